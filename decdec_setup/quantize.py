#!/usr/bin/env python
"""Quantizes an original model into a prepared model directory (weights and quant_config.json, no
DecDEC artifacts; AWQ also writes awq_scales.safetensors, which cheatsheet.py needs)."""
from __future__ import annotations

import sys

from _cli import (Stages, check_args, finish, load_calibration, load_for_quantization, needs_calibration,
                  quant_settings, quantization_parser, run_cli)
from decdec.quantizers import quantize_to_dir


def main(argv: list[str] | None = None) -> dict:
    args = quantization_parser(__doc__).parse_args(argv)
    check_args(args)
    stages = Stages()
    model, tokenizer, bits, _ = load_for_quantization(args, stages)
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
