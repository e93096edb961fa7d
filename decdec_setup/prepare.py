#!/usr/bin/env python
"""One command from an original model to a prepared DecDEC model directory: quantize, cheatsheet,
thresholds. A step whose valid result is already in --out (same settings) is not redone."""
from __future__ import annotations

import sys

from _cli import (Stages, check_args, finish, load_calibration, load_for_quantization, quant_settings,
                  quantization_parser, run_cli)
from decdec import artifacts
from decdec.prepared import group_input_sizes
from decdec.quantizers import build_cheatsheet, measure_thresholds, quantize_to_dir


def main(argv: list[str] | None = None) -> dict:
    args = quantization_parser(__doc__).parse_args(argv)
    check_args(args)
    stages = Stages()
    model, tokenizer, bits, existing = load_for_quantization(args, stages)
    settings = quant_settings(args, bits)
    with stages("calibration data"):
        calib = load_calibration(args, tokenizer, model)
    calibration = {**calib.describe(), "seed": args.seed}

    if existing is not None and existing.get("extra", {}).get("settings") == settings:
        stages.skip("quantize", f"{args.out} already holds this quantization")
        qc = existing
    else:
        with stages("quantize"):
            qc = quantize_to_dir(model, tokenizer, args.model, args.out, method=args.method, bits=bits,
                                 group_size=args.group_size, calib_ids=calib.ids, device=args.device,
                                 settings=settings)

    if _valid(lambda: artifacts.load_cheatsheet(f"{args.out}/{artifacts.CHEATSHEET}", qc)):
        stages.skip("cheatsheet", "cheatsheet.pt is valid for these weights")
    else:
        with stages("cheatsheet"):
            build_cheatsheet(model, args.out, args.device)
    del model

    thr = f"{args.out}/{artifacts.THRESHOLDS}"
    if _valid(lambda: artifacts.load_thresholds(thr, qc, group_input_sizes(qc))[1] == calibration):
        stages.skip("thresholds", "thresholds.pt is valid for these weights and calibration")
    else:
        with stages("thresholds"):
            measure_thresholds(args.out, calib.ids, calibration, args.device)
    return finish(args.out, stages, {"model": args.model, "device": args.device, "settings": settings,
                                     "block_bits": qc["block_bits"]})


def _valid(check) -> bool:
    try:
        return bool(check())
    except (FileNotFoundError, ValueError):
        return False


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])
