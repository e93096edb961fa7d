"""Decode attention at batch 1: DecDEC's kernel (``decdec.attention``) against what transformers'
SDPA path runs for a one-token query over a static cache (kv heads repeated, boolean mask), and
against torch's SDPA over the written positions only (grouped heads, no mask: the best torch
does when it knows the length), with the roofline of reading the written keys and values.

Each case is a cache of S positions of which the first L are written (the mask HF builds); a
step's worth of layers, each with its own cache (together beyond twice the L2), runs as one CUDA
graph, timed with events (median); microseconds per layer. Prints a table, writes JSON.

    python decdec_extension/bench_attention.py --out results/h200/bench_attention.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from decdec import ops
from decdec.attention import counters, decode_attention_reference
from decdec.timing import device_name, l2_cache_bytes, memory_bandwidth, time_call

# (cache positions S, written positions L): a window of the benchmark's context, longer contexts,
# and a whole 8k cache holding a short context
CASES = [(512, 272), (1024, 1000), (4096, 4000), (8192, 8000), (8192, 272), (16384, 16000)]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--heads", type=int, default=32, help="query heads (default: Llama-3-8B's 32)")
    p.add_argument("--kv-heads", type=int, default=8, help="kv heads (default 8)")
    p.add_argument("--head-dim", type=int, default=128, help="head dimension (default 128)")
    p.add_argument("--dtype", choices=("float16", "bfloat16"), default="float16")
    p.add_argument("--cases", help="S:L,S:L,... (default: %s)" % ",".join(f"{s}:{n}" for s, n in CASES))
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    args = p.parse_args(argv)
    if args.cases:
        try:
            args.cases = [tuple(int(v) for v in c.split(":")) for c in args.cases.split(",")]
        except ValueError:
            p.error(f"--cases {args.cases!r}: expected S:L pairs")
    else:
        args.cases = CASES
    if any(not 1 <= n <= s for s, n in args.cases):
        p.error("every case needs 1 <= L <= S")
    if args.heads % args.kv_heads:
        p.error("--heads must be a multiple of --kv-heads")
    return args


def hf_sdpa(q, k, v, mask, scale):
    """transformers' SDPA path for one query token with a mask: kv heads repeated, boolean mask."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    return F.scaled_dot_product_attention(q[:, :, None], k, v, attn_mask=mask[:, None, None, :], scale=scale)


def sdpa_written(q, k, v, n, scale):
    """torch's SDPA over the written positions only, grouped heads, no mask."""
    return F.scaled_dot_product_attention(q[:, :, None], k[:, :, :n], v[:, :, :n], scale=scale, enable_gqa=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    ops.require()
    dev = torch.device("cuda")
    dtype = getattr(torch, args.dtype)
    bw = memory_bandwidth(dev)
    l2 = l2_cache_bytes(dev)
    scale = args.head_dim ** -0.5
    work = counters(dev)
    rows = []
    for s, n in args.cases:
        written = 2 * n * args.kv_heads * args.head_dim * dtype.itemsize  # K and V bytes a layer must read
        layers = max(4, min(128, -(-2 * l2 // written)))
        gen = torch.Generator(device=dev).manual_seed(s + n)
        q = [torch.randn(1, args.heads, args.head_dim, device=dev, dtype=dtype, generator=gen) for _ in range(layers)]
        k = [torch.randn(1, args.kv_heads, s, args.head_dim, device=dev, dtype=dtype, generator=gen) for _ in range(layers)]
        v = [torch.randn_like(t) for t in k]
        mask = (torch.arange(s, device=dev) < n)[None]
        err = (ops.decode_attention(q[0], k[0], v[0], mask, scale, work).float()
               - decode_attention_reference(q[0], k[0], v[0], mask, scale).float()).abs().max().item()
        impls = {
            "decdec": lambda i: ops.decode_attention(q[i], k[i], v[i], mask, scale, work),
            "hf_sdpa": lambda i: hf_sdpa(q[i], k[i], v[i], mask, scale),
            "sdpa_written": lambda i: sdpa_written(q[i], k[i], v[i], n, scale),
        }
        row = {"S": s, "L": n, "layers": layers, "roofline_us": 1e6 * written / bw, "max_abs_err": err, "us": {}}
        for name, call in impls.items():
            t = time_call(lambda: [call(i) for i in range(layers)], dev, repeats=args.repeats)
            row["us"][name] = 1e6 * t / layers
        rows.append(row)
        print(f"S {s} L {n}: " + ", ".join(f"{k_} {v_:.2f}" for k_, v_ in row["us"].items())
              + f" us/layer (roofline {row['roofline_us']:.2f}, max |err| {err:.1e})", file=sys.stderr)
        del q, k, v
    head = (f"{device_name(dev)}, torch {torch.__version__}; batch 1, {args.heads} query / {args.kv_heads} kv heads, "
            f"head_dim {args.head_dim}, {args.dtype}; memory {bw / 1e9:.0f} GB/s; us per layer (CUDA graph replay)")
    print(head)
    print("| cache S | written L | decdec | HF SDPA (repeat + mask) | SDPA, written only (GQA) | roofline | decdec share of roofline |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        u = r["us"]
        print(f"| {r['S']} | {r['L']} | {u['decdec']:.2f} | {u['hf_sdpa']:.2f} | {u['sdpa_written']:.2f} | "
              f"{r['roofline_us']:.2f} | {100 * r['roofline_us'] / u['decdec']:.0f} % |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"device": device_name(dev), "header": head, "memory_GBps": bw / 1e9,
                                        "heads": args.heads, "kv_heads": args.kv_heads, "head_dim": args.head_dim,
                                        "dtype": args.dtype, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
