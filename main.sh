#!/usr/bin/env bash
# The main job: installs the project and runs the whole pipeline on the default model.
set -euo pipefail
cd "$(dirname "$0")"
bash install.sh
exec "${PYTHON:-python3}" end-to-end/pipeline.py "$@"
