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
               desc: str = "perplexity") -> tuple[float, int]:
    """(perplexity, scored tokens): mean next-token NLL over non-overlapping windows, each window
    scored from its second token on."""
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    for w in tqdm(windows(token_ids, seqlen, limit_windows), desc=desc, leave=False):
        w = w.to(device)
        logits = model(input_ids=w).logits[0, :-1].float()
        nll += F.cross_entropy(logits, w[0, 1:], reduction="sum").item()
        count += w.shape[1] - 1
    return math.exp(nll / count), count


def kl_divergence(logits_ref: Tensor, logits: Tensor) -> Tensor:
    """Per-position KL(p_ref || p) in nats over the last (vocabulary) dimension."""
    log_p = F.log_softmax(logits_ref.float(), dim=-1)
    log_q = F.log_softmax(logits.float(), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)
