"""``DecDECLinear``: a quantized linear layer with dynamic residual compensation.

Linears that read the same input (q/k/v, gate/up) hold one shared :class:`SelectionGroup`, which
selects the channels once per input tensor and owns the selection settings of that kind; on CUDA
it also runs its linears as one launch (``kernels.fusable``) and hands each its slice.
"""
from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import kernels
from .formats import QuantizedWeight, weight_from_tensors
from .residual import ResidualPack, residual_correction
from .selection import CHUNK_SIZE, MODES, chunk_quotas, select


def _apply_keeping_dtype(module: nn.Module, names: tuple[str, ...], fn, apply) -> nn.Module:
    """Runs ``apply`` (nn.Module._apply) but lets the named buffers only move, never change dtype:
    fp16 scales or fp32 envelopes must stay exact under ``model.half()`` / ``model.to(bf16)``."""
    saved = {n: module._buffers[n] for n in names if module._buffers.get(n) is not None}
    result = apply(fn)
    for n, original in saved.items():
        moved = module._buffers[n]
        if moved.dtype != original.dtype:
            module._buffers[n] = original.to(moved.device)
    return result


class SelectionGroup(nn.Module):
    """Selection settings and calibration data of one distinct linear input.

    ``compensate_prefill``: with False, inputs of more than one token per sequence (prefill) get no
    compensation; with True every token is compensated independently, as if it were being decoded
    ("decode-equivalent", used by evaluation).

    ``n_tb`` and ``scales_on_host`` are run-time settings of the CUDA path: the DEC thread blocks
    per launch (None: the default), and whether they read the residual scales from pinned host
    memory, fetched like the rows, rather than from the GPU. Changing either re-uploads nothing.
    """

    def __init__(self, kind: str, envelope: Tensor | None = None, mean_sq: Tensor | None = None,
                 mode: str = "decdec", k_chunk: int = 0, chunk_size: int = CHUNK_SIZE,
                 compensate_prefill: bool = False, seed: int = 0):
        super().__init__()
        self.kind = kind
        self.register_buffer("envelope", None if envelope is None else envelope.float())
        self.register_buffer("mean_sq", None if mean_sq is None else mean_sq.float())
        self.chunk_size = chunk_size
        self.compensate_prefill = compensate_prefill
        self.n_tb: int | None = None  # GPU thread-block budget, set by the tuned config
        self.scales_on_host: bool = False
        self.generator = torch.Generator().manual_seed(seed)
        self.configure(mode=mode, k_chunk=k_chunk)
        self._cache_key: tuple | None = None
        self._cache_input: weakref.ref | None = None
        self._cache_value: Tensor | None = None
        # the DecDECLinears reading this input, in call order (a plain list: not submodules)
        self.members: list[DecDECLinear] = []
        self._shared: tuple[Tensor, Tensor, set[int]] | None = None  # (input, output, ids served)
        self._gpu: kernels.GPUState | None = None  # CUDA path of fused members, made on first use

    def add_member(self, linear: "DecDECLinear") -> None:
        self.members.append(linear)
        self._gpu = None

    def shared_output(self, member: nn.Module, x: Tensor, compute) -> Tensor:
        """``compute()`` once per input tensor for all members: the first member to pass ``x``
        computes it, the others get the same tensor; it is dropped once every member has had it."""
        if self._shared is None or self._shared[0] is not x:
            self._shared = (x, compute(), set())
        _, out, served = self._shared
        served.add(id(member))
        if len(served) == len(self.members):
            self._shared = None
        return out

    def configure(self, mode: str | None = None, k_chunk: int | None = None) -> None:
        mode = self.mode if mode is None else mode
        k_chunk = self.k_chunk if k_chunk is None else k_chunk
        if mode not in MODES:
            raise ValueError(f"unknown selection mode {mode!r}: expected one of {MODES}")
        if mode == "decdec" and self.envelope is None and k_chunk > 0:
            raise ValueError(f"{self.kind}: mode 'decdec' needs the envelope from thresholds.pt")
        if mode == "static" and self.mean_sq is None and k_chunk > 0:
            raise ValueError(f"{self.kind}: mode 'static' needs mean_sq from thresholds.pt")
        if self.envelope is not None:
            chunk_quotas(self.envelope.numel(), k_chunk, self.chunk_size)  # validates k_chunk
        elif not 0 <= k_chunk <= self.chunk_size:
            raise ValueError(f"k_chunk must be in 0..{self.chunk_size}, got {k_chunk}")
        self.mode, self.k_chunk = mode, k_chunk
        self._cache_key = None

    def _apply(self, fn, recurse=True):
        self._gpu = None
        self._shared = None
        return _apply_keeping_dtype(self, ("envelope", "mean_sq"), fn, lambda f: super(SelectionGroup, self)._apply(f, recurse))

    @property
    def active(self) -> bool:
        return self.mode == "full" or (self.mode != "none" and self.k_chunk > 0)

    def is_prefill(self, x: Tensor) -> bool:
        return x.dim() >= 3 and x.shape[-2] > 1

    def compensates(self, x: Tensor) -> bool:
        """Whether the input ``x`` gets compensation under the current settings."""
        return self.active and (self.compensate_prefill or not self.is_prefill(x))

    def select(self, x: Tensor) -> Tensor | None:
        """Channels [..., k] for ``x``, or None when this input gets no compensation. The linears
        of the group call this with the same tensor: the selection is computed once for it."""
        if not self.compensates(x):
            return None
        key = (x.data_ptr(), x._version, tuple(x.shape), self.mode, self.k_chunk)
        if self._cache_key == key and self._cache_input is not None and self._cache_input() is x:
            return self._cache_value
        channels = self.compute(x)
        self._cache_key, self._cache_input, self._cache_value = key, weakref.ref(x), channels
        return channels

    def compute(self, x: Tensor) -> Tensor:
        """The channels of ``x`` under the current settings, uncached (subclasses swap the algorithm)."""
        return select(self.mode, x, self.k_chunk, self.envelope, self.mean_sq, self.chunk_size, self.generator)

    def extra_repr(self) -> str:
        return (f"kind={self.kind!r}, mode={self.mode!r}, k_chunk={self.k_chunk}, n_tb={self.n_tb}, "
                f"scales_on_host={self.scales_on_host}")


class DecDECLinear(nn.Module):
    """y = deq(Q) x + b, plus x[S] R_hat[S, :] over the channels S that the selection group picks.

    The quantized weight lives on the module's device; the residual stays in host memory (pinned
    when CUDA is used) and is read row by row for the selected channels only.
    """

    def __init__(self, weight: QuantizedWeight, bias: Tensor | None = None, residual: ResidualPack | None = None,
                 selection: SelectionGroup | None = None):
        super().__init__()
        if residual is not None:
            residual.validate()
            if (residual.in_features, residual.out_features) != (weight.in_features, weight.out_features):
                raise ValueError(f"residual is [{residual.out_features}, {residual.in_features}], weight is "
                                 f"[{weight.out_features}, {weight.in_features}]")
        self.in_features, self.out_features = weight.in_features, weight.out_features
        self.weight_meta = weight.metadata()
        for name, t in weight.tensors().items():
            self.register_buffer(f"q_{name}", t)
        self.register_buffer("bias", bias)
        self.residual = residual  # deliberately not a buffer: .to(cuda) must not move it to the GPU
        self.selection = selection
        if selection is not None:
            selection.add_member(self)
        self._dense: Tensor | None = None  # reference path: dequantized weight, made on first use
        self._gpu: kernels.GPUState | None = None  # CUDA path: GPU layout + pinned residual, made on first use

    @property
    def quantized_weight(self) -> QuantizedWeight:
        tensors = {name[2:]: t for name, t in self.named_buffers(recurse=False) if name.startswith("q_")}
        return weight_from_tensors(tensors, self.weight_meta)

    def _apply(self, fn, recurse=True):
        self._dense = None
        self._gpu = None
        quantized = tuple(n for n in self._buffers if n.startswith("q_"))
        return _apply_keeping_dtype(self, quantized, fn, lambda f: super(DecDECLinear, self)._apply(f, recurse))

    def pin_residual(self) -> None:
        if self.residual is not None and not self.residual.packed.is_pinned():
            self.residual = self.residual.pin_memory()

    def dense_weight(self, dtype: torch.dtype) -> Tensor:
        if self._dense is None or self._dense.dtype != dtype:
            self._dense = self.quantized_weight.dequantize().to(dtype)
        return self._dense

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input has {x.shape[-1]} features, layer expects {self.in_features}")
        if kernels.supports(self, x):
            return kernels.forward(self, x)
        channels = None
        if self.residual is not None and self.selection is not None:
            channels = self.selection.select(x)
        if channels is None:
            return F.linear(x, self.dense_weight(x.dtype), self.bias)
        # fp32 accumulation of base + correction, one rounding at the end
        out = F.linear(x.float(), self.dense_weight(torch.float32), None if self.bias is None else self.bias.float())
        return out.add_(self.correction(x, channels)).to(x.dtype)

    def correction(self, x: Tensor, channels: Tensor) -> Tensor:
        """fp32 [..., out]: the residual correction of the selected ``channels`` of ``x``."""
        return residual_correction(x, channels, self.residual)

    def extra_repr(self) -> str:
        fmt = self.weight_meta
        return (f"in_features={self.in_features}, out_features={self.out_features}, format={fmt['format']}, "
                f"bits={fmt['bits']}, residual={self.residual is not None}")
