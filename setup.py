"""Build script. Pure Python + Triton everywhere; the CUDA extension cos_kernels._C is added where
torch has CUDA and nvcc is found (csrc/). COS_KERNELS_BUILD_CUDA=1 forces it (failing loudly when it
cannot be built), =0 skips it, unset decides automatically. Install with
``pip install --no-build-isolation .`` so the build sees the torch already installed; without build
isolation pip installs none of the build's own needs, so setuptools must already be new enough
(checked first, with the command that fixes it). CUDA_HOME is found by cuda_build.find_cuda_home
(which sees through an nvcc wrapper script) before torch's build helpers guess it."""

import os
import sys

import setuptools
from setuptools import setup

# PEP 517 builds do not put setup.py's folder on sys.path; cuda_build.py lives beside this file.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cuda_build import cuda_extension, find_cuda_home  # noqa: E402  (csrc build description, beside this file)

MIN_SETUPTOOLS = (70, 1)  # the first with bdist_wheel built in (older ones need the wheel package)


def _check_setuptools() -> None:
    have = tuple(int(p) for p in setuptools.__version__.split(".")[:2] if p.isdigit())
    if have >= MIN_SETUPTOOLS:
        return
    try:
        import wheel  # noqa: F401  (setuptools < 70.1 builds wheels through it)
    except ImportError:
        sys.exit(
            f"cos_kernels setup: setuptools {setuptools.__version__} cannot build a wheel without the wheel "
            f"package, and --no-build-isolation installs neither: run "
            f"pip install 'setuptools>={MIN_SETUPTOOLS[0]}.{MIN_SETUPTOOLS[1]}' first"
        )


_check_setuptools()


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
    cuda_home = find_cuda_home()
    if cuda_home is None:
        problems.append("no CUDA toolkit was found (nvcc; set CUDA_HOME to the folder holding "
                        "include/cuda_runtime_api.h)")
    else:
        os.environ["CUDA_HOME"] = cuda_home  # before torch.utils.cpp_extension reads it at import
    try:
        import torch
    except ImportError:
        problems.append("torch is not importable (install torch first, then use --no-build-isolation)")
    else:
        if torch.version.cuda is None:
            problems.append(f"torch {torch.__version__} has no CUDA")
    if problems:
        if flag == "1":
            sys.exit("COS_KERNELS_BUILD_CUDA=1 but the CUDA extension cannot be built: " + "; ".join(problems))
        return False, "; ".join(problems)
    return True, f"torch has CUDA, CUDA_HOME={cuda_home}" + (" (COS_KERNELS_BUILD_CUDA=1)" if flag else "")


build_cuda, reason = _cuda_extension_plan()
ext_modules, cmdclass = [], {}
if build_cuda:
    ext_modules, cmdclass = cuda_extension()
print(
    f"cos_kernels setup: {'building' if build_cuda else 'skipping'} the CUDA extension cos_kernels._C: {reason}",
    file=sys.stderr,
)

setup(ext_modules=ext_modules, cmdclass=cmdclass)
