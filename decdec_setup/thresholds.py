#!/usr/bin/env python
"""Writes thresholds.pt of a quantized model directory: per block and distinct linear input, the
rank envelope and mean x^2 of the activations the quantized model computes on calibration text."""
from __future__ import annotations

import argparse
import sys

from _cli import Stages, add_calibration, add_device, check_args, finish, load_calibration, run_cli
from decdec import artifacts
from decdec.prepared import load_prepared
from decdec.quantizers import measure_thresholds


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model-dir", required=True, help="a directory written by quantize.py or prepare.py")
    add_calibration(p)
    add_device(p)
    return p


def main(argv: list[str] | None = None) -> dict:
    args = parser().parse_args(argv)
    check_args(args)
    qc = artifacts.read_quant_config(args.model_dir)
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    stages = Stages()
    with stages("calibration data"):
        # data-free calibration samples from the quantized model itself: it is all this step has
        model = load_prepared(args.model_dir, "cpu", mode="none", cheatsheet=False,
                              thresholds=False) if args.calib == "self" else None
        calib = load_calibration(args, tokenizer, model)
    with stages("thresholds"):
        measure_thresholds(args.model_dir, calib.ids, {**calib.describe(), "seed": args.seed}, args.device)
    return finish(args.model_dir, stages, {"device": args.device, "block_bits": qc["block_bits"]})


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])
