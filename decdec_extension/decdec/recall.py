"""Recall of a channel selection against the exact per-token top-k, per linear kind.

Recall of one token = |selected ∩ exact| / k, where "exact" is the top-k of |x| with the same
chunk quotas (:func:`decdec.selection.select_exact`); the meter averages it over every token
that reached the group's linears while it was attached.
"""
from __future__ import annotations

from collections import defaultdict

import torch
from torch import Tensor, nn

from .batched import fast_select
from .linear import DecDECLinear, SelectionGroup


def selection_recall(selected: Tensor, exact: Tensor, d_in: int) -> tuple[int, int]:
    """(hits, slots) over all tokens: channels of ``selected`` [..., k] that are also in ``exact``
    [..., k], and the number of selected channels."""
    k = selected.shape[-1]
    if k == 0:
        return 0, 0
    sel = selected.reshape(-1, k)
    in_exact = torch.zeros(sel.shape[0], d_in, dtype=torch.bool, device=sel.device)
    in_exact.scatter_(1, exact.reshape(-1, k), True)
    return int(in_exact.gather(1, sel).sum()), sel.numel()


class RecallMeter:
    """Measures, while attached, the recall of every selection group's current mode per kind.

    Usage: ``with RecallMeter(model) as meter: model(ids)``, then ``meter.recall()``. It hooks
    the first linear of each group, asks the group for its selection of that input (the group
    caches it, so the linears reuse it) and compares with the exact top-k.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.hits: dict[str, int] = defaultdict(int)
        self.slots: dict[str, int] = defaultdict(int)
        self._handles: list = []

    def __enter__(self) -> "RecallMeter":
        seen: set[int] = set()
        for m in self.model.modules():
            if isinstance(m, DecDECLinear) and m.selection is not None and id(m.selection) not in seen:
                seen.add(id(m.selection))
                self._handles.append(m.register_forward_pre_hook(self._hook(m.selection)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _hook(self, group: SelectionGroup):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0]
            if group.mode == "full":  # every channel: nothing to compare
                return
            selected = group.select(x)
            if selected is None or selected.shape[-1] == 0:
                return
            exact = fast_select("exact", x, group.k_chunk, chunk_size=group.chunk_size)
            hits, slots = selection_recall(selected, exact, x.shape[-1])
            self.hits[group.kind] += hits
            self.slots[group.kind] += slots
        return hook

    def recall(self) -> dict[str, float]:
        """kind -> recall over everything seen, plus "all" over every kind."""
        out = {kind: self.hits[kind] / self.slots[kind] for kind in self.slots if self.slots[kind]}
        total = sum(self.slots.values())
        if total:
            out["all"] = sum(self.hits.values()) / total
        return out
