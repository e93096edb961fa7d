"""Writing a prepared model directory and loading it back as a patched Hugging Face model."""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from . import artifacts, ops
from .formats import QuantizedWeight, weight_from_tensors
from .linear import DecDECLinear, SelectionGroup
from .patching import find_decoder_blocks, kind_name, set_module
from .timing import device_name


def save_model_files(out_dir: Path | str, model: nn.Module, tokenizer) -> None:
    """Copies config, generation config and tokenizer of the original (a GGUF's quantization
    config is dropped: the prepared model's dense tensors are plain)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = model.config
    if not getattr(config, "architectures", None):  # a model built from a config names no class yet
        config.architectures = [type(model).__name__]
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config
    config.save_pretrained(out_dir)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)


def write_prepared_model(out_dir: Path | str, model: nn.Module, tokenizer, quantized: list[dict[str, QuantizedWeight]],
                         groups: list[list[str]], *, method: str, bits: float, source: str,
                         group_size: int | None = None, block_bits: list[int] | None = None,
                         quant_id: str | None = None, extra: dict | None = None) -> dict:
    """Writes config, tokenizer, weights and quant_config.json; returns the quant config.

    ``model`` holds the non-quantized tensors as they must be used at inference (AWQ: after its
    scales were folded in); ``quantized[i][name]`` is block i's linear ``name``.
    """
    out_dir = Path(out_dir)
    blocks_name, blocks = find_decoder_blocks(model)
    if len(quantized) != len(blocks):
        raise ValueError(f"{len(quantized)} blocks of quantized weights for a model of {len(blocks)} blocks")
    save_model_files(out_dir, model, tokenizer)  # first: it completes config.architectures
    tensors: dict[str, torch.Tensor] = {}
    layers = []
    skip = set()
    for i, block_weights in enumerate(quantized):
        meta = {}
        for name, weight in block_weights.items():
            prefix = f"{blocks_name}.{i}.{name}"
            skip.add(f"{prefix}.weight")
            for t_name, t in weight.tensors().items():
                tensors[f"{prefix}.{t_name}"] = t
            meta[name] = weight.metadata()
        layers.append(meta)
    seen_storage = set()
    for name, t in model.state_dict().items():
        if name in skip:
            continue
        ptr = t.untyped_storage().data_ptr() if t.numel() else None
        if ptr is not None and ptr in seen_storage:  # tied weights (lm_head = embed_tokens): stored once
            continue
        seen_storage.add(ptr)
        tensors[name] = t
    quant_config = {
        "model": artifacts.model_identity(model.config, source),
        "quant_id": quant_id or artifacts.new_quant_id(),
        "method": method, "bits": bits, "group_size": group_size,
        "block_bits": block_bits or [int(bits)] * len(blocks),
        "blocks": blocks_name, "groups": groups, "layers": layers, "extra": extra or {},
    }
    artifacts.write_quantized(out_dir, quant_config, tensors)
    return artifacts.read_quant_config(out_dir)


def group_input_sizes(quant_config: dict) -> dict[str, int]:
    """kind -> input size (the in_features of the group's linears)."""
    first = quant_config["layers"][0]
    return {kind_name(g): first[g[0]]["in_features"] for g in quant_config["groups"]}


def default_dtype(device: torch.device | str, config) -> torch.dtype:
    if torch.device(device).type == "cpu":
        return torch.float32
    wanted = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return torch.bfloat16 if wanted in (torch.bfloat16, "bfloat16") else torch.float16


def load_prepared(model_dir: Path | str, device: str | torch.device = "cpu", *, dtype: torch.dtype | None = None,
                  mode: str | None = None, k_chunk: int | dict[str, int] | None = None,
                  compensate_prefill: bool = False, cheatsheet: bool = True, thresholds: bool = True):
    """A Hugging Face causal LM whose decoder-block linears are :class:`DecDECLinear`.

    Settings come from ``decdec_config.json`` when present (k_chunk and n_tb per kind); explicit
    ``mode`` / ``k_chunk`` (one value or one per kind) override it. Without thresholds.pt only the
    modes that need no calibration work; without cheatsheet.pt there is no compensation.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    model_dir = Path(model_dir)
    quant_config = artifacts.read_quant_config(model_dir)
    config = AutoConfig.from_pretrained(model_dir)
    dtype = dtype or default_dtype(device, config)
    ident = artifacts.model_identity(config)
    artifacts.check_identity(model_dir / "config.json", ident, quant_config["model"])
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    blocks_name, blocks = find_decoder_blocks(model)
    if blocks_name != quant_config["blocks"] or len(blocks) != len(quant_config["layers"]):
        raise artifacts.ArtifactError(model_dir / artifacts.QUANT_CONFIG, "blocks",
                                      f"{blocks_name} x {len(blocks)}",
                                      f"{quant_config['blocks']} x {len(quant_config['layers'])}")
    tensors = artifacts.read_weights(model_dir)
    residuals = (artifacts.load_cheatsheet(model_dir / artifacts.CHEATSHEET, quant_config)
                 if cheatsheet and (model_dir / artifacts.CHEATSHEET).is_file() else None)
    sizes = group_input_sizes(quant_config)
    calib = (artifacts.load_thresholds(model_dir / artifacts.THRESHOLDS, quant_config, sizes)[0]
             if thresholds and (model_dir / artifacts.THRESHOLDS).is_file() else None)
    tuned = artifacts.load_tuning_config(model_dir, quant_config, list(sizes))

    for i, layer_meta in enumerate(quant_config["layers"]):
        for group in quant_config["groups"]:
            kind = kind_name(group)
            stats = calib[i][kind] if calib else {}
            selection = SelectionGroup(kind, stats.get("envelope"), stats.get("mean_sq"), mode="none",
                                       compensate_prefill=compensate_prefill)
            for name in group:
                prefix = f"{blocks_name}.{i}.{name}"
                meta = layer_meta[name]
                weight = weight_from_tensors(_take_prefixed(tensors, prefix, _weight_tensor_names(meta)), meta)
                bias = tensors.pop(f"{prefix}.bias", None)
                residual = residuals[i][name] if residuals else None
                linear = DecDECLinear(weight, None if bias is None else bias.to(dtype), residual, selection)
                set_module(model, prefix, linear)

    rest = {name: t.to(dtype) if t.is_floating_point() else t for name, t in tensors.items()}
    missing, unexpected = model.load_state_dict(rest, strict=False, assign=True)
    if unexpected:
        raise artifacts.ArtifactError(model_dir / artifacts.WEIGHTS, "tensors", "only this model's tensors",
                                      sorted(unexpected)[:5])
    model.tie_weights()
    still_meta = [n for n, p in model.named_parameters() if p.is_meta]
    if still_meta:
        raise artifacts.ArtifactError(model_dir / artifacts.WEIGHTS, "tensors", "every model tensor",
                                      f"missing {still_meta[:5]}")
    model.to(device).eval()
    if torch.device(device).type == "cuda":
        for m in decdec_linears(model):
            m.pin_residual()
    configure(model, tuned=tuned, mode=mode if mode is not None else ("decdec" if residuals and calib else "none"),
              k_chunk=k_chunk)
    model.decdec_quant_config = quant_config
    model.decdec_model_dir = str(model_dir)
    return model


def _weight_tensor_names(meta: dict) -> Iterable[str]:
    return {"uniform": ("packed", "scales", "zeros"), "lut": ("packed", "lut")}[meta["format"]]


def _take_prefixed(tensors: dict, prefix: str, names: Iterable[str]) -> dict:
    out = {}
    for n in names:
        key = f"{prefix}.{n}"
        if key not in tensors:
            raise KeyError(f"{artifacts.WEIGHTS}: tensor {key!r} missing")
        out[n] = tensors.pop(key)
    return out


def decdec_linears(model: nn.Module) -> list[DecDECLinear]:
    return [m for m in model.modules() if isinstance(m, DecDECLinear)]


def selection_groups(model: nn.Module) -> list[SelectionGroup]:
    seen, out = set(), []
    for m in model.modules():
        if isinstance(m, SelectionGroup) and id(m) not in seen:
            seen.add(id(m))
            out.append(m)
    return out


GroupSettings = list[tuple[str, int, int | None]]  # (mode, k_chunk, n_tb) per selection group


def group_settings(model: nn.Module) -> GroupSettings:
    """(mode, k_chunk, n_tb) of every selection group, for :func:`apply_group_settings`."""
    return [(g.mode, g.k_chunk, g.n_tb) for g in selection_groups(model)]


def apply_group_settings(model: nn.Module, settings: GroupSettings) -> None:
    """Restores what :func:`group_settings` returned (or a modified copy of it)."""
    for g, (mode, k_chunk, n_tb) in zip(selection_groups(model), settings, strict=True):
        g.configure(mode=mode, k_chunk=k_chunk)
        g.n_tb = n_tb


def timed_on(device: torch.device) -> dict:
    """What timings depend on besides the model, as tune.py records it in a tuned config: the GPU
    and, on CUDA, how the kernels are launched (:func:`tuned_elsewhere` compares them)."""
    where = {"gpu": device_name(device)}
    if device.type == "cuda":
        where["dependent_launch"] = ops.dependent_launch()
    return where


def tuned_elsewhere(tuned: dict, device: torch.device | str) -> str | None:
    """Why the timings behind a tuned config may not hold on the CUDA ``device``, or None. Those of
    tune.py's verify rounds (``verified_on``) count over those of its table. Other devices run the
    reference path, where speed is not the point; configs written before tune.py recorded the GPU
    (or the launch) are taken as they are."""
    device = torch.device(device)
    timed = tuned.get("verified_on", tuned)
    tuned_on = timed.get("gpu")
    if device.type != "cuda" or tuned_on is None:
        return None
    here = device_name(device)
    if tuned_on.startswith("analytic model"):
        return f"it was estimated by tune.py --dry-run ({tuned_on}), not measured on {here}"
    if tuned_on != here:
        return f"it was tuned on {tuned_on}, and this model runs on {here}"
    launch = timed.get("dependent_launch")
    if launch is not None and launch != ops.dependent_launch():
        state = {True: "dependent", False: "one after the other"}
        return (f"it was tuned with the kernels launched {state[launch]}, and they are now launched "
                f"{state[not launch]} (DECDEC_DEPENDENT_LAUNCH)")
    return None


def configure(model: nn.Module, *, mode: str | None = None, k_chunk: int | dict[str, int] | None = None,
              tuned: dict | None = None, compensate_prefill: bool | None = None,
              scales_on_host: bool | None = None) -> None:
    """Sets the selection of every group: ``tuned`` (a decdec_config.json) first, then the explicit
    ``mode`` and ``k_chunk`` (one value for all kinds, or kind -> value); ``compensate_prefill`` and
    ``scales_on_host`` (see :class:`SelectionGroup`) when given. Warns when ``tuned`` was timed
    on another GPU than the model's (:func:`tuned_elsewhere`)."""
    param = next(model.parameters(), None)
    reason = None if tuned is None or param is None else tuned_elsewhere(tuned, param.device)
    if reason:
        warnings.warn(f"tuned DecDEC config: {reason}; its n_tb and k_chunk may miss the slowdown target here "
                      f"(rerun autotuner/tune.py on this GPU)", stacklevel=2)
    for group in selection_groups(model):
        kc = group.k_chunk
        if tuned is not None:
            kc = tuned["kinds"][group.kind]["k_chunk"]
            group.n_tb = tuned["kinds"][group.kind].get("n_tb")
        if isinstance(k_chunk, dict):
            kc = k_chunk.get(group.kind, kc)
        elif k_chunk is not None:
            kc = k_chunk
        group.configure(mode=mode, k_chunk=kc)
        if compensate_prefill is not None:
            group.compensate_prefill = compensate_prefill
        if scales_on_host is not None:
            group.scales_on_host = scales_on_host
