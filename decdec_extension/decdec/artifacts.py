"""The prepared model directory and its artifacts: the one place that defines their formats.

A prepared directory holds::

    config.json, generation_config.json, tokenizer files   copied from the original model
    quant_config.json    QUANT_FORMAT: method, bits, groups of linears, every quantized linear's metadata
    model.safetensors    quantized tensors ("<linear>.<tensor>") and the non-quantized tensors
    cheatsheet.pt        CHEATSHEET_FORMAT: per block, per linear, the 4-bit residual pack
    thresholds.pt        THRESHOLDS_FORMAT: per block, per distinct linear input, envelope and mean x^2
    decdec_config.json   TUNING_FORMAT: n_tb and k_chunk per linear kind, written by the autotuner

Every file names its format and version and the model identity (architecture and sizes) and
``quant_id`` (a random id drawn when the weights were quantized) it belongs to. Readers refuse a
mismatch with :class:`ArtifactError`, naming the file, the field, what was expected and found.
Files are written to a temporary name and renamed, so an interrupted run never leaves a file that
looks complete.
"""
from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .residual import ResidualPack

QUANT_CONFIG = "quant_config.json"
WEIGHTS = "model.safetensors"
CHEATSHEET = "cheatsheet.pt"
THRESHOLDS = "thresholds.pt"
TUNING_CONFIG = "decdec_config.json"

QUANT_FORMAT = ("decdec-quantized-model", 1)
CHEATSHEET_FORMAT = ("decdec-cheatsheet", 1)
THRESHOLDS_FORMAT = ("decdec-thresholds", 1)
TUNING_FORMAT = ("decdec-config", 1)

IDENTITY_FIELDS = ("architecture", "num_hidden_layers", "hidden_size", "vocab_size")


class ArtifactError(ValueError):
    def __init__(self, path: Path | str, field: str, expected: Any, found: Any, hint: str = ""):
        self.path, self.field, self.expected, self.found = str(path), field, expected, found
        msg = f"{path}: field '{field}': expected {expected!r}, found {found!r}"
        super().__init__(msg + (f" ({hint})" if hint else ""))


def model_identity(config: Any, source: str = "") -> dict:
    """What ties an artifact to one model: architecture and sizes, plus where it came from."""
    archs = getattr(config, "architectures", None) or [type(config).__name__]
    ident = {"architecture": archs[0], "source": source}
    for field in IDENTITY_FIELDS[1:]:
        ident[field] = getattr(config, field, None)
        if ident[field] is None and hasattr(config, "get_text_config"):
            ident[field] = getattr(config.get_text_config(), field, None)
    return ident


def new_quant_id() -> str:
    return uuid.uuid4().hex


def check_identity(path: Path | str, found: dict, expected: dict) -> None:
    for field in IDENTITY_FIELDS:
        if found.get(field) != expected.get(field):
            raise ArtifactError(path, f"model.{field}", expected.get(field), found.get(field),
                                "this file was made for another model")


def _check_header(path: Path, data: Any, fmt: tuple[str, int]) -> None:
    if not isinstance(data, dict):
        raise ArtifactError(path, "format", fmt[0], type(data).__name__)
    if data.get("format") != fmt[0]:
        raise ArtifactError(path, "format", fmt[0], data.get("format"))
    if data.get("version") != fmt[1]:
        raise ArtifactError(path, "version", fmt[1], data.get("version"), "written by another decdec version")


def _check_belongs(path: Path, data: Any, fmt: tuple[str, int], quant_config: dict, rebuild_hint: str) -> None:
    """Format, version, model identity and quant_id of an artifact against the quantized model's."""
    _check_header(path, data, fmt)
    check_identity(path, data.get("model", {}), quant_config["model"])
    if data.get("quant_id") != quant_config["quant_id"]:
        raise ArtifactError(path, "quant_id", quant_config["quant_id"], data.get("quant_id"),
                            f"made for other quantized weights: {rebuild_hint}")


def _atomic_write(path: Path, write) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json(path: Path, data: dict) -> None:
    _atomic_write(path, lambda p: p.write_text(json.dumps(data, indent=2) + "\n"))


def read_json(path: Path) -> dict:
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(path, "<json>", "valid JSON", str(e)) from None


def _torch_save(path: Path, data: dict) -> None:
    _atomic_write(path, lambda p: torch.save(data, p))


def _torch_load(path: Path) -> dict:
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such file")
    return torch.load(path, map_location="cpu", weights_only=True)


# ---------------------------------------------------------------- quantized weights

def write_quantized(model_dir: Path | str, quant_config: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Writes the weights first and quant_config.json last: the config marks the weights complete."""
    model_dir = Path(model_dir)
    quant_config = {"format": QUANT_FORMAT[0], "version": QUANT_FORMAT[1], **quant_config}
    for key in ("model", "quant_id", "method", "groups", "layers"):
        if key not in quant_config:
            raise ValueError(f"quant_config lacks '{key}'")
    contiguous = {name: t.detach().contiguous().cpu() for name, t in tensors.items()}
    _atomic_write(model_dir / WEIGHTS, lambda p: save_file(contiguous, str(p), metadata={"format": "pt"}))
    write_json(model_dir / QUANT_CONFIG, quant_config)


def read_quant_config(model_dir: Path | str) -> dict:
    path = Path(model_dir) / QUANT_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not a prepared model directory (run decdec_setup/quantize.py first)")
    data = read_json(path)
    _check_header(path, data, QUANT_FORMAT)
    return data


def read_weights(model_dir: Path | str) -> dict[str, torch.Tensor]:
    path = Path(model_dir) / WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"{path}: quantized weights missing")
    return load_file(str(path))


# ---------------------------------------------------------------- cheatsheet

def save_cheatsheet(path: Path | str, quant_config: dict, blocks: list[dict[str, ResidualPack]]) -> None:
    data = {"format": CHEATSHEET_FORMAT[0], "version": CHEATSHEET_FORMAT[1], "model": quant_config["model"],
            "quant_id": quant_config["quant_id"],
            "blocks": [{name: {"packed": p.packed.cpu().contiguous(), "scales": p.scales.cpu().contiguous()}
                        for name, p in block.items()} for block in blocks]}
    _torch_save(Path(path), data)


def load_cheatsheet(path: Path | str, quant_config: dict) -> list[dict[str, ResidualPack]]:
    """Residual packs per block, validated against the quantized model's config."""
    path = Path(path)
    data = _torch_load(path)
    _check_belongs(path, data, CHEATSHEET_FORMAT, quant_config, "rebuild it with decdec_setup/cheatsheet.py")
    layers = quant_config["layers"]
    blocks = data["blocks"]
    if len(blocks) != len(layers):
        raise ArtifactError(path, "blocks", len(layers), len(blocks))
    out = []
    for i, (block, expected) in enumerate(zip(blocks, layers)):
        packs = {}
        for name, meta in expected.items():
            if name not in block:
                raise ArtifactError(path, f"blocks[{i}].{name}", "a residual pack", "missing")
            pack = ResidualPack(block[name]["packed"], block[name]["scales"])
            shape = (pack.out_features, pack.in_features)
            want = (meta["out_features"], meta["in_features"])
            if shape != want:
                raise ArtifactError(path, f"blocks[{i}].{name}.shape", want, shape)
            try:
                pack.validate()
            except ValueError as e:
                raise ArtifactError(path, f"blocks[{i}].{name}", "a valid residual pack", str(e)) from None
            packs[name] = pack
        out.append(packs)
    return out


# ---------------------------------------------------------------- thresholds

def save_thresholds(path: Path | str, quant_config: dict, blocks: list[dict[str, dict[str, torch.Tensor]]],
                    calibration: dict) -> None:
    """``blocks[i][kind] = {"envelope": fp32 [d], "mean_sq": fp32 [d]}``; ``calibration`` describes
    the data (source, nsamples, seqlen, tokens)."""
    data = {"format": THRESHOLDS_FORMAT[0], "version": THRESHOLDS_FORMAT[1], "model": quant_config["model"],
            "quant_id": quant_config["quant_id"], "calibration": calibration,
            "blocks": [{kind: {k: v.float().cpu().contiguous() for k, v in entry.items()}
                        for kind, entry in block.items()} for block in blocks]}
    _torch_save(Path(path), data)


def load_thresholds(path: Path | str, quant_config: dict, input_sizes: dict[str, int]) -> tuple[list[dict], dict]:
    """(per-block {kind: {"envelope", "mean_sq"}}, calibration info). ``input_sizes``: kind -> d_in."""
    path = Path(path)
    data = _torch_load(path)
    _check_belongs(path, data, THRESHOLDS_FORMAT, quant_config, "rerun decdec_setup/thresholds.py")
    blocks = data["blocks"]
    if len(blocks) != len(quant_config["layers"]):
        raise ArtifactError(path, "blocks", len(quant_config["layers"]), len(blocks))
    for i, block in enumerate(blocks):
        for kind, d_in in input_sizes.items():
            if kind not in block:
                raise ArtifactError(path, f"blocks[{i}].{kind}", "an envelope", "missing")
            for field in ("envelope", "mean_sq"):
                shape = tuple(block[kind][field].shape)
                if shape != (d_in,):
                    raise ArtifactError(path, f"blocks[{i}].{kind}.{field}.shape", (d_in,), shape)
    return blocks, data.get("calibration", {})


# ---------------------------------------------------------------- tuned config

def save_tuning_config(model_dir: Path | str, quant_config: dict, kinds: dict[str, dict], extra: dict) -> None:
    """``kinds[kind] = {"n_tb": int, "k_chunk": int}``; ``extra``: target, prediction, GPU, table..."""
    data = {"format": TUNING_FORMAT[0], "version": TUNING_FORMAT[1], "model": quant_config["model"],
            "quant_id": quant_config["quant_id"], "kinds": kinds, **extra}
    write_json(Path(model_dir) / TUNING_CONFIG, data)


def load_tuning_config(model_dir: Path | str, quant_config: dict, kinds: list[str]) -> dict | None:
    """The tuned settings per kind, or None when the model was not tuned."""
    path = Path(model_dir) / TUNING_CONFIG
    if not path.is_file():
        return None
    data = read_json(path)
    _check_belongs(path, data, TUNING_FORMAT, quant_config, "rerun autotuner/tune.py")
    for kind in kinds:
        if kind not in data["kinds"]:
            raise ArtifactError(path, f"kinds.{kind}", "n_tb and k_chunk", "missing")
    return data
