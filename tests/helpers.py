"""Test helpers: tiny models of several architectures and a prepared directory made by hand
through the public API (round-trip tests of the loader; decdec_setup makes real ones)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch
from torch import nn

import decdec
from decdec import artifacts
from decdec.patching import block_linears, find_decoder_blocks
from decdec.selection import bucket_edges

REPO = Path(__file__).resolve().parents[1]


def load_script(path: Path):
    """A stage script as a module, named after its folder and file (stages share file names);
    its folder goes on sys.path first, for the sibling modules it imports."""
    name = f"{path.parent.name.replace('-', '_')}_{path.stem}"
    if name not in sys.modules:
        sys.path.insert(0, str(path.parent))
        spec = importlib.util.spec_from_file_location(name, path)
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


TINY = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=300, max_position_embeddings=128)


def tiny_model(arch: str) -> nn.Module:
    """A randomly initialised causal LM of the given architecture with TINY sizes."""
    import transformers
    configs = {
        "llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config, "phi3": transformers.Phi3Config,
        "mistral": transformers.MistralConfig, "gemma": transformers.GemmaConfig, "qwen3": transformers.Qwen3Config,
    }
    extra = {"head_dim": 16} if arch in ("gemma", "qwen3") else {}
    if arch == "phi3":
        extra["pad_token_id"] = 0
    config = configs[arch](**TINY, **extra)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    return model


def block_inputs(model: nn.Module, groups: list[list[str]], input_ids: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    """Per block, per kind: the [tokens, d_in] inputs the group's linears saw."""
    _, blocks = find_decoder_blocks(model)
    seen = [dict() for _ in blocks]
    hooks = []
    for i, block in enumerate(blocks):
        for group in groups:
            kind = decdec.kind_name(group)
            lin = block.get_submodule(group[0])
            hooks.append(lin.register_forward_pre_hook(
                lambda m, a, i=i, kind=kind: seen[i].setdefault(kind, []).append(a[0].reshape(-1, a[0].shape[-1]))))
    with torch.no_grad():
        model(input_ids=input_ids)
    for h in hooks:
        h.remove()
    return [{kind: torch.cat(xs) for kind, xs in block.items()} for block in seen]


def prepare_by_hand(model: nn.Module, out_dir: Path, bits: int = 3, group_size: int = 32, fmt: str = "uniform",
                    cheatsheet: bool = True, thresholds: bool = True, tokenizer=None) -> dict:
    groups = decdec.discover_linear_groups(model)
    _, blocks = find_decoder_blocks(model)
    quantized, residuals = [], []
    for block in blocks:
        q_block, r_block = {}, {}
        for name, lin in block_linears(block).items():
            w = lin.weight.detach().float()
            if fmt == "uniform":
                q = decdec.UniformWeight.quantize(w, bits, group_size)
            else:
                levels = torch.quantile(w, torch.linspace(0, 1, 1 << bits), dim=1).t().contiguous()
                q = decdec.LUTWeight.quantize_nearest(w, levels, bits)
            q_block[name] = q
            r_block[name] = decdec.quantize_residual(w - q.dequantize())
        quantized.append(q_block)
        residuals.append(r_block)
    qc = decdec.write_prepared_model(out_dir, model, tokenizer, quantized, groups, method="rtn", bits=bits,
                                     source="tiny-test", group_size=group_size if fmt == "uniform" else None)
    if cheatsheet:
        artifacts.save_cheatsheet(out_dir / artifacts.CHEATSHEET, qc, residuals)
    if thresholds:
        ids = torch.randint(0, model.config.vocab_size, (4, 16))
        acts = block_inputs(model, groups, ids)
        stats = [{kind: {"envelope": decdec.rank_envelope(x), "mean_sq": x.float().square().mean(0)}
                  for kind, x in block.items()} for block in acts]
        artifacts.save_thresholds(out_dir / artifacts.THRESHOLDS, qc, stats,
                                  {"source": "random-ids", "nsamples": 4, "seqlen": 16, "tokens": 64})
    return qc


def special_inputs(tokens: int, k: int, env: torch.Tensor, dtype) -> torch.Tensor:
    """Random activations with ties, zeros, NaN, values above the calibration maximum and values
    exactly on bucket edges."""
    x = torch.randn(tokens, k)
    x[0, ::7] = 0.0
    x[1 % tokens, ::5] = torch.randint(-2, 3, (len(range(0, k, 5)),)).float() * 0.5  # ties
    x[-1, 3::11] = float("nan")
    x[0, 1::13] = env[0] * 4
    edges = bucket_edges(env[0], env[min(k, 64) - 1])
    x[-1, 2::17] = edges[torch.randint(0, 32, (len(range(2, k, 17)),))]
    return x.to(dtype)
