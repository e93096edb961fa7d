"""Synthetic prepared models: random quantized weights, residuals and envelopes of a real model's
shape, written as an ordinary prepared directory, so speed can be measured (and tuned) without
downloading or quantizing a model. The text such a model writes is noise.

Weights are drawn directly in the quantized format (uniform codes, zero point in the middle, a
scale giving the config's initializer std; or a LUT of evenly spaced levels), residual nibbles
uniformly in 1..15, envelopes from Gaussian activations. Nothing is quantized, so building
Llama-3-8B's shape takes seconds of random-number generation plus the file writes.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from . import artifacts
from .formats import LUTWeight, UniformWeight, packed_row_bytes
from .patching import block_linears, discover_linear_groups, find_decoder_blocks, kind_name
from .prepared import write_prepared_model
from .residual import ResidualPack
from .selection import rank_envelope

# Llama architecture sizes of a few real models; "tiny" is for CPU tests
SHAPES: dict[str, dict] = {
    "llama-3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0),
    "llama-3-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                        num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0),
    # tiny: one partial chunk (512) and a full plus a partial one (1536), GPU-kernel friendly sizes
    "tiny": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=2, num_attention_heads=8,
                 num_key_value_heads=4, vocab_size=1024, max_position_embeddings=512),
}
ENVELOPE_TOKENS = 64


def synthetic_config(shape: str, num_layers: int | None = None):
    from transformers import LlamaConfig
    if shape not in SHAPES:
        raise ValueError(f"unknown synthetic shape {shape!r}: expected one of {sorted(SHAPES)}")
    sizes = dict(SHAPES[shape])
    if num_layers is not None:
        if num_layers < 1:
            raise ValueError(f"num_layers must be positive, got {num_layers}")
        sizes["num_hidden_layers"] = num_layers
    return LlamaConfig(**sizes, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
                       architectures=["LlamaForCausalLM"])


def _linear_groups(config) -> list[list[str]]:
    """The groups of linears sharing an input, found structurally on a miniature of the model."""
    from transformers import AutoModelForCausalLM
    small = config.__class__(**{**config.to_dict(), "hidden_size": 64, "intermediate_size": 96,
                                "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
                                "head_dim": 16, "vocab_size": 64})
    return discover_linear_groups(AutoModelForCausalLM.from_config(small).eval())


def quant_layout(shape: str, bits: int = 3, fmt: str = "uniform", group_size: int = 128,
                 num_layers: int | None = None) -> dict:
    """The "groups" and "layers" of the quant_config.json a synthetic model of this shape gets,
    without drawing any weight: enough for ``tuning.workloads_from_quant_config`` (dry runs)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM
    config = synthetic_config(shape, num_layers)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    _, blocks = find_decoder_blocks(model)
    layers = []
    for block in blocks:
        meta = {}
        for name, lin in block_linears(block).items():
            meta[name] = {"format": fmt, "bits": bits, "in_features": lin.in_features, "out_features": lin.out_features}
            if fmt == "uniform":
                meta[name]["group_size"] = min(group_size, lin.in_features)
        layers.append(meta)
    return {"groups": _linear_groups(config), "layers": layers}


def _random_uniform_weight(in_f: int, out_f: int, bits: int, group_size: int, std: float,
                           gen: torch.Generator) -> UniformWeight:
    device = gen.device
    groups = UniformWeight.num_groups(in_f, group_size)
    # codes uniform in 0..2^b-1 around a mid zero point have std ~ 2^b / sqrt(12) steps
    step = std * math.sqrt(12) / (1 << bits)
    packed = torch.randint(0, 256, (out_f, packed_row_bytes(in_f, bits)), dtype=torch.uint8, device=device,
                           generator=gen)
    scales = torch.full((out_f, groups), step, dtype=torch.float16, device=device)
    zeros = torch.full((out_f, groups), 1 << (bits - 1), dtype=torch.uint8, device=device)
    return UniformWeight(packed.cpu(), scales.cpu(), zeros.cpu(), bits, group_size, in_f)


def _random_lut_weight(in_f: int, out_f: int, bits: int, std: float, gen: torch.Generator) -> LUTWeight:
    device = gen.device
    levels = (torch.arange(1 << bits, device=device, dtype=torch.float32) - ((1 << bits) - 1) / 2)
    lut = (levels * std * math.sqrt(12) / (1 << bits)).half().expand(out_f, -1).contiguous()
    packed = torch.randint(0, 256, (out_f, packed_row_bytes(in_f, bits)), dtype=torch.uint8, device=device,
                           generator=gen)
    return LUTWeight(packed.cpu(), lut.cpu(), bits, in_f)


def _random_residual(in_f: int, out_f: int, weight_step: float, gen: torch.Generator) -> ResidualPack:
    # two nibbles in 1..15 from one draw in 0..224: low = v % 15 + 1, high = v // 15 + 1
    v = torch.randint(0, 225, (in_f, packed_row_bytes(out_f, 4)), dtype=torch.int32, device=gen.device, generator=gen)
    packed = ((v % 15 + 1) | ((v // 15 + 1) << 4)).to(torch.uint8)
    if out_f % 2:  # the unused high nibble of an odd row is zero, as pack_codes leaves it
        packed[:, -1] &= 15
    # an RTN residual lies within half a quantization step: 7 residual steps span it
    scales = torch.full((out_f,), weight_step / 2 / 7, dtype=torch.float16)
    return ResidualPack(packed.cpu(), scales)


def _materialize_dense(model: nn.Module, skip: set[str], std: float, gen: torch.Generator) -> None:
    """Replaces the meta parameters outside the quantized linears: norms 1, the rest N(0, std)."""
    for name, param in list(model.named_parameters()):
        if name in skip:
            continue
        module_name, _, leaf = name.rpartition(".")
        module = model.get_submodule(module_name)
        if param.dim() == 1:
            value = torch.ones(param.shape, dtype=torch.float16)
        else:
            value = (torch.randn(param.shape, device=gen.device, generator=gen) * std).half().cpu()
        module._parameters[leaf] = nn.Parameter(value, requires_grad=False)
    model.tie_weights()


def write_synthetic_model(out_dir: Path | str, shape: str, bits: int = 3, fmt: str = "uniform",
                          group_size: int = 128, num_layers: int | None = None, seed: int = 0,
                          device: str | torch.device = "cpu") -> dict:
    """Writes a prepared directory (weights, cheatsheet, thresholds) of the named shape; returns
    its quant config. ``device`` only draws the random numbers (a GPU draws gigabytes faster)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    if fmt not in ("uniform", "lut"):
        raise ValueError(f"unknown format {fmt!r}: expected 'uniform' or 'lut'")
    if bits not in (3, 4):
        raise ValueError(f"bits must be 3 or 4, got {bits}")
    out_dir = Path(out_dir)
    config = synthetic_config(shape, num_layers)
    groups = _linear_groups(config)
    (out_dir / artifacts.TUNING_CONFIG).unlink(missing_ok=True)  # tuned for the weights being replaced
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float16)
    blocks_name, blocks = find_decoder_blocks(model)
    gen = torch.Generator(device=device).manual_seed(seed)
    std = config.initializer_range
    quantized, residuals, skip = [], [], set()
    for i, block in enumerate(tqdm(blocks, desc=f"synthetic {shape} {bits}-bit", leave=False)):
        q_block, r_block = {}, {}
        for name, lin in block_linears(block).items():
            skip.add(f"{blocks_name}.{i}.{name}.weight")
            in_f, out_f = lin.in_features, lin.out_features
            if fmt == "uniform":
                q_block[name] = _random_uniform_weight(in_f, out_f, bits, min(group_size, in_f), std, gen)
            else:
                q_block[name] = _random_lut_weight(in_f, out_f, bits, std, gen)
            r_block[name] = _random_residual(in_f, out_f, std * math.sqrt(12) / (1 << bits), gen)
        quantized.append(q_block)
        residuals.append(r_block)
    _materialize_dense(model, skip, std, gen)
    synthetic = {"shape": shape, "bits": bits, "format": fmt, "group_size": group_size,
                 "num_layers": config.num_hidden_layers, "seed": seed}
    qc = write_prepared_model(out_dir, model, None, quantized, groups, method="synthetic", bits=bits,
                              source=f"synthetic:{shape}", group_size=group_size if fmt == "uniform" else None,
                              extra={"synthetic": synthetic})
    artifacts.save_cheatsheet(out_dir / artifacts.CHEATSHEET, qc, residuals)
    first = block_linears(blocks[0])
    stats = []
    for _ in blocks:
        entry = {}
        for group in groups:
            d_in = first[group[0]].in_features
            acts = torch.randn(ENVELOPE_TOKENS, d_in, device=gen.device, generator=gen)
            entry[kind_name(group)] = {"envelope": rank_envelope(acts).cpu(), "mean_sq": torch.ones(d_in)}
        stats.append(entry)
    artifacts.save_thresholds(out_dir / artifacts.THRESHOLDS, qc, stats,
                              {"source": "synthetic gaussian", "nsamples": ENVELOPE_TOKENS, "seqlen": 1,
                               "tokens": ENVELOPE_TOKENS})
    return qc


def ensure_synthetic_model(out_dir: Path | str, shape: str, bits: int = 3, fmt: str = "uniform",
                           group_size: int = 128, num_layers: int | None = None, seed: int = 0,
                           device: str | torch.device = "cpu") -> Path:
    """The directory of a synthetic model, written only when it does not already hold that model
    (a tuned decdec_config.json there survives reuse)."""
    out_dir = Path(out_dir)
    want = {"shape": shape, "bits": bits, "format": fmt, "group_size": group_size,
            "num_layers": synthetic_config(shape, num_layers).num_hidden_layers, "seed": seed}
    try:
        found = artifacts.read_quant_config(out_dir).get("extra", {}).get("synthetic")
    except (FileNotFoundError, artifacts.ArtifactError):
        found = None
    complete = all((out_dir / f).is_file() for f in (artifacts.CHEATSHEET, artifacts.THRESHOLDS))
    if found != want or not complete:
        write_synthetic_model(out_dir, shape, bits, fmt, group_size, num_layers, seed, device)
    return out_dir
