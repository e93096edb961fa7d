"""What the evaluation scripts share: the model options, loading a prepared or original model in
decode-equivalent mode, the records' common fields, and JSON / table output."""
from __future__ import annotations

import argparse
import json
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

import decdec
from decdec import artifacts
from decdec.batched import use_batched_compensation
from decdec.resolve import load_original
from decdec.selection import CHUNK_SIZE, MODES

#: modes whose result depends on k_chunk; "none" and "full" are run once
K_MODES = ("decdec", "exact", "exact-global", "static", "random")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def add_model_args(p: argparse.ArgumentParser) -> None:
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--model-dir", help="a prepared DecDEC model directory (decdec_setup/prepare.py)")
    which.add_argument("--model", help="an unquantized model (the original): HF id, local directory, .gguf, "
                                       "smollm2-135m or stories260k")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu or cuda[:i] (default: cuda when available)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="activation dtype (default: float32 on CPU, the model's fp16/bf16 on CUDA)")
    p.add_argument("--data-dir", default=None, help="data directory (default: $DECDEC_DATA or ../shared/data)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's choice; 1 is often faster on a busy machine)")
    p.add_argument("--reference", action="store_true",
                   help="compensate with the per-token reference path instead of the batched one (slow; for checks)")


def check_model_args(args: argparse.Namespace) -> None:
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"error: --device {args.device} but CUDA is not available")
    if args.model_dir is not None and not Path(args.model_dir).is_dir():
        raise SystemExit(f"error: --model-dir {args.model_dir} is not a directory")
    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit("error: --threads must be >= 1")
        torch.set_num_threads(args.threads)


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    info: dict = field(default_factory=dict)  # the model fields of every record

    @property
    def quantized(self) -> bool:
        return self.info["method"] != "original"


def load_model(args: argparse.Namespace) -> LoadedModel:
    """The prepared model (every position compensated as if decoded, batched unless
    --reference) or the original, in eval mode on ``args.device``."""
    dtype = DTYPES[args.dtype] if args.dtype else None
    if args.model is not None:
        try:
            model, tokenizer, _ = load_original(args.model, dtype=dtype or _original_dtype(args.device),
                                                device=args.device, data_dir=args.data_dir)
        except (FileNotFoundError, OSError) as e:
            raise SystemExit(f"error: {e}") from None
        info = {"model": args.model, "source": args.model, "method": "original", "bits": 16.0, "group_size": None}
        return LoadedModel(model, tokenizer, info)
    from transformers import AutoTokenizer
    try:
        model = decdec.load_prepared(args.model_dir, args.device, dtype=dtype, mode="none", compensate_prefill=True)
    except artifacts.ArtifactError as e:
        raise SystemExit(f"error: {e}") from None
    if not args.reference:
        use_batched_compensation(model)
    qc = model.decdec_quant_config
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    info = {"model": Path(args.model_dir).resolve().name, "source": qc["model"].get("source", ""),
            "method": qc["method"], "bits": float(qc["bits"]), "group_size": qc.get("group_size"),
            "quant_id": qc.get("quant_id")}
    return LoadedModel(model, tokenizer, info)


def _original_dtype(device: str) -> torch.dtype:
    return torch.float32 if torch.device(device).type == "cpu" else torch.float16


def check_modes(modes: list[str], k_chunks: list[int]) -> None:
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise SystemExit(f"error: unknown --mode {', '.join(unknown)}: expected some of {', '.join(MODES)}")
    if any(not 0 <= k <= CHUNK_SIZE for k in k_chunks):
        raise SystemExit(f"error: --k-chunk values must be in 0..{CHUNK_SIZE}")


def modes_and_k(loaded: LoadedModel, modes: list[str], k_chunks: list[int]) -> list[tuple[str, int | None]]:
    """The (mode, k_chunk) runs: k-dependent modes at every k_chunk, "none" at 0, "full" once
    (k_chunk None); the original has a single run ("original", None)."""
    if not loaded.quantized:
        return [("original", None)]
    runs: list[tuple[str, int | None]] = []
    for mode in modes:
        ks = [0] if mode == "none" else [None] if mode == "full" else k_chunks
        runs += [(mode, k) for k in ks if (mode, k) not in runs]
    return runs


def configure(loaded: LoadedModel, mode: str, k_chunk: int | None) -> None:
    if loaded.quantized:
        try:
            decdec.configure(loaded.model, mode=mode, k_chunk=k_chunk or 0)
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None


def run_fields(args: argparse.Namespace) -> dict:
    """Where and how a record was measured."""
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    return {"device": str(device), "device_name": name, "threads": torch.get_num_threads(),
            "path": "reference" if args.reference else "batched", "torch": torch.__version__,
            "decdec": decdec.__version__, "cpu_count": os.cpu_count()}


def write_json(path: str | None, records: list[dict], quiet: bool = False) -> None:
    """Writes the records atomically (nothing without a path)."""
    if path is None:
        return
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(records, indent=1) + "\n", encoding="utf-8")
    tmp.replace(out)
    if not quiet:
        print(f"wrote {len(records)} records to {out}")


def markdown_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """rows -> a markdown table of the given (key, header) columns; floats with 4 digits."""
    def cell(v) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.0f}"
        return str(v)
    lines = ["| " + " | ".join(h for _, h in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(k)) for k, _ in columns) + " |" for r in rows]
    return "\n".join(lines)
