"""Fast decode-equivalent compensation of many tokens at once, for evaluation.

Evaluation compensates every position of a prefill-shaped input as if it were the token being
decoded (``compensate_prefill``). The reference path (:mod:`decdec.selection`,
:func:`decdec.residual.residual_correction`) does that per token and is slow on long sequences;
this module computes the same thing with a few whole-tensor operations:

- selection: per chunk, the quota-th largest score fixes a threshold; everything above it is
  taken and the ties at the threshold (the bucket that overflows, for DecDEC) are taken lowest
  index first. DecDEC's selection is the extensions' ``select_channels`` kernel where one is built
  (CUDA: one warp per chunk and token; CPU: counts per chunk, threads over tokens); without them,
  counts per bucket on the GPU (no sort) and top-k on the CPU. The channel sets are identical to
  the reference (tests check it).
- correction (the reference path: CPU, or layers the CUDA kernels do not take): one weighted
  gather-sum (``embedding_bag``) of the residual's rows, which each layer unpacks once and keeps
  (fp32 [in, out]); a dense product when many channels are selected. Equal
  to the reference up to fp32 summation order. On the CUDA path the whole compensated product is
  one matrix product instead (``kernels``).

:func:`use_batched_compensation` switches a loaded model to these paths for multi-token inputs;
single-token inputs (decoding) keep the reference path.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from . import ops
from .linear import DecDECLinear, SelectionGroup
from .residual import ResidualPack, dequantize_residual
from .selection import CHUNK_SIZE, bucket_edges, chunk_quotas, select

# Scores: larger = taken first. |x| is >= 0, so NaN (ranked last by the reference) maps to -1.
_NAN_SCORE = -1.0
# above this fraction of selected channels a dense product beats the gathered one
_DENSE_FRACTION = 0.125


def _segments(d: int, chunk_size: int, quotas: list[int]) -> list[tuple[int, int, int]]:
    """(start, chunk length, quota) of the runs of equal chunks: the full chunks, then the partial one."""
    full = d // chunk_size
    out = [(0, chunk_size, quotas[0])] if full else []
    if d % chunk_size:
        out.append((full * chunk_size, d - full * chunk_size, quotas[-1]))
    return out


def _abs_score(x: Tensor) -> Tensor:
    return x.float().abs().nan_to_num_(nan=_NAN_SCORE, posinf=float("inf"))


def bucket_bounds(envelope: Tensor, k: int, device: torch.device | str) -> Tensor:
    """fp32 [34]: entry b is the lower edge of bucket b - 1 as a running minimum, with +inf for
    b = 0 and -1 (the NaN score) past bucket 31. A score is in a bucket below b iff it is >=
    entry b, and in bucket b or below iff it is >= entry b + 1 (running minima make this hold
    for any edges). Constant per envelope and k: the batched group computes it once."""
    env = envelope.to(device=device, dtype=torch.float32)
    running_min = bucket_edges(env[0], env[k - 1]).cummin(0).values
    return torch.cat([running_min.new_full((1,), float("inf")), running_min, running_min.new_full((1,), _NAN_SCORE)])


def _take_segment(score: Tensor, quota: int, bounds: Tensor | None, gpu_method: bool | None = None) -> Tensor:
    """score [N, chunks, L] -> int64 [N, chunks, quota]: each chunk's channels (unordered).

    The quota-th largest score of a chunk splits it into what is taken whole (``above``), the
    tie that overflows, and the rest; the tie's lowest indices fill the quota. Without ``bounds``:
    exact top-k, the tie being the equal scores. With DecDEC's :func:`bucket_bounds`: the bucket
    of the quota-th largest score is the tie, every higher bucket is ``above``.

    ``gpu_method`` (default: on CUDA) takes the way that is fast on a GPU, where top-k is slow on
    many short rows: DecDEC's threshold bucket from counts per bucket, exact top-k's threshold
    from a sort of each row, the quota filled by a scatter. On the CPU, top-k is the faster. Same
    channels either way."""
    length = score.shape[-1]
    gpu = score.is_cuda if gpu_method is None else gpu_method
    if gpu and bounds is not None:
        above, tie = _bucketed_split(score, quota, bounds)
    else:
        if gpu:
            kth = score.sort(dim=-1).values[..., length - quota:length - quota + 1]
        else:
            kth = score.topk(quota, dim=-1, sorted=False).values.amin(-1, keepdim=True)
        if bounds is None:
            above, at_least = score > kth, score >= kth
        else:
            b = (kth < bounds[1:-1]).sum(-1, keepdim=True)  # the bucket of kth (running minima: a count)
            above, at_least = score >= bounds[b], score >= bounds[b + 1]
        tie = at_least & ~above
    if gpu:
        return _fill_quota(above, tie, quota)
    # rank key: above, then tie, then the rest, each by channel index; the quota smallest are taken
    rank = above.to(torch.int32).mul_(2).add_(tie)
    keys = torch.arange(2 * length, 3 * length, dtype=torch.int32, device=score.device).sub(rank, alpha=length)
    return keys.topk(quota, dim=-1, largest=False, sorted=False).indices


def _bucketed_split(score: Tensor, quota: int, bounds: Tensor) -> tuple[Tensor, Tensor]:
    """(above, tie) of :func:`_take_segment` for DecDEC without a sort: a score's bucket is the
    number of edges above it; the threshold bucket is the first whose running count reaches the
    quota."""
    edges = bounds[1:-1].flip(0)  # the running minima, ascending
    bucket = edges.numel() - torch.bucketize(score.contiguous(), edges, right=True)  # int64
    counts = torch.zeros(*score.shape[:-1], edges.numel() + 1, dtype=torch.int32, device=score.device)
    counts.scatter_add_(-1, bucket, torch.ones(1, dtype=torch.int32, device=score.device).expand(bucket.shape))
    threshold = (counts.cumsum(-1, dtype=torch.int32) < quota).sum(-1, keepdim=True)
    return bucket < threshold, bucket == threshold


def _fill_quota(above: Tensor, tie: Tensor, quota: int) -> Tensor:
    """int64 [..., quota]: the channels (last dim) of ``above`` and the lowest of ``tie``, quota in
    all, without a sort: each taken channel goes to its rank among the taken, the rest to a spare
    slot."""
    room = quota - above.sum(-1, keepdim=True)
    taken = above | (tie & (tie.cumsum(-1) <= room))
    slot = torch.where(taken, taken.cumsum(-1).sub_(1), quota)
    channel = torch.arange(taken.shape[-1], device=taken.device).expand(taken.shape)
    out = torch.empty(*taken.shape[:-1], quota + 1, dtype=torch.int64, device=taken.device)
    return out.scatter_(-1, slot, channel)[..., :quota]


def _select_by_score(score: Tensor, quotas: list[int], chunk_size: int, bounds: Tensor | None = None) -> Tensor:
    """score [N, d] (larger first) -> int64 [N, k], each token's channels ascending."""
    n, d = score.shape
    pieces = []
    for start, length, quota in _segments(d, chunk_size, quotas):
        seg = score[:, start:start + (d - start) // length * length].reshape(n, -1, length)
        if quota == length:
            idx = torch.arange(length, device=score.device).expand(seg.shape)
        elif quota:
            idx = _take_segment(seg, quota, bounds)
        else:
            continue
        offsets = start + torch.arange(seg.shape[1], device=score.device).unsqueeze(-1) * length
        pieces.append((idx + offsets).reshape(n, -1))
    return torch.cat(pieces, dim=1).sort(dim=1).values


def _select_kernel_serves(x: Tensor, chunk_size: int) -> bool:
    """Whether an extension kernel takes DecDEC's selection of ``x`` [T, d]: the CUDA one, or the
    CPU one (``decdec._cpu``)."""
    if chunk_size != CHUNK_SIZE:
        return False
    if x.is_cuda:
        return x.dtype in (torch.float16, torch.bfloat16) and ops.available()
    return x.device.type == "cpu" and x.dtype in (torch.float32, torch.float16, torch.bfloat16) and \
        ops.cpu_selection_available()


def fast_select(mode: str, x: Tensor, k_chunk: int, envelope: Tensor | None = None, mean_sq: Tensor | None = None,
                chunk_size: int = CHUNK_SIZE, generator: torch.Generator | None = None,
                bounds: Tensor | None = None) -> Tensor | None:
    """Same contract and result as :func:`decdec.selection.select`, faster on many tokens for the
    per-token modes (decdec, exact, exact-global, random); the others use the reference.
    ``bounds``: :func:`bucket_bounds` of (envelope, k) when the caller keeps it (decdec mode)."""
    if mode not in ("decdec", "exact", "exact-global", "random"):
        return select(mode, x, k_chunk, envelope, mean_sq, chunk_size, generator)
    d = x.shape[-1]
    if envelope is not None and envelope.shape != (d,):
        raise ValueError(f"envelope has shape {tuple(envelope.shape)}, x has {d} channels")
    if mode == "decdec" and envelope is None:
        raise ValueError("mode 'decdec' needs the calibration envelope (thresholds.pt)")
    quotas = chunk_quotas(d, k_chunk, chunk_size)
    k = sum(quotas)
    lead = x.shape[:-1]
    if k == 0:
        return torch.empty(*lead, 0, dtype=torch.int64, device=x.device)
    flat = x.reshape(-1, d)
    if mode == "decdec" and _select_kernel_serves(flat, chunk_size):
        sel = ops.select_channels(flat.contiguous(), envelope.to(x.device, torch.float32).contiguous(), k_chunk)
    elif mode == "decdec":
        bounds = bucket_bounds(envelope, k, x.device) if bounds is None else bounds
        sel = _select_by_score(_abs_score(flat), quotas, chunk_size, bounds)
    elif mode == "exact":
        sel = _select_by_score(_abs_score(flat), quotas, chunk_size)
    elif mode == "exact-global":
        sel = _select_by_score(_abs_score(flat), [k], d)
    else:  # random: the reference's draw, smaller priority first
        priority = torch.rand(flat.shape, generator=generator,
                              device="cpu" if generator is None else generator.device)
        sel = _select_by_score(-priority.to(x.device), quotas, chunk_size)
    return sel.reshape(*lead, k)


def residual_rows(pack: ResidualPack, device: torch.device | str) -> Tensor:
    """fp32 [in, out]: R_hat by input channel (:func:`decdec.residual.dequantize_residual`, transposed)."""
    return dequantize_residual(pack).t().contiguous().to(device)


def fast_residual_correction(x: Tensor, channels: Tensor, rows: Tensor) -> Tensor:
    """fp32 [..., out] = residual_correction(x, channels, pack) with ``rows`` =
    :func:`residual_rows` (pack), computed as one product."""
    d, out_f = rows.shape
    lead, k = x.shape[:-1], channels.shape[-1]
    if k == 0:
        return torch.zeros(*lead, out_f, dtype=torch.float32, device=x.device)
    ch = channels.reshape(-1, k)
    values = x.reshape(-1, d).gather(1, ch).float()  # only the selected activations to fp32
    if k > _DENSE_FRACTION * d:
        out = values.new_zeros(ch.shape[0], d).scatter_(1, ch, values) @ rows
    else:  # each token: the sum of its selected rows, weighted by its activations
        out = torch.nn.functional.embedding_bag(ch, rows, per_sample_weights=values, mode="sum")
    return out.reshape(*lead, out_f)


class _BatchedSelectionGroup(SelectionGroup):
    """A SelectionGroup whose multi-token selections use :func:`fast_select`."""

    def compute(self, x: Tensor) -> Tensor:
        if not self.is_prefill(x):
            return super().compute(x)
        bounds = None
        if self.mode == "decdec":
            k = sum(chunk_quotas(x.shape[-1], self.k_chunk, self.chunk_size))
            cached = getattr(self, "_bounds", None)
            if cached is None or cached[:2] != (k, x.device) or cached[2] is not self.envelope:
                cached = self._bounds = (k, x.device, self.envelope, bucket_bounds(self.envelope, k, x.device) if k else None)
            bounds = cached[3]
        return fast_select(self.mode, x, self.k_chunk, self.envelope, self.mean_sq, self.chunk_size, self.generator,
                           bounds)


class _BatchedDecDECLinear(DecDECLinear):
    """A DecDECLinear whose compensated multi-token inputs use :func:`fast_residual_correction`
    with the residual rows unpacked once (kept on the input's device: a host -> device copy per
    call would stall every layer on the GPU)."""

    def correction(self, x: Tensor, channels: Tensor) -> Tensor:
        if not self.selection.is_prefill(x):
            return super().correction(x, channels)
        rows = getattr(self, "_rows", None)
        if rows is None or rows.device != x.device:
            rows = self._rows = residual_rows(self.residual, x.device)
        return fast_residual_correction(x, channels, rows)


def use_batched_compensation(model: nn.Module) -> int:
    """Switches every DecDECLinear and SelectionGroup of ``model`` to the batched paths for
    multi-token compensated inputs (results unchanged up to fp32 summation order); returns the
    number of linears switched. Costs one fp32 copy of the residual per linear."""
    n = 0
    for m in model.modules():
        if type(m) is SelectionGroup:
            m.__class__ = _BatchedSelectionGroup
        elif type(m) is DecDECLinear:
            m.__class__ = _BatchedDecDECLinear
            n += 1
    return n
