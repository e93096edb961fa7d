"""DecDEC: decoding with dynamic error compensation for low-bit weight-only quantized LLMs.

The pure-PyTorch reference semantics live here and run on any device; the compiled CUDA
extension ``decdec._C``, when built, provides fast kernels for the same operations.
"""
from .artifacts import ArtifactError
from .formats import LUTWeight, QuantizedWeight, UniformWeight, pack_codes, unpack_codes
from .linear import DecDECLinear, SelectionGroup
from .patching import discover_linear_groups, find_decoder_blocks, kind_label, kind_name
from .prepared import (apply_group_settings, configure, decdec_linears, group_settings, load_prepared, selection_groups,
                       write_prepared_model)
from .residual import ResidualPack, dequantize_residual, quantize_residual, residual_correction
from .selection import (CHUNK_SIZE, MODES, chunk_quotas, num_selected, rank_envelope, select, select_channels,
                        select_exact, select_full, select_random, select_static)

__version__ = "0.1.0"
__all__ = [
    "ArtifactError", "LUTWeight", "QuantizedWeight", "UniformWeight", "pack_codes", "unpack_codes",
    "DecDECLinear", "SelectionGroup", "discover_linear_groups", "find_decoder_blocks", "kind_label", "kind_name",
    "apply_group_settings", "configure", "decdec_linears", "group_settings", "load_prepared", "selection_groups",
    "write_prepared_model",
    "ResidualPack", "dequantize_residual", "quantize_residual", "residual_correction",
    "CHUNK_SIZE", "MODES", "chunk_quotas", "num_selected", "rank_envelope", "select", "select_channels",
    "select_exact", "select_full", "select_random", "select_static", "cuda_available",
]


def cuda_available() -> bool:
    """True when the compiled CUDA extension is importable and a CUDA device is present."""
    import torch
    if not torch.cuda.is_available():
        return False
    try:
        from . import _C  # noqa: F401
    except ImportError:
        return False
    return True
