#!/usr/bin/env python
"""Quantizes an original model into a prepared model directory (weights and quant_config.json, no
DecDEC artifacts; AWQ also writes awq_scales.safetensors, which cheatsheet.py needs)."""
from __future__ import annotations

import argparse
import sys

from _cli import (Stages, add_calibration, add_device, add_quantization, check_args, finish, load_calibration,
                  needs_calibration, quant_settings, run_cli)
from decdec import artifacts
from decdec.prepared import default_dtype
from decdec.quantizers import check_out_dir, check_quant_settings, parse_bits, quantize_to_dir
from decdec.resolve import load_config, load_original, resolve_model


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__)
    add_quantization(p)
    add_calibration(p)
    add_device(p)
    return p


def main(argv: list[str] | None = None) -> dict:
    args = parser().parse_args(argv)
    check_args(args)
    bits = parse_bits(args.bits)
    stages = Stages()
    config = load_config(resolve_model(args.model, args.data_dir))
    check_out_dir(args.out, artifacts.model_identity(config, args.model), args.overwrite)
    with stages("load original"):
        model, tokenizer, _ = load_original(args.model, dtype=default_dtype(args.device, config), data_dir=args.data_dir)
    check_quant_settings(model, args.method, bits, args.group_size)
    calib = None
    if needs_calibration(args.method, bits):
        with stages("calibration data"):
            calib = load_calibration(args, tokenizer, model)
    settings = quant_settings(args, bits)
    with stages("quantize"):
        qc = quantize_to_dir(model, tokenizer, args.model, args.out, method=args.method, bits=bits,
                             group_size=args.group_size, calib_ids=None if calib is None else calib.ids,
                             device=args.device, settings=settings)
    return finish(args.out, stages, {"model": args.model, "device": args.device, "settings": settings,
                                     "block_bits": qc["block_bits"]})


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])
