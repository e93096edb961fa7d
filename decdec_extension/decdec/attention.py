"""Decode attention for Hugging Face models: a decode step's attention in one kernel.

With a static cache, transformers' SDPA path gives a one-token query a mask, and with a mask it
repeats the grouped kv heads and runs a kernel that is parallel over heads only. The kernel of
``csrc/attention.cu`` (``torch.ops.decdec.decode_attention``) instead spreads the cache's
positions over many blocks, reads each kv head once for its whole query group and, past each
block's first tile, skips the positions the mask excludes.

It is offered to transformers as the attention implementation ``"decdec"`` (with SDPA's mask
function); every call the kernel does not take (several query tokens, CPU tensors, softcapping,
attention sinks, dropout, per-head masks, head_dim > 256, ...) goes to transformers' SDPA function
unchanged. :func:`implementation_for` says which name a model should use; ``DecodeSession``
applies it.
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor, nn

from . import ops

NAME = "decdec"
MAX_GROUP = 16  # query heads per kv head (csrc/decdec_kernels.h)
MAX_HEAD_DIM = 256
COUNTERS = 1024  # (sequence, kv head) pairs one call can take; more go to SDPA

_counters: dict[torch.device, Tensor] = {}


def decode_attention_reference(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float) -> Tensor:
    """The kernel's definition, in fp32: q [B, Hq, D], k and v [B, Hkv, S, D], mask bool [B, S]
    (True: attend) -> [B, Hq, D] in q's dtype; query head h reads kv head h // (Hq / Hkv). A
    sequence whose positions are all masked gets zeros."""
    B, Hq, D = q.shape
    Hkv = k.shape[1]
    scores = torch.einsum("bhgd,bhsd->bhgs", q.float().view(B, Hkv, Hq // Hkv, D), k.float()) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    weights = scores.softmax(-1).nan_to_num(0.0)
    return torch.einsum("bhgs,bhsd->bhgd", weights, v.float()).reshape(B, Hq, D).to(q.dtype)


def counters(device: torch.device) -> Tensor:
    """The zeroed int32 workspace of the kernel on ``device`` (every call leaves it zeroed); made
    once, before any capture or compilation reaches it, and kept for the graphs that use it."""
    if device not in _counters:
        _counters[device] = torch.zeros(COUNTERS, dtype=torch.int32, device=device)
    return _counters[device]


def kernel_takes(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                 dropout: float, kwargs: dict) -> bool:
    """Whether the decode kernel computes exactly what transformers' SDPA function would."""
    if not (query.is_cuda and ops.available() and query.shape[2] == 1):
        return False
    B, Hq, _, D = query.shape
    Hkv, S = key.shape[1], key.shape[2]
    if query.dtype not in (torch.float16, torch.bfloat16) or key.dtype != query.dtype or value.dtype != query.dtype:
        return False
    if D % 2 or D > MAX_HEAD_DIM or value.shape != key.shape or key.shape[-1] != D or Hq % Hkv or Hq // Hkv > MAX_GROUP:
        return False
    if (dropout and module.training) or any(kwargs.get(name) is not None for name in ("softcap", "s_aux", "position_bias")):
        return False
    if kwargs.get("output_attentions"):
        return False
    if attention_mask is not None:
        if attention_mask.dtype != torch.bool or attention_mask.dim() != 4 or attention_mask.shape[1] != 1:
            return False
        if attention_mask.shape[0] != B or attention_mask.shape[-1] != S or attention_mask.stride(-1) != 1:
            return False
    return query.device in _counters and B * Hkv <= COUNTERS


def attention_forward(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                      dropout: float = 0.0, scaling: float | None = None, **kwargs) -> tuple[Tensor, None]:
    """transformers' attention interface: query [B, Hq, T, D], key and value [B, Hkv, S, D] ->
    ([B, T, Hq, D], None)."""
    if kernel_takes(module, query, key, value, attention_mask, dropout, kwargs):
        mask = None if attention_mask is None else attention_mask[:, 0, -1, :]
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        out = ops.decode_attention(query[:, :, 0], key, value, mask, scale, _counters[query.device])
        return out.unsqueeze(1), None
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


@functools.cache
def register() -> None:
    """Registers ``"decdec"`` with transformers' attention and mask interfaces (once)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)


def implementation_for(model: nn.Module, use_kernel: bool | None = None) -> str:
    """The attention implementation ``model`` should run with: ``"decdec"`` for a model on SDPA
    when ``use_kernel`` (default: when the kernel exists for the model's device), else SDPA; a
    model on another implementation (eager, flash attention, ...) keeps it."""
    current = model.config._attn_implementation
    if current not in ("sdpa", NAME):
        return current
    device = next(model.parameters()).device
    if use_kernel is None:
        use_kernel = device.type == "cuda" and ops.available()
    if not use_kernel:
        return "sdpa"
    register()
    if device.type == "cuda":
        counters(device)
    return NAME
