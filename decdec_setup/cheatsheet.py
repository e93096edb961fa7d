#!/usr/bin/env python
"""Writes cheatsheet.pt of a quantized model directory: per linear, the 4-bit residual of the
original weight (AWQ: scaled as quantized) minus the dequantized quantized weight."""
from __future__ import annotations

import argparse
import sys

from _cli import Stages, add_device, check_args, finish, load_original_model, run_cli
from decdec import artifacts
from decdec.quantizers import build_cheatsheet


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model-dir", required=True, help="a directory written by quantize.py or prepare.py")
    p.add_argument("--original", required=True, help="the model it was quantized from (as given to quantize.py)")
    add_device(p)
    return p


def main(argv: list[str] | None = None) -> dict:
    args = parser().parse_args(argv)
    check_args(args)
    qc = artifacts.read_quant_config(args.model_dir)  # before loading anything: is this a prepared directory?
    stages = Stages()
    model, _ = load_original_model(args.original, args, stages)
    with stages("cheatsheet"):
        build_cheatsheet(model, args.model_dir, args.device)
    return finish(args.model_dir, stages, {"model": args.original, "device": args.device,
                                           "block_bits": qc["block_bits"]})


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])
