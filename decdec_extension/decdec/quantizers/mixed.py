"""3.5-bit: half the decoder blocks at 3 bits, half at 4, the blocks least sensitive to 3 bits at 3.

Sensitivity of block i = mean per-token KL(p_original || p_i) on calibration text, where p_i is the
model with only block i quantized: its linears replaced by their 3-bit round-to-nearest
dequantized weights (the probe is the same for every method, so the split does not depend on the
method's own search). With an odd number of blocks the extra block goes to 4 bits.

The pass runs the whole model on the device, on at most ``SENSITIVITY_SAMPLES`` calibration
sequences; the blocks before block i are skipped by feeding block i the original hidden states
recorded once, so block i costs (n - i) block forwards plus the output layer.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..formats import UniformWeight
from ..metrics import kl_divergence
from ..patching import block_linears, find_decoder_blocks

SENSITIVITY_SAMPLES = 8
PROBE_BITS = 3


@contextmanager
def _start_at_block(blocks: nn.ModuleList, start: int, hidden: Tensor, tuple_output: bool) -> Iterator[None]:
    """Within: blocks before ``start`` pass their input through untouched and block ``start`` sees
    ``hidden`` (the model still computes its embedding and the arguments of every block)."""
    def passthrough(hidden_states: Tensor, *args, **kwargs):
        return (hidden_states,) if tuple_output else hidden_states

    def feed(module, args, kwargs):
        if args:
            return (hidden,) + tuple(args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    skipped = list(blocks[:start])
    for b in skipped:
        b.forward = passthrough
    handle = blocks[start].register_forward_pre_hook(feed, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
        for b in skipped:
            del b.forward


@torch.no_grad()
def block_sensitivity(model: nn.Module, ids: Tensor, group_size: int, device: torch.device | str,
                      max_samples: int = SENSITIVITY_SAMPLES) -> list[float]:
    """Per block: mean per-token KL divergence when only that block is quantized to 3 bits."""
    _, blocks = find_decoder_blocks(model)
    host = next(model.parameters()).device
    ids = ids[:max_samples].to(device)
    model.to(device)
    inputs: list[list[Tensor]] = [[] for _ in blocks]
    raw: list = []
    hooks = [b.register_forward_pre_hook(lambda m, args, kwargs, i=i: inputs[i].append(
        args[0] if args else kwargs["hidden_states"]), with_kwargs=True) for i, b in enumerate(blocks)]
    hooks.append(blocks[0].register_forward_hook(lambda m, a, out: raw.append(out)))
    try:
        reference = [model(input_ids=row.unsqueeze(0), use_cache=False).logits.float() for row in ids]
    finally:
        for h in hooks:
            h.remove()
    tuple_output = isinstance(raw[0], (tuple, list))
    scores = []
    try:
        for i, block in enumerate(tqdm(blocks, desc="3.5-bit sensitivity", leave=False)):
            linears = block_linears(block)
            saved = {name: lin.weight.data for name, lin in linears.items()}
            for lin in linears.values():
                gs = min(group_size, lin.in_features)
                lin.weight.data = UniformWeight.fake_quantize(lin.weight, PROBE_BITS, gs).to(lin.weight.dtype)
            kl = []
            for j, row in enumerate(ids):
                with _start_at_block(blocks, i, inputs[i][j], tuple_output):
                    logits = model(input_ids=row.unsqueeze(0), use_cache=False).logits
                kl.append(kl_divergence(reference[j], logits).mean())
            for name, lin in linears.items():
                lin.weight.data = saved[name]
            scores.append(float(torch.stack(kl).mean()))
    finally:
        model.to(host)
    return scores


def split_bits(sensitivity: list[float]) -> list[int]:
    """3 bits for the floor(n / 2) least sensitive blocks, 4 for the rest (ties: earlier block first)."""
    n = len(sensitivity)
    order = sorted(range(n), key=lambda i: (sensitivity[i], i))
    bits = [4] * n
    for i in order[:n // 2]:
        bits[i] = 3
    return bits
