"""The CUDA path of :class:`decdec.DecDECLinear`: GPU weight layout, pinned residual, forward.

The canonical (on-disk, CPU) formats of ``formats.py`` and ``residual.py`` are converted once,
when a layer first runs on a CUDA device:
- the quantized weight into tiles of 16 output rows x 256 input channels laid out as the
  mma.m16n8k16 A fragments of each lane (``csrc/decdec_kernels.h`` gives the exact layout), padded
  with code 0, plus its meta (uniform: scale | zero << 16 per group and row; LUT: the tables);
- the residual rows into pinned, mapped host memory with rows padded to 16 bytes, which the DEC
  thread blocks read directly (zero-copy); the module's ResidualPack is replaced by a view of it.
  The per-output scales are kept twice, on the GPU and in pinned host memory: the selection
  group's run-time setting ``scales_on_host`` picks which one the DEC blocks read.
The linears of a selection group (q/k/v, gate/up) are converted side by side, outputs
concatenated, and run as one launch: one weight stream, one selection, one residual fetch.
Decode-equivalent evaluation (every token of a long input compensated) is one cuBLAS product per
launch instead, with the residual also kept on the GPU as a 4-bit weight (``_compensated_product``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from . import ops
from .formats import LUTWeight, QuantizedWeight, UniformWeight, pack_codes, unpack_codes
from .residual import ResidualPack
from .selection import CHUNK_SIZE

TILE_ROWS, TILE_K = 16, 256
DEFAULT_N_TB = 16  # DEC thread blocks when the tuned config gives none (best in bench_dec on the H100)


@dataclass
class GPUWeight:
    qweight: Tensor  # int32, the tiled layout
    meta: Tensor  # uniform: int32 [groups, Npad]; LUT: fp16 [Npad, 2**bits]
    fmt: int
    bits: int
    group_size: int
    out_features: int
    in_features: int

    def gemv(self, x: Tensor, bias: Tensor | None) -> Tensor:
        return ops.gemv(x, self.qweight, self.meta, bias, self.fmt, self.bits, self.group_size, self.out_features,
                        self.in_features)

    def dequantize(self, dtype: torch.dtype) -> Tensor:
        return ops.dequantize(self.qweight, self.meta, self.fmt, self.bits, self.group_size, self.out_features,
                              self.in_features, dtype)


@dataclass
class GPUResidual:
    """The residual of a launch: rows in pinned host memory, scales both on the device and in
    pinned host memory (fetched with the rows, zero-copy, under ``SelectionGroup.scales_on_host``),
    so that switching between the two uploads nothing."""
    host: Tensor  # uint8 [in, stride] pinned + mapped; keeps the memory alive
    ptr: int  # its device-visible address (a plain int, so torch.compile traces no data_ptr())
    stride: int  # bytes per row, a multiple of 16
    scales: Tensor  # fp16 [out] on the device
    host_scales: Tensor  # fp16 [out] pinned + mapped (the same values)


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _to_int32(words: Tensor) -> Tensor:
    """int64 holding uint32 values -> int32 with the same bits."""
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def tile_codes(codes: Tensor) -> Tensor:
    """uint8 codes [N, K] -> int64 [RT, KT, 32 lanes, 16 k-steps, 8 elements] in fragment order."""
    n, k = codes.shape
    npad, kpad = _round_up(n, TILE_ROWS), _round_up(k, TILE_K)
    padded = torch.zeros(npad, kpad, dtype=torch.int64, device=codes.device)
    padded[:n, :k] = codes.to(torch.int64)
    # row = 16 rt + 8 rh + g; channel = 256 kt + 16 s + 4 t + 2 kh + e0; element e = e0 + 2 rh + 4 kh
    v = padded.view(npad // TILE_ROWS, 2, 8, kpad // TILE_K, 16, 4, 2, 2)
    v = v.permute(0, 3, 2, 5, 4, 6, 1, 7)  # rt, kt, g, t, s, kh, rh, e0
    return v.reshape(npad // TILE_ROWS, kpad // TILE_K, 32, 16, 8)


def pack_tiles(codes: Tensor, bits: int) -> Tensor:
    """uint8 codes [N, K] -> int32 GPU layout (see ``csrc/decdec_kernels.h``)."""
    c = tile_codes(codes)
    i = torch.arange(4, device=c.device)
    lo_e, hi_e = c[..., 0::2], c[..., 1::2]  # [..., s, i]: e = 2i and e = 2i + 1
    if bits == 4:
        words = ((lo_e << (4 * i)) | (hi_e << (16 + 4 * i))).sum(-1)  # [..., 16]: word s (disjoint bits)
    else:
        # pairs j = 4 (s % 4) + i of k-steps 4m .. 4m + 3 share words 3m .. 3m + 2: pair j < 15 at
        # bits 3 (j % 5) (+ 16) of word 3m + j // 5, pair 15 bit by bit at bits 15 and 31 of all three
        lo_e, hi_e = lo_e.reshape(*lo_e.shape[:-2], 4, 16), hi_e.reshape(*hi_e.shape[:-2], 4, 16)
        slot = 3 * torch.arange(5, device=c.device)
        words = ((lo_e[..., :15].unflatten(-1, (3, 5)) << slot) | (hi_e[..., :15].unflatten(-1, (3, 5)) << (16 + slot)))
        words = words.sum(-1)  # [..., 4 m, 3 words] (disjoint bits)
        b = torch.arange(3, device=c.device)
        spare = (((lo_e[..., 15:] >> b) & 1) << 15) | (((hi_e[..., 15:] >> b) & 1) << 31)
        words = (words | spare).flatten(-2)  # [..., 12]
    rt, kt, lanes, nw = words.shape
    # load j of lane l = words 4j..4j+3, stored lane-contiguous per load
    words = words.view(rt, kt, lanes, nw // 4, 4).permute(0, 1, 3, 2, 4)
    return _to_int32(words.contiguous().view(-1))


def to_gpu_weight(weight: QuantizedWeight, device: torch.device) -> GPUWeight:
    """One-time conversion of a canonical quantized weight to the GPU layout on ``device``."""
    weight = weight.to(device)
    n, k = weight.out_features, weight.in_features
    npad = _round_up(n, TILE_ROWS)
    codes = unpack_codes(weight.packed, weight.bits, k)
    qweight = pack_tiles(codes, weight.bits)
    if isinstance(weight, UniformWeight):
        if weight.group_size % 16:
            raise ValueError(f"the CUDA kernels need a group size that is a multiple of 16, got {weight.group_size}")
        if int(weight.zeros.max()) >= 1 << weight.bits:  # the kernels' exact decode relies on it
            raise ValueError(f"zero points must be codes (< {1 << weight.bits}), got {int(weight.zeros.max())}")
        scale_bits = weight.scales.contiguous().view(torch.int16).to(torch.int64) & 0xFFFF
        packed = scale_bits | (weight.zeros.to(torch.int64) << 16)  # [N, G]
        meta = torch.zeros(packed.shape[1], npad, dtype=torch.int64, device=device)
        meta[:, :n] = packed.t()
        return GPUWeight(qweight, _to_int32(meta), ops.FORMAT_IDS["uniform"], weight.bits, weight.group_size, n, k)
    if isinstance(weight, LUTWeight):
        meta = torch.zeros(npad, 1 << weight.bits, dtype=torch.float16, device=device)
        meta[:n] = weight.lut.half()
        return GPUWeight(qweight, meta, ops.FORMAT_IDS["lut"], weight.bits, 0, n, k)
    raise TypeError(f"no GPU layout for {type(weight).__name__}")


def pinned_copy(t: Tensor) -> Tensor:
    """A contiguous copy of ``t`` in pinned, mapped host memory (the GPU reads it at ``data_ptr()``)."""
    out = ops.alloc_pinned(t.numel() * t.element_size()).view(t.dtype).view(t.shape)
    out.copy_(t)
    return out


def pin_residuals(packs: list[ResidualPack], device: torch.device) -> tuple[GPUResidual, list[ResidualPack]]:
    """Copies the residual rows and scales of one or more linears with the same input, side by side
    (their outputs concatenated), into pinned mapped memory with rows padded to 16 bytes, and the
    scales to ``device`` too; returns the GPU handle and one ResidualPack per linear viewing the
    pinned memory (for the reference path), so the host keeps one copy."""
    for pack in packs:
        pack.validate()
    rows = packs[0].packed.shape[0]
    if any(p.packed.shape[0] != rows for p in packs):
        raise ValueError(f"residuals of one input differ in rows: {[p.packed.shape[0] for p in packs]}")
    if len(packs) > 1 and any(p.out_features % 2 for p in packs):
        raise ValueError("side-by-side residuals need an even number of outputs each")
    widths = [p.packed.shape[1] for p in packs]
    stride = _round_up(sum(widths), 16)
    host = ops.alloc_pinned(rows * stride).view(rows, stride)
    host.fill_(0x88)  # nibble 8 = residual 0 in the padding
    host_scales = pinned_copy(torch.cat([p.scales.cpu() for p in packs]))  # fp16: validated
    views, col, first = [], 0, 0
    for pack, width in zip(packs, widths):
        host[:, col:col + width] = pack.packed.cpu()
        views.append(ResidualPack(host[:, col:col + width], host_scales[first:first + pack.out_features]))
        col += width
        first += pack.out_features
    return GPUResidual(host, host.data_ptr(), stride, host_scales.to(device), host_scales), views


def concat_gpu_weights(weights: list[GPUWeight]) -> GPUWeight:
    """The GPU weights of linears with the same input as one weight with their outputs concatenated
    (a row tile never straddles two: every out_features is a multiple of 16)."""
    first = weights[0]
    if any(w.out_features % TILE_ROWS for w in weights):
        raise ValueError(f"concatenated weights need out_features that are multiples of {TILE_ROWS}")
    meta_dim = 1 if first.fmt == ops.FORMAT_IDS["uniform"] else 0  # uniform: [groups, N]; LUT: [N, 2**bits]
    return GPUWeight(torch.cat([w.qweight for w in weights]), torch.cat([w.meta for w in weights], meta_dim),
                     first.fmt, first.bits, first.group_size, sum(w.out_features for w in weights),
                     first.in_features)


@dataclass
class GPUState:
    """What one launch needs on a CUDA device: the weight of a DecDECLinear, or those of the
    linears of a selection group side by side (one launch serves them all, see ``fusable``)."""
    device: torch.device
    weight: GPUWeight
    residual: GPUResidual | None
    bias: Tensor | None  # the linears' biases side by side (zeros where one has none)
    mailbox: Tensor | None  # ops.new_mailbox, grown to the largest batch seen; zero between calls
    outputs: dict[int, slice]  # id(linear) -> its outputs in the launch's output
    # the residual on the GPU as a 4-bit weight, made on the first compensated prefill (evaluation)
    residual_weight: GPUWeight | None = None


def supports(module, x: Tensor) -> bool:
    """Whether the CUDA path can run this layer on this input."""
    if not (x.is_cuda and ops.available() and x.dtype in (torch.float16, torch.bfloat16)):
        return False
    meta = module.weight_meta
    return meta["format"] == "lut" or meta["group_size"] % 16 == 0


def fusable(linears: list) -> bool:
    """Whether the linears of a selection group can run as one GPU launch: the same format, bits,
    group size and input, out_features multiples of 16, and residuals for all or for none."""
    if len(linears) < 2:
        return False
    first = {k: v for k, v in linears[0].weight_meta.items() if k != "out_features"}
    return all({k: v for k, v in m.weight_meta.items() if k != "out_features"} == first
               and m.out_features % TILE_ROWS == 0 and (m.residual is None) == (linears[0].residual is None)
               for m in linears)


def _build_state(linears: list, device: torch.device) -> GPUState:
    weights = [to_gpu_weight(m.quantized_weight, device) for m in linears]
    residual = None
    if linears[0].residual is not None:
        residual, views = pin_residuals([m.residual for m in linears], device)
        for m, view in zip(linears, views):
            m.residual = view
    bias = None
    if any(m.bias is not None for m in linears):
        dtype = next(m.bias.dtype for m in linears if m.bias is not None)
        bias = torch.cat([m.bias.to(device) if m.bias is not None else torch.zeros(m.out_features, dtype=dtype, device=device)
                          for m in linears])
    outputs, first = {}, 0
    for m in linears:
        outputs[id(m)] = slice(first, first + m.out_features)
        first += m.out_features
    return GPUState(device, concat_gpu_weights(weights) if len(weights) > 1 else weights[0], residual, bias, None,
                    outputs)


def state_for(module, device: torch.device) -> GPUState:
    """The GPU state serving ``module``: its group's shared one when the group is fusable."""
    group = module.selection
    for state in (module._gpu, group._gpu if group is not None else None):
        if state is not None and state.device == device and id(module) in state.outputs:
            return state
    if group is not None and fusable(group.members):
        group._gpu = _build_state(group.members, device)
        return group._gpu
    module._gpu = _build_state([module], device)
    return module._gpu


def forward(module, x: Tensor) -> Tensor:
    """DecDECLinear.forward on CUDA. The linears of a fusable group share one launch per input
    (the group keeps its output until each has taken its slice)."""
    state = state_for(module, x.device)
    group = module.selection
    if len(state.outputs) == 1:
        return _launch(state, group, x)
    out = group.shared_output(module, x, lambda: _launch(state, group, x))
    return out[..., state.outputs[id(module)]]


def _launch(state: GPUState, group, x: Tensor) -> Tensor:
    """The output of the state's linear(s) for ``x``. Compensated inputs of more than 8 tokens
    (decode-equivalent evaluation) take :func:`_compensated_product`."""
    w, r = state.weight, state.residual
    bias = state.bias if state.bias is None else state.bias.to(x.dtype)
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k).contiguous()
    tokens = x2.shape[0]
    compensate = r is not None and group is not None and group.compensates(x)
    if not compensate:
        if tokens <= ops.MAX_TOKENS:
            out = w.gemv(x2, bias)
        else:  # prefill: dequantize once per call and use cuBLAS
            out = F.linear(x2, w.dequantize(x.dtype), bias)
        return out.view(*lead, w.out_features)
    if tokens > ops.MAX_TOKENS:
        if state.residual_weight is None:
            state.residual_weight = residual_as_weight(r, w.out_features, x.device)
        if group.mode == "decdec" and group.chunk_size == CHUNK_SIZE:  # selection and [x | m] in one kernel
            inputs = ops.select_masked(x2, group.envelope, group.k_chunk)
        elif group.mode == "full":  # every channel: m = x
            inputs = torch.cat([x2, x2], dim=1)
        else:
            inputs = masked_inputs(x2, group.select(x).reshape(tokens, -1))
        return _compensated_product(w, state.residual_weight, inputs, bias).view(*lead, w.out_features)
    channels = None
    if group.mode != "decdec":
        channels = group.select(x).reshape(tokens, -1).contiguous()
    envelope = group.envelope if group.envelope is not None else x2.new_zeros(k, dtype=torch.float32)
    if state.mailbox is None or state.mailbox.numel() < tokens * w.out_features:
        state.mailbox = ops.new_mailbox(tokens, w.out_features, x.device)
    scales = r.host_scales if group.scales_on_host else r.scales
    out = ops.gemv_dec(x2, w.qweight, w.meta, bias, w.fmt, w.bits, w.group_size, w.out_features, w.in_features,
                       envelope, channels, group.k_chunk, r.ptr, r.stride, scales, group.n_tb or DEFAULT_N_TB,
                       state.mailbox)
    return out.view(*lead, w.out_features)


def residual_as_weight(r: GPUResidual, out_features: int, device: torch.device) -> GPUWeight:
    """The residual rows as a 4-bit uniform weight in the GPU layout: one group per output row,
    zero point 8, the residual's scale, so that ``dequantize`` gives R_hat as it gives W (fp32
    product, one rounding to the activations' dtype). A quarter of an fp16 weight in size."""
    in_features = r.host.shape[0]
    nibbles = unpack_codes(r.host.to(device), 4, 2 * r.stride)[:, :out_features].t().contiguous()  # [out, in]
    zeros = torch.full((out_features, 1), 8, dtype=torch.uint8, device=device)
    group = _round_up(in_features, 16)  # one group per row; the kernels want a multiple of 16
    return to_gpu_weight(UniformWeight(pack_codes(nibbles, 4), r.scales.view(-1, 1), zeros, 4, group, in_features), device)


def masked_inputs(x: Tensor, channels: Tensor) -> Tensor:
    """[x | m] [T, 2 in]: m = x on each token's ``channels`` [T, k] and 0 elsewhere (what
    ``ops.select_masked`` makes for DecDEC's own selection)."""
    d = x.shape[1]
    inputs = F.pad(x, (0, d))
    inputs[:, d:].scatter_(1, channels, x.gather(1, channels))
    return inputs


def _compensated_product(w: GPUWeight, residual: GPUWeight, inputs: Tensor, bias: Tensor | None) -> Tensor:
    """Every token compensated on its own channels, as one cuBLAS product:

        [x | m] @ [W | R]^T + bias

    with ``inputs`` = [x | m] (:func:`masked_inputs`), W and R dequantized to the activations'
    dtype (``residual``: :func:`residual_as_weight`); fp32 accumulation, and base + correction +
    bias rounded once, as in the decode kernel."""
    dtype = inputs.dtype
    return F.linear(inputs, torch.cat([w.dequantize(dtype), residual.dequantize(dtype)], dim=1), bias)
