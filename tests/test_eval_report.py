"""evaluation/report.py: merging, the gap-recovery arithmetic, cost ratios, task tables, plots."""
import json
from pathlib import Path

import pytest

from helpers import load_script

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def report():
    return load_script(ROOT / "evaluation" / "report.py")


def rec(mode, k, ppl, bits=3.0, method="awq", model="m-awq3", **extra):
    return {"model": model, "source": "m", "method": method, "bits": bits, "group_size": 128, "dataset": "wikitext2",
            "mode": mode, "k_chunk": k, "ppl": ppl, "tokens": 100, "device": "cpu", "path": "batched",
            "seconds": 2.0, "cpu_seconds": 10.0, **extra}


def write(path: Path, records: list) -> str:
    path.write_text(json.dumps(records))
    return str(path)


def test_tables_gap_cost_and_plots(report, tmp_path):
    quantized = [rec("none", 0, 30.0), rec("decdec", 8, 25.0, cpu_seconds=14.0, recall={"o_proj": 0.8, "all": 0.85}),
                 rec("decdec", 64, 20.0), rec("full", None, 12.0), rec("static", 8, 28.0),
                 rec("none", 0, 16.0, bits=3.5, model="m-awq3.5"), rec("decdec", 8, 99.0, model="stale")]
    newer = [rec("decdec", 8, 15.0, bits=3.5, model="m-awq3.5"), rec("decdec", 8, 50.0, model="stale")]
    original = [{"model": "m", "source": "m", "method": "original", "bits": 16.0, "dataset": "wikitext2",
                 "mode": "original", "k_chunk": None, "ppl": 10.0, "tokens": 100}]
    tasks = [{"model": "m-awq3", "source": "m", "method": "awq", "bits": 3.0, "group_size": 128, "mode": "decdec",
              "k_chunk": 16, "task": "piqa", "metric": "acc", "filter": "none", "value": 0.6, "stderr": 0.01, "samples": 1838, "limit": None}]
    files = [write(tmp_path / "a.json", quantized), write(tmp_path / "b.json", newer + original + tasks)]
    text = report.main(files + ["--out", str(tmp_path / "out")])
    assert (tmp_path / "out" / "report.md").read_text() == text
    # the gap is none - original = 20: k=8 recovers 5/20, k=64 10/20, full 18/20
    gap_row = next(line for line in text.splitlines()
                   if "| m awq 3-bit g128 | 100 | decdec |" in line and "0.25" in line)
    assert "| 0.25 | 0.5 | 0.9 |" in gap_row
    assert "| 10 | 30 | 25 | 20 | 12 |" in text  # original, none, k=8, k=64, full
    assert "| 50 |" in text and "| 99 |" not in text  # the later file wins
    assert "| cpu_seconds | 14 | 1.4 |" in text  # 14 s against the plain run's 10
    assert "| 0.8 | 0.85 |" in text
    assert "| piqa | acc | none | m awq 3-bit g128 | decdec | 16 | 0.6 |" in text
    assert (tmp_path / "out" / "ppl_vs_k.png").stat().st_size > 10_000
    assert (tmp_path / "out" / "recall_vs_k.png").stat().st_size > 10_000


def test_bad_files(report, tmp_path):
    with pytest.raises(SystemExit, match="cannot read"):
        report.main([str(tmp_path / "missing.json"), "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="neither"):
        report.main([write(tmp_path / "odd.json", [{"model": "x"}]), "--out", str(tmp_path)])
