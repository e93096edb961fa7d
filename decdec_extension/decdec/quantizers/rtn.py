"""Round-to-nearest: group-wise asymmetric uniform quantization of every block linear, no data."""
from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from ..formats import UniformWeight
from ..patching import block_linears, find_decoder_blocks


@torch.no_grad()
def quantize_rtn(model: nn.Module, block_bits: list[int], group_size: int,
                 device: torch.device | str = "cpu") -> list[dict[str, UniformWeight]]:
    """Quantized linears per block (on the host); each weight is quantized on ``device``."""
    _, blocks = find_decoder_blocks(model)
    return [{name: UniformWeight.quantize(lin.weight.to(device), bits, group_size).to("cpu")
             for name, lin in block_linears(block).items()}
            for block, bits in tqdm(list(zip(blocks, block_bits)), desc="RTN blocks", leave=False)]
