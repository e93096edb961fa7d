"""SqueezeLLM (dense): per output channel, 2^bits centroids from k-means over the channel's weights
weighted by their diagonal Fisher information.

The Fisher information of a weight is the sum over calibration sequences of its squared gradient
of the language-model loss (mean next-token cross-entropy of that sequence). The gradients are taken
on the full model, moved to the device in fp32 for the pass (a checkpoint in fp16 or bf16 returns
to its dtype losslessly): this needs the whole model plus one linear's worth of fp32 accumulators per
block linear on the device, which suits models up to a few billion parameters on one GPU.

k-means: Lloyd iterations on every row at once, initialised at the row's quantiles
(k + 0.5) / 2^bits, until no assignment changes or ``KMEANS_ITERS``; an emptied cluster keeps its
centroid. The codes are then the nearest fp16 centroid (``LUTWeight.quantize_nearest``).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..formats import LUTWeight
from ..patching import block_linears, find_decoder_blocks

KMEANS_ITERS = 50


def fisher_information(model: nn.Module, ids: Tensor, device: torch.device | str) -> list[dict[str, Tensor]]:
    """Per block, per linear: fp32 [out, in] sum over sequences of the squared loss gradient (host)."""
    _, blocks = find_decoder_blocks(model)
    host = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    flags = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    model.to(device=device, dtype=torch.float32)
    fisher: list[dict[str, Tensor]] = []
    hooks = []
    for block in blocks:
        acc = {}
        for name, lin in block_linears(block).items():
            acc[name] = torch.zeros_like(lin.weight, dtype=torch.float32)
            lin.weight.requires_grad_(True)

            def accumulate(p: Tensor, a: Tensor = acc[name]) -> None:
                a.add_(p.grad.square())
                p.grad = None

            hooks.append(lin.weight.register_post_accumulate_grad_hook(accumulate))
        fisher.append(acc)
    try:
        for row in tqdm(ids, desc="Fisher (gradients)", leave=False):
            seq = row.unsqueeze(0).to(device)
            model(input_ids=seq, labels=seq, use_cache=False).loss.backward()
    finally:
        for h in hooks:
            h.remove()
        for p, flag in flags.items():
            p.requires_grad_(flag)
        model.to(device=host, dtype=dtype)
    return [{name: f.cpu() for name, f in block.items()} for block in fisher]


def weighted_kmeans(w: Tensor, weight: Tensor, k: int, iters: int = KMEANS_ITERS) -> Tensor:
    """fp32 [rows, k] centroids (ascending) of each row of ``w`` [rows, n] under per-element weights.

    In one dimension the nearest centroid of x is the number of midpoints between sorted
    centroids that lie below x: k - 1 comparisons per weight, no distance table.
    """
    w, weight = w.float(), weight.float()
    rows, n = w.shape
    quantiles = (torch.arange(k, device=w.device, dtype=torch.float32) + 0.5) / k
    step = max(1, (1 << 24) // max(n, 1))  # torch.quantile's input size limit
    centroids = torch.cat([torch.quantile(w[r:r + step], quantiles, dim=1).t() for r in range(0, rows, step)])
    assign = torch.full((rows, n), -1, dtype=torch.int64, device=w.device)
    for _ in range(iters):
        mids = (centroids[:, 1:] + centroids[:, :-1]) / 2
        new = torch.zeros(rows, n, dtype=torch.int64, device=w.device)
        for j in range(k - 1):
            new += w > mids[:, j:j + 1]
        if torch.equal(new, assign):
            break
        assign = new
        num = torch.zeros(rows, k, device=w.device).scatter_add_(1, assign, weight * w)
        den = torch.zeros(rows, k, device=w.device).scatter_add_(1, assign, weight)
        centroids = torch.where(den > 0, num / den.clamp(min=torch.finfo(torch.float32).tiny), centroids)
        centroids = centroids.sort(dim=1).values  # an emptied cluster keeps its place in the order
    return centroids


@torch.no_grad()
def quantize_squeezellm(model: nn.Module, fisher: list[dict[str, Tensor]], block_bits: list[int],
                        device: torch.device | str = "cpu") -> list[dict[str, LUTWeight]]:
    """LUT-quantized linears per block (on the host), k-means run on ``device``."""
    _, blocks = find_decoder_blocks(model)
    out = []
    for i, block in enumerate(tqdm(blocks, desc="SqueezeLLM blocks", leave=False)):
        block_q = {}
        for name, lin in block_linears(block).items():
            w = lin.weight.to(device).float()
            lut = weighted_kmeans(w, fisher[i][name].to(device), 1 << block_bits[i])
            block_q[name] = LUTWeight.quantize_nearest(w, lut, block_bits[i]).to("cpu")
        out.append(block_q)
    return out
