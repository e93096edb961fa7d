#!/usr/bin/env python
"""Tunes DecDEC's thread-block budget n_tb and k_chunk per linear kind for a slowdown target and
writes them to <model-dir>/decdec_config.json, which load_prepared then applies.

On the GPU it times every linear kind of the model without DecDEC and over a grid of
(n_tb, k_chunk) with CUDA events over CUDA graph replays, then runs the two-phase search of the
DecDEC paper (decdec.tuning). --dry-run runs the same search on an analytic cost model of a GPU
you describe (memory and PCIe bandwidth, SM count): an estimate, labelled as such.

Examples:
  python autotuner/tune.py --model-dir out/llama3-8b-awq3 --target-slowdown 2.5 --plot tune.png
  python autotuner/tune.py --model-dir out/llama3-8b-awq3 --target-slowdown 5 --table out/llama3-8b-awq3/decdec_config.json
  python autotuner/tune.py --model-dir out/llama3-8b-awq3 --target-slowdown 2.5 --dry-run \\
      --mem-bw 3350 --pcie-bw 52 --sms 132
  python autotuner/tune.py --model-dir out/llama3-8b-awq3 --target-slowdown 2.5 --of step \\
      --table out/llama3-8b-awq3/decdec_config.json    # 2.5 % of the decode step; times the step only
  python autotuner/tune.py --model-dir out/llama3-8b-awq3 --target-slowdown 2.5 --of step --compile \\
      --verify 3    # time the chosen configs in the compiled step, search again until they fit
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
import time
from pathlib import Path

import torch

import decdec
from decdec import artifacts, generation, tuning
from decdec.prepared import timed_on
from decdec.tables import text_table
from decdec.timing import memory_bandwidth, pcie_bandwidth

GB = 1e9


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", required=True, type=Path, help="prepared model directory (decdec_setup output)")
    p.add_argument("--target-slowdown", required=True, type=float,
                   help="allowed slowdown in percent (e.g. 2.5), of the summed linear time or, with --of step, "
                        "of the whole decode step")
    p.add_argument("--of", choices=("linears", "step"), default="linears",
                   help="what the target is a share of: the summed time of the linears (the paper's tuner; "
                        "default) or the whole decode step, whose time outside the linears (attention, norms, "
                        "lm_head) DecDEC does not touch")
    p.add_argument("--step-ms", type=float,
                   help="with --of step: the decode step's ms per token with DecDEC off (generate.py --bench "
                        "prints it); default: measured here, as generate.py runs it (also with --table)")
    p.add_argument("--compile", action="store_true",
                   help="with --of step: measure the torch.compile'd step (match how you decode)")
    p.add_argument("--verify", type=int, metavar="ROUNDS", default=0,
                   help="with --of step: time the searched config in the decode step, then search again with the "
                        "target scaled by how far the measurement missed it, up to ROUNDS times; the config that "
                        "compensates the most among those measured within the target is kept (default 0: trust "
                        "the table's prediction)")
    p.add_argument("--n-tb-max", type=int, help="largest n_tb tried (default: the GPU's SM count)")
    p.add_argument("--plot", type=Path, help="save relative time vs k_chunk per n_tb (PNG/PDF/SVG)")
    p.add_argument("--table", type=Path,
                   help="reuse the measured table of an earlier decdec_config.json instead of measuring")
    p.add_argument("--no-write", action="store_true", help="print the result without writing decdec_config.json")
    p.add_argument("--json", type=Path, help="also write the result (the config contents) to this file")
    g = p.add_argument_group("measurement")
    g.add_argument("--device", default="cuda",
                   help="cuda (default) or cpu; cpu times the reference path, only useful to test this script")
    g.add_argument("--dtype", choices=("float16", "bfloat16"), help="activation dtype (default: from config.json)")
    g.add_argument("--eager", action="store_true", help="time eager calls instead of CUDA graph replays")
    g.add_argument("--replayed-input", action="store_true",
                   help="time every call on the same input, so the same residual rows are fetched each time "
                        "(optimistic: decoding fetches other rows every token; for comparison only)")
    g.add_argument("--k-max", type=int, default=tuning.K_GRID[-1], help="largest k_chunk measured (default %(default)s)")
    d = p.add_argument_group("dry run (analytic cost model)")
    d.add_argument("--dry-run", action="store_true", help="estimate with the analytic model instead of measuring")
    d.add_argument("--mem-bw", type=float, help="GPU memory bandwidth, GB/s")
    d.add_argument("--pcie-bw", type=float, help="host -> GPU bandwidth, GB/s")
    d.add_argument("--sms", type=int, help="number of SMs")
    d.add_argument("--dec-overhead-us", type=float, default=0.0,
                   help="fixed cost per linear whenever DecDEC is on, microseconds (default 0)")
    args = p.parse_args(argv)
    if args.target_slowdown < 0:
        p.error("--target-slowdown must be >= 0 (percent)")
    if args.dry_run:
        missing = [f"--{n.replace('_', '-')}" for n in ("mem_bw", "pcie_bw", "sms") if getattr(args, n) is None]
        if missing:
            p.error(f"--dry-run needs {' '.join(missing)}")
        if min(args.mem_bw, args.pcie_bw) <= 0 or args.sms < 1:
            p.error("--mem-bw, --pcie-bw and --sms must be positive")
    elif any(getattr(args, n) is not None for n in ("mem_bw", "pcie_bw", "sms")):
        p.error("--mem-bw, --pcie-bw and --sms describe the GPU of a --dry-run only")
    if args.n_tb_max is not None and args.n_tb_max < 1:
        p.error("--n-tb-max must be at least 1")
    if args.table is not None and args.dry_run:
        p.error("--table and --dry-run exclude each other")
    if args.of == "linears" and (args.step_ms is not None or args.compile):
        p.error("--step-ms and --compile go with --of step")
    if args.of == "step" and args.step_ms is None and args.dry_run:
        p.error("--of step with --dry-run needs --step-ms (nothing runs to time the step)")
    if args.step_ms is not None and args.step_ms <= 0:
        p.error("--step-ms must be positive")
    if args.verify < 0:
        p.error("--verify takes a number of rounds >= 0")
    if args.verify and (args.of != "step" or args.dry_run or args.step_ms is not None):
        p.error("--verify times the decode step here: it needs --of step, without --dry-run or --step-ms")
    return args


def k_grid_up_to(k_max: int) -> tuple[int, ...]:
    grid = tuple(k for k in tuning.K_GRID if k <= k_max)
    if len(grid) < 2:
        raise SystemExit(f"--k-max {k_max} leaves no k_chunk above 0 to try")
    return grid


def reused_table(path: Path, workloads: list[tuning.Workload]) -> tuple[tuning.CostTable, dict]:
    data = artifacts.read_json(path)
    if "table" not in data:
        raise artifacts.ArtifactError(path, "table", "a measured table", "missing")
    table = tuning.CostTable.from_json(data["table"])
    found = sorted((w.kind, w.bits, w.shapes) for w in table.workloads)
    want = sorted((w.kind, w.bits, w.shapes) for w in workloads)
    if found != want:
        raise artifacts.ArtifactError(path, "table.workloads", want, found, "measured on another model's shapes")
    return table, data


def load_model(args: argparse.Namespace):
    """The prepared model on --device, for timing (refuses a GPU run without the CUDA extension)."""
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: use --dry-run (analytic estimate) or run on a GPU")
        if not decdec.cuda_available():
            raise SystemExit("the CUDA extension decdec._C is not built: the reference path's timings mean "
                             "nothing (pip install --no-build-isolation -e decdec_extension on a CUDA machine)")
    missing = [f for f in (artifacts.CHEATSHEET, artifacts.THRESHOLDS) if not (args.model_dir / f).is_file()]
    if missing:
        raise SystemExit(f"{args.model_dir} lacks {', '.join(missing)}: DecDEC cannot run, so there is nothing to "
                         f"measure (decdec_setup makes them)")
    dtype = getattr(torch, args.dtype) if args.dtype else None
    print(f"loading {args.model_dir} on {device} ...", file=sys.stderr)
    return decdec.load_prepared(args.model_dir, device, dtype=dtype, mode="decdec")


def measure(args: argparse.Namespace, model) -> tuple[tuning.CostTable, dict]:
    device = next(model.parameters()).device
    info = {**timed_on(device), "device": str(device), "dtype": str(next(model.parameters()).dtype),
            "timing": "eager" if args.eager or device.type != "cuda" else "cuda-graph replays, CUDA events",
            "input": "replayed" if args.replayed_input else "fresh before every timed call"}
    if device.type == "cuda":
        info["bandwidth_GBps"] = {"memory": memory_bandwidth(device) / GB, "pcie": pcie_bandwidth(device) / GB}
        n_tb_max = args.n_tb_max or torch.cuda.get_device_properties(device).multi_processor_count
    else:
        n_tb_max = args.n_tb_max or 1
    grid, k_grid = tuning.n_tb_grid(n_tb_max), k_grid_up_to(args.k_max)
    try:
        table = tuning.measure_table(model, grid, k_grid, cuda_graph=not args.eager, fresh_input=not args.replayed_input)
    except RuntimeError as e:
        if args.eager or device.type != "cuda":
            raise
        # a DEC path that cannot be captured still has a speed: time it eagerly, and say so
        reason = str(e).splitlines()[0]
        print(f"CUDA graph capture failed ({reason}); timing eager calls instead", file=sys.stderr)
        info["timing"] = f"eager calls, CUDA events (graph capture failed: {reason})"
        table = tuning.measure_table(model, grid, k_grid, cuda_graph=False, fresh_input=not args.replayed_input)
    return table, info


def step_ms_without_decdec(model, compile: bool) -> tuple[float, str]:
    """ms per token of greedy decoding with DecDEC off, as generate.py --bench runs it, and how it ran."""
    print("timing the decode step with DecDEC off ...", file=sys.stderr)
    saved = decdec.group_settings(model)
    decdec.configure(model, mode="none")
    try:
        ms = 1e3 * generation.seconds_per_token(model, compile=compile)
    finally:
        decdec.apply_group_settings(model, saved)
    cuda = next(model.parameters()).is_cuda
    return ms, "measured: greedy decoding, " + ("torch.compile + " if compile else "") + ("CUDA graph" if cuda else "eager")


def step_slowdown(model, off_ms: float, compile: bool):
    """measure(kinds) for tuning.search_measured: the decode step's slowdown with that config, timed
    as step_ms_without_decdec times the step without DecDEC."""
    def measure(kinds: dict) -> float:
        decdec.configure(model, mode="decdec", tuned={"kinds": kinds})
        slowdown = generation.seconds_per_token(model, compile=compile) * 1e3 / off_ms - 1
        print(f"  {off_ms * (1 + slowdown):.3f} ms/token ({100 * slowdown:+.2f} %) with k_chunk/n_tb "
              f"{tuning.settings_text(kinds)}", file=sys.stderr)
        return slowdown
    return measure


def print_rounds(rounds: list[tuning.MeasuredRound], chosen: tuning.TuneResult) -> None:
    print("\nverified in the decode step (slowdown of the whole step):")
    rows = [("round", "search target", "predicted", "measured", "k_chunk/n_tb")]
    for i, r in enumerate(rounds, start=1):
        mark = "  <- kept" if r.kinds == chosen.kinds else ""
        rows.append((str(i), f"{100 * r.goal:.2f} %", f"{100 * r.predicted:.2f} %", f"{100 * r.measured:.2f} %",
                     tuning.settings_text(r.kinds) + mark))
    print(text_table(rows, left=(4,)))


def print_table(table: tuning.CostTable, result: tuning.TuneResult, target: float, estimate: bool) -> None:
    head = "ESTIMATE (analytic model, nothing measured)" if estimate else "measured"
    print(f"\nDecDEC tuning, target slowdown {100 * target:.2f} %: {head}")
    rows = [("kind", "bits", "blocks", "base us", "n_tb", "k_chunk", "DEC us", "relative")]
    for w in table.workloads:
        chosen = result.kinds[w.kind]
        i = table.k_grid.index(chosen["k_chunk"])
        t = table.baseline[w.key] if i == 0 else table.times[w.key][chosen["n_tb"]][i]
        rows.append((w.kind, str(w.bits), str(w.count), f"{1e6 * table.baseline[w.key]:.2f}", str(chosen["n_tb"]),
                     str(chosen["k_chunk"]), f"{1e6 * t:.2f}", f"{t / table.baseline[w.key]:.3f}"))
    print(text_table(rows, left=(0,)))
    of = f" of the decode step ({1e3 * (result.baseline + result.other):.3f} ms)" if result.other else ""
    print(f"summed linear time per token: {1e3 * result.baseline:.3f} ms -> {1e3 * result.predicted:.3f} ms, "
          f"predicted slowdown{of} {100 * result.predicted_slowdown:.2f} % (n_tb cap {result.cap}"
          + (f", pinned to 0: {', '.join(result.pinned)}" if result.pinned else "") + ")")
    for s in result.steps:
        print(f"  {s}")


def plot(path: Path, table: tuning.CostTable, result: tuning.TuneResult, target: float,
         bandwidth: dict | None, title: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        print("no plot: matplotlib is not installed (pip install matplotlib)", file=sys.stderr)
        return

    n = len(table.workloads)
    cols = min(n, 2)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 4 * rows), squeeze=False)
    for ax, w in zip(axes.flat, table.workloads):
        base = table.baseline[w.key]
        for n_tb, row in table.times[w.key].items():
            pts = [(k, t / base) for k, t in zip(table.k_grid, row) if math.isfinite(t)]
            ax.plot(*zip(*pts), marker=".", label=f"n_tb {n_tb}")
        ax.axhline(1 + target, color="gray", linestyle=":", label=f"1 + target ({100 * target:g} %)")
        if bandwidth:
            k = tuning.knee(bandwidth["memory"], bandwidth["pcie"], w.bits)
            ax.axvline(k, color="red", linestyle="--", label=f"analytic knee {k:.1f}")
        chosen = result.kinds[w.kind]
        ax.axvline(chosen["k_chunk"], color="green", linestyle="-", alpha=0.5, label=f"tuned k_chunk {chosen['k_chunk']}")
        ax.set_xscale("symlog", linthresh=4)
        ax.set_xlim(0, 1.1 * table.k_grid[-1])
        ax.set_xticks([k for k in (0, 1, 2, 4, 8, 16, 32, 64, 128) if k <= table.k_grid[-1]])
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_ylim(0.95, min(tuning.STOP_ABOVE, ax.get_ylim()[1]))
        ax.set_title(f"{w.kind} ({w.bits}-bit, {' + '.join(f'{i}x{o}' for i, o in w.shapes)})", fontsize=9)
        ax.set_xlabel("k_chunk")
        ax.set_ylabel("time / time without DecDEC")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quant_config = artifacts.read_quant_config(args.model_dir)
    workloads = tuning.workloads_from_quant_config(quant_config)
    target = args.target_slowdown / 100
    t0 = time.perf_counter()
    model = None
    if args.dry_run:
        gpu = tuning.AnalyticGPU(args.mem_bw * GB, args.pcie_bw * GB, args.sms,
                                 dec_overhead=args.dec_overhead_us * 1e-6)
        table = tuning.analytic_table(workloads, gpu, args.n_tb_max, k_grid_up_to(args.k_max))
        info = {"gpu": f"analytic model: {args.mem_bw:g} GB/s memory, {args.pcie_bw:g} GB/s PCIe, {args.sms} SMs, "
                       f"{args.dec_overhead_us:g} us DEC overhead per linear",
                "bandwidth_GBps": {"memory": args.mem_bw, "pcie": args.pcie_bw}}
    elif args.table is not None:
        table, previous = reused_table(args.table, workloads)
        info = {k: previous[k] for k in ("gpu", "device", "dtype", "timing", "bandwidth_GBps", "dependent_launch")
                if k in previous}
        info["table_from"] = str(args.table)
    else:
        model = load_model(args)
        table, info = measure(args, model)
    if args.step_ms is not None:
        info["step_ms"], info["step_timing"] = args.step_ms, "given (--step-ms)"
    elif args.of == "step":  # with --table, the model is loaded only for this
        model = model or load_model(args)
        info["step_ms"], info["step_timing"] = step_ms_without_decdec(model, args.compile)
    other = 0.0
    if args.of == "step":
        linears = sum(table.kind_baseline(k) for k in table.kinds)
        other = 1e-3 * info["step_ms"] - linears
        if other < 0:
            raise SystemExit(f"the decode step ({info['step_ms']:.3f} ms) is shorter than its linears alone "
                             f"({1e3 * linears:.3f} ms): was it timed on another model or GPU?")
    rounds: list[tuning.MeasuredRound] = []
    if args.verify:
        print(f"verifying in the decode step, up to {args.verify} rounds ...", file=sys.stderr)
        result, rounds = tuning.search_measured(table, target, other, step_slowdown(model, info["step_ms"], args.compile),
                                                args.verify)
    else:
        result = tuning.search(table, target, other)
    estimate = table.source == "analytic"
    extra = {
        "estimate": estimate, "target_slowdown_percent": args.target_slowdown, "target_of": args.of,
        "predicted_slowdown_percent": 100 * result.predicted_slowdown,
        "summed_linear_ms": {"baseline": 1e3 * result.baseline, "tuned": 1e3 * result.predicted},
        "n_tb_cap": result.cap, "pinned": result.pinned, "phase1_k_chunk": result.phase1_k_chunk,
        "search_log": result.steps, **info,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "tuning_seconds": time.perf_counter() - t0, "table": table.to_json(),
    }
    if rounds:
        extra["verification"] = [{"target_percent": 100 * r.goal, "kinds": r.kinds, "predicted_percent": 100 * r.predicted,
                                  "measured_percent": 100 * r.measured} for r in rounds]
        extra["measured_slowdown_percent"] = next((100 * r.measured for r in rounds if r.kinds == result.kinds), None)
        # the step timings that chose the config, which a --table from elsewhere did not
        extra["verified_on"] = timed_on(next(model.parameters()).device)
    bandwidth = info.get("bandwidth_GBps")
    if bandwidth:
        extra["knee_k_chunk"] = {str(b): tuning.knee(bandwidth["memory"], bandwidth["pcie"], b)
                                 for b in sorted({w.bits for w in workloads})}
    print_table(table, result, target, estimate)
    if rounds:
        print_rounds(rounds, result)
    print(f"device: {info['gpu']}; tuning took {extra['tuning_seconds']:.1f} s")
    if not args.no_write:
        artifacts.save_tuning_config(args.model_dir, quant_config, result.kinds, extra)
        print(f"wrote {args.model_dir / artifacts.TUNING_CONFIG}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"kinds": result.kinds, **extra}, indent=2) + "\n")
    if args.plot:
        label = "ESTIMATE: " if estimate else ""
        plot(args.plot, table, result, target, bandwidth, f"{label}{info['gpu']} — {args.model_dir.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
