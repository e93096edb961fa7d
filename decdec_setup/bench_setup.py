#!/usr/bin/env python
"""Wall time of each setup stage on a randomly initialised model of a real shape (e.g. Llama-3-8B),
so the setup cost can be measured on a GPU without downloading the model. Random weights make the
quantization itself meaningless; the time of every stage is that of the real model.

Stages: random init (host memory), quantize (RTN), cheatsheet, thresholds over random token ids,
each through the same functions prepare.py uses; a table and a JSON summary come last."""
from __future__ import annotations

import argparse
import sys
import tempfile

import torch

from _cli import Stages, check_args, finish, run_cli
from decdec.quantizers import build_cheatsheet, measure_thresholds, quantize_to_dir
from decdec.synthetic import SHAPES, synthetic_config


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--shape", default="llama-3-8b", choices=sorted(SHAPES), help="model shape (default llama-3-8b)")
    p.add_argument("--bits", type=int, default=3, choices=(3, 4))
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--nsamples", type=int, default=100, help="calibration sequences for thresholds (default 100)")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per sequence (default 512)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None, help="directory to write (default: a temporary one)")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = parser().parse_args(argv)
    check_args(args)
    out = args.out or tempfile.mkdtemp(prefix=f"decdec-bench-{args.shape}-")
    stages = Stages()
    from transformers import AutoModelForCausalLM
    config = synthetic_config(args.shape)
    with stages("random init"):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float16).eval()
    calib_ids = torch.randint(0, config.vocab_size, (args.nsamples, args.seqlen))
    with stages("quantize"):
        quantize_to_dir(model, None, f"random {args.shape}", out, method="rtn", bits=args.bits,
                        group_size=args.group_size, calib_ids=None, device=args.device,
                        settings={"method": "rtn", "bits": args.bits, "group_size": args.group_size})
    with stages("cheatsheet"):
        build_cheatsheet(model, out, args.device)
    del model
    with stages("thresholds"):
        measure_thresholds(out, calib_ids, {"source": "random token ids", "nsamples": args.nsamples,
                                            "seqlen": args.seqlen, "tokens": args.nsamples * args.seqlen},
                           args.device)
    return finish(out, stages, {"model": f"random {args.shape}", "device": args.device,
                                "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None})


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])
