#!/usr/bin/env bash
# The one device call (scripts/gpu_check.py says what it runs, in what order, with which timeouts):
#   bash scripts/gpu_check.sh            # on the GPU machine: at most 7 minutes, 6 files under $OUT
#   bash scripts/gpu_check.sh --quick    # a second call after a fix: the kernel table, ~3 minutes
#   bash scripts/gpu_check.sh --dry      # on a CPU: the same plan at tiny sizes (CI runs this)
set -uo pipefail
cd "$(dirname "$0")/.."
exec python3 scripts/gpu_check.py "$@"
