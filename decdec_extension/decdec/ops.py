"""The DecDEC custom ops, ``torch.ops.decdec.*``: schemas and fake implementations.

The schemas and fakes are defined here, in Python, so that they exist (and ``torch.compile`` can
trace them) whether or not the extensions are built: ``decdec._C`` registers the CUDA
implementations (call :func:`available` before running them), ``decdec._cpu`` a CPU
implementation of ``select_channels`` (:func:`cpu_selection_available`). Weights are in the GPU layout of
``decdec.kernels`` (see ``csrc/decdec_kernels.h``).

- ``gemv(x [B, K], qweight, meta, bias?, fmt, bits, group_size, out_features, in_features) -> [B, N]``: the
  quantized GEMV for 1..8 tokens, fp32 accumulation, output in x's dtype.
- ``gemv_dec(..., envelope, channels?, k_chunk, residual_ptr, residual_stride, residual_scales,
  n_tb, mailbox) -> [B, N]``: the same plus DecDEC's compensation in one launch: each token selects
  its channels (or takes ``channels`` [B, k]), the selected residual rows are read from pinned host
  memory at ``residual_ptr`` (a device-visible address; the caller keeps the memory alive), the
  fp16 [N] ``residual_scales`` from x's device or from pinned host memory (a CPU tensor, read in
  place like the rows), and out = (base + correction) + bias is rounded once. ``mailbox`` is a
  zeroed int64 workspace of at least B x N elements owned by the layer (:func:`new_mailbox`);
  every call leaves it zeroed, so the op is functional.
- ``select_channels(x [T, K], envelope, k_chunk) -> int64 [T, k]``: DecDEC's selection, identical
  to :func:`decdec.select_channels`.
- ``select_masked(x [T, K], envelope, k_chunk) -> [T, 2K]``: ``[x | m]`` with m = x on each token's
  DecDEC selection and 0 elsewhere (the input of the compensated product of evaluation).
- ``dequantize(qweight, meta, fmt, bits, group_size, out_features, in_features, dtype) -> [N, K]``:
  the dense weight (prefill path), equal to ``weight.dequantize().to(dtype)``.
- ``decode_attention(q [B, Hq, D], k [B, Hkv, S, D], v, mask? bool [B, S], scale, counters) -> [B, Hq, D]``:
  one query token per sequence against a KV cache (``decdec.attention``); ``counters`` is a zeroed
  int32 workspace of at least B x Hkv elements that every call leaves zeroed.
"""
from __future__ import annotations

import importlib

import torch
from torch import Tensor

from .selection import CHUNK_SIZE, num_selected

FORMAT_IDS = {"uniform": 0, "lut": 1}
MAX_TOKENS = 8  # rows of x the GEMV takes in one call

_lib = torch.library.Library("decdec", "DEF")
_lib.define("gemv(Tensor x, Tensor qweight, Tensor meta, Tensor? bias, int fmt, int bits, int group_size, "
            "int out_features, int in_features) -> Tensor")
_lib.define("gemv_dec(Tensor x, Tensor qweight, Tensor meta, Tensor? bias, int fmt, int bits, int group_size, "
            "int out_features, int in_features, Tensor envelope, Tensor? channels, int k_chunk, int residual_ptr, "
            "int residual_stride, Tensor residual_scales, int n_tb, Tensor mailbox) -> Tensor")
_lib.define("select_channels(Tensor x, Tensor envelope, int k_chunk) -> Tensor")
_lib.define("select_masked(Tensor x, Tensor envelope, int k_chunk) -> Tensor")
_lib.define("dequantize(Tensor qweight, Tensor meta, int fmt, int bits, int group_size, int out_features, "
            "int in_features, ScalarType dtype) -> Tensor")
_lib.define("decode_attention(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale, Tensor counters) -> Tensor")


@torch.library.register_fake("decdec::gemv")
def _gemv_fake(x, qweight, meta, bias, fmt, bits, group_size, out_features, in_features):
    torch._check(x.dim() == 2, lambda: f"x must be [tokens, in], got {tuple(x.shape)}")
    return x.new_empty(x.shape[0], out_features)


@torch.library.register_fake("decdec::gemv_dec")
def _gemv_dec_fake(x, qweight, meta, bias, fmt, bits, group_size, out_features, in_features, envelope, channels, k_chunk,
                   residual_ptr, residual_stride, residual_scales, n_tb, mailbox):
    torch._check(x.dim() == 2, lambda: f"x must be [tokens, in], got {tuple(x.shape)}")
    return x.new_empty(x.shape[0], out_features)


@torch.library.register_fake("decdec::select_channels")
def _select_fake(x, envelope, k_chunk):
    torch._check(x.dim() == 2, lambda: f"x must be [tokens, in], got {tuple(x.shape)}")
    return x.new_empty(x.shape[0], num_selected(x.shape[1], k_chunk, CHUNK_SIZE), dtype=torch.int64)


@torch.library.register_fake("decdec::select_masked")
def _select_masked_fake(x, envelope, k_chunk):
    torch._check(x.dim() == 2, lambda: f"x must be [tokens, in], got {tuple(x.shape)}")
    return x.new_empty(x.shape[0], 2 * x.shape[1])


@torch.library.register_fake("decdec::dequantize")
def _dequantize_fake(qweight, meta, fmt, bits, group_size, out_features, in_features, dtype):
    return qweight.new_empty(out_features, in_features, dtype=dtype)


@torch.library.register_fake("decdec::decode_attention")
def _decode_attention_fake(q, k, v, mask, scale, counters):
    torch._check(q.dim() == 3, lambda: f"q must be [batch, heads, head_dim], got {tuple(q.shape)}")
    return q.new_empty(q.shape)


def _load_extension(name: str) -> bool:
    """Imports decdec.<name>, which registers its implementations; False when it is not built."""
    try:
        importlib.import_module(f"{__package__}.{name}")
    except ImportError:
        return False
    return True


_EXTENSION = _load_extension("_C")
_CPU_EXTENSION = _load_extension("_cpu")


def available() -> bool:
    """True when the CUDA implementations are registered and a CUDA device is present."""
    return _EXTENSION and torch.cuda.is_available()


def cpu_selection_available() -> bool:
    """True when ``select_channels`` has its CPU implementation (the optional ``decdec._cpu``)."""
    return _CPU_EXTENSION


def dependent_launch() -> bool:
    """Whether the GEMV and attention kernels are launched dependent (programmatic dependent launch:
    sm_90 and later, unless DECDEC_DEPENDENT_LAUNCH=0), so that they may start while the kernel
    before them still runs (csrc/dependent_launch.cuh)."""
    if not available():
        return False
    from . import _C
    return _C.dependent_launch()


def require() -> None:
    if not _EXTENSION:
        raise RuntimeError("the DecDEC CUDA extension decdec._C is not built: reinstall with "
                           "`pip install --no-build-isolation -e decdec_extension` on a machine with CUDA and nvcc")
    if not torch.cuda.is_available():
        raise RuntimeError("the DecDEC CUDA ops need a CUDA device")


def alloc_pinned(nbytes: int) -> Tensor:
    """uint8 [nbytes] in pinned, mapped host memory (the GPU reads it at ``data_ptr()``)."""
    require()
    from . import _C
    return _C.alloc_pinned(nbytes)


def hold_sms(release: Tensor, count: int, timeout_s: float = 5.0) -> None:
    """Launches on the current stream a kernel that holds ``count`` whole SMs until ``release[0]``
    (int32, on the GPU) turns non-zero or ``timeout_s`` pass (benchmarks: a kernel beside the one timed)."""
    require()
    from . import _C
    _C.hold_sms(release, count, timeout_s)


def gemv(x: Tensor, qweight: Tensor, meta: Tensor, bias: Tensor | None, fmt: int, bits: int, group_size: int,
         out_features: int, in_features: int) -> Tensor:
    return torch.ops.decdec.gemv(x, qweight, meta, bias, fmt, bits, group_size, out_features, in_features)


def gemv_dec(x: Tensor, qweight: Tensor, meta: Tensor, bias: Tensor | None, fmt: int, bits: int, group_size: int,
             out_features: int, in_features: int, envelope: Tensor, channels: Tensor | None, k_chunk: int,
             residual_ptr: int, residual_stride: int, residual_scales: Tensor, n_tb: int, mailbox: Tensor) -> Tensor:
    return torch.ops.decdec.gemv_dec(x, qweight, meta, bias, fmt, bits, group_size, out_features, in_features,
                                     envelope, channels, k_chunk, residual_ptr, residual_stride, residual_scales, n_tb,
                                     mailbox)


def new_mailbox(tokens: int, out_features: int, device: torch.device) -> Tensor:
    """The zeroed workspace ``gemv_dec`` needs for up to ``tokens`` tokens."""
    return torch.zeros(tokens * out_features, dtype=torch.int64, device=device)


def select_channels(x: Tensor, envelope: Tensor, k_chunk: int) -> Tensor:
    return torch.ops.decdec.select_channels(x, envelope, k_chunk)


def select_masked(x: Tensor, envelope: Tensor, k_chunk: int) -> Tensor:
    return torch.ops.decdec.select_masked(x, envelope, k_chunk)


def dequantize(qweight: Tensor, meta: Tensor, fmt: int, bits: int, group_size: int, out_features: int,
               in_features: int, dtype: torch.dtype) -> Tensor:
    return torch.ops.decdec.dequantize(qweight, meta, fmt, bits, group_size, out_features, in_features, dtype)


def decode_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float, counters: Tensor) -> Tensor:
    return torch.ops.decdec.decode_attention(q, k, v, mask, scale, counters)
