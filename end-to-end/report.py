#!/usr/bin/env python
"""Prints the tables of autotuner/tune.py --json and end-to-end/generate.py --bench --json result
files: one tuning table (a row per target) and each benchmark table.

Example:
  python end-to-end/report.py out/tune_*.json out/bench.json
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

from decdec.patching import kind_label
from decdec.tables import text_table


def load_generate():
    spec = importlib.util.spec_from_file_location("generate", Path(__file__).with_name("generate.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tuning_table(results: list[dict]) -> str:
    kinds = list(results[0]["kinds"])
    head = ("target", "predicted", "measured", *(f"{kind_label(k)} k/n_tb" for k in kinds), "n_tb cap", "pinned",
            "source", "s")
    lines = [head]
    for r in sorted(results, key=lambda r: r["target_slowdown_percent"]):
        of = " of step" if r.get("target_of") == "step" else ""
        measured = r.get("measured_slowdown_percent")  # tune.py --verify: the kept config timed in the step
        lines.append((f"{r['target_slowdown_percent']:g} %{of}", f"{r['predicted_slowdown_percent']:.2f} %",
                      "-" if measured is None else f"{measured:.2f} %",
                      *(f"{r['kinds'][k]['k_chunk']}/{r['kinds'][k]['n_tb']}" for k in kinds), str(r["n_tb_cap"]),
                      ",".join(kind_label(p) for p in r["pinned"]) or "-",
                      "ESTIMATE" if r["estimate"] else ("reused table" if "table_from" in r else "measured"),
                      f"{r['tuning_seconds']:.0f}"))
    return text_table(lines, left=range(len(lines[0])))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", type=Path, nargs="+", help="JSON files from tune.py --json / generate.py --bench --json")
    args = p.parse_args(argv)
    tunes, benches = [], []
    for path in args.results:
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            print(f"{path}: skipped ({e})", file=sys.stderr)
            continue
        if "rows" in data:
            benches.append((path, data))
        elif "kinds" in data and "predicted_slowdown_percent" in data:
            tunes.append(data)
        else:
            print(f"{path}: neither a tuning nor a benchmark result, skipped", file=sys.stderr)
    if tunes:
        print("\nDecDEC tuning (k_chunk/n_tb per kind; s = tuning seconds)")
        print(tuning_table(tunes))
        for gpu in dict.fromkeys(t["gpu"] for t in tunes):
            print(f"  device: {gpu}")
    if benches:
        generate = load_generate()
        for path, data in benches:
            bw = data.get("memory_bandwidth_GBps")
            print(f"\ndecode benchmark {path.name}: {data['model_dir']} on {data['device']}, batch 1, "
                  f"{data['prompt_tokens']} prompt + {data['max_new_tokens']} new tokens"
                  + (", decode step torch.compile'd" if data.get("compile") else "")
                  + (f", measured memory bandwidth {bw:.0f} GB/s" if bw else ""))
            print(generate.bench_table(data["rows"]))
            if data.get("graph_errors"):
                print(f"not captured as CUDA graphs: {data['graph_errors']}")
            if "memory_check" in data:
                print(generate.memory_check_line(data["memory_check"]))
            if "contexts" in data:
                print(generate.context_table(data["contexts"]))
            if "profile" in data:
                print(generate.profile_table(data["profile"]))
    return 0 if tunes or benches else 1


if __name__ == "__main__":
    sys.exit(main())
