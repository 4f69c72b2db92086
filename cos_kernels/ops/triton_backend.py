"""The "triton" fused backend: its registration as a FusedKernel, its checks and its buffers.

The launches (kernels, grids, arguments) come from ``triton_launch.build_launches``. K and V are read
in place through their strides (views of a fused (B, N, S, 2, H, D) projection work without copies);
q may be a stride-0 batch broadcast. Offsets are int64 inside the kernels.

CPU tensors run under the Triton interpreter when TRITON_INTERPRET=1 was set before this module (and
triton) were first imported; otherwise only CUDA tensors are accepted.
"""

from __future__ import annotations

import contextlib
import os

import torch

from ..layout import WindowLayout
from .registry import register_kernel

try:
    from . import triton_launch
except ImportError as err:  # triton missing or broken: the backend registers but reports why
    triton_launch = None
    _TRITON_IMPORT_ERROR = f"{type(err).__name__}: {err}"
else:
    _TRITON_IMPORT_ERROR = None

__all__ = ["TritonWindowAttention", "TRITON_KERNEL", "POISON_OUTPUTS"]

# Test hook: when True, every output buffer (out, lse, dq, dk, dv, delta) is pre-filled with NaN
# instead of left uninitialised, so an element a kernel fails to write shows up as NaN.
POISON_OUTPUTS = False


def _interpreted() -> bool:
    """Whether the kernels were built for the Triton interpreter (TRITON_INTERPRET=1 at import)."""
    return triton_launch is not None and type(triton_launch.KERNELS["fwd"]).__name__ == "InterpretedFunction"


def _new(shape, dtype, device) -> torch.Tensor:
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _run(launches, device: torch.device) -> None:
    """Run ``launches`` (triton_launch.Launch) in order, on ``device``'s CUDA context where it has one."""
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        for launch in launches:
            launch.kernel[launch.grid](*launch.args, **launch.constexprs)


class TritonWindowAttention:
    """FusedKernel "triton": forward (one launch) and backward (two launches) in Triton."""

    name = "triton"
    dtypes = (torch.float32, torch.float16, torch.bfloat16)
    head_dims = range(16, 129)

    def unavailable_reason(self, device: torch.device) -> str | None:
        device = torch.device(device)
        if triton_launch is None:
            return f"the triton package could not be imported ({_TRITON_IMPORT_ERROR})"
        if device.type == "cuda":
            if not torch.cuda.is_available():
                return "CUDA is not available in this process"
            return None
        if device.type == "cpu":
            if _interpreted():
                return None
            if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
                return (
                    "TRITON_INTERPRET was set after the Triton kernels were imported; set "
                    "TRITON_INTERPRET=1 before importing cos_kernels' triton backend, or use a CUDA device"
                )
            return (
                "Triton kernels need a CUDA device; to run them on CPU tensors set TRITON_INTERPRET=1 "
                "(before triton is imported) to use the Triton interpreter, or move the tensors to a "
                "CUDA device"
            )
        return f"Triton kernels run on CUDA devices (or CPU under TRITON_INTERPRET=1), got device {device}"

    def _check(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """What is the Triton kernels' own: the device, the dtypes and head dims they are built for
        (the q, k, v contract against the layout is ops.check_qkv, which the custom ops run)."""
        reason = self.unavailable_reason(q.device)
        if reason is not None:
            raise RuntimeError(f"backend='triton' cannot run on {q.device}: {reason}")
        if q.dtype not in self.dtypes or k.dtype != q.dtype or v.dtype != q.dtype:
            raise TypeError(
                f"backend='triton' needs q, k, v of one dtype among {list(self.dtypes)}, got "
                f"{q.dtype}, {k.dtype}, {v.dtype}"
            )
        if q.shape[-1] not in self.head_dims:
            raise ValueError(f"backend='triton' supports head dims 16..128, got D={q.shape[-1]}")

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: WindowLayout, softmax_scale: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """q (B, Q, H, D), k/v (B, S, N, H, D), any strides -> out (B, Q, H, D) contiguous in q's
        dtype, lse (B, H, Q) fp32 (natural log of each query's softmax denominator)."""
        self._check(q, k, v)
        B, Q, H, D = q.shape
        out = _new((B, Q, H, D), q.dtype, q.device)
        lse = _new((B, H, Q), torch.float32, q.device)
        if B * H > 0:
            _run(triton_launch.build_launches(layout, softmax_scale, q, k, v, out, lse), q.device)
        return out, lse

    def backward(
        self,
        grad_out: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        out: torch.Tensor,
        lse: torch.Tensor,
        layout: WindowLayout,
        softmax_scale: float,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """grad_out, out (B, Q, H, D), lse (B, H, Q) fp32 from forward -> dq (B, Q, H, D), dk and
        dv (B, S, N, H, D), contiguous, in the inputs' dtype. Two launches, deterministic."""
        self._check(q, k, v)
        B, Q, H, D = q.shape
        if grad_out.dtype != q.dtype:
            grad_out = grad_out.to(q.dtype)
        if out.dtype != q.dtype:
            out = out.to(q.dtype)
        if lse.dtype != torch.float32 or not lse.is_contiguous():
            lse = lse.float().contiguous()
        dq = _new((B, Q, H, D), q.dtype, q.device)
        dk = _new(tuple(k.shape), k.dtype, k.device)
        dv = _new(tuple(v.shape), v.dtype, v.device)
        if B * H > 0:
            delta = _new((B, H, Q), torch.float32, q.device)
            buffers = triton_launch.BackwardBuffers(grad_out, delta, dq, dk, dv)
            _run(triton_launch.build_launches(layout, softmax_scale, q, k, v, out, lse, buffers), q.device)
        return dq, dk, dv


TRITON_KERNEL = TritonWindowAttention()
register_kernel(TRITON_KERNEL)
