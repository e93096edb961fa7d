#!/usr/bin/env python
"""Downstream tasks with lm-eval on a prepared DecDEC model (selection modes x k_chunk) or on the
original model.

Offline by default: piqa, arc_easy, arc_challenge, openbookqa, lambada, bbh (chain-of-thought,
3-shot, as in the paper) and gsm8k run from the task YAMLs in evaluation/tasks/, which read the
local files of the data directory. Any other name, or every name with --online, is one of
lm-eval's built-in tasks (they download from the Hugging Face hub).

The model is our loaded model wrapped in lm-eval's HFLM. Every position of a prompt is
compensated as if it were being decoded; generated tokens are decoded with compensation.
One record per (task, mode, k_chunk, metric), printed as a table and written with --json.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (add_model_args, check_model_args, check_modes, configure, load_model,  # noqa: E402
                     markdown_table, modes_and_k, run_fields, write_json)
from decdec.resolve import find_data_dir  # noqa: E402

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
#: the names this script runs offline -> their task in evaluation/tasks/
LOCAL_TASKS = {"piqa": "decdec_piqa", "arc_easy": "decdec_arc_easy", "arc_challenge": "decdec_arc_challenge",
               "openbookqa": "decdec_openbookqa", "lambada": "decdec_lambada", "bbh": "decdec_bbh",
               "gsm8k": "decdec_gsm8k"}
#: their lm-eval built-in counterparts (--online)
BUILTIN_TASKS = {"piqa": "piqa", "arc_easy": "arc_easy", "arc_challenge": "arc_challenge",
                 "openbookqa": "openbookqa", "lambada": "lambada_openai", "bbh": "bbh_cot_fewshot", "gsm8k": "gsm8k"}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--tasks", nargs="+", required=True,
                   help=f"task names: {', '.join(LOCAL_TASKS)} (offline), or lm-eval built-in names")
    p.add_argument("--k-chunk", nargs="+", type=int, default=[8], help="k_chunk values (default 8)")
    p.add_argument("--mode", nargs="+", default=["decdec"],
                   help="selection modes (decdec, exact, static, random at every --k-chunk; none, full once)")
    p.add_argument("--limit", type=float, default=None,
                   help="examples per task (a fraction when < 1); for quick runs, not for reported numbers")
    p.add_argument("--num-fewshot", type=int, default=None, help="override the tasks' number of few-shot examples")
    p.add_argument("--max-gen-toks", type=int, default=None,
                   help="cap the generated tokens of generation tasks (bbh, gsm8k; their YAMLs allow 256)")
    p.add_argument("--batch-size", default="1", help="lm-eval batch size (an integer or 'auto'; default 1)")
    p.add_argument("--online", action="store_true",
                   help="use lm-eval's built-in tasks (Hugging Face hub) instead of the local YAMLs")
    p.add_argument("--json", default=None, help="write the records to this JSON file")
    return p


def task_names(names: list[str], online: bool) -> list[str]:
    table = BUILTIN_TASKS if online else LOCAL_TASKS
    return [table.get(n, n) for n in names]


def metric_records(results: dict, names: list[str], tasks: list[str]) -> list[dict]:
    """lm-eval's results of the requested tasks (a group: its aggregate) as
    {task, lm_eval_task, metric, filter, value, stderr, samples} rows."""
    rows = []
    for name, task in zip(names, tasks):
        entry = results["results"].get(task, {})
        for key, value in entry.items():
            if "," not in key or "_stderr," in key or not isinstance(value, (int, float)):
                continue
            metric, filt = key.split(",", 1)
            stderr = entry.get(f"{metric}_stderr,{filt}")
            rows.append({"task": name, "lm_eval_task": task, "metric": metric, "filter": filt, "value": float(value),
                         "stderr": float(stderr) if isinstance(stderr, (int, float)) else None,
                         "samples": results.get("n-samples", {}).get(task, {}).get("effective")})
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    args = parser().parse_args(argv)
    check_model_args(args)
    check_modes(args.mode, args.k_chunk)
    try:
        batch_size = args.batch_size if args.batch_size == "auto" else int(args.batch_size)
    except ValueError:
        raise SystemExit(f"error: --batch-size must be an integer or 'auto', got {args.batch_size!r}") from None
    if args.max_gen_toks is not None and args.max_gen_toks < 1:
        raise SystemExit("error: --max-gen-toks must be >= 1")
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    tasks = task_names(args.tasks, args.online)
    local = [t for t in tasks if t.startswith("decdec_")]
    metadata = {}
    if local and not args.online:
        data_dir = find_data_dir(args.data_dir)
        if data_dir is None:
            raise SystemExit("error: the offline tasks need the data directory: pass --data-dir or set $DECDEC_DATA "
                             "(or use --online)")
        metadata["data_dir"] = str(data_dir)
    # indexing lm-eval's thousands of built-in tasks takes a while: only when one is asked for
    manager = TaskManager(include_path=None if args.online else str(TASKS_DIR),
                          include_defaults=args.online or len(local) < len(tasks), metadata=metadata)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise SystemExit(f"error: unknown task(s) {unknown}: offline names are {', '.join(LOCAL_TASKS)}; "
                         f"other names must be lm-eval tasks")
    loaded = load_model(args)
    lm = HFLM(pretrained=loaded.model, tokenizer=loaded.tokenizer, batch_size=batch_size)
    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    records = []
    for mode, k_chunk in modes_and_k(loaded, args.mode, args.k_chunk):
        configure(loaded, mode, k_chunk)
        wall = time.perf_counter()
        results = simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=args.limit,
                                  num_fewshot=args.num_fewshot, bootstrap_iters=1000, log_samples=False,
                                  gen_kwargs={"max_gen_toks": args.max_gen_toks} if args.max_gen_toks else None)
        seconds = time.perf_counter() - wall
        for row in metric_records(results, args.tasks, tasks):
            records.append({**loaded.info, "mode": mode, "k_chunk": k_chunk, **row, "limit": args.limit,
                            "online": args.online, "seconds": seconds, "compensation": "decode-equivalent",
                            **run_fields(args)})
        write_json(args.json, records, quiet=True)
    write_json(args.json, records)
    print()
    print(markdown_table(records, [("model", "model"), ("mode", "mode"), ("k_chunk", "k_chunk"), ("task", "task"),
                                   ("metric", "metric"), ("filter", "filter"), ("value", "value"),
                                   ("stderr", "stderr"), ("samples", "samples")]))
    return records


if __name__ == "__main__":
    main()
