"""Finding the decoder blocks, their linears and which linears share an input, structurally.

No model-name tables: the decoder blocks are the longest ``nn.ModuleList`` of identical modules,
the quantizable linears are the ``nn.Linear`` modules inside a block, and linears share an input
when one forward pass hands them the very same tensor (q/k/v, gate/up; Phi-3's fused qkv_proj
reads its input alone).
"""
from __future__ import annotations

import torch
from torch import nn


class _StopForward(Exception):
    pass


def find_decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(qualified name, ModuleList) of the decoder blocks."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(m) for m in module}) != 1:
            continue
        if not any(isinstance(m, nn.Linear) for m in module[0].modules()):
            continue
        if best is None or len(module) > len(best[1]):
            best = (name, module)
    if best is None:
        raise ValueError(f"{type(model).__name__}: found no list of decoder blocks containing nn.Linear layers")
    return best


def block_linears(block: nn.Module) -> dict[str, nn.Linear]:
    """Relative name -> nn.Linear of one decoder block, in registration order."""
    return {name: m for name, m in block.named_modules() if isinstance(m, nn.Linear)}


def discover_linear_groups(model: nn.Module, input_ids: torch.Tensor | None = None) -> list[list[str]]:
    """Groups of relative linear names that read the same input, in execution order.

    Runs the model on a few tokens and stops after the first decoder block.
    """
    _, blocks = find_decoder_blocks(model)
    block = blocks[0]
    linears = block_linears(block)
    seen: list[tuple[str, torch.Tensor]] = []
    hooks = [lin.register_forward_pre_hook(lambda mod, args, name=name: seen.append((name, args[0])))
             for name, lin in linears.items()]

    def stop(*_):
        raise _StopForward

    hooks.append(block.register_forward_hook(stop))
    if input_ids is None:
        input_ids = torch.tensor([[1, 2, 3, 4]])
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            model(input_ids=input_ids.to(device))
    except _StopForward:
        pass
    finally:
        for h in hooks:
            h.remove()
    missing = set(linears) - {name for name, _ in seen}
    if missing:
        raise ValueError(f"linears {sorted(missing)} were not called in a forward pass of the first block")
    groups: list[tuple[torch.Tensor, list[str]]] = []
    for name, x in seen:
        for tensor, names in groups:
            if tensor is x:
                if name not in names:
                    names.append(name)
                break
        else:
            groups.append((x, [name]))
    return [names for _, names in groups]


def kind_name(group: list[str]) -> str:
    """A short name for a group of linears: their leaf names joined with '+' ('q_proj+k_proj+v_proj')."""
    return "+".join(name.rsplit(".", 1)[-1] for name in group)


def kind_label(kind: str) -> str:
    """A kind as tables show it: its first linear's name ('q_proj' for 'q_proj+k_proj+v_proj')."""
    return kind.split("+")[0]


def set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, leaf, module)
