#!/usr/bin/env bash
# One device call: build the package with its CUDA extension, then run the stages named (default: all)
# and write logs, JSON, the Markdown table and plots under $OUT.
#
#   bash scripts/gpu_check.sh                    # tests kernel e2e
#   bash scripts/gpu_check.sh tests kernel       # one 10-minute call: tests + kernel/module benchmarks
#   bash scripts/gpu_check.sh e2e                # another: end-to-end pre-training benchmarks
#
# Stages: tests (pytest tests/, GPU tests included), kernel (benchmarks/test_kernel.py and
# test_module.py), e2e (benchmarks/test_e2e.py). $OUT gets at most 8 files (the device tool's limit):
# env.txt, build.log, tests.log, bench.log, bench.json, RESULTS.md, time.png, e2e.png.
set -uo pipefail
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(tests kernel e2e)

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  nvcc --version | tail -1
  date -u
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

echo "== build (CUDA extension forced)"
COS_KERNELS_BUILD_CUDA=1 MAX_JOBS=16 python3 -m pip install -v --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1
status="build=$?"
grep -E "cos_kernels setup|error" "$OUT/build.log" | head -20
python3 -c "import cos_kernels, cos_kernels._C; print('extension loaded; backends on cuda:', cos_kernels.available_backends('cuda'))"

bench_files=()
for stage in "${stages[@]}"; do
  case "$stage" in
    tests)
      echo "== tests"
      python3 -m pytest -q -ra tests >"$OUT/tests.log" 2>&1
      status="$status tests=$?"
      tail -30 "$OUT/tests.log" ;;
    kernel) bench_files+=(benchmarks/test_kernel.py benchmarks/test_module.py) ;;
    e2e) bench_files+=(benchmarks/test_e2e.py) ;;
    *) echo "unknown stage $stage (tests, kernel, e2e)"; exit 2 ;;
  esac
done
if [ ${#bench_files[@]} -gt 0 ]; then
  echo "== benchmarks: ${bench_files[*]}"
  python3 -m pytest -q "${bench_files[@]}" --benchmark-only --benchmark-json "$OUT/bench.json" >"$OUT/bench.log" 2>&1
  status="$status bench=$?"
  tail -15 "$OUT/bench.log"
  python3 -m benchmarks.report "$OUT/bench.json" --out "$OUT" >>"$OUT/bench.log" 2>&1 && cat "$OUT/RESULTS.md"
fi
echo "== $status"
! echo "$status" | grep -qE "=[1-9]"
