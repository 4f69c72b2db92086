"""Shared test set-up.

Where no CUDA device exists, the Triton kernels run on CPU tensors under the Triton interpreter,
which must be switched on before triton is first imported: set TRITON_INTERPRET=1 here, before any
test module imports cos_kernels' Triton backend. Where a CUDA device exists it is left unset, so the
GPU tests run the compiled kernels (and the interpreter-only CPU tests skip), unless the caller set
TRITON_INTERPRET explicitly.

Every GPU test is followed by a check that the CUDA context still works (tests/cuda_guard.py).
"""

import os

import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

# after TRITON_INTERPRET: the guard imports benchmarks.common, which imports cos_kernels and triton
from cuda_guard import _cuda_context_guard  # noqa: E402, F401  (an autouse fixture)
