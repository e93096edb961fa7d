"""Running a Hugging Face decoder one block at a time on a device, the rest of it in host memory.

The inputs of block 0 (hidden states and the keyword arguments the model hands every block:
position embeddings, mask, position ids) are captured by running the model on the host and
stopping as block 0 is entered, so only the embedding runs there. Then each block moves to the
device, runs on every calibration sequence, and moves back: peak device memory is about one block
plus the hidden states of the calibration set and one sequence's activations.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..patching import find_decoder_blocks


class _StopForward(Exception):
    pass


def _to(obj: Any, device: torch.device | str) -> Any:
    if isinstance(obj, Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def block_output(out: Any) -> Tensor:
    """A decoder block returns the hidden states alone or first in a tuple, depending on the model."""
    return out[0] if isinstance(out, (tuple, list)) else out


class BlockRunner:
    """Calibration hidden states flowing block by block through ``model`` on ``device``.

    ``hidden`` holds one [1, seqlen, d] tensor per calibration sequence (on the device) at the input
    of the block about to run.
    """

    def __init__(self, model: nn.Module, ids: Tensor, device: torch.device | str, blocks_name: str | None = None):
        """``blocks_name``: where the blocks are when the model's linears are no longer nn.Linear
        (a loaded prepared model: quant_config["blocks"])."""
        self.model, self.device = model, torch.device(device)
        if blocks_name is None:
            self.blocks_name, self.blocks = find_decoder_blocks(model)
        else:
            self.blocks_name, self.blocks = blocks_name, model.get_submodule(blocks_name)
        self.hidden: list[Tensor] = []
        self.kwargs: dict = {}
        self._capture(ids)

    @torch.no_grad()
    def _capture(self, ids: Tensor) -> None:
        block0 = self.blocks[0]
        seen: list[tuple[Tensor, dict]] = []

        def grab(module, args, kwargs):
            hidden = args[0] if args else kwargs.pop("hidden_states")
            seen.append((hidden, {k: v for k, v in kwargs.items() if k != "hidden_states"}))
            raise _StopForward

        handle = block0.register_forward_pre_hook(grab, with_kwargs=True)
        host = next(self.model.parameters()).device
        try:
            for row in ids:
                try:
                    self.model(input_ids=row.unsqueeze(0).to(host), use_cache=False)
                except _StopForward:
                    pass
        finally:
            handle.remove()
        # every sequence has the same length and no padding: the block kwargs of one serve all
        self.kwargs = _to(seen[0][1], self.device)
        self.hidden = [h.to(self.device) for h, _ in seen]

    def run_block(self, block: nn.Module, hidden: Tensor) -> Tensor:
        return block_output(block(hidden, **self.kwargs))

    @torch.no_grad()
    def outputs(self, block: nn.Module, inputs: list[Tensor] | None = None) -> list[Tensor]:
        return [self.run_block(block, h) for h in (self.hidden if inputs is None else inputs)]

    def iterate(self, desc: str = "blocks") -> Iterator[tuple[int, nn.Module]]:
        """Yields (index, block on the device); the caller runs the block (``outputs``) and sets
        ``hidden`` to what the next block must see; the block then moves back to the host."""
        for i in tqdm(range(len(self.blocks)), desc=desc, leave=False):
            block = self.blocks[i]
            host = next(block.parameters()).device
            block.to(self.device)
            yield i, block
            block.to(host)


@contextmanager
def watch_inputs(modules: dict[str, nn.Module], observe: Callable[[str, Tensor], None]) -> Iterator[None]:
    """While active, calls ``observe(name, x)`` with the input of every call of each named module,
    flattened to [tokens, d_in]: statistics accumulate without keeping activations."""
    hooks = [m.register_forward_pre_hook(
        lambda mod, args, name=name: observe(name, args[0].detach().reshape(-1, args[0].shape[-1])))
        for name, m in modules.items()]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()
