"""Calibration token windows for setup: C4, WikiText-2, text sampled from the model itself, or a
local text file.

Every source yields ``nsamples`` non-overlapping windows of ``seqlen`` tokens ([nsamples, seqlen]
int64). Text sources are documents shuffled with ``seed``, tokenized without special tokens and
concatenated with the tokenizer's EOS between documents, then cut into consecutive windows; a
source with too few tokens is an error raised before any quantization starts.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .resolve import load_text_dataset

DATASET_SPLITS = {"c4": "validation", "wikitext2": "test"}
SOURCES = ("c4", "wikitext2", "self")  # or the path of a UTF-8 text file


@dataclass
class Calibration:
    source: str
    ids: Tensor  # int64 [nsamples, seqlen]

    @property
    def nsamples(self) -> int:
        return self.ids.shape[0]

    @property
    def seqlen(self) -> int:
        return self.ids.shape[1]

    def describe(self) -> dict:
        """What thresholds.pt and the summaries record about the data."""
        return {"source": self.source, "nsamples": self.nsamples, "seqlen": self.seqlen,
                "tokens": self.nsamples * self.seqlen}


def check_calib_source(source: str) -> None:
    """Fails fast on a source that is neither a known name nor an existing file."""
    if source in SOURCES:
        return
    if not Path(source).is_file():
        raise ValueError(f"calibration source {source!r}: expected one of {SOURCES} or the path of a text file")


def _text_rows(source: str, data_dir: str | Path | None) -> list[str]:
    if source in DATASET_SPLITS:
        return load_text_dataset(source, DATASET_SPLITS[source], data_dir)
    path = Path(source)
    # a local file: paragraphs (blank-line separated) are its documents
    return [p for p in path.read_text(encoding="utf-8").split("\n\n")]


def windows_from_text(rows: list[str], tokenizer, nsamples: int, seqlen: int, seed: int = 0,
                      source: str = "text") -> Tensor:
    """[nsamples, seqlen] token windows from shuffled documents; tokenizes only as many as needed."""
    need = nsamples * seqlen
    order = [r for r in rows if r.strip()]
    random.Random(seed).shuffle(order)
    sep = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    stream: list[int] = []
    batch = 64
    for start in range(0, len(order), batch):
        for ids in tokenizer(order[start:start + batch], add_special_tokens=False)["input_ids"]:
            stream += ids + sep
        if len(stream) >= need:
            break
    if len(stream) < need:
        raise ValueError(f"calibration source {source!r} holds {len(stream)} tokens, fewer than the "
                         f"{nsamples} x {seqlen} = {need} requested: lower --nsamples or --seqlen")
    return torch.tensor(stream[:need], dtype=torch.int64).reshape(nsamples, seqlen)


@torch.no_grad()
def sample_from_model(model: nn.Module, tokenizer, nsamples: int, seqlen: int, seed: int = 0,
                      batch_size: int = 8) -> Tensor:
    """Data-free calibration: sequences sampled from the model (temperature 1) starting at BOS.

    Sampling, not greedy decoding, keeps the text varied; generation runs where the model is.
    """
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise ValueError("calibration 'self' needs a tokenizer with a BOS or EOS token to start from")
    device = next(model.parameters()).device
    gen = torch.Generator(device="cpu").manual_seed(seed)
    out = []
    for b0 in tqdm(range(0, nsamples, batch_size), desc="sampling calibration text", leave=False):
        n = min(batch_size, nsamples - b0)
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
        ids = torch.full((n, 1), start, dtype=torch.int64, device=device)
        seqs = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=0, top_p=1.0,
                              temperature=1.0, max_new_tokens=seqlen, min_new_tokens=seqlen,
                              pad_token_id=tokenizer.eos_token_id)
        out.append(seqs[:, :seqlen].cpu())
    return torch.cat(out)


def calibration_data(source: str, tokenizer, nsamples: int, seqlen: int, *, seed: int = 0,
                     model: nn.Module | None = None, data_dir: str | Path | None = None) -> Calibration:
    """Calibration windows from ``source`` (c4, wikitext2, self, or a text file path)."""
    if nsamples < 1 or seqlen < 2:
        raise ValueError(f"need nsamples >= 1 and seqlen >= 2, got {nsamples} and {seqlen}")
    check_calib_source(source)
    max_len = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if max_len is not None and seqlen > max_len:
        raise ValueError(f"--seqlen {seqlen} exceeds the model's max_position_embeddings {max_len}")
    if source == "self":
        if model is None:
            raise ValueError("calibration 'self' samples text from the model: pass the model")
        return Calibration(source, sample_from_model(model, tokenizer, nsamples, seqlen, seed))
    return Calibration(source, windows_from_text(_text_rows(source, data_dir), tokenizer, nsamples, seqlen, seed,
                                                 source))
