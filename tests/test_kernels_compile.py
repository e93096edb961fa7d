"""The CUDA kernel sources are torch-free: where nvcc exists (even with no GPU, as in CI), they
must compile on their own for the architecture we target."""
import shutil
import subprocess
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parents[1] / "decdec_extension" / "csrc"


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found")
@pytest.mark.parametrize("source", sorted(p.name for p in CSRC.glob("*.cu")))
def test_kernel_source_compiles_without_torch(source, tmp_path):
    cmd = ["nvcc", "-arch=sm_90", "-std=c++17", "-O1", "-static-global-template-stub=false",
           "-c", str(CSRC / source), "-o", str(tmp_path / "kernels.o")]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    assert not any("torch" in line for line in (CSRC / source).read_text().splitlines() if "#include" in line)
