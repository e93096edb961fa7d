"""CPU checks of the CUDA path that need no GPU: the GPU weight layout (decoded here exactly as the
kernels decode it), the op schemas and their fake implementations."""
from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from decdec import kernels, ops
from decdec.formats import LUTWeight, UniformWeight


def decode_like_kernel(qweight: torch.Tensor, bits: int, n: int, k: int) -> torch.Tensor:
    """The kernels' code_pair() on every (tile, lane, k-step, register), mapped back to [n, k]."""
    rt, kt = -(-n // 16), -(-k // 256)
    nw = 16 if bits == 4 else 12
    words = (qweight.to(torch.int64) & 0xFFFFFFFF).view(rt, kt, nw // 4, 32, 4).permute(0, 1, 3, 2, 4)
    words = words.reshape(rt, kt, 32, nw)
    codes = torch.zeros(rt * 16, kt * 256, dtype=torch.int64)
    lane = torch.arange(32)
    g, t = lane // 4, lane % 4
    for s in range(16):
        for i in range(4):
            if bits == 4:
                pair = (words[..., s] >> (4 * i)) & 0x000F000F
            elif (j := 4 * (s % 4) + i) < 15:
                pair = (words[..., 3 * (s // 4) + j // 5] >> (3 * (j % 5))) & 0x00070007
            else:  # the spare pair: bit b at bits 15 and 31 of word 3m + b
                w0 = 3 * (s // 4)
                pair = sum(((words[..., w0 + b] >> (15 - b)) & (0x00010001 << b)) for b in range(3))
            for h in range(2):
                q = (pair >> 16) if h else (pair & 0xFFFF)  # [rt, kt, 32]
                rows = (torch.arange(rt).view(-1, 1, 1) * 16 + g + 8 * (i & 1)).expand(rt, kt, 32)
                cols = (torch.arange(kt).view(1, -1, 1) * 256 + 16 * s + 4 * t + 2 * (i >> 1) + h).expand(rt, kt, 32)
                codes[rows, cols] = q
    return codes[:n, :k]


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("shape", [(40, 600), (16, 256), (33, 1100)])
def test_layout_round_trip(bits, shape):
    n, k = shape
    codes = torch.randint(0, 1 << bits, (n, k), dtype=torch.uint8)
    qweight = kernels.pack_tiles(codes, bits)
    assert qweight.dtype == torch.int32
    assert qweight.numel() == -(-n // 16) * -(-k // 256) * 32 * (16 if bits == 4 else 12)
    assert torch.equal(decode_like_kernel(qweight, bits, n, k), codes.to(torch.int64))


def test_uniform_meta():
    w = torch.randn(20, 300)
    q = UniformWeight.quantize(w, 3, 64)
    gw = kernels.to_gpu_weight(q, torch.device("cpu"))
    assert gw.meta.shape == (5, 32)
    meta = gw.meta.to(torch.int64) & 0xFFFFFFFF
    assert torch.equal((meta[:, :20] >> 16).t(), q.zeros.to(torch.int64))
    scales = (meta[:, :20] & 0xFFFF).to(torch.int16).view(torch.float16).t()
    assert torch.equal(scales, q.scales)
    assert torch.equal(decode_like_kernel(gw.qweight, 3, 20, 300), q.codes().to(torch.int64))


def test_lut_meta():
    lut = torch.randn(20, 16).half()
    q = LUTWeight.from_codes(torch.randint(0, 16, (20, 300), dtype=torch.uint8), lut, 4)
    gw = kernels.to_gpu_weight(q, torch.device("cpu"))
    assert gw.meta.shape == (32, 16) and torch.equal(gw.meta[:20], lut)


def test_group_size_not_multiple_of_16_is_refused():
    q = UniformWeight.quantize(torch.randn(16, 100), 4, 40)
    with pytest.raises(ValueError, match="multiple of 16"):
        kernels.to_gpu_weight(q, torch.device("cpu"))


def test_fake_implementations_give_shapes():
    with FakeTensorMode():
        x = torch.empty(3, 600, dtype=torch.float16)
        qw = torch.empty(10, dtype=torch.int32)
        meta = torch.empty(5, 48, dtype=torch.int32)
        assert torch.ops.decdec.gemv(x, qw, meta, None, 0, 3, 128, 40, 600).shape == (3, 40)
        env = torch.empty(600)
        out = torch.ops.decdec.gemv_dec(x, qw, meta, None, 0, 3, 128, 40, 600, env, None, 8, 1, 32,
                                        torch.empty(40, dtype=torch.float16), 4, torch.empty(3, dtype=torch.int32))
        assert out.shape == (3, 40) and out.dtype == torch.float16
        sel = torch.ops.decdec.select_channels(torch.empty(2, 2600, dtype=torch.bfloat16), torch.empty(2600), 8)
        assert sel.shape == (2, 8 + 8 + 8 * 552 // 1024) and sel.dtype == torch.int64
        dense = torch.ops.decdec.dequantize(qw, meta, 0, 3, 128, 40, 600, torch.bfloat16)
        assert dense.shape == (40, 600) and dense.dtype == torch.bfloat16


def test_fake_gemv_dec_takes_scales_in_host_memory():
    """Residual scales in (pinned) host memory beside CUDA operands, as under scales_on_host: the
    fake implementation that torch.compile traces gives the output on x's device."""
    with FakeTensorMode():
        x = torch.empty(3, 600, dtype=torch.float16, device="cuda")
        qw = torch.empty(10, dtype=torch.int32, device="cuda")
        meta = torch.empty(5, 48, dtype=torch.int32, device="cuda")
        env, mailbox = torch.empty(600, device="cuda"), torch.empty(120, dtype=torch.int64, device="cuda")
        out = torch.ops.decdec.gemv_dec(x, qw, meta, None, 0, 3, 128, 40, 600, env, None, 8, 1, 32,
                                        torch.empty(40, dtype=torch.float16), 4, mailbox)
        assert out.shape == (3, 40) and out.device == x.device


def test_pinned_residual_keeps_the_scales_on_both_sides(monkeypatch):
    """pin_residuals, with plain host memory standing in for pinned memory: the scales of the
    linears side by side on the device and in host memory, the latter shared by the linears' views."""
    from decdec.residual import quantize_residual
    monkeypatch.setattr(ops, "alloc_pinned", lambda nbytes: torch.empty(nbytes, dtype=torch.uint8))
    packs = [quantize_residual(torch.randn(n, 96)) for n in (32, 48)]
    r, views = kernels.pin_residuals(packs, torch.device("cpu"))
    expected = torch.cat([p.scales for p in packs])
    assert torch.equal(r.scales, expected) and torch.equal(r.host_scales, expected)
    assert views[1].scales.data_ptr() == r.host_scales[32:].data_ptr()
    for view, pack in zip(views, packs):
        assert torch.equal(view.scales, pack.scales) and torch.equal(view.packed, pack.packed)


def test_ops_report_missing_extension_clearly():
    if ops.available():
        pytest.skip("the extension is available here")
    with pytest.raises(RuntimeError, match="decdec._C|CUDA device"):
        ops.require()


def test_zero_point_outside_the_code_range_is_refused():
    q = UniformWeight.quantize(torch.randn(16, 256), 3, 128)
    q.zeros[0, 0] = 8
    with pytest.raises(ValueError, match="zero points"):
        kernels.to_gpu_weight(q, torch.device("cpu"))


@pytest.mark.parametrize("fmt", ["uniform", "lut"])
def test_side_by_side_weights_equal_the_stacked_weight(fmt):
    """A fused group's GPU weight is the GPU weight of its members' rows stacked."""
    sizes, k = (32, 48, 16), 300
    if fmt == "uniform":
        w = torch.randn(sum(sizes), k)
        parts = [UniformWeight.quantize(p, 3, 64) for p in w.split(sizes)]
        stacked = UniformWeight.quantize(w, 3, 64)  # row-wise: the same codes, scales and zeros
    else:
        codes, lut = torch.randint(0, 8, (sum(sizes), k), dtype=torch.uint8), torch.randn(sum(sizes), 8).half()
        parts = [LUTWeight.from_codes(c, t, 3) for c, t in zip(codes.split(sizes), lut.split(sizes))]
        stacked = LUTWeight.from_codes(codes, lut, 3)
    fused = kernels.concat_gpu_weights([kernels.to_gpu_weight(p, torch.device("cpu")) for p in parts])
    whole = kernels.to_gpu_weight(stacked, torch.device("cpu"))
    assert (fused.out_features, fused.in_features) == (whole.out_features, whole.in_features)
    assert torch.equal(fused.qweight, whole.qweight) and torch.equal(fused.meta, whole.meta)
    with pytest.raises(ValueError, match="multiples of 16"):
        kernels.concat_gpu_weights([kernels.to_gpu_weight(UniformWeight.quantize(torch.randn(40, k), 3, 64),
                                                          torch.device("cpu"))] * 2)


def test_group_output_is_computed_once_per_input():
    from decdec.linear import DecDECLinear, SelectionGroup
    group = SelectionGroup("a+b+c")
    members = [DecDECLinear(UniformWeight.quantize(torch.randn(16, 64), 3, 32), selection=group) for _ in range(3)]
    assert group.members == members and kernels.fusable(members)
    calls = []

    def compute():
        calls.append(1)
        return torch.randn(2, 48)

    x, y = torch.randn(2, 64), torch.randn(2, 64)
    outs = [group.shared_output(m, x, compute) for m in members]
    assert len(calls) == 1 and all(o is outs[0] for o in outs)
    assert group._shared is None, "kept after every member had it"
    group.shared_output(members[0], x, compute)
    group.shared_output(members[1], y, compute)  # another input: computed again
    assert len(calls) == 3


def test_holding_sms_needs_cuda():
    from decdec.timing import time_call
    with pytest.raises(ValueError, match="CUDA"):
        time_call(lambda: None, "cpu", hold_sms=4)
