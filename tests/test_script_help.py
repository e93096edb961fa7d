"""Every command-line script answers --help with its usage (no GPU, data or model needed)."""
import runpy
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted(
    p for folder in ("decdec_setup", "autotuner", "end-to-end", "evaluation", "decdec_extension")
    for p in (ROOT / folder).glob("*.py") if not p.name.startswith("_") and p.name != "setup.py")


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_help(script, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [str(script), "--help"])
    monkeypatch.syspath_prepend(str(script.parent))  # scripts import their sibling modules
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(script), run_name="__main__")
    assert done.value.code in (0, None)
    assert "usage:" in capsys.readouterr().out
