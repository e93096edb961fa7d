"""Benchmark of the quantized GEMV kernels (issue 4): time per call and effective weight bandwidth
of ours (uniform and LUT, 3 and 4 bits), fp16 cuBLAS and torch's int4 weight-only kernel, on
Llama-3-8B and -70B shapes, batch 1; plus prefill (2048 tokens: dequantize + cuBLAS vs fp16).

Each timing is the median of CUDA-graph replays of one graph that calls the kernel on several
weight copies in turn (together larger than twice the L2 cache), divided by the number of calls.
Our kernels are launched dependent on sm_90+ (csrc/dependent_launch.cuh): in that graph each call
starts during the previous call's tail, as it does after another dependent kernel in a decode step;
DECDEC_DEPENDENT_LAUNCH=0 times them launched one after the other (the JSON records which).
--hold-sms N times every kernel a second time with N SMs held by another kernel (as a kernel
running beside the GEMV would hold them) and reports the slowdown. Writes JSON (--out) and prints
a table.

    python decdec_extension/bench_gemv.py --out runs/bench_gemv.json
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from decdec import kernels, ops
from decdec.timing import device_name, l2_cache_bytes, time_call

SHAPES = {
    "8b": [("qkv", 4096, 6144), ("o", 4096, 4096), ("gate_up", 4096, 28672), ("down", 14336, 4096)],
    "70b": [("gate_up", 8192, 57344), ("down", 28672, 8192)],
}
VARIANTS = [("uniform", 3), ("uniform", 4), ("lut", 3), ("lut", 4)]


def random_gpu_weight(fmt: str, bits: int, k: int, n: int, device: torch.device) -> kernels.GPUWeight:
    """A GPU-layout weight with random codes and valid meta (any bit pattern is a valid code)."""
    npad = -(-n // 16) * 16
    words = npad // 16 * -(-k // 256) * 32 * (16 if bits == 4 else 12)
    qweight = torch.randint(-2**31, 2**31 - 1, (words,), dtype=torch.int32, device=device)
    if fmt == "uniform":
        groups = -(-k // 128)
        scales = (torch.rand(groups, npad, device=device) * 0.01 + 1e-3).half().view(torch.int16).to(torch.int32)
        zeros = torch.randint(0, 1 << bits, (groups, npad), dtype=torch.int32, device=device)
        meta = (scales & 0xFFFF) | (zeros << 16)
        return kernels.GPUWeight(qweight, meta, ops.FORMAT_IDS["uniform"], bits, 128, n, k)
    meta = torch.randn(npad, 1 << bits, device=device).half()
    return kernels.GPUWeight(qweight, meta, ops.FORMAT_IDS["lut"], bits, 0, n, k)


def weight_bytes(w: kernels.GPUWeight) -> int:
    return w.qweight.numel() * 4 + w.meta.numel() * w.meta.element_size()


def copies_for(nbytes: int, l2: int) -> int:
    return max(2, math.ceil(2 * l2 / nbytes))


def time_rotated(calls: list, device: torch.device, repeats: int, hold_sms: int = 0) -> float:
    """Seconds per call: one graph runs every call in ``calls`` (distinct weight copies), with
    ``hold_sms`` SMs held by another kernel."""
    return time_call(lambda: [c() for c in calls], device, repeats=repeats, hold_sms=hold_sms) / len(calls)


def timed_entry(calls: list, nbytes: int, device: torch.device, repeats: int, hold_sms: int) -> dict:
    """us and effective TB/s of ``calls``; with ``hold_sms``, also us with those SMs held."""
    t = time_rotated(calls, device, repeats)
    entry = {"us": t * 1e6, "TBps": nbytes / t / 1e12}
    if hold_sms:
        held = time_rotated(calls, device, repeats, hold_sms)
        entry.update(us_held=held * 1e6, held_slowdown=held / t - 1)
    return entry


def int4_calls(k: int, n: int, x: torch.Tensor, copies: int) -> tuple[list, int] | None:
    """torch's tinygemm int4 kernel (bf16 activations, group 128), or None where unavailable."""
    try:
        calls = []
        for _ in range(copies):
            w = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device=x.device)
            packed = torch.ops.aten._convert_weight_to_int4pack(w, 8)
            sz = torch.randn(k // 128, n, 2, device=x.device).to(torch.bfloat16)
            xb = x.to(torch.bfloat16)
            calls.append(lambda p=packed, s=sz, xb=xb: torch.ops.aten._weight_int4pack_mm(xb, p, 128, s))
        calls[0]()
        return calls, n * k // 2 + (k // 128) * n * 4
    except (RuntimeError, AttributeError) as e:
        print(f"torch int4 kernel unavailable: {e}", file=sys.stderr)
        return None


def bench(shapes: list[tuple[str, str, int, int]], repeats: int, prefill_tokens: int, hold_sms: int = 0) -> dict:
    device = torch.device("cuda")
    l2 = l2_cache_bytes(device)
    rows = []
    for model, name, k, n in tqdm(shapes, desc="shapes"):
        x = torch.randn(1, k, device=device).half()
        row = {"model": model, "linear": name, "in": k, "out": n}
        fp16_bytes = n * k * 2
        ws = [torch.randn(n, k, device=device).half() for _ in range(copies_for(fp16_bytes, l2))]
        row["fp16_cublas"] = timed_entry([lambda w=w: F.linear(x, w) for w in ws], fp16_bytes, device, repeats, hold_sms)
        if prefill_tokens and model == "8b":
            xp = torch.randn(prefill_tokens, k, device=device).half()
            t16 = time_call(lambda: F.linear(xp, ws[0]), device, repeats=repeats)
            gw = random_gpu_weight("uniform", 3, k, n, device)
            tq = time_call(lambda: F.linear(xp, gw.dequantize(torch.float16)), device, repeats=repeats)
            row["prefill"] = {"tokens": prefill_tokens, "fp16_us": t16 * 1e6, "ours_uniform3_us": tq * 1e6,
                              "ratio": tq / t16}
        del ws
        int4 = int4_calls(k, n, x, copies_for(n * k // 2, l2))
        if int4 is not None:
            calls, nbytes = int4
            row["torch_int4"] = timed_entry(calls, nbytes, device, repeats, hold_sms)
            del calls
        for fmt, bits in VARIANTS:
            w0 = random_gpu_weight(fmt, bits, k, n, device)
            ws = [w0] + [random_gpu_weight(fmt, bits, k, n, device) for _ in range(copies_for(weight_bytes(w0), l2) - 1)]
            entry = timed_entry([lambda w=w: w.gemv(x, None) for w in ws], weight_bytes(w0), device, repeats, hold_sms)
            entry["vs_fp16_bw"] = entry["TBps"] / row["fp16_cublas"]["TBps"]
            row[f"{fmt}{bits}"] = entry
            del ws
        rows.append(row)
        torch.cuda.empty_cache()
    return {"device": device_name(device), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "batch": 1, "repeats": repeats, "hold_sms": hold_sms, "dependent_launch": ops.dependent_launch(),
            "rows": rows}


def table(result: dict) -> str:
    cols = ["fp16_cublas", "torch_int4"] + [f"{f}{b}" for f, b in VARIANTS]
    launch = "dependent launch" if result.get("dependent_launch") else "ordinary launch"
    lines = [f"{result['device']}, torch {result['torch']}, {result['date']}; batch 1, CUDA graph replay, "
             f"weights rotated beyond L2, ours by {launch}; us per call (effective TB/s)",
             "| shape | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for r in result["rows"]:
        cells = [f"{r[c]['us']:.1f} ({r[c]['TBps']:.2f})" if c in r else "n/a" for c in cols]
        lines.append(f"| {r['model']} {r['linear']} {r['in']}->{r['out']} | " + " | ".join(cells) + " |")
    if result.get("hold_sms"):
        lines += ["", f"with {result['hold_sms']} SMs held by another kernel: us per call (slowdown)",
                  "| shape | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
        for r in result["rows"]:
            cells = [f"{r[c]['us_held']:.1f} ({100 * r[c]['held_slowdown']:+.1f} %)" if c in r else "n/a" for c in cols]
            lines.append(f"| {r['model']} {r['linear']} {r['in']}->{r['out']} | " + " | ".join(cells) + " |")
    pre = [r for r in result["rows"] if "prefill" in r]
    if pre:
        lines += ["", f"prefill of {pre[0]['prefill']['tokens']} tokens (dequantize + cuBLAS vs fp16 cuBLAS):",
                  "| shape | fp16 us | ours uniform3 us | ratio |", "|---|---|---|---|"]
        for r in pre:
            p = r["prefill"]
            lines.append(f"| {r['linear']} {r['in']}->{r['out']} | {p['fp16_us']:.1f} | {p['ours_uniform3_us']:.1f} | "
                         f"{p['ratio']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="8b,70b", help="comma-separated subset of: " + ", ".join(SHAPES))
    parser.add_argument("--repeats", type=int, default=20, help="timed graph replays per measurement")
    parser.add_argument("--prefill-tokens", type=int, default=2048, help="0 skips the prefill comparison")
    parser.add_argument("--hold-sms", type=int, default=0,
                        help="also time every kernel with this many SMs held by another kernel (e.g. 16)")
    parser.add_argument("--out", type=Path, default=Path("bench_gemv.json"), help="JSON output path")
    args = parser.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in SHAPES]
    if unknown:
        parser.error(f"unknown model(s) {unknown}: choose from {sorted(SHAPES)}")
    if args.hold_sms < 0:
        parser.error("--hold-sms must be >= 0")
    if not ops.available():
        sys.exit("needs a CUDA device and the compiled extension decdec._C")
    shapes = [(m, *s) for m in models for s in SHAPES[m]]
    result = bench(shapes, args.repeats, args.prefill_tokens, args.hold_sms)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(table(result))


if __name__ == "__main__":
    main()
