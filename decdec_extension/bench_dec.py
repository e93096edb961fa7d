"""Benchmark of the fused DEC kernel (issue 5): base GEMV alone vs base + DecDEC per linear, for the
Llama-3-8B shapes at 3 and 4 bits (uniform and LUT base), k_chunk in {0, 1, 2, 4, 8, 16, 32, 64}
across n_tb; fetch bandwidth next to pinned cudaMemcpy bandwidth; the measured knee (largest
k_chunk within +2.5 % of the base) next to the analytic knee 1024 / R_bw * b / 4 with R_bw = device
memory bandwidth / PCIe bandwidth, both measured in the same run.

Timings: median CUDA-graph replay of one graph over weight copies larger than twice the L2 cache,
per call. Batch 1. Writes JSON (--out) and prints a table. --given-channels passes the selection
precomputed (the path of the static/random modes), which isolates the cost of selecting on the GPU;
--residual-on-gpu reads the residual rows from device memory instead of pinned host memory, which
isolates the cost of the PCIe round trip (a diagnosis: DecDEC keeps them on the host).
--scales-on-host reads the residual scales from pinned host memory with the rows instead of from
device memory (the setting ``SelectionGroup.scales_on_host``; run with and without it to compare).

    python decdec_extension/bench_dec.py --out runs/bench_dec.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from bench_gemv import SHAPES, VARIANTS, copies_for, random_gpu_weight, time_rotated, weight_bytes
from decdec import ops
from decdec.kernels import pinned_copy
from decdec.selection import num_selected, rank_envelope
from decdec.timing import device_name, l2_cache_bytes, memory_bandwidth, pcie_bandwidth

K_CHUNKS = [0, 1, 2, 4, 8, 16, 32, 64]
SLOWDOWN = 1.025


def bench(variants, n_tbs: list[int], k_chunks: list[int], repeats: int, given_channels: bool = False,
          residual_on_gpu: bool = False, scales_on_host: bool = False) -> dict:
    device = torch.device("cuda")
    l2 = l2_cache_bytes(device)
    mem_bw, pcie_bw = memory_bandwidth(device), pcie_bandwidth(device)
    r_bw = mem_bw / pcie_bw
    rows = []
    work = [(name, k, n, fmt, bits) for name, k, n in SHAPES["8b"] for fmt, bits in variants]
    for name, k, n, fmt, bits in tqdm(work, desc="shape x format"):
        x = torch.randn(1, k, device=device).half()
        envelope = rank_envelope(torch.randn(256, k, device=device)).contiguous()
        stride = -(-(n // 2) // 16) * 16
        host = ops.alloc_pinned(k * stride)
        host.view(torch.int32).random_()  # any nibble pattern is a valid residual
        residual = host.to(device) if residual_on_gpu else host
        scales = (torch.rand(n, device=device) * 1e-3).half()
        if scales_on_host:
            scales = pinned_copy(scales)
        mailbox = ops.new_mailbox(1, n, device)
        w0 = random_gpu_weight(fmt, bits, k, n, device)
        ws = [w0] + [random_gpu_weight(fmt, bits, k, n, device) for _ in range(copies_for(weight_bytes(w0), l2) - 1)]
        base = time_rotated([lambda w=w: w.gemv(x, None) for w in ws], device, repeats)
        row = {"linear": name, "in": k, "out": n, "format": fmt, "bits": bits, "base_us": base * 1e6, "dec_us": {}}
        for n_tb in n_tbs:
            times = []
            for kc in k_chunks:
                channels = ops.select_channels(x, envelope, kc) if given_channels else None
                calls = [lambda w=w, kc=kc, c=channels: ops.gemv_dec(x, w.qweight, w.meta, None, w.fmt, w.bits,
                                                                     w.group_size, n, k, envelope, c, kc,
                                                                     residual.data_ptr(), stride, scales, n_tb, mailbox)
                         for w in ws]
                times.append(time_rotated(calls, device, repeats) * 1e6)
            row["dec_us"][str(n_tb)] = times
        best = [min(row["dec_us"][str(t)][i] for t in n_tbs) for i in range(len(k_chunks))]
        row["best_us"] = best
        fetch = [num_selected(k, kc) * stride for kc in k_chunks]
        row["fetch_GBps"] = [b / (t * 1e-6) / 1e9 for b, t in zip(fetch, best)]
        within = [kc for kc, t in zip(k_chunks, best) if t <= SLOWDOWN * row["base_us"]]
        row["knee_measured"] = max(within) if within else None
        row["knee_analytic"] = 1024 / r_bw * bits / 4
        if 1 in k_chunks:
            row["fixed_cost_us"] = best[k_chunks.index(1)] - row["base_us"]
        if 0 in k_chunks:
            row["k0_cost_us"] = best[k_chunks.index(0)] - row["base_us"]
        rows.append(row)
        del ws, host, residual, scales
        torch.cuda.empty_cache()
    return {"device": device_name(device), "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "mem_TBps": mem_bw / 1e12,
            "pcie_GBps": pcie_bw / 1e9, "R_bw": r_bw, "n_tb": n_tbs, "k_chunk": k_chunks,
            "given_channels": given_channels, "residual_on_gpu": residual_on_gpu, "scales_on_host": scales_on_host,
            "dependent_launch": ops.dependent_launch(), "rows": rows}


def table(result: dict) -> str:
    ks = result["k_chunk"]
    lines = [f"{result['device']}, torch {result['torch']}, {result['date']}; batch 1, CUDA graph replay; device memory "
             f"{result['mem_TBps']:.2f} TB/s, pinned memcpy {result['pcie_GBps']:.1f} GB/s, R_bw {result['R_bw']:.1f}",
             "us per call, best n_tb of " + str(result["n_tb"]) +
             (", dependent launch (as in bench_gemv.py)" if result.get("dependent_launch") else "") +
             (", selection precomputed (--given-channels)" if result.get("given_channels") else "") +
             (", residual rows in device memory (--residual-on-gpu)" if result.get("residual_on_gpu") else "") +
             (", residual scales in pinned host memory (--scales-on-host)" if result.get("scales_on_host")
              else ", residual scales in device memory"),
             "| linear | fmt | base | " + " | ".join(f"k={k}" for k in ks) +
             " | fixed cost (k=1) | max fetch GB/s | knee measured / analytic |",
             "|---" * (len(ks) + 6) + "|"]
    for r in result["rows"]:
        cells = " | ".join(f"{t:.1f}" for t in r["best_us"])
        knee = f"{r['knee_measured']} / {r['knee_analytic']:.1f}"
        lines.append(f"| {r['linear']} {r['in']}->{r['out']} | {r['format']}{r['bits']} | {r['base_us']:.1f} | {cells} | "
                     f"{r.get('fixed_cost_us', float('nan')):+.2f} | {max(r['fetch_GBps']):.1f} | {knee} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-tb", default="4,8,16,32", help="comma-separated DEC thread-block counts")
    parser.add_argument("--k-chunk", default=",".join(map(str, K_CHUNKS)), help="comma-separated k_chunk values")
    parser.add_argument("--formats", default="uniform3,uniform4,lut3,lut4", help="subset of uniform3,uniform4,lut3,lut4")
    parser.add_argument("--repeats", type=int, default=15, help="timed graph replays per measurement")
    parser.add_argument("--given-channels", action="store_true",
                        help="pass the selection precomputed instead of selecting in the kernel")
    parser.add_argument("--residual-on-gpu", action="store_true",
                        help="read the residual rows from device memory (isolates the PCIe round trip)")
    parser.add_argument("--scales-on-host", action="store_true",
                        help="read the residual scales from pinned host memory with the rows (default: device memory)")
    parser.add_argument("--out", type=Path, default=Path("bench_dec.json"), help="JSON output path")
    args = parser.parse_args(argv)
    try:
        n_tbs = [int(v) for v in args.n_tb.split(",")]
        k_chunks = [int(v) for v in args.k_chunk.split(",")]
    except ValueError:
        parser.error("--n-tb and --k-chunk take comma-separated integers")
    if any(t < 1 for t in n_tbs) or any(not 0 <= k <= 1024 for k in k_chunks):
        parser.error("n_tb must be >= 1 and k_chunk in 0..1024")
    names = {f"{f}{b}": (f, b) for f, b in VARIANTS}
    fmts = [s.strip() for s in args.formats.split(",")]
    if any(f not in names for f in fmts):
        parser.error(f"--formats: choose from {sorted(names)}")
    if not ops.available():
        sys.exit("needs a CUDA device and the compiled extension decdec._C")
    result = bench([names[f] for f in fmts], n_tbs, k_chunks, args.repeats, args.given_channels, args.residual_on_gpu,
                   args.scales_on_host)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(table(result))


if __name__ == "__main__":
    main()
