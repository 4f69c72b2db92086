"""Build description of the CUDA extension cos_kernels._C (csrc/), used by setup.py.

cuda_extension() -> (ext_modules, cmdclass) for setuptools: one CUDAExtension built with ninja from
csrc/bindings.cpp and csrc/kernels/*.cu, -O3 and line info, for sm_80 and sm_90 (plus compute_90
PTX, so newer GPUs can JIT it) unless TORCH_CUDA_ARCH_LIST is set, in which case torch's own arch
flags for that list are used.

find_cuda_home() -> the CUDA toolkit's folder (the one holding include/cuda_runtime_api.h), found the
same way by setup.py, .ci/compile_cuda.sh, the tests and scripts/gpu_check.py. torch guesses
CUDA_HOME as the parent of the folder of the `nvcc` on the PATH, which is wrong where that nvcc is a
wrapper script outside the toolkit (e.g. /usr/local/bin/nvcc running /usr/local/cuda-13.0/bin/nvcc);
``nvcc --dryrun`` names the real toolkit (its TOP line). ``python cuda_build.py --cuda-home`` prints it.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCH_FLAGS = [
    "-gencode=arch=compute_80,code=sm_80",
    "-gencode=arch=compute_90,code=sm_90",
    "-gencode=arch=compute_90,code=compute_90",
]


def _is_toolkit(folder: str | None) -> bool:
    return bool(folder) and os.path.isfile(os.path.join(folder, "include", "cuda_runtime_api.h"))


def _nvcc_top(nvcc: str) -> str | None:
    """The toolkit folder an nvcc (binary or wrapper script) really uses, from its --dryrun TOP line."""
    try:
        out = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    for line in (out.stdout + out.stderr).splitlines():
        if line.startswith("#$ TOP="):
            return os.path.normpath(line.split("=", 1)[1].strip())
    return None


def find_cuda_home() -> str | None:
    """The CUDA toolkit folder: $CUDA_HOME or $CUDA_PATH where it holds the toolkit's headers, else the
    toolkit of the nvcc on the PATH (asked with --dryrun, then its resolved location), else
    /usr/local/cuda; None where none holds include/cuda_runtime_api.h."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates += [_nvcc_top(nvcc), os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))]
    candidates.append("/usr/local/cuda")
    for folder in candidates:
        if _is_toolkit(folder):
            return os.path.realpath(folder)
    return None


def sources() -> list[str]:
    """Relative paths (setuptools wants them relative to setup.py)."""
    kernels = sorted(glob.glob(os.path.join(ROOT, "csrc", "kernels", "*.cu")))
    if not kernels:
        raise RuntimeError(f"no CUDA sources under {os.path.join(ROOT, 'csrc', 'kernels')}")
    return [os.path.relpath(p, ROOT) for p in [os.path.join(ROOT, "csrc", "bindings.cpp"), *kernels]]


def nvcc_arch_flags() -> list[str]:
    """-gencode flags, or none where TORCH_CUDA_ARCH_LIST is set (torch then adds its own from it)."""
    if os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip():
        return []
    return list(DEFAULT_ARCH_FLAGS)


def cuda_extension():
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    include_dirs = [os.path.join(ROOT, "csrc")]
    ext = CUDAExtension(
        name="cos_kernels._C",
        sources=sources(),
        include_dirs=include_dirs,
        extra_compile_args={
            "cxx": ["-O3"],
            "nvcc": ["-O3", "-lineinfo", *nvcc_arch_flags()],
        },
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


if __name__ == "__main__":
    if sys.argv[1:] != ["--cuda-home"]:
        sys.exit("usage: python cuda_build.py --cuda-home   (prints the CUDA toolkit folder)")
    home = find_cuda_home()
    if home is None:
        sys.exit("no CUDA toolkit found (set CUDA_HOME to the folder holding include/cuda_runtime_api.h)")
    print(home)
