#!/usr/bin/env bash
# CI for the CUDA sources where no GPU exists (a few minutes on 2 cores). Exits nonzero on any error.
#   1. every csrc/**/*.cu compiled with nvcc for sm_80 and sm_90 (compile only, objects in a temp dir),
#      with the flags torch's extension build adds (no implicit half conversions, -O3, line info);
#   2. csrc/bindings.cpp compiled (not linked) against the installed torch's headers, when torch is
#      importable (a CPU-only torch lacks one generated CUDA header; a stand-in is supplied);
#   3. the emulated tensor-core instructions alone, then the kernels' own code run on the CPU under
#      csrc/tests/emulation.h against a float64 reference
#      (forward and backward, fixed + random cases; the seed is printed).
# Environment: CUDA_HOME (else the toolkit of the nvcc on PATH, else /usr/local/cuda: cuda_build.py); COS_CI_EMULATION_CASES (random
# cases of step 3, default 12); COS_CI_SKIP_BINDINGS=1 / COS_CI_SKIP_EMULATION=1 skip steps 2 / 3.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
START=$SECONDS

# The toolkit, found as setup.py finds it (cuda_build.find_cuda_home sees through an nvcc wrapper script).
if ! CUDA_HOME="$(python3 cuda_build.py --cuda-home)"; then
  echo "compile_cuda: no CUDA toolkit found (set CUDA_HOME or put nvcc on PATH)" >&2
  exit 1
fi
NVCC="$CUDA_HOME/bin/nvcc"
CUDA_INC="$CUDA_HOME/include"
JOBS="$(nproc 2>/dev/null || echo 2)"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
echo "compile_cuda: $("$NVCC" --version | tail -1), $JOBS jobs"

# ---- 1. nvcc, sm_80 + sm_90 ----------------------------------------------------------------------
mapfile -t CU_FILES < <(find csrc -name '*.cu' | sort)
if [[ ${#CU_FILES[@]} -eq 0 ]]; then
  echo "compile_cuda: no .cu files under csrc/" >&2
  exit 1
fi
export NVCC TMP
compile_one() {
  local src="$1" obj
  obj="$TMP/$(echo "$src" | tr '/' '_').o"
  if "$NVCC" -std=c++17 -O3 -lineinfo -Icsrc \
      -gencode=arch=compute_80,code=sm_80 -gencode=arch=compute_90,code=sm_90 \
      -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__ \
      -D__CUDA_NO_HALF2_OPERATORS__ -Xcompiler -Wall -c "$src" -o "$obj" >"$obj.log" 2>&1; then
    echo "  ok   $src"
  else
    echo "  FAIL $src"
    cat "$obj.log"
    return 1
  fi
}
export -f compile_one
t0=$SECONDS
echo "compile_cuda: nvcc -c for sm_80 and sm_90: ${CU_FILES[*]}"
printf '%s\n' "${CU_FILES[@]}" | xargs -P "$JOBS" -I{} bash -c 'compile_one "$@"' _ {}
echo "compile_cuda: nvcc done in $((SECONDS - t0)) s"

# ---- 2. bindings.cpp against torch's headers -------------------------------------------------------
PYTHON="${PYTHON:-python}"
if [[ "${COS_CI_SKIP_BINDINGS:-0}" != 1 ]] && "$PYTHON" -c "import torch" >/dev/null 2>&1; then
  t0=$SECONDS
  read -r -a TORCH_INC < <("$PYTHON" -c "import torch.utils.cpp_extension as c; print(' '.join('-I' + p for p in c.include_paths()))")
  PY_INC="$("$PYTHON" -c "import sysconfig; print(sysconfig.get_paths()['include'])")"
  ABI="$("$PYTHON" -c "import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))")"
  # the standard torch's own extension builds use (c++20 from torch 2.10 on, c++17 before)
  STD=c++17
  grep -q -- "-std=c++20" "$("$PYTHON" -c "import torch.utils.cpp_extension as c; print(c.__file__)")" && STD=c++20
  STUB="$TMP/stub"
  if ! "$PYTHON" -c "import torch, os, sys; sys.exit(0 if os.path.isfile(os.path.join(os.path.dirname(torch.__file__), 'include/c10/cuda/impl/cuda_cmake_macros.h')) else 1)"; then
    mkdir -p "$STUB/c10/cuda/impl"  # generated only in CUDA builds of torch
    printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' >"$STUB/c10/cuda/impl/cuda_cmake_macros.h"
  fi
  echo "compile_cuda: bindings.cpp against torch $("$PYTHON" -c 'import torch; print(torch.__version__)') headers (-std=$STD)"
  if ! c++ -std="$STD" -O1 -fPIC -Wall -Wno-unused-parameter "${TORCH_INC[@]}" -I"$STUB" -I"$PY_INC" -I"$CUDA_INC" \
      -Icsrc -DTORCH_EXTENSION_NAME=_C -DTORCH_API_INCLUDE_EXTENSION_H -D_GLIBCXX_USE_CXX11_ABI="$ABI" \
      -c csrc/bindings.cpp -o "$TMP/bindings.o" 2>"$TMP/bindings.log"; then
    echo "  FAIL csrc/bindings.cpp"
    cat "$TMP/bindings.log"
    exit 1
  fi
  grep -E "warning" "$TMP/bindings.log" | grep "csrc/" || true
  echo "  ok   csrc/bindings.cpp ($((SECONDS - t0)) s)"
else
  echo "compile_cuda: skipping bindings.cpp (torch not importable or COS_CI_SKIP_BINDINGS=1)"
fi

# ---- 3. kernels under CPU emulation ----------------------------------------------------------------
if [[ "${COS_CI_SKIP_EMULATION:-0}" != 1 ]]; then
  t0=$SECONDS
  echo "compile_cuda: kernels under CPU emulation (csrc/tests/test_emulated.cpp)"
  c++ -std=c++20 -O1 -Wall -Wno-unknown-pragmas -I"$CUDA_INC" csrc/tests/test_emulated.cpp -o "$TMP/test_emulated"
  status=0
  "$TMP/test_emulated" "${COS_CI_EMULATION_CASES:-12}" >"$TMP/emulated.log" 2>&1 || status=$?
  grep -E "^FAIL|seed|cases passed|emulation:" "$TMP/emulated.log" || true
  if [[ $status -ne 0 ]]; then
    tail -20 "$TMP/emulated.log"
    echo "compile_cuda: emulation test failed (exit $status)" >&2
    exit 1
  fi
  echo "compile_cuda: emulation done in $((SECONDS - t0)) s"
fi

echo "compile_cuda: all done in $((SECONDS - START)) s"
