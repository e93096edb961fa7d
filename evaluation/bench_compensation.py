"""GPU (or CPU) time of decode-equivalent compensation for one decoder block, without a model:
the seven linears of a SmolLM2-135M block (q/k/v, o, gate/up, down; random weights, uniform 3-bit
g64, 4-bit residuals) called on a batch of prefill-shaped inputs through the batched evaluation
path, plain and under each selection setting. Prints ms per block and the ratio to plain; with
--profile, the top kernels of the first compensated setting (torch.profiler).

    python evaluation/bench_compensation.py --mode decdec exact full --k-chunk 8 64 --profile
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

from decdec.batched import use_batched_compensation
from decdec.formats import UniformWeight
from decdec.linear import DecDECLinear, SelectionGroup
from decdec.residual import quantize_residual
from decdec.selection import rank_envelope

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import K_MODES  # noqa: E402

# (kind, in_features, out_features of each linear reading that input): one SmolLM2-135M block
BLOCK = [("q+k+v", 576, [576, 192, 192]), ("o", 576, [576]), ("gate+up", 576, [1536, 1536]), ("down", 1536, [576])]


def build_block(device: torch.device) -> list[tuple[SelectionGroup, list[DecDECLinear], int]]:
    torch.manual_seed(0)
    block, plan = nn.ModuleList(), []
    for kind, d, outs in BLOCK:
        group = SelectionGroup(kind, rank_envelope(torch.randn(256, d)), compensate_prefill=True)
        linears = []
        for n in outs:
            w = torch.randn(n, d)
            q = UniformWeight.quantize(w, 3, 64)
            linears.append(DecDECLinear(q, None, quantize_residual(w - q.dequantize()), group))
        block.extend(linears)
        plan.append((group, linears, d))
    use_batched_compensation(block)
    block.to(device=device, dtype=torch.float16 if device.type == "cuda" else torch.float32)
    return plan


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", nargs="+", default=["decdec"], help="selection modes besides the plain run")
    p.add_argument("--k-chunk", nargs="+", type=int, default=[8, 64], help="for the k-dependent modes")
    p.add_argument("--batch", type=int, default=8, help="sequences per call")
    p.add_argument("--seqlen", type=int, default=2048, help="tokens per sequence")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per setting (the mean is reported)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--profile", action="store_true", help="print the top kernels of the first compensated setting")
    p.add_argument("--json", type=Path, default=None, help="write the records to this JSON file")
    args = p.parse_args(argv)
    if min(args.batch, args.seqlen, args.repeats) < 1:
        raise SystemExit("error: --batch, --seqlen and --repeats must be positive")
    device = torch.device(args.device)
    plan = build_block(device)
    x = {d: torch.randn(args.batch, args.seqlen, d, device=device) for _, _, d in plan}
    if device.type == "cuda":
        x = {d: t.half() for d, t in x.items()}

    def block_call() -> None:
        for _, linears, d in plan:
            xi = x[d].clone()
            for linear in linears:
                linear(xi)

    def configure(mode: str, k: int) -> None:
        for group, _, _ in plan:
            group.configure(mode=mode, k_chunk=k)

    def ms_per_block() -> float:
        block_call()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(args.repeats):
                block_call()
            end.record()
            torch.cuda.synchronize(device)
            return start.elapsed_time(end) / args.repeats
        t0 = time.perf_counter()
        for _ in range(args.repeats):
            block_call()
        return (time.perf_counter() - t0) * 1e3 / args.repeats

    settings = [("none", 0)] + [(m, k) for m in args.mode for k in (args.k_chunk if m in K_MODES else [0])]
    records = []
    with torch.no_grad():
        for mode, k in settings:
            configure(mode, k)
            records.append({"mode": mode, "k_chunk": k, "ms_per_block": ms_per_block()})
        base = records[0]["ms_per_block"]
        print(f"one SmolLM2-135M block, {args.batch} x {args.seqlen} tokens, {device}")
        print("| mode | k_chunk | ms per block | x plain |\n|---|---|---|---|")
        for r in records:
            r["ratio"] = r["ms_per_block"] / base
            print(f"| {r['mode']} | {r['k_chunk']} | {r['ms_per_block']:.2f} | {r['ratio']:.2f} |")
        if args.profile and len(settings) > 1:
            configure(*settings[1])
            activities = [torch.profiler.ProfilerActivity.CPU]
            if device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            with torch.profiler.profile(activities=activities) as prof:
                for _ in range(3):
                    block_call()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
            sort_by = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
            print(prof.key_averages().table(sort_by=sort_by, row_limit=15, max_name_column_width=60))
    if args.json:
        args.json.write_text(json.dumps(records, indent=1))
    return records


if __name__ == "__main__":
    main()
