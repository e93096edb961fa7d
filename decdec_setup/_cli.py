"""What the decdec_setup scripts share: common options, stage timing, calibration loading, the summary."""
from __future__ import annotations

import argparse
import json
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

from decdec import artifacts
from decdec.calibration import Calibration, calibration_data, check_calib_source
from decdec.prepared import default_dtype
from decdec.quantizers import METHODS, check_out_dir, check_quant_settings, parse_bits
from decdec.resolve import load_config, load_original, resolve_model
from decdec.quantizers.pipeline import SUMMARY, deployed_sizes, write_summary

DEFAULT_NSAMPLES = 100
DEFAULT_SEQLEN = 512


def add_quantization(parser: argparse.ArgumentParser) -> None:
    """The options of quantize.py and prepare.py: what to quantize, how, and where to."""
    parser.add_argument("--model", required=True, help="HF id, local HF directory, .gguf file, smollm2-135m or stories260k")
    parser.add_argument("--method", required=True, choices=METHODS)
    parser.add_argument("--bits", required=True, help="3, 4 or 3.5 (half the blocks at 3 bits, half at 4)")
    parser.add_argument("--out", required=True, help="the prepared model directory to write")
    parser.add_argument("--group-size", type=int, default=128, help="uniform methods: input channels per group (128)")
    parser.add_argument("--overwrite", action="store_true", help="replace a directory that holds another model")


def quantization_parser(description: str) -> argparse.ArgumentParser:
    """The command line of quantize.py and prepare.py."""
    p = argparse.ArgumentParser(description=description)
    add_quantization(p)
    add_calibration(p)
    add_device(p)
    return p


def load_original_model(name: str, args: argparse.Namespace, stages: "Stages", config=None):
    """(model, tokenizer) of the original, in the dtype the setup device computes in (``config``:
    the model's config when the caller has read it already)."""
    config = config or load_config(resolve_model(name, args.data_dir))
    with stages("load original"):
        model, tokenizer, _ = load_original(name, dtype=default_dtype(args.device, config), data_dir=args.data_dir)
    return model, tokenizer


def load_for_quantization(args: argparse.Namespace, stages: "Stages"):
    """Checks --out and the settings around loading the original: (model, tokenizer, bits, the
    quant config already in --out or None)."""
    bits = parse_bits(args.bits)
    config = load_config(resolve_model(args.model, args.data_dir))
    existing = check_out_dir(args.out, artifacts.model_identity(config, args.model), args.overwrite)
    model, tokenizer = load_original_model(args.model, args, stages, config)
    check_quant_settings(model, args.method, bits, args.group_size)
    return model, tokenizer, bits, existing


def add_device(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where the blocks run, one at a time (default: cuda when available)")
    parser.add_argument("--data-dir", default=None, help="data directory (default: $DECDEC_DATA or ../shared/data)")


def add_calibration(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--calib", default="c4",
                        help="calibration text: c4 (validation, the default), wikitext2 (the test split: not for models "
                             "evaluated on WikiText-2), self (sampled from the model: data-free), or a text file path")
    parser.add_argument("--nsamples", type=int, default=DEFAULT_NSAMPLES, help="calibration sequences (default 100)")
    parser.add_argument("--seqlen", type=int, default=DEFAULT_SEQLEN, help="tokens per sequence (default 512)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the document shuffle / sampling")


def check_args(args: argparse.Namespace) -> None:
    """Cheap checks of the options before anything is loaded."""
    if hasattr(args, "calib"):
        check_calib_source(args.calib)
        if args.nsamples < 1 or args.seqlen < 2:
            raise SystemExit("error: need --nsamples >= 1 and --seqlen >= 2")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"error: --device {args.device} but CUDA is not available")


def needs_calibration(method: str, bits: float) -> bool:
    """RTN at 3 or 4 bits quantizes without data; everything else looks at calibration text."""
    return method != "rtn" or bits == 3.5


def quant_settings(args: argparse.Namespace, bits: float) -> dict:
    """What the quantized weights depend on: recorded in quant_config, compared on a re-run."""
    settings = {"method": args.method, "bits": bits, "group_size": args.group_size}
    if needs_calibration(args.method, bits):
        settings.update(calib=args.calib, nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed)
    return settings


def load_calibration(args: argparse.Namespace, tokenizer, model=None) -> Calibration:
    if args.calib == "self":
        model_device = next(model.parameters()).device
        model.to(args.device)
        try:
            return calibration_data("self", tokenizer, args.nsamples, args.seqlen, seed=args.seed, model=model)
        finally:
            model.to(model_device)
    return calibration_data(args.calib, tokenizer, args.nsamples, args.seqlen, seed=args.seed, model=model,
                            data_dir=args.data_dir)


class Stages:
    """Wall time of each named stage, printed as it ends."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        print(f"[{name}] ...", flush=True)
        start = time.perf_counter()
        yield
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
        print(f"[{name}] done in {self.seconds[name]:.1f} s", flush=True)

    def skip(self, name: str, why: str) -> None:
        print(f"[{name}] skipped: {why}", flush=True)


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def finish(model_dir: Path | str, stages: Stages, info: dict) -> dict:
    """Prints the summary table and writes it as JSON into the directory (setup_summary.json)."""
    model_dir = Path(model_dir)
    sizes = deployed_sizes(model_dir)
    previous = model_dir / SUMMARY
    # a step run alone adds its time to what the other steps recorded before
    earlier = json.loads(previous.read_text()).get("stages_s", {}) if previous.is_file() else {}
    summary = {**info, "stages_s": {**earlier, **stages.seconds}, "sizes": sizes}
    rows = [(f"time: {k}", f"{v:.1f} s") for k, v in summary["stages_s"].items()]
    rows += [("time: total", f"{sum(summary['stages_s'].values()):.1f} s"),
             ("GPU: quantized weights", _mib(sizes["gpu_quantized_bytes"])),
             ("GPU: other tensors (fp16)", _mib(sizes["gpu_other_bytes"])),
             ("GPU: total", _mib(sizes["gpu_bytes"])),
             ("pinned host: cheatsheet", _mib(sizes["pinned_host_bytes"]))]
    width = max(len(r[0]) for r in rows)
    print(f"\nsummary for {model_dir}")
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")
    write_summary(model_dir, summary)
    print(f"  (JSON: {model_dir / SUMMARY})")
    return summary


def run_cli(main, argv: list[str]) -> None:
    """Runs a script's main; bad input (ValueError, missing files) ends with a one-line error."""
    try:
        main(argv)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
