"""The "cuda" fused backend: the CUDA C++ kernels of csrc/, loaded from the extension cos_kernels._C.

Importing this module never fails: where the extension is not built (or cannot load), the backend is
registered anyway and ``unavailable_reason`` says why and how to build it, so backend="cuda" raises a
clear error and backend="auto" falls back to the next backend.
"""

from __future__ import annotations

import importlib

import torch

from ..layout import WindowLayout
from .registry import register_kernel

BUILD_HINT = (
    "build it with `COS_KERNELS_BUILD_CUDA=1 pip install --no-build-isolation .` (or `-e .`) from the "
    "repository root, on a machine with a CUDA build of torch and nvcc (CUDA_HOME)"
)


def _load_extension():
    """-> (module or None, why it is unavailable or None)."""
    try:
        module = importlib.import_module("cos_kernels._C")
    except (ImportError, OSError) as err:
        return None, f"the CUDA extension cos_kernels._C is not built or cannot load ({type(err).__name__}: {err})"
    if not hasattr(torch.ops.cos_kernels_cuda, "window_attention_forward"):
        return None, "cos_kernels._C loaded but did not register torch.ops.cos_kernels_cuda (stale build?)"
    _register_fakes()
    return module, None


_FAKES_REGISTERED = False


def _register_fakes() -> None:
    """Fake (meta) kernels of the extension's ops, symbolic-shape friendly (for opcheck, compile)."""
    global _FAKES_REGISTERED
    if _FAKES_REGISTERED:
        return

    @torch.library.register_fake("cos_kernels_cuda::window_attention_forward")
    def _forward_fake(q, k, v, layout_spec, softmax_scale):
        B, Q, H, D = q.shape
        return q.new_empty(B, Q, H, D), q.new_empty(B, H, Q, dtype=torch.float32)

    @torch.library.register_fake("cos_kernels_cuda::window_attention_backward")
    def _backward_fake(grad_out, q, k, v, out, lse, layout_spec, softmax_scale):
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)

    _FAKES_REGISTERED = True


class CudaKernel:
    name = "cuda"
    dtypes = (torch.float32, torch.float16, torch.bfloat16)
    head_dims = range(16, 129)

    def __init__(self):
        self._extension = None
        self._load_error: str | None = None
        self._loaded = False

    def _ensure_loaded(self) -> str | None:
        if not self._loaded:
            self._extension, self._load_error = _load_extension()
            self._loaded = True
        return self._load_error

    def unavailable_reason(self, device: torch.device) -> str | None:
        error = self._ensure_loaded()
        if error is not None:
            return f"{error}; {BUILD_HINT}"
        device = torch.device(device)
        if device.type != "cuda":
            return f"the cuda backend runs on CUDA tensors only, got tensors on {device}"
        if not torch.cuda.is_available():
            return "torch.cuda.is_available() is False (no usable CUDA device or driver)"
        major, minor = torch.cuda.get_device_capability(device)
        if major < 8:
            return (
                f"the cuda backend needs compute capability 8.0 (sm_80) or newer, "
                f"got {major}.{minor} on {torch.cuda.get_device_name(device)}"
            )
        return None

    def forward(self, q, k, v, layout: WindowLayout, softmax_scale: float):
        return torch.ops.cos_kernels_cuda.window_attention_forward(
            q, k, v, list(layout.to_spec()), float(softmax_scale)
        )

    def backward(self, grad_out, q, k, v, out, lse, layout: WindowLayout, softmax_scale: float):
        return torch.ops.cos_kernels_cuda.window_attention_backward(
            grad_out, q, k, v, out, lse, list(layout.to_spec()), float(softmax_scale)
        )


CUDA_KERNEL = CudaKernel()
register_kernel(CUDA_KERNEL)


def extension():
    """The loaded cos_kernels._C module; RuntimeError saying how to build it where it is missing."""
    error = CUDA_KERNEL._ensure_loaded()
    if error is not None:
        raise RuntimeError(f"{error}; {BUILD_HINT}")
    return CUDA_KERNEL._extension


def set_poison_outputs(on: bool) -> None:
    """Test hook: fill the kernels' output buffers with NaN before each launch (unwritten elements show)."""
    extension().set_poison_outputs(bool(on))
