"""decdec_setup/bench_setup.py times every setup stage on a random model of a named shape."""
from pathlib import Path

import decdec
from helpers import load_script

SETUP = Path(__file__).resolve().parents[1] / "decdec_setup"


def test_bench_setup_on_the_tiny_shape(tmp_path):
    summary = load_script(SETUP / "bench_setup.py").main(
        ["--shape", "tiny", "--nsamples", "2", "--seqlen", "32", "--device", "cpu", "--out", str(tmp_path)])
    assert set(summary["stages_s"]) == {"random init", "quantize", "cheatsheet", "thresholds"}
    model = decdec.load_prepared(tmp_path, k_chunk=8)  # a complete prepared directory
    assert len(decdec.decdec_linears(model)) == 14
