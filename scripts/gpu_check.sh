#!/usr/bin/env bash
# The one device call (scripts/gpu_check.py says what it runs, in what order, with which timeouts):
#   bash scripts/gpu_check.sh            # on the GPU machine: at most 8 minutes, 8 files under $OUT
#   bash scripts/gpu_check.sh --dry      # on a CPU: the same stages at tiny sizes (CI runs this)
set -uo pipefail
cd "$(dirname "$0")/.."
exec python3 scripts/gpu_check.py "$@"
