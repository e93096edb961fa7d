"""A few launches of our GEMV on chosen shapes, for a profiler to read (no timing of its own).

Random weights in the GPU layout (bench_gemv.random_gpu_weight), fp16 x, batch 1; each shape is
launched --launches times on fresh weight copies. For example, the stall reasons and pipe loads
of KERNEL_NOTES.md ("ncu of the uniform GEMV"):

    ncu --clock-control none --kernel-name regex:gemv_kernel --metrics <list> \\
        python decdec_extension/profile_gemv.py --format uniform --bits 3 --shapes 4096x28672,4096x4096
"""
from __future__ import annotations

import argparse

import torch

from bench_gemv import random_gpu_weight


def parse_shape(text: str) -> tuple[int, int]:
    try:
        k, n = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape {text!r}: expected IN x OUT, e.g. 4096x28672") from None
    if k < 1 or n < 1:
        raise argparse.ArgumentTypeError(f"shape {text!r}: sizes must be positive")
    return k, n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--format", choices=["uniform", "lut"], default="uniform")
    p.add_argument("--bits", type=int, choices=[3, 4], default=3)
    p.add_argument("--shapes", default="4096x28672,4096x4096,14336x4096",
                   help="comma-separated IN x OUT (default: Llama-3-8B gate_up, o, down)")
    p.add_argument("--launches", type=int, default=2, help="launches per shape (default 2)")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("profile_gemv.py needs a CUDA device")
    device = torch.device("cuda")
    for k, n in (parse_shape(s) for s in args.shapes.split(",")):
        weights = [random_gpu_weight(args.format, args.bits, k, n, device) for _ in range(args.launches)]
        x = torch.randn(1, k, device=device).half()
        for w in weights:
            w.gemv(x, None)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
