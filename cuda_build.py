"""Build description of the CUDA extension cos_kernels._C (csrc/), used by setup.py.

cuda_extension() -> (ext_modules, cmdclass) for setuptools: one CUDAExtension built with ninja from
csrc/bindings.cpp and csrc/kernels/*.cu, -O3 and line info, for sm_80 and sm_90 (plus compute_90
PTX, so newer GPUs can JIT it) unless TORCH_CUDA_ARCH_LIST is set, in which case torch's own arch
flags for that list are used.
"""

from __future__ import annotations

import glob
import os

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCH_FLAGS = [
    "-gencode=arch=compute_80,code=sm_80",
    "-gencode=arch=compute_90,code=sm_90",
    "-gencode=arch=compute_90,code=compute_90",
]


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
