"""Build script. Pure Python + Triton everywhere; the CUDA extension cos_kernels._C is added where
torch has CUDA and nvcc is found (csrc/). COS_KERNELS_BUILD_CUDA=1 forces it (failing loudly when it
cannot be built), =0 skips it, unset decides automatically. Install with
``pip install --no-build-isolation .`` so the build sees the torch already installed."""

import os
import sys

from setuptools import setup


def _cuda_extension_plan():
    """-> (build: bool, reason: str)."""
    flag = os.environ.get("COS_KERNELS_BUILD_CUDA", "").strip()
    if flag not in ("", "0", "1"):
        sys.exit(f"COS_KERNELS_BUILD_CUDA must be 0 or 1, got {flag!r}")
    if flag == "0":
        return False, "COS_KERNELS_BUILD_CUDA=0"
    problems = []
    if not os.path.isdir(os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")):
        problems.append("this source tree has no csrc/ (no CUDA kernels to build)")
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME
    except ImportError:
        problems.append("torch is not importable (install torch first, then use --no-build-isolation)")
    else:
        if torch.version.cuda is None:
            problems.append(f"torch {torch.__version__} has no CUDA")
        if CUDA_HOME is None:
            problems.append("nvcc was not found (set CUDA_HOME)")
    if problems:
        if flag == "1":
            sys.exit("COS_KERNELS_BUILD_CUDA=1 but the CUDA extension cannot be built: " + "; ".join(problems))
        return False, "; ".join(problems)
    return True, "torch has CUDA and nvcc was found" + (" (COS_KERNELS_BUILD_CUDA=1)" if flag else "")


build_cuda, reason = _cuda_extension_plan()
ext_modules, cmdclass = [], {}
if build_cuda:
    # PEP 517 builds do not put setup.py's folder on sys.path; cuda_build.py lives beside this file.
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from cuda_build import cuda_extension  # noqa: E402  (csrc build description, beside this file)

    ext_modules, cmdclass = cuda_extension()
print(
    f"cos_kernels setup: {'building' if build_cuda else 'skipping'} the CUDA extension cos_kernels._C: {reason}",
    file=sys.stderr,
)

setup(ext_modules=ext_modules, cmdclass=cmdclass)
