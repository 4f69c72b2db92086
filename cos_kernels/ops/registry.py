"""Fused-kernel backends: what one must provide, and where they are registered.

A fused backend (Triton, CUDA) computes the forward with the logsumexp and a separate backward; the
custom ops in ``custom_op.py`` wrap whichever one is named, so autograd, fake tensors and
torch.compile support are written once for all of them.
"""

from __future__ import annotations

from typing import Protocol

import torch

from ..layout import WindowLayout


class FusedKernel(Protocol):
    name: str
    dtypes: tuple[torch.dtype, ...]
    head_dims: range

    def unavailable_reason(self, device: torch.device) -> str | None:
        """None where the kernel can run on ``device``, else a sentence saying why not."""

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: WindowLayout, softmax_scale: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """q (B, Q, H, D), k/v (B, S, N, H, D) -> out (B, Q, H, D) in q's dtype, lse (B, H, Q) fp32."""

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
        """-> dq (B, Q, H, D), dk and dv (B, S, N, H, D), contiguous, in the inputs' dtype."""


_KERNELS: dict[str, FusedKernel] = {}


def register_kernel(kernel: FusedKernel) -> None:
    _KERNELS[kernel.name] = kernel


def get_kernel(name: str) -> FusedKernel:
    return _KERNELS[name]


def registered_kernels() -> dict[str, FusedKernel]:
    return dict(_KERNELS)
