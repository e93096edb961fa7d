#!/usr/bin/env python
"""Perplexity of a prepared DecDEC model under selection modes and k_chunk values, or of the
original (unquantized) model, with the GPTQ protocol.

Protocol: the rows of the evaluation split (WikiText-2 test, C4 validation) joined with blank
lines, tokenized once, cut into non-overlapping windows of --seqlen tokens (the tail dropped),
each window scored from its second token. Compensation is decode-equivalent: every position
gets the correction it would get if it were the token being decoded.

One record per (dataset, mode, k_chunk), printed as a table and written with --json; its
``seconds`` time the scoring pass only (the median of --repeats passes), after one untimed warm-up
batch of the same setting.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (K_MODES, add_model_args, check_model_args, check_modes, configure,  # noqa: E402
                     load_model, markdown_table, modes_and_k, run_fields, write_json)
from decdec.metrics import join_rows, perplexity, windows  # noqa: E402
from decdec.recall import RecallMeter  # noqa: E402
from decdec.resolve import load_text_dataset  # noqa: E402

SPLITS = {"wikitext2": "test", "c4": "validation"}
NONE = ("none", 0)  # the plain quantized model's run, against which the others' cost is given


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--dataset", nargs="+", default=["wikitext2"], choices=sorted(SPLITS),
                   help="evaluation text: wikitext2 (test split), c4 (validation split)")
    p.add_argument("--seqlen", type=int, default=2048, help="tokens per window (default 2048)")
    p.add_argument("--k-chunk", nargs="+", type=int, default=[8],
                   help="channels compensated per 1024 input channels, for each k-dependent mode (default 8)")
    p.add_argument("--mode", nargs="+", default=["decdec"],
                   help="selection modes: decdec, exact, exact-global, static, random (each at every --k-chunk), "
                        "none, full (once each); ignored with --model")
    p.add_argument("--limit-windows", type=int, default=None, help="score only the first N windows (quick runs)")
    p.add_argument("--batch-size", type=int, default=1,
                   help="windows per forward pass (default 1; on a GPU, 8 amortizes kernel launches)")
    p.add_argument("--report-recall", action="store_true",
                   help="also measure the recall of each k-dependent mode's selection against the exact top-k, "
                        "per linear kind, over the first window (in an untimed pass)")
    p.add_argument("--repeats", type=int, default=1,
                   help="timed passes per setting, the settings taking turns; the record keeps the median pass's "
                        "time (for cost comparisons)")
    p.add_argument("--json", default=None, help="write the records to this JSON file")
    return p


def token_stream(tokenizer, dataset: str, data_dir: str | None) -> torch.Tensor:
    """The whole evaluation split as one token stream [1, N]."""
    try:
        rows = load_text_dataset(dataset, SPLITS[dataset], data_dir)
    except FileNotFoundError as e:
        raise SystemExit(f"error: {e}") from None
    return tokenizer(join_rows(rows), return_tensors="pt").input_ids


@torch.no_grad()
def recall_on_first_window(model: torch.nn.Module, ids: torch.Tensor, seqlen: int) -> dict[str, float]:
    """Recall per kind over the first window, in a pass of its own so that it does not weigh on
    the timing of the perplexity run."""
    window = windows(ids, seqlen, limit=1)[0].to(next(model.parameters()).device)
    with RecallMeter(model) as meter:
        model(input_ids=window)
    return meter.recall()


@torch.no_grad()
def warm_up(model: torch.nn.Module, ids: torch.Tensor, seqlen: int, batch_size: int, limit: int | None) -> None:
    """One untimed forward pass over the first batch of windows, so that one-time work (kernel
    selection, per-layer caches such as the unpacked residual rows) is not timed as part of a
    setting."""
    first = windows(ids, seqlen, limit=batch_size if limit is None else min(batch_size, limit))
    model(input_ids=torch.cat(first).to(next(model.parameters()).device))


def main(argv: list[str] | None = None) -> list[dict]:
    args = parser().parse_args(argv)
    check_model_args(args)
    if args.seqlen < 2:
        raise SystemExit("error: --seqlen must be >= 2")
    if args.limit_windows is not None and args.limit_windows < 1:
        raise SystemExit("error: --limit-windows must be >= 1")
    if args.batch_size < 1:
        raise SystemExit("error: --batch-size must be >= 1")
    if args.repeats < 1:
        raise SystemExit("error: --repeats must be >= 1")
    check_modes(args.mode, args.k_chunk)
    loaded = load_model(args)
    max_pos = getattr(loaded.model.config, "max_position_embeddings", None)
    if max_pos is not None and args.seqlen > max_pos:
        raise SystemExit(f"error: --seqlen {args.seqlen} exceeds the model's {max_pos} positions")
    runs = modes_and_k(loaded, args.mode, args.k_chunk)
    records = []
    for dataset in args.dataset:
        ids = token_stream(loaded.tokenizer, dataset, args.data_dir)
        # (wall seconds, CPU seconds, perplexity, tokens) of each timed pass, per setting. With
        # --repeats the settings take turns, pass after pass, so that a machine whose speed drifts
        # over minutes slows every setting alike and their time ratios stay fair.
        passes: dict[tuple, list] = {run: [] for run in runs}
        for round_ in range(args.repeats):
            for mode, k_chunk in runs:
                configure(loaded, mode, k_chunk)
                desc = f"{dataset} {mode} k={k_chunk}" + (f" ({round_ + 1}/{args.repeats})" if args.repeats > 1 else "")
                if round_ == 0:
                    warm_up(loaded.model, ids, args.seqlen, args.batch_size, args.limit_windows)
                wall, cpu = time.perf_counter(), time.process_time()
                ppl, tokens = perplexity(loaded.model, ids, args.seqlen, args.limit_windows, desc=desc,
                                         batch_size=args.batch_size)
                passes[mode, k_chunk].append((time.perf_counter() - wall, time.process_time() - cpu, ppl, tokens))
                print(f"{desc}: ppl {ppl:.4f} over {tokens} tokens ({passes[mode, k_chunk][-1][0]:.1f} s)", flush=True)
        median = {run: sorted(timed)[len(timed) // 2] for run, timed in passes.items()}  # the median pass
        plain = median[NONE][0] if NONE in median else None
        for mode, k_chunk in runs:
            seconds, cpu_seconds, ppl, tokens = median[mode, k_chunk]
            record = {**loaded.info, "dataset": dataset, "mode": mode, "k_chunk": k_chunk, "ppl": ppl,
                      "tokens": tokens, "seqlen": args.seqlen, "batch_size": args.batch_size,
                      "windows": tokens // (args.seqlen - 1), "total_windows": ids.shape[1] // args.seqlen,
                      "seconds": seconds, "cpu_seconds": cpu_seconds, "compensation": "decode-equivalent",
                      **run_fields(args)}
            if args.repeats > 1:
                record["seconds_per_pass"] = [p[0] for p in passes[mode, k_chunk]]
            if plain is not None:
                record["cost_vs_none"] = seconds / plain  # the cost of compensating, same run
            if args.report_recall and mode in K_MODES and k_chunk:
                configure(loaded, mode, k_chunk)
                record["recall"] = recall_on_first_window(loaded.model, ids, args.seqlen)
                record["recall_tokens"] = args.seqlen
            records.append(record)
            write_json(args.json, records, quiet=True)  # partial results survive an interruption
    write_json(args.json, records)
    print()
    print(markdown_table(records, [("model", "model"), ("dataset", "dataset"), ("mode", "mode"),
                                   ("k_chunk", "k_chunk"), ("ppl", "perplexity"), ("tokens", "tokens"),
                                   ("seconds", "seconds"), ("cost_vs_none", "x none")]))
    if args.report_recall:
        rows = [{"mode": r["mode"], "k_chunk": r["k_chunk"], **r["recall"]} for r in records if "recall" in r]
        kinds = sorted({k for r in rows for k in r} - {"mode", "k_chunk", "all"}) + ["all"]
        print()
        print(markdown_table(rows, [("mode", "mode"), ("k_chunk", "k_chunk")] + [(k, f"recall {k}") for k in kinds]))
    return records


if __name__ == "__main__":
    main()
