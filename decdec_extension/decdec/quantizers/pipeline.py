"""The setup steps: original model -> quantized directory -> + cheatsheet.pt -> + thresholds.pt.

Each step reads what the previous one wrote, so each runs alone (decdec_setup/quantize.py,
cheatsheet.py, thresholds.py) or all in one process (prepare.py). What the cheatsheet needs besides
the original model and the quantized weights, AWQ's scales, is written by the quantize step to
``awq_scales.safetensors`` (named in quant_config "extra", tagged with the quant_id).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .. import artifacts
from ..formats import weight_from_tensors
from ..patching import block_linears, discover_linear_groups, find_decoder_blocks, kind_name
from ..prepared import default_dtype, load_prepared, write_prepared_model
from ..residual import ResidualPack, quantize_residual
from ..selection import rank_envelope
from .awq import quantize_awq, scaled_weight
from .blockwise import BlockRunner, watch_inputs
from .mixed import block_sensitivity, split_bits
from .rtn import quantize_rtn
from .squeezellm import fisher_information, quantize_squeezellm

METHODS = ("rtn", "awq", "squeezellm")
BITS = (3.0, 4.0, 3.5)
AWQ_SCALES = "awq_scales.safetensors"
SUMMARY = "setup_summary.json"
# files a (possibly interrupted) quantize step writes: a directory holding only these may be reused
OWN_FILES = {artifacts.QUANT_CONFIG, artifacts.WEIGHTS, artifacts.CHEATSHEET, artifacts.THRESHOLDS,
             artifacts.TUNING_CONFIG, AWQ_SCALES, SUMMARY, "config.json", "generation_config.json",
             "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
             "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json"}


def parse_bits(value: str | float) -> float:
    """'3' / '4' / '3.5' -> float; anything else is an error naming the choices."""
    try:
        bits = float(value)
    except ValueError:
        bits = -1.0
    if bits not in BITS:
        raise ValueError(f"unsupported --bits {value!r}: expected one of 3, 4, 3.5")
    return bits


def check_quant_settings(model: nn.Module, method: str, bits: float, group_size: int) -> None:
    """Fails before any long work on a method, bit width or group size the model cannot take."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: expected one of {METHODS}")
    parse_bits(bits)
    if method == "squeezellm":
        return  # per-output-channel tables: no groups
    if group_size < 1:
        raise ValueError(f"--group-size must be positive, got {group_size}")
    _, blocks = find_decoder_blocks(model)
    for name, lin in block_linears(blocks[0]).items():
        if group_size > lin.in_features:
            raise ValueError(f"--group-size {group_size} is larger than {name}'s {lin.in_features} input channels")


def check_out_dir(out_dir: Path | str, identity: dict, overwrite: bool = False) -> dict | None:
    """The quant config already in ``out_dir`` (None if there is none). Refuses a directory that
    holds another model or files this pipeline does not write, unless ``overwrite``."""
    out_dir = Path(out_dir)
    if not out_dir.exists():
        return None
    if not out_dir.is_dir():
        raise ValueError(f"--out {out_dir} exists and is not a directory")
    foreign = sorted(p.name for p in out_dir.iterdir() if p.name not in OWN_FILES and not p.name.startswith("."))
    if foreign and not overwrite:
        raise ValueError(f"--out {out_dir} holds files that are not a prepared model's ({', '.join(foreign[:5])}): "
                         f"choose an empty directory")
    if not (out_dir / artifacts.QUANT_CONFIG).is_file():
        return None
    qc = artifacts.read_quant_config(out_dir)
    found = qc.get("model", {})
    differs = [f for f in artifacts.IDENTITY_FIELDS + ("source",) if found.get(f) != identity.get(f)]
    if differs and not overwrite:
        f = differs[0]
        raise artifacts.ArtifactError(out_dir / artifacts.QUANT_CONFIG, f"model.{f}", identity.get(f), found.get(f),
                                      "--out holds another model: choose another directory or pass --overwrite")
    return qc


def _clear_stale(out_dir: Path) -> None:
    """Before new weights are written: the old config goes first, so the directory never looks
    complete with a mix of old and new files."""
    for name in (artifacts.QUANT_CONFIG, artifacts.CHEATSHEET, artifacts.THRESHOLDS, artifacts.TUNING_CONFIG,
                 AWQ_SCALES):
        (out_dir / name).unlink(missing_ok=True)


def quantize_to_dir(model: nn.Module, tokenizer, source: str, out_dir: Path | str, *, method: str, bits: float,
                    group_size: int, calib_ids: Tensor | None, device: torch.device | str, settings: dict) -> dict:
    """Quantizes ``model`` (in host memory; AWQ folds its scales into the norms and biases in
    place, linear weights stay original) and writes the directory; returns the quant config.
    ``settings`` (what was asked for) is recorded so that prepare.py can reuse the result."""
    out_dir = Path(out_dir)
    check_quant_settings(model, method, bits, group_size)
    if method != "rtn" and calib_ids is None:
        raise ValueError(f"{method} needs calibration data")
    groups = discover_linear_groups(model)
    _, blocks = find_decoder_blocks(model)
    extra: dict = {"settings": settings}
    if bits == 3.5:
        if calib_ids is None:
            raise ValueError("3.5 bits needs calibration data for the sensitivity of each block")
        sens = block_sensitivity(model, calib_ids, group_size, device)
        block_bits = split_bits(sens)
        extra["sensitivity_kl"] = sens
    else:
        block_bits = [int(bits)] * len(blocks)
    out_dir.mkdir(parents=True, exist_ok=True)
    _clear_stale(out_dir)
    quant_id = artifacts.new_quant_id()
    if method == "rtn":
        quantized = quantize_rtn(model, block_bits, group_size, device)
    elif method == "awq":
        runner = BlockRunner(model, calib_ids, device)
        quantized, scales, notes = quantize_awq(runner, groups, block_bits, group_size)
        extra.update(notes)
        extra["residual_scales"] = AWQ_SCALES
        artifacts._atomic_write(out_dir / AWQ_SCALES, lambda p: save_file(
            {k: v.contiguous() for k, v in scales.items()}, str(p), metadata={"quant_id": quant_id}))
    else:
        fisher = fisher_information(model, calib_ids, device)
        quantized = quantize_squeezellm(model, fisher, block_bits, device)
    return write_prepared_model(out_dir, model, tokenizer, quantized, groups, method=method, bits=bits,
                                source=source, group_size=None if method == "squeezellm" else group_size,
                                block_bits=block_bits, quant_id=quant_id, extra=extra)


def _residual_scales(model_dir: Path, quant_config: dict) -> dict[str, Tensor]:
    name = quant_config.get("extra", {}).get("residual_scales")
    if not name:
        return {}
    path = model_dir / name
    if not path.is_file():
        raise FileNotFoundError(f"{path}: AWQ scales missing (rerun decdec_setup/quantize.py)")
    with safe_open(str(path), "pt") as f:
        found = (f.metadata() or {}).get("quant_id")
    if found != quant_config["quant_id"]:
        raise artifacts.ArtifactError(path, "quant_id", quant_config["quant_id"], found,
                                      "scales of other quantized weights: rerun decdec_setup/quantize.py")
    return load_file(str(path))


def check_original(model: nn.Module, model_dir: Path, quant_config: dict, tensors: dict[str, Tensor]) -> None:
    """Refuses an original that is not the model the directory was quantized from: the identity
    (architecture, sizes) and the input embedding, which no method changes, must match."""
    artifacts.check_identity(f"--original vs {model_dir / artifacts.QUANT_CONFIG}",
                             artifacts.model_identity(model.config), quant_config["model"])
    emb = model.get_input_embeddings().weight
    name = next(n for n, p in model.named_parameters() if p is emb)
    stored = tensors.get(name)
    if stored is None or stored.shape != emb.shape or not torch.allclose(
            stored.float(), emb.detach().float().cpu(), rtol=1e-2, atol=1e-3 * float(emb.abs().max())):
        raise artifacts.ArtifactError(model_dir / artifacts.WEIGHTS, name, "the --original model's embedding",
                                      "different values", "--original is not the model this directory was made from")


@torch.no_grad()
def build_cheatsheet(model: nn.Module, model_dir: Path | str, device: torch.device | str) -> dict:
    """Writes cheatsheet.pt: per block, per linear, quantize_residual(W_orig - deq(Q)) with W_orig
    the original weight (AWQ: scaled as it was quantized). Returns the quant config."""
    from tqdm.auto import tqdm
    model_dir = Path(model_dir)
    qc = artifacts.read_quant_config(model_dir)
    tensors = artifacts.read_weights(model_dir)
    check_original(model, model_dir, qc, tensors)
    scales = _residual_scales(model_dir, qc)
    blocks_name, blocks = find_decoder_blocks(model)
    packs: list[dict[str, ResidualPack]] = []
    for i, block in enumerate(tqdm(blocks, desc="cheatsheet blocks", leave=False)):
        block_packs = {}
        for name, lin in block_linears(block).items():
            prefix = f"{blocks_name}.{i}.{name}"
            meta = qc["layers"][i][name]
            parts = {k[len(prefix) + 1:]: t for k, t in tensors.items()
                     if k.startswith(prefix + ".") and k[len(prefix) + 1:] in ("packed", "scales", "zeros", "lut")}
            q = weight_from_tensors(parts, meta).to(device)
            w = scaled_weight(lin.weight.to(device), _get(scales, f"{prefix}.in_scale", device),
                              _get(scales, f"{prefix}.out_scale", device))
            pack = quantize_residual(w - q.dequantize())
            block_packs[name] = ResidualPack(pack.packed.cpu(), pack.scales.cpu())
        packs.append(block_packs)
    artifacts.save_cheatsheet(model_dir / artifacts.CHEATSHEET, qc, packs)
    return qc


def _get(tensors: dict[str, Tensor], name: str, device) -> Tensor | None:
    t = tensors.get(name)
    return None if t is None else t.to(device)


@torch.no_grad()
def measure_thresholds(model_dir: Path | str, calib_ids: Tensor, calibration: dict,
                       device: torch.device | str) -> dict:
    """Writes thresholds.pt: per block, per distinct linear input, the rank envelope and mean x^2
    over the calibration tokens, as the deployed quantized model computes them (its blocks run
    one at a time on ``device``). Returns the quant config."""
    from transformers import AutoConfig
    model_dir = Path(model_dir)
    qc = artifacts.read_quant_config(model_dir)
    dtype = default_dtype(device, AutoConfig.from_pretrained(model_dir))
    model = load_prepared(model_dir, "cpu", dtype=dtype, mode="none", cheatsheet=False, thresholds=False)
    runner = BlockRunner(model, calib_ids, device, qc["blocks"])
    stats = []
    for _, block in runner.iterate("thresholds blocks"):
        acc: dict[str, list] = {}

        def observe(kind: str, x: Tensor) -> None:
            env = rank_envelope(x)
            old = acc.get(kind)
            acc[kind] = [env, x.float().square().sum(0), x.shape[0]] if old is None else \
                [torch.maximum(old[0], env), old[1] + x.float().square().sum(0), old[2] + x.shape[0]]

        with watch_inputs({kind_name(g): block.get_submodule(g[0]) for g in qc["groups"]}, observe):
            runner.hidden = runner.outputs(block)
        stats.append({kind: {"envelope": env.cpu(), "mean_sq": (sq / n).cpu()} for kind, (env, sq, n) in acc.items()})
    artifacts.save_thresholds(model_dir / artifacts.THRESHOLDS, qc, stats, calibration)
    return qc


def deployed_sizes(model_dir: Path | str, act_bytes: int = 2) -> dict:
    """Bytes on the GPU (quantized weights as stored, other tensors at ``act_bytes`` per element,
    a tied output layer once) and in pinned host memory (the cheatsheet)."""
    model_dir = Path(model_dir)
    qc = artifacts.read_quant_config(model_dir)
    quantized = quant_bytes = dense = 0
    with safe_open(str(model_dir / artifacts.WEIGHTS), "pt") as f:
        for name in f.keys():
            t = f.get_slice(name)
            numel = 1
            for n in t.get_shape():
                numel *= n
            if name.rsplit(".", 1)[-1] in ("packed", "scales", "zeros", "lut") and name.startswith(qc["blocks"] + "."):
                quant_bytes += numel * _dtype_bytes(t.get_dtype())
                quantized += 1
            else:
                dense += numel * act_bytes
    pinned = 0
    if (model_dir / artifacts.CHEATSHEET).is_file():
        for block in artifacts.load_cheatsheet(model_dir / artifacts.CHEATSHEET, qc):
            pinned += sum(p.packed.numel() + 2 * p.scales.numel() for p in block.values())
    return {"gpu_quantized_bytes": quant_bytes, "gpu_other_bytes": dense, "gpu_bytes": quant_bytes + dense,
            "pinned_host_bytes": pinned}


def _dtype_bytes(name: str) -> int:
    return {"U8": 1, "I8": 1, "F16": 2, "BF16": 2, "F32": 4, "I32": 4, "I64": 8, "F64": 8}[name]


def write_summary(model_dir: Path | str, summary: dict) -> None:
    artifacts.write_json(Path(model_dir) / SUMMARY, json.loads(json.dumps(summary, default=str)))

