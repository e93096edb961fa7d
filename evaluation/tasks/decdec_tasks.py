"""Offline loaders of the task YAMLs in this folder: each reads the local files of the data
directory into a ``datasets.DatasetDict`` shaped like the hub copy that lm-eval's built-in task of
the same name uses, so the prompts and metrics match. lm-eval calls them (``custom_dataset``)
with the task's metadata, to which evaluation/tasks.py adds ``data_dir``."""
from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import datasets


def _root(data_dir: str | None, sub: str) -> Path:
    if not data_dir:
        raise ValueError("the decdec_* tasks read the data directory: pass metadata data_dir (evaluation/tasks.py does)")
    path = Path(data_dir) / sub
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist (the data directory lacks this task)")
    return path


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _dataset(split: str, rows: list[dict]) -> datasets.DatasetDict:
    return datasets.DatasetDict({split: datasets.Dataset.from_list(rows)})


def piqa(data_dir: str | None = None, **_) -> datasets.DatasetDict:
    """PIQA validation: goal, sol1, sol2, label."""
    root = _root(data_dir, "piqa")
    labels = (root / "valid-labels.lst").read_text().split()
    docs = _jsonl(root / "valid.jsonl")
    if len(labels) != len(docs):
        raise ValueError(f"piqa: {len(docs)} questions but {len(labels)} labels")
    return _dataset("validation", [{"goal": d["goal"], "sol1": d["sol1"], "sol2": d["sol2"], "label": int(y)}
                                   for d, y in zip(docs, labels)])


def arc(data_dir: str | None = None, subset: str = "Easy", **_) -> datasets.DatasetDict:
    """ARC-Easy / ARC-Challenge test: question, choices {text, label}, answerKey."""
    path = _root(data_dir, "arc") / f"ARC-{subset}-Test.jsonl"
    rows = [{"id": d["id"], "question": d["question"]["stem"],
             "choices": {"text": [c["text"] for c in d["question"]["choices"]],
                         "label": [c["label"] for c in d["question"]["choices"]]},
             "answerKey": d["answerKey"]} for d in _jsonl(path)]
    return _dataset("test", rows)


_OBQA_CHOICE = re.compile(r"\(([A-D])\) ")


def openbookqa(data_dir: str | None = None, **_) -> datasets.DatasetDict:
    """OpenBookQA main test: question_stem, choices {text, label}, answerKey."""
    rows = []
    with open(_root(data_dir, "openbookqa") / "test.tsv", encoding="utf-8", newline="") as f:
        for r in csv.DictReader(f, delimiter="\t"):
            parts = _OBQA_CHOICE.split(r["Choices"])  # ["", "A", text, "B", text, ...]
            labels, texts = parts[1::2], [t.strip() for t in parts[2::2]]
            if labels != ["A", "B", "C", "D"]:
                raise ValueError(f"openbookqa {r['ID']}: cannot parse choices {r['Choices']!r}")
            rows.append({"id": r["ID"], "question_stem": r["Question Stem"],
                         "choices": {"text": texts, "label": labels}, "answerKey": r["Answer Key"].strip()})
    return _dataset("test", rows)


def lambada(data_dir: str | None = None, **_) -> datasets.DatasetDict:
    """LAMBADA (OpenAI's detokenized test set): text."""
    return _dataset("test", [{"text": d["text"]} for d in _jsonl(_root(data_dir, "lambada") / "lambada_test.jsonl")])


def gsm8k(data_dir: str | None = None, **_) -> datasets.DatasetDict:
    """GSM8K test: question, answer (the reasoning, then "#### <number>")."""
    return _dataset("test", [{"question": d["question"], "answer": d["answer"]}
                             for d in _jsonl(_root(data_dir, "gsm8k") / "test.jsonl")])


def bbh(data_dir: str | None = None, name: str = "", **_) -> datasets.DatasetDict:
    """One BIG-Bench Hard task: input, target, and ``prompt``: the task's 3-shot chain-of-thought
    prompt (description and exemplars) exactly as the BBH authors wrote it."""
    root = _root(data_dir, "bbh")
    examples = json.loads((root / f"{name}.json").read_text(encoding="utf-8"))["examples"]
    text = (root / "cot-prompts" / f"{name}.txt").read_text(encoding="utf-8")
    # the files open with a canary line and a "-----" separator
    prompt = text.split("-----\n", 1)[1].strip() if "-----\n" in text else text.strip()
    return _dataset("test", [{"input": e["input"], "target": e["target"], "prompt": prompt} for e in examples])
