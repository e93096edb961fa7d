"""GPU tests of the CUDA kernels against the reference path (skipped without CUDA + decdec._C).

Fresh random inputs per case; outputs poisoned before each run (the caching allocator hands the
op the block we just filled with NaN); selections compared with the CPU reference bit for bit.
"""
from __future__ import annotations

import copy
import os
import shutil
import subprocess

import pytest

import torch
from torch import nn

import decdec
from decdec import kernels, ops
from helpers import special_inputs
from decdec.formats import LUTWeight, UniformWeight
from decdec.linear import DecDECLinear, SelectionGroup
from decdec.residual import quantize_residual, residual_correction
from decdec.selection import rank_envelope, select_channels

pytestmark = pytest.mark.gpu
DEV = torch.device("cuda")
TOL = {torch.float16: 2e-3, torch.bfloat16: 1e-2}


def poison(shape, dtype):
    """Leaves a NaN-filled block of exactly this size at the top of the allocator's cache."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    p = torch.full(shape, float("nan"), dtype=dtype, device=DEV)
    del p


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double().cpu(), ref.double().cpu()
    assert not out.isnan().any(), "unwritten (poisoned) or NaN outputs"
    return ((out - ref).norm() / ref.double().norm().clamp_min(1e-30)).item()


def make_weight(fmt: str, bits: int, n: int, k: int, group_size: int = 128, zero_lut: bool = False):
    if fmt == "uniform":
        return UniformWeight.quantize(torch.randn(n, k), bits, min(group_size, k))
    lut = torch.zeros(n, 1 << bits) if zero_lut else torch.randn(n, 1 << bits)
    return LUTWeight.from_codes(torch.randint(0, 1 << bits, (n, k), dtype=torch.uint8), lut, bits)


SHAPES = [(40, 576), (200, 1000), (48, 301), (1536, 576), (1000, 4096)]


@pytest.mark.parametrize("fmt", ["uniform", "lut"])
@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gemv_matches_reference(fmt, bits, dtype):
    for n, k in SHAPES:
        gs = 32 if k == 301 else 128
        q = make_weight(fmt, bits, n, k, gs)
        gw = kernels.to_gpu_weight(q, DEV)
        dense = q.dequantize().to(DEV)
        for batch in (1, 3, 8):
            x = torch.randn(batch, k, device=DEV).to(dtype)
            bias = torch.randn(n, device=DEV).to(dtype) if batch == 3 else None
            ref = x.float() @ dense.t() + (bias.float() if bias is not None else 0)
            poison((batch, n), dtype)
            out = gw.gemv(x, bias)
            assert out.shape == (batch, n) and out.dtype == dtype
            err = rel_err(out, ref)
            assert err < TOL[dtype], (n, k, batch, err)


def output_rounding_ratio(gw, dense: torch.Tensor, x: torch.Tensor) -> float:
    """The GEMV's error against an fp64 reference, over the error of rounding that reference to x's dtype."""
    ref = x.double().cpu() @ dense.double().t()
    err = (gw.gemv(x, None).double().cpu() - ref).norm()
    return (err / (ref.to(x.dtype).double() - ref).norm()).item()


@pytest.mark.parametrize("fmt", ["uniform", "lut"])
@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gemv_error_is_output_rounding(fmt, bits, dtype):
    """Weights are decoded exactly (q - z, LUT values) and products summed in fp32, so the error is the
    rounding of the output, also when x has a large mean (large sums against small outputs)."""
    for gs in (128, 64):  # uniform: the group-size-128 path and the generic one
        q = make_weight(fmt, bits, 2048, 4096, gs)
        gw = kernels.to_gpu_weight(q, DEV)
        for mean in (0.0, 10.0):
            x = (torch.randn(4, 4096, device=DEV) + mean).to(dtype)
            ratio = output_rounding_ratio(gw, q.dequantize(), x)
            assert ratio < 1.1, (gs, mean, ratio)


@pytest.mark.parametrize("fmt", ["uniform", "lut"])
@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dequantize_is_exact(fmt, bits, dtype):
    q = make_weight(fmt, bits, 200, 1000)
    gw = kernels.to_gpu_weight(q, DEV)
    poison((200, 1000), dtype)
    assert torch.equal(gw.dequantize(dtype).cpu(), q.dequantize().to(dtype))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("k", [576, 1024, 2600, 4096])
def test_selection_identical_to_reference(dtype, k):
    env = rank_envelope(torch.randn(64, k) * torch.rand(k) * 3)
    x = special_inputs(5, k, env, dtype)
    for k_chunk in (0, 1, 3, 8, 64, 500, 1023, 1024):
        ref = select_channels(x, k_chunk, env)
        got = ops.select_channels(x.to(DEV), env.to(DEV), k_chunk)
        assert torch.equal(got.cpu(), ref), (k, k_chunk)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_selection_for_every_small_quota(dtype):
    """The threshold search starts at the bucket of a chunk's largest |x| and gallops from there:
    every k_chunk up to 40 on 48 tokens whose scales spread that bucket and the gaps after it."""
    k = 4096
    env = rank_envelope(torch.randn(64, k) * torch.rand(k) * 3)
    x = (torch.randn(48, k) * torch.linspace(0.05, 6, 48).unsqueeze(1)).to(dtype)
    x_dev, env_dev = x.to(DEV), env.to(DEV)
    for k_chunk in range(1, 41):
        assert torch.equal(ops.select_channels(x_dev, env_dev, k_chunk).cpu(), select_channels(x, k_chunk, env)), k_chunk


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("k", [100, 576, 1024, 1540, 2600])
def test_select_masked_identical_to_reference(dtype, k):
    env = rank_envelope(torch.randn(64, k) * torch.rand(k) * 3)
    x = special_inputs(7, k, env, dtype)
    for k_chunk in (0, 1, 8, 64, 1024):
        expected = kernels.masked_inputs(x, select_channels(x, k_chunk, env))
        poison((7, 2 * k), dtype)
        got = ops.select_masked(x.to(DEV), env.to(DEV), k_chunk).cpu()
        assert torch.equal(got.view(torch.int16), expected.view(torch.int16)), (k, k_chunk)  # bits: NaN, -0


def test_selection_with_degenerate_envelopes():
    k = 1500
    x = torch.randn(3, k).half()
    for env in (torch.zeros(k), torch.full((k,), 0.5), torch.linspace(3, 0, k)):
        for k_chunk in (1, 16, 1024):
            ref = select_channels(x, k_chunk, env)
            assert torch.equal(ops.select_channels(x.to(DEV), env.to(DEV), k_chunk).cpu(), ref)


class Layer:
    """One quantized linear with its residual, on the GPU, plus the reference computation."""

    def __init__(self, fmt: str, bits: int, n: int, k: int, zero_base: bool = False, bias: bool = True):
        w = torch.randn(n, k)
        self.q = make_weight(fmt, bits, n, k, zero_lut=zero_base)
        base = self.q.dequantize()
        self.pack = quantize_residual(w - base if not zero_base else w * 0.1)
        self.dense = base.to(DEV)
        self.gw = kernels.to_gpu_weight(self.q, DEV)
        self.res, (self.pack,) = kernels.pin_residuals([self.pack], DEV)
        self.mailbox = ops.new_mailbox(8, n, DEV)
        self.env = rank_envelope(torch.randn(128, k) * (torch.rand(k) * 2 + 0.1))
        self.env_dev = self.env.to(DEV)
        self.bias = torch.randn(n) if bias else None
        # on the device beforehand: no host copy may happen inside a graph capture
        self.bias_dev = {dt: self.bias.to(DEV, dt) for dt in (torch.float16, torch.bfloat16)} if bias else None
        self.n, self.k = n, k

    def run(self, x: torch.Tensor, k_chunk: int, n_tb: int = 8, channels: torch.Tensor | None = None,
            scales: torch.Tensor | None = None):
        """``scales``: the residual scales to read (default: the copy on the GPU)."""
        g, r = self.gw, self.res
        bias = None if self.bias is None else self.bias_dev[x.dtype]
        return ops.gemv_dec(x, g.qweight, g.meta, bias, g.fmt, g.bits, g.group_size, g.out_features, g.in_features,
                            self.env_dev, channels, k_chunk, r.ptr, r.stride, r.scales if scales is None else scales,
                            n_tb, self.mailbox)

    def reference(self, x: torch.Tensor, k_chunk: int) -> torch.Tensor:
        xc = x.cpu()
        channels = select_channels(xc, k_chunk, self.env)
        out = x.float().cpu() @ self.dense.cpu().t() + residual_correction(xc.float(), channels, self.pack)
        if self.bias is not None:
            out = out + self.bias.to(x.dtype).float()
        return out


@pytest.mark.parametrize("fmt,bits", [("uniform", 3), ("uniform", 4), ("lut", 3), ("lut", 4)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gemv_dec_matches_reference(fmt, bits, dtype):
    for n, k in [(200, 1000), (1536, 2600), (96, 576)]:
        layer = Layer(fmt, bits, n, k)
        for batch in (1, 4, 8):
            x = torch.randn(batch, k, device=DEV).to(dtype)
            for k_chunk, n_tb in ((0, 8), (1, 1), (8, 3), (64, 16), (1024, 8)):
                poison((batch, n), dtype)
                out = layer.run(x, k_chunk, n_tb)
                err = rel_err(out, layer.reference(x, k_chunk))
                assert err < TOL[dtype], (n, k, batch, k_chunk, n_tb, err)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_correction_alone(dtype):
    """A zero base weight leaves only the correction: a sharp check of selection, fetch and product,
    each token with its own selection."""
    layer = Layer("lut", 4, 520, 2600, zero_base=True, bias=False)
    x = special_inputs(6, 2600, layer.env, torch.float32).nan_to_num(0.0).to(DEV, dtype)
    for k_chunk in (1, 5, 32, 1024):
        out = layer.run(x, k_chunk, n_tb=7)
        err = rel_err(out, layer.reference(x, k_chunk))
        assert err < TOL[dtype], (k_chunk, err)
        # given channels (the other selection modes) take the same path
        chans = select_channels(x.cpu(), k_chunk, layer.env).to(DEV)
        assert torch.equal(layer.run(x, k_chunk, n_tb=7, channels=chans), out)


@pytest.mark.parametrize("fmt,bits", [("uniform", 3), ("uniform", 4), ("lut", 3), ("lut", 4)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_scales_on_host_give_the_device_scales_output(fmt, bits, dtype):
    """Scales read from pinned host memory (plain loads) give the output of the scales on the GPU
    (cp.async) bit for bit: selected and given channels, a block's last scales not a multiple of 8
    (the 16-byte loads' tail), and 9004 outputs in one DEC block (two passes of staged scales)."""
    for (n, k), n_tbs in (((1004, 2600), (1, 3, 16)), ((9004, 1024), (1, 7))):
        layer = Layer(fmt, bits, n, k)
        for batch in (1, 3):
            x = torch.randn(batch, k, device=DEV).to(dtype)
            for k_chunk in (1, 8, 64):
                given = select_channels(x.cpu(), k_chunk, layer.env).to(DEV)
                for n_tb in n_tbs:
                    for channels in (None, given):
                        on_gpu = layer.run(x, k_chunk, n_tb, channels)
                        poison((batch, n), dtype)
                        on_host = layer.run(x, k_chunk, n_tb, channels, scales=layer.res.host_scales)
                        assert torch.equal(on_host, on_gpu), (n, batch, k_chunk, n_tb, channels is None)


def test_repeated_runs_are_bitwise_identical():
    layer = Layer("uniform", 3, 4096, 4096)
    x = torch.randn(4, 4096, device=DEV).half()
    first = layer.run(x, 16, n_tb=16)
    for _ in range(100):
        assert torch.equal(layer.run(x, 16, n_tb=16), first)
    assert torch.equal(layer.mailbox, torch.zeros_like(layer.mailbox))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_selection_over_many_chunks(dtype):
    """More chunks than DEC warps: later selection rounds read x staged in shared memory (up to 16
    chunks), the rest straight from memory. A zero base leaves only the correction, and the given
    channels must give the very same output."""
    for k in (14336, 26000):  # 14 full chunks; 25 full chunks and a partial one
        layer = Layer("lut", 4, 264, k, zero_base=True, bias=False)
        x = special_inputs(3, k, layer.env, torch.float32).nan_to_num(0.0).to(DEV, dtype)
        for k_chunk in (1, 7, 1024):
            poison((3, 264), dtype)
            out = layer.run(x, k_chunk, n_tb=4)
            err = rel_err(out, layer.reference(x, k_chunk))
            assert err < TOL[dtype], (k, k_chunk, err)
            chans = select_channels(x.cpu(), k_chunk, layer.env).to(DEV)
            assert torch.equal(layer.run(x, k_chunk, n_tb=4, channels=chans), out), (k, k_chunk)


@pytest.mark.parametrize("scales_on_host", [False, True])
def test_cuda_graph_capture_and_replay(scales_on_host):
    layer = Layer("uniform", 4, 1000, 4096)
    scales = layer.res.host_scales if scales_on_host else layer.res.scales
    x = torch.randn(2, 4096, device=DEV).half()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        layer.run(x, 8, scales=scales)  # warm up outside the capture
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = layer.run(x, 8, scales=scales)
        base = layer.gw.gemv(x, None)
    for _ in range(3):
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, layer.run(x, 8))  # eager, the scales on the GPU
        assert torch.equal(base, layer.gw.gemv(x, None))


def test_chained_launches_read_their_input_after_the_previous_kernel():
    """Each call takes the previous call's output as x. The kernels are launched dependent (they may
    start while the kernel before them still runs) and must read x only after it is written: eager
    and graph-replayed chains give, bit for bit, the outputs of calls separated by synchronizations."""
    layers = [Layer(fmt, bits, 2048, 2048) for fmt, bits in (("uniform", 3), ("lut", 4), ("uniform", 4), ("lut", 3))]

    def chain(x, sync):
        outs = []
        for i, layer in enumerate(layers * 2):
            x = layer.run(x, 8, n_tb=8) if i % 2 else layer.gw.gemv(x, None)
            outs.append(x)
            if sync:
                torch.cuda.synchronize()
        return outs

    x = torch.randn(2, 2048, device=DEV).bfloat16()  # bf16: eight products of 2048 channels stay finite
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        chain(x, sync=False)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        replayed = chain(x, sync=False)
    for _ in range(3):
        x.copy_(torch.randn_like(x))
        expected = chain(x, sync=True)
        assert all(e.isfinite().all() for e in expected)
        for got in (chain(x, sync=False), (graph.replay(), replayed)[1]):
            torch.cuda.synchronize()
            assert all(torch.equal(g, e) for g, e in zip(got, expected))


def gemv_kernels_sass() -> dict[str, list[str]]:
    """SASS of each GEMV kernel in the built extension, by "arch mangled-name" (cuobjdump of decdec._C)."""
    from torch.utils.cpp_extension import CUDA_HOME
    tool = shutil.which("cuobjdump") or (CUDA_HOME and shutil.which("cuobjdump", path=os.path.join(CUDA_HOME, "bin")))
    if not tool:
        pytest.skip("no cuobjdump (CUDA toolkit) to read the extension's SASS")
    dump = subprocess.run([tool, "-sass", decdec._C.__file__], capture_output=True, text=True, check=True).stdout
    kernels_sass, arch, name = {}, "", None
    for line in dump.splitlines():
        if line.strip().startswith("arch ="):
            arch = line.split("=")[1].strip()
        elif "Function :" in line:
            name = line.split("Function :")[1].strip()
            name = f"{arch} {name}" if "gemv_kernel" in name else None
            if name:
                kernels_sass[name] = []
        elif name:
            kernels_sass[name].append(line)
    return kernels_sass


def test_first_weight_tile_requested_before_the_wait():
    """The dependent launch pays only if a GEMV block's first weight loads go out before its
    griddepcontrol.wait (ACQBULK in SASS). Nothing in the source can force that order: ptxas hoists
    the wait to the top of the kernel unless the loads sit in a branch it keeps (a kernel parameter
    read beside the wait was enough to lose it in all LUT kernels, results/h200/next_starts_early_ab.txt)."""
    sass = gemv_kernels_sass()
    assert len(sass) >= 24, f"expected the 24 GEMV instantiations, found {len(sass)}"
    first = lambda lines, op: next((i for i, line in enumerate(lines) if op in line), None)
    waiting = {name: lines for name, lines in sass.items() if first(lines, "ACQBULK") is not None}
    if not waiting:
        pytest.skip("built only for architectures without dependent launch (before sm_90)")
    for name, lines in waiting.items():
        load = first(lines, "LDG.E.NA.128")
        assert load is not None and load < first(lines, "ACQBULK"), f"{name}: the wait comes before the first weight tile's loads"


def test_kernels_correct_with_sms_held():
    """With SMs taken by another kernel, the persistent grid is not all resident at once: the GEMV
    and the DEC merge (GEMV blocks waiting on DEC blocks) must still finish and be right."""
    from decdec.timing import sms_held
    layer = Layer("uniform", 3, 4096, 4096)
    x = torch.randn(1, 4096, device=DEV).half()
    base_ref, dec_ref = layer.gw.gemv(x, None), layer.run(x, 16, n_tb=16)
    with sms_held(torch.cuda.get_device_properties(DEV).multi_processor_count // 2, DEV):
        base, dec = layer.gw.gemv(x, None), layer.run(x, 16, n_tb=16)
        done = torch.cuda.Event()
        done.record()
        done.synchronize()  # an event, not the device: the held SMs are released only after the block
    assert torch.equal(base, base_ref) and torch.equal(dec, dec_ref)


@pytest.mark.parametrize("scales_on_host", [False, True])
def test_torch_compile(scales_on_host):
    layer = Layer("lut", 3, 256, 1024)
    scales = layer.res.host_scales if scales_on_host else layer.res.scales
    x = torch.randn(1, 1024, device=DEV).half()
    fn = torch.compile(lambda x: layer.run(x * 2, 8, scales=scales) + 1, fullgraph=True)
    assert torch.equal(fn(x), layer.run(x * 2, 8) + 1)


def test_argument_checks_raise():
    layer = Layer("uniform", 3, 64, 576)
    g = layer.gw
    x = torch.randn(1, 576, device=DEV).half()
    bad = [
        (x.float(), "float16 or bfloat16"),
        (x.cpu(), "CUDA"),
        (torch.randn(9, 576, device=DEV).half(), "1..8"),
        (torch.randn(1, 575, device=DEV).half(), r"\[tokens, 576\]"),
        (torch.randn(576, 2, device=DEV).half().t(), "contiguous"),
    ]
    for xb, msg in bad:
        with pytest.raises((RuntimeError, ValueError, TypeError), match=msg):
            g.gemv(xb, None)
    with pytest.raises((RuntimeError, ValueError), match="bias"):
        g.gemv(x, torch.zeros(65, device=DEV).half())
    with pytest.raises((RuntimeError, ValueError), match="k_chunk"):
        layer.run(x, 1025)
    with pytest.raises((RuntimeError, ValueError), match="n_tb"):
        layer.run(x, 8, n_tb=0)
    with pytest.raises((RuntimeError, ValueError), match="pinned host memory; got a tensor on cpu that is not pinned"):
        layer.run(x, 8, scales=layer.res.scales.cpu())
    misaligned = kernels.pinned_copy(torch.zeros(65, dtype=torch.float16))[1:]
    with pytest.raises((RuntimeError, ValueError), match="16-byte aligned"):
        layer.run(x, 8, scales=misaligned)
    with pytest.raises((RuntimeError, ValueError), match="qweight"):
        ops.gemv(x, g.qweight[:-1], g.meta, None, g.fmt, g.bits, g.group_size, g.out_features, g.in_features)


@pytest.mark.parametrize("mode", ["decdec", "exact", "none"])
def test_decdec_linear_uses_kernels(mode):
    n, k = 300, 2100
    w = torch.randn(n, k)
    q = UniformWeight.quantize(w, 3, 128)
    env = rank_envelope(torch.randn(64, k))
    group = SelectionGroup("o_proj", env, mode=mode, k_chunk=16 if mode != "none" else 0)
    layer = DecDECLinear(q, torch.randn(n), quantize_residual(w - q.dequantize()), group)
    x = torch.randn(3, k).half().float()  # fp16 values: the same selection on both sides
    ref = layer(x)  # CPU reference path, fp32
    layer = layer.to(DEV)
    out = layer(x.to(DEV).half())
    assert layer._gpu is not None, "the CUDA path did not run"
    assert rel_err(out, ref.to(DEV)) < 3e-3
    xp = torch.randn(2, 16, k).half()  # 32 tokens: the prefill path (dequantize + cuBLAS)
    prefill = layer(xp.to(DEV))
    assert prefill.shape == (2, 16, n)
    assert rel_err(prefill.float(), xp.float() @ q.dequantize().t() + layer.bias.float().cpu()) < 3e-3
    assert decdec.cuda_available()


def test_scales_on_host_setting_keeps_the_output():
    """SelectionGroup.scales_on_host switches a layer between the two copies of its scales at run
    time: the same output, nothing made again."""
    n, k = 300, 2100
    w = torch.randn(n, k)
    q = UniformWeight.quantize(w, 3, 128)
    group = SelectionGroup("o_proj", rank_envelope(torch.randn(64, k)), mode="decdec", k_chunk=16)
    layer = DecDECLinear(q, torch.randn(n), quantize_residual(w - q.dequantize()), group).to(DEV)
    x = torch.randn(3, k, device=DEV).half()
    on_gpu = layer(x)
    state = layer._gpu
    group.scales_on_host = True
    assert torch.equal(layer(x), on_gpu)
    assert layer._gpu is state, "the setting rebuilt the GPU state"
    assert layer.residual.scales.data_ptr() == state.residual.host_scales.data_ptr()  # the host keeps one copy


@pytest.mark.parametrize("mode", ["decdec", "full"])
@pytest.mark.parametrize("batched", [False, True])
def test_compensated_prefill_matches_reference(mode, batched):
    """Decode-equivalent evaluation on CUDA (more than 8 tokens): the plain prefill product plus
    every token's correction equals the CPU reference."""
    from decdec.batched import use_batched_compensation
    n, k = 300, 2100
    w = torch.randn(n, k)
    q = UniformWeight.quantize(w, 3, 128)
    group = SelectionGroup("o_proj", rank_envelope(torch.randn(64, k)), mode=mode, k_chunk=16, compensate_prefill=True)
    layer = DecDECLinear(q, torch.randn(n), quantize_residual(w - q.dequantize()), group)
    if batched:
        use_batched_compensation(layer)
    x = torch.randn(2, 20, k).half().float()  # fp16 values: the same selection on both sides
    ref = layer(x)  # CPU, fp32
    plain = x @ q.dequantize().t() + layer.bias
    layer = layer.to(DEV)
    out = layer(x.to(DEV).half())
    assert out.shape == (2, 20, n) and out.dtype == torch.float16
    assert rel_err(out, ref.to(DEV)) < 3e-3
    assert rel_err(ref, plain) > 1e-2  # the correction is not negligible: the check above means something


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_batched_evaluation_path_on_gpu(dtype):
    """Evaluation on CUDA, 2 x 700 tokens: DecDEC's batched selection runs in the selection kernel
    and equals the CPU reference; the compensated output (one product of [x | m] with the weight
    beside the residual) equals the CPU reference for every selection mode."""
    from decdec.batched import fast_select, use_batched_compensation
    d, n = 1600, 200
    env = rank_envelope(torch.randn(64, d) * torch.rand(d) * 3)
    x = special_inputs(1400, d, env, dtype).reshape(2, 700, d)
    for k_chunk in (1, 8, 64, 1024):
        assert torch.equal(fast_select("decdec", x.to(DEV), k_chunk, env).cpu(), select_channels(x, k_chunk, env))
    w = torch.randn(n, d)
    q = UniformWeight.quantize(w, 3, 128)
    group = SelectionGroup("o_proj", env, torch.rand(d), compensate_prefill=True)
    layer = DecDECLinear(q, torch.randn(n), quantize_residual(w - q.dequantize()), group)
    use_batched_compensation(layer)
    finite = x.float().nan_to_num(0.0, 0.0, 0.0).to(dtype)  # NaN/inf would swamp the comparison
    gpu_layer = copy.deepcopy(layer).to(DEV)
    for mode, k_chunk in (("decdec", 8), ("exact", 64), ("static", 16), ("full", 0)):
        group.configure(mode=mode, k_chunk=k_chunk)
        gpu_layer.selection.configure(mode=mode, k_chunk=k_chunk)
        ref = layer(finite.float())
        out = gpu_layer(finite.to(DEV))
        assert out.dtype == dtype and rel_err(out, ref) < TOL[dtype], mode


def fused_group(mode: str, compensate_prefill: bool = False):
    """Three linears reading one input (q/k/v-like: different out_features, one without bias), as
    a container whose forward calls them in order on the same tensor."""
    k = 1100
    group = SelectionGroup("q+k+v", rank_envelope(torch.randn(64, k)), mode=mode, k_chunk=16 if mode != "none" else 0,
                           compensate_prefill=compensate_prefill)
    layers = nn.ModuleList()
    for n, bias in ((96, True), (48, False), (64, True)):
        w = torch.randn(n, k)
        q = UniformWeight.quantize(w, 3, 128)
        layers.append(DecDECLinear(q, torch.randn(n) if bias else None, quantize_residual(w - q.dequantize()), group))
    return group, layers, k


@pytest.mark.parametrize("mode", ["decdec", "exact", "none"])
def test_group_runs_as_one_launch(mode):
    group, layers, k = fused_group(mode)
    x = torch.randn(3, k).half().float()  # fp16 values: the same selection on both sides
    refs = [layer(x) for layer in layers]  # CPU reference path, fp32
    layers.to(DEV)
    xd = x.to(DEV).half()
    outs = [layer(xd) for layer in layers]
    assert group._gpu is not None and all(layer._gpu is None for layer in layers), "the fused path did not run"
    assert group._shared is None, "the shared output outlived its last member"
    for out, ref in zip(outs, refs):
        assert out.shape == ref.shape and rel_err(out, ref.to(DEV)) < 3e-3
    alone = layers[1](torch.randn(2, k, device=DEV).half())  # a member called on its own input
    assert alone.shape == (2, 48) and group._shared is not None
    xp = torch.randn(2, 16, k).half()  # the prefill path
    for layer, out in zip(layers, [layer(xp.to(DEV)) for layer in layers]):
        plain = xp.float() @ layer.quantized_weight.dequantize().cpu().t()
        plain = plain + (layer.bias.float().cpu() if layer.bias is not None else 0)
        assert rel_err(out.float(), plain) < 3e-3


def test_group_compensated_prefill_and_graph_capture():
    group, layers, k = fused_group("decdec", compensate_prefill=True)
    x = torch.randn(2, 12, k).half().float()
    refs = [layer(x) for layer in layers]
    layers.to(DEV)
    outs = [layer(x.to(DEV).half()) for layer in layers]
    for out, ref in zip(outs, refs):
        assert rel_err(out, ref.to(DEV)) < 3e-3
    static_x = torch.randn(1, 1, k, device=DEV).half()
    reference = copy.deepcopy(layers).cpu()
    graph = torch.cuda.CUDAGraph()
    for layer in layers:  # warm up outside the graph
        layer(static_x)
    with torch.cuda.graph(graph):
        static_out = [layer(static_x) for layer in layers]
    for _ in range(3):
        static_x.copy_(torch.randn(1, 1, k).half())
        graph.replay()
        expected = [layer(static_x.cpu().float()) for layer in reference]
        for out, ref in zip(static_out, expected):
            assert rel_err(out, ref.to(DEV)) < 3e-3
