#!/usr/bin/env python
"""Merges JSON results of evaluation/ppl.py and evaluation/tasks.py into a markdown report and plots.

- perplexity: per model and mode, one column per k_chunk, plus the plain model (none), full
  compensation and the original; the share of the quantization gap that compensation recovers,
  (ppl_none - ppl) / (ppl_none - ppl_original), when an original was measured on the same tokens;
- recall of the selection against the exact top-k, per mode and k_chunk (and per kind);
- the cost of each run relative to the plain quantized run (CPU seconds, or wall seconds on GPU);
- task scores;
- ppl_vs_k.png (per data set: perplexity against k_chunk for each method, bit width and mode,
  with the original, full compensation and any 3.5-bit model as horizontal lines) and
  recall_vs_k.png.
Later files win where two hold the same measurement.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import K_MODES, markdown_table  # noqa: E402


MODE_STYLE = {"decdec": "-", "exact": "--", "exact-global": (0, (5, 1)), "static": "-.", "random": (0, (1, 2))}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="+", help="JSON files written by ppl.py / tasks.py --json")
    p.add_argument("--out", default="report", help="folder for report.md and the plots (default ./report)")
    p.add_argument("--no-plots", action="store_true", help="write only report.md")
    return p


def load_records(paths: list[str]) -> tuple[list[dict], list[dict]]:
    """(perplexity records, task records), deduplicated: the last file wins."""
    ppl, tasks = {}, {}
    for path in paths:
        try:
            records = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise SystemExit(f"error: cannot read {path}: {e}") from None
        if not isinstance(records, list):
            raise SystemExit(f"error: {path} does not hold a list of records")
        for r in records:
            if "ppl" in r:
                ppl[(r["model"], r["dataset"], r["mode"], r["k_chunk"], r["tokens"])] = r
            elif "task" in r:
                tasks[(r["model"], r["mode"], r["k_chunk"], r["task"], r["metric"], r["filter"], r.get("limit"))] = r
            else:
                raise SystemExit(f"error: {path}: a record is neither perplexity nor a task score: {sorted(r)[:8]}")
    return list(ppl.values()), list(tasks.values())


def label(r: dict) -> str:
    """The model as a legend entry: method and bit width (the directory name when they are missing)."""
    if r.get("method") == "original":
        return f"original ({r['model']})"
    gs = f" g{r['group_size']}" if r.get("group_size") else ""
    source = f"{r['source']} " if r.get("source") else ""
    return f"{source}{r.get('method', r['model'])} {r.get('bits', 0):g}-bit{gs}"


def originals(records: list[dict]) -> dict[tuple, dict]:
    """(dataset, tokens, source) -> the original model's record."""
    return {(r["dataset"], r["tokens"], r.get("source")): r for r in records if r["mode"] == "original"}


def perplexity_tables(records: list[dict]) -> str:
    ks = sorted({r["k_chunk"] for r in records if r["mode"] in K_MODES})
    orig = originals(records)
    by_model = defaultdict(list)
    for r in records:
        if r["mode"] != "original":
            by_model[(r["dataset"], r["tokens"], label(r), r["model"])].append(r)
    ppl_rows, gap_rows = [], []
    for (dataset, tokens, name, model), rs in sorted(by_model.items()):
        at = {(r["mode"], r["k_chunk"]): r["ppl"] for r in rs}
        none = at.get(("none", 0), at.get(("decdec", 0)))
        o = orig.get((dataset, tokens, rs[0].get("source")))
        base = {"dataset": dataset, "model": name, "tokens": tokens, "none": none, "full": at.get(("full", None)),
                "original": o["ppl"] if o else None}
        for mode in [m for m in K_MODES if any(r["mode"] == m for r in rs)]:
            ppl_rows.append({**base, "mode": mode, **{f"k{k}": at.get((mode, k)) for k in ks}})
            if none is not None and o is not None and none > o["ppl"]:
                gap = none - o["ppl"]
                gap_rows.append({**base, "mode": mode, **{f"k{k}": None if at.get((mode, k)) is None
                                                          else (none - at[(mode, k)]) / gap for k in ks},
                                 "full": None if base["full"] is None else (none - base["full"]) / gap})
    for key, o in orig.items():
        if not any((r["dataset"], r["tokens"], r.get("source")) == key for r in records if r["mode"] != "original"):
            ppl_rows.append({"dataset": o["dataset"], "model": label(o), "tokens": o["tokens"], "mode": "-",
                             "original": o["ppl"]})
    head = [("dataset", "data"), ("model", "model"), ("tokens", "tokens"), ("mode", "mode")]
    cols = head + [("original", "original"), ("none", "none")] + [(f"k{k}", f"k={k}") for k in ks] + [("full", "full")]
    out = ["## Perplexity", "", markdown_table(ppl_rows, cols)]
    if gap_rows:
        out += ["", "## Share of the quantization gap recovered: (none - ppl) / (none - original)", "",
                markdown_table(gap_rows, head + [(f"k{k}", f"k={k}") for k in ks] + [("full", "full")])]
    return "\n".join(out)


def recall_table(records: list[dict]) -> str:
    rows = [{"dataset": r["dataset"], "model": label(r), "mode": r["mode"], "k_chunk": r["k_chunk"], **r["recall"]}
            for r in records if r.get("recall")]
    if not rows:
        return ""
    kinds = sorted({k for r in rows for k in r} - {"dataset", "model", "mode", "k_chunk", "all"}) + ["all"]
    return "\n".join(["## Recall of the selection against the exact top-k", "",
                      markdown_table(rows, [("dataset", "data"), ("model", "model"), ("mode", "mode"),
                                            ("k_chunk", "k_chunk")] + [(k, k) for k in kinds])])


def cost_table(records: list[dict]) -> str:
    """Seconds of each run over those of the plain quantized run of the same model, data and device."""
    plain = {(r["model"], r["dataset"], r["tokens"], r.get("device"), r.get("path")): r
             for r in records if r["mode"] == "none"}
    rows = []
    for r in records:
        p = plain.get((r["model"], r["dataset"], r["tokens"], r.get("device"), r.get("path")))
        if p is None or r is p:
            continue
        cpu = str(r.get("device", "cpu")).startswith("cpu") and r.get("cpu_seconds") and p.get("cpu_seconds")
        key = "cpu_seconds" if cpu else "seconds"
        rows.append({"dataset": r["dataset"], "model": label(r), "mode": r["mode"], "k_chunk": r["k_chunk"],
                     "device": r.get("device"), "measure": key, "seconds": r[key], "ratio": r[key] / p[key]})
    if not rows:
        return ""
    return "\n".join(["## Cost relative to the plain quantized run (same model, data, device, threads)", "",
                      markdown_table(rows, [("dataset", "data"), ("model", "model"), ("mode", "mode"),
                                            ("k_chunk", "k_chunk"), ("device", "device"), ("measure", "measure"),
                                            ("seconds", "seconds"), ("ratio", "x plain")])])


def task_table(records: list[dict]) -> str:
    if not records:
        return ""
    order = {m: i for i, m in enumerate(("original", "none") + K_MODES + ("full",))}
    rows = sorted(records, key=lambda r: (r["task"], r["metric"], r["filter"], r.get("method") != "original",
                                          label(r), order.get(r["mode"], len(order)), r["k_chunk"] or 0))
    return "\n".join(["## Tasks", "", markdown_table([{**r, "model": label(r)} for r in rows], [
        ("task", "task"), ("metric", "metric"), ("filter", "filter"), ("model", "model"), ("mode", "mode"),
        ("k_chunk", "k_chunk"), ("value", "value"), ("stderr", "stderr"), ("samples", "samples"),
        ("limit", "limit")])])


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)
    return path


def plot_perplexity(records: list[dict], out: Path) -> Path | None:
    plt = _pyplot()

    datasets = sorted({r["dataset"] for r in records})
    if not datasets:
        return None
    fig, axes = plt.subplots(1, len(datasets), figsize=(7 * len(datasets), 5), squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        rs = [r for r in records if r["dataset"] == dataset]
        lines = defaultdict(dict)
        for r in rs:
            if r["mode"] in K_MODES:
                lines[(label(r), r["mode"])][r["k_chunk"]] = r["ppl"]
            elif r["mode"] == "none":  # k_chunk 0 of every mode
                for mode in K_MODES:
                    lines[(label(r), mode)].setdefault(0, r["ppl"])
        names = sorted({label(r) for r in rs if r["mode"] != "original"})
        color = {n: f"C{i % 10}" for i, n in enumerate(names)}
        for (name, mode), points in sorted(lines.items()):
            if len(points) < 2:
                continue
            ks = sorted(points)
            ax.plot(ks, [points[k] for k in ks], marker="o", color=color[name], linestyle=MODE_STYLE[mode],
                    label=f"{name}, {mode}")
        for r in rs:
            if r["mode"] == "original":
                ax.axhline(r["ppl"], color="black", linewidth=1.5, label=label(r))
            elif r["mode"] == "full":
                ax.axhline(r["ppl"], color=color[label(r)], linestyle=":", linewidth=1,
                           label=f"{label(r)}, full compensation")
            elif r["mode"] == "none" and float(r.get("bits", 0)) == 3.5:
                ax.axhline(r["ppl"], color=color[label(r)], linestyle="-.", linewidth=1.5,
                           label=f"{label(r)}, no compensation")
        values = [r["ppl"] for r in rs]
        if max(values) > 3 * min(values):
            ax.set_yscale("log")
        ax.set_xlabel("k_chunk (channels compensated per 1024)")
        ax.set_ylabel("perplexity")
        ax.set_title(f"{dataset}: perplexity vs k_chunk")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, out / "ppl_vs_k.png")


def plot_recall(records: list[dict], out: Path) -> Path | None:
    plt = _pyplot()

    lines = defaultdict(dict)
    for r in records:
        for kind, value in (r.get("recall") or {}).items():
            if kind == "all" or r["mode"] == "decdec":  # decdec per kind, every mode overall
                lines[(r["dataset"], label(r), r["mode"], kind)][r["k_chunk"]] = value
    if not lines:
        return None
    fig, ax = plt.subplots(figsize=(7, 5))
    for (dataset, name, mode, kind), points in sorted(lines.items()):
        ks = sorted(points)
        ax.plot(ks, [points[k] for k in ks], marker="o", linestyle="-" if kind == "all" else ":",
                label=f"{name}, {mode}" + ("" if kind == "all" else f", {kind}") + f" ({dataset})")
    ax.set_xlabel("k_chunk")
    ax.set_ylabel("recall of the exact top-k")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, out / "recall_vs_k.png")


def main(argv: list[str] | None = None) -> str:
    args = parser().parse_args(argv)
    ppl, tasks = load_records(args.results)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sections = ["# DecDEC evaluation report", "",
                f"Sources: {', '.join(args.results)}. Compensation is decode-equivalent: every position is "
                "corrected as if it were the token being decoded."]
    if ppl:
        sections += ["", perplexity_tables(ppl)]
        for part in (recall_table(ppl), cost_table(ppl)):
            if part:
                sections += ["", part]
    if tasks:
        sections += ["", task_table(tasks)]
    if not args.no_plots:
        plots = [p for p in (plot_perplexity(ppl, out) if ppl else None, plot_recall(ppl, out)) if p]
        if plots:
            sections += ["", "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots]
    text = "\n".join(sections) + "\n"
    (out / "report.md").write_text(text, encoding="utf-8")
    print(text)
    print(f"wrote {out / 'report.md'}")
    return text


if __name__ == "__main__":
    main()
