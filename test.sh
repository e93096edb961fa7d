#!/usr/bin/env bash
# Installs the project, then runs the test suite (GPU tests are skipped without CUDA).
set -euo pipefail
cd "$(dirname "$0")"
bash install.sh
exec "${PYTHON:-python3}" -m pytest -q tests "$@"
