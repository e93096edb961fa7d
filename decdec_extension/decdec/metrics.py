"""Language-model quality measures shared by setup (3.5-bit sensitivity), evaluation and the main job."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm


def join_rows(rows: list[str]) -> str:
    """GPTQ-style evaluation text: the rows of the split joined with blank lines."""
    return "\n\n".join(rows)


def windows(token_ids: Tensor, seqlen: int, limit: int | None = None) -> list[Tensor]:
    """Non-overlapping windows [1, seqlen] of a [1, N] or [N] token stream; the tail is dropped."""
    ids = token_ids.reshape(-1)
    n = ids.numel() // seqlen
    if n == 0:
        raise ValueError(f"{ids.numel()} tokens are fewer than one window of {seqlen}")
    if limit is not None:
        n = min(n, limit)
    return [ids[i * seqlen:(i + 1) * seqlen].unsqueeze(0) for i in range(n)]


@torch.no_grad()
def perplexity(model: nn.Module, token_ids: Tensor, seqlen: int, limit_windows: int | None = None,
               desc: str = "perplexity", batch_size: int = 1) -> tuple[float, int]:
    """(perplexity, scored tokens): mean next-token NLL over non-overlapping windows, each window
    scored from its second token on. ``batch_size`` windows go through the model at once (on a
    GPU this spreads every kernel launch over more work; the result is the same up to the
    summation order of the matrix products)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = next(model.parameters()).device
    nll, count = torch.zeros((), dtype=torch.float64, device=device), 0  # summed on the device: no sync per window
    all_windows = windows(token_ids, seqlen, limit_windows)
    with tqdm(total=len(all_windows), desc=desc, leave=False) as bar:
        for i in range(0, len(all_windows), batch_size):
            batch = torch.cat(all_windows[i:i + batch_size]).to(device)
            logits = model(input_ids=batch).logits
            for row in range(batch.shape[0]):  # one window's fp32 logits at a time
                nll += F.cross_entropy(logits[row, :-1].float(), batch[row, 1:], reduction="sum").double()
            count += batch.shape[0] * (seqlen - 1)
            bar.update(batch.shape[0])
    return math.exp(nll.item() / count), count


def kl_divergence(logits_ref: Tensor, logits: Tensor) -> Tensor:
    """Per-position KL(p_ref || p) in nats over the last (vocabulary) dimension."""
    log_p = F.log_softmax(logits_ref.float(), dim=-1)
    log_q = F.log_softmax(logits.float(), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)
