"""Channel selection: which input channels of a token get their residual rows fetched.

This module is the single definition of the selection semantics (DESIGN.md, "Channel selection");
every backend is tested against it. All functions are vectorised over tokens: ``x`` is
[..., d_in] and the result is int64 [..., k], each token's channels in ascending order.

Every variant reduces to a per-channel priority (smaller = taken first) and the common rule
:func:`_take_per_chunk`: each chunk of ``chunk_size`` consecutive channels takes its quota of the
highest-priority channels, the lowest channel index first among equal priorities.
"""
from __future__ import annotations

import torch
from torch import Tensor

CHUNK_SIZE = 1024
NUM_BUCKETS = 32
MODES = ("none", "decdec", "exact", "exact-global", "static", "random", "full")


def rank_envelope(acts: Tensor) -> Tensor:
    """acts [N, d_in] -> fp32 [d_in]: e[r] = max over tokens of the r-th largest |x|."""
    if acts.dim() != 2:
        raise ValueError(f"rank_envelope expects activations [tokens, d_in], got {tuple(acts.shape)}")
    ranked = acts.float().abs().nan_to_num(nan=0.0).sort(dim=1, descending=True).values
    return ranked.amax(0)


def chunk_quotas(d_in: int, k_chunk: int, chunk_size: int = CHUNK_SIZE) -> list[int]:
    """Channels taken from each chunk; a last partial chunk of length L takes floor(k_chunk * L / C)."""
    if not 0 <= k_chunk <= chunk_size:
        raise ValueError(f"k_chunk must be in 0..{chunk_size}, got {k_chunk}")
    if d_in < 1:
        raise ValueError(f"d_in must be positive, got {d_in}")
    full, rest = divmod(d_in, chunk_size)
    return [k_chunk] * full + ([k_chunk * rest // chunk_size] if rest else [])


def num_selected(d_in: int, k_chunk: int, chunk_size: int = CHUNK_SIZE) -> int:
    return sum(chunk_quotas(d_in, k_chunk, chunk_size))


def bucket_edges(b_hi: Tensor, b_lo: Tensor) -> Tensor:
    """fp32 [32] lower bucket edges: 0..15 split [b_lo, b_hi] linearly, 16..31 split [0, b_lo)."""
    b_hi = b_hi.float().reshape(1)
    b_lo = b_lo.float().reshape(1)
    i = torch.arange(16, device=b_hi.device, dtype=torch.float32)
    upper = b_hi - (b_hi - b_lo) * i / 15
    lower = b_lo * (15 - i) / 16  # i + 16 for i = 0..15: b_lo * (31 - (i + 16)) / 16
    return torch.cat([upper, lower])


def bucket_index(abs_x: Tensor, edges: Tensor) -> Tensor:
    """int64: the smallest i with |x| >= edges[i]; 32 when there is none (NaN)."""
    hits = abs_x.unsqueeze(-1) >= edges  # [..., 32]
    first = hits.to(torch.uint8).argmax(-1)  # argmax returns the first of equal maxima
    return torch.where(hits.any(-1), first, NUM_BUCKETS)


def _take_per_chunk(priority: Tensor, quotas: list[int], chunk_size: int) -> Tensor:
    """priority [T, d] -> int64 [T, k] sorted channels; stable sort = lowest index wins ties."""
    T, d = priority.shape
    full = d // chunk_size
    pieces = []
    if full and quotas[0]:
        blocks = priority[:, :full * chunk_size].reshape(T, full, chunk_size)
        order = blocks.sort(dim=-1, stable=True).indices[..., :quotas[0]]
        offsets = torch.arange(full, device=priority.device).unsqueeze(-1) * chunk_size
        pieces.append((order + offsets).reshape(T, -1))
    if len(quotas) > full and quotas[-1]:
        tail = priority[:, full * chunk_size:]
        pieces.append(tail.sort(dim=-1, stable=True).indices[:, :quotas[-1]] + full * chunk_size)
    if not pieces:
        return torch.empty(T, 0, dtype=torch.int64, device=priority.device)
    return torch.cat(pieces, dim=1).sort(dim=1).values


def _check_x(x: Tensor, vector: Tensor | None, name: str) -> None:
    if not x.is_floating_point():
        raise ValueError(f"x must be floating point, got {x.dtype}")
    if vector is not None and vector.shape != (x.shape[-1],):
        raise ValueError(f"{name} has shape {tuple(vector.shape)}, x has {x.shape[-1]} channels")


def _descending_priority(values: Tensor) -> Tensor:
    """Larger value = smaller priority; NaN last."""
    return (-values.float()).nan_to_num(nan=float("inf"))


def select_channels(x: Tensor, k_chunk: int, envelope: Tensor, chunk_size: int = CHUNK_SIZE) -> Tensor:
    """DecDEC's approximate top-k: bucketise |x| with edges from the envelope, then per chunk take
    buckets from 0 downward, the lowest indices first inside the bucket that overflows."""
    _check_x(x, envelope, "envelope")
    d = x.shape[-1]
    quotas = chunk_quotas(d, k_chunk, chunk_size)
    k = sum(quotas)
    flat = x.reshape(-1, d)
    if k == 0:
        return torch.empty(*x.shape[:-1], 0, dtype=torch.int64, device=x.device)
    env = envelope.to(device=x.device, dtype=torch.float32)
    edges = bucket_edges(env[0], env[k - 1])
    priority = bucket_index(flat.float().abs(), edges)
    return _take_per_chunk(priority, quotas, chunk_size).reshape(*x.shape[:-1], k)


def select_exact(x: Tensor, k_chunk: int, chunk_size: int = CHUNK_SIZE, per_chunk: bool = True) -> Tensor:
    """Exact top-k of |x|: the chunk quotas of :func:`select_channels` (``per_chunk``) or the same
    total k over the whole vector."""
    _check_x(x, None, "")
    d = x.shape[-1]
    quotas = chunk_quotas(d, k_chunk, chunk_size)
    priority = _descending_priority(x.reshape(-1, d).abs())
    if per_chunk:
        sel = _take_per_chunk(priority, quotas, chunk_size)
    else:
        sel = _take_per_chunk(priority, [sum(quotas)], d)
    return sel.reshape(*x.shape[:-1], -1)


def select_static(x: Tensor, k_chunk: int, mean_sq: Tensor, chunk_size: int = CHUNK_SIZE) -> Tensor:
    """One fixed set for every token: per chunk, the channels of largest calibration mean x^2."""
    _check_x(x, mean_sq, "mean_sq")
    d = x.shape[-1]
    quotas = chunk_quotas(d, k_chunk, chunk_size)
    sel = _take_per_chunk(_descending_priority(mean_sq.to(x.device)).unsqueeze(0), quotas, chunk_size)
    return sel.expand(x.reshape(-1, d).shape[0], -1).reshape(*x.shape[:-1], -1)


def select_random(x: Tensor, k_chunk: int, chunk_size: int = CHUNK_SIZE,
                  generator: torch.Generator | None = None) -> Tensor:
    """Per token, a uniformly random set with the chunk quotas of :func:`select_channels`."""
    _check_x(x, None, "")
    d = x.shape[-1]
    quotas = chunk_quotas(d, k_chunk, chunk_size)
    flat_shape = (x.reshape(-1, d).shape[0], d)
    priority = torch.rand(flat_shape, generator=generator, device="cpu" if generator is None else generator.device)
    return _take_per_chunk(priority.to(x.device), quotas, chunk_size).reshape(*x.shape[:-1], -1)


def select_full(x: Tensor) -> Tensor:
    """Every channel (the upper bound of compensation)."""
    d = x.shape[-1]
    return torch.arange(d, device=x.device).expand(*x.shape[:-1], d)


def select(mode: str, x: Tensor, k_chunk: int, envelope: Tensor | None = None, mean_sq: Tensor | None = None,
           chunk_size: int = CHUNK_SIZE, generator: torch.Generator | None = None) -> Tensor | None:
    """Dispatches on the selection ``mode``; None for mode "none"."""
    if mode == "none":
        return None
    if mode == "full":
        return select_full(x)
    if mode == "decdec":
        if envelope is None:
            raise ValueError("mode 'decdec' needs the calibration envelope (thresholds.pt)")
        return select_channels(x, k_chunk, envelope, chunk_size)
    if mode == "exact":
        return select_exact(x, k_chunk, chunk_size, per_chunk=True)
    if mode == "exact-global":
        return select_exact(x, k_chunk, chunk_size, per_chunk=False)
    if mode == "static":
        if mean_sq is None:
            raise ValueError("mode 'static' needs the calibration mean x^2 (thresholds.pt)")
        return select_static(x, k_chunk, mean_sq, chunk_size)
    if mode == "random":
        return select_random(x, k_chunk, chunk_size, generator)
    raise ValueError(f"unknown selection mode {mode!r}: expected one of {MODES}")
