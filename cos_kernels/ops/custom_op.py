"""The fused op as torch.library custom ops: forward, backward, fake tensors and autograd, written
once for every fused backend (the backend is a string argument; the layout crosses as flat ints)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..layout import WindowLayout
from . import check_qkv
from .registry import get_kernel


@torch.library.custom_op("cos_kernels::window_attention_forward", mutates_args=())
def window_attention_forward(
    q: Tensor, k: Tensor, v: Tensor, layout_spec: list[int], softmax_scale: float, backend: str
) -> tuple[Tensor, Tensor]:
    """-> out (B, Q, H, D) in q's dtype, lse (B, H, Q) fp32."""
    layout = WindowLayout.from_spec(layout_spec)
    check_qkv(q, k, v, layout)
    return get_kernel(backend).forward(q, k, v, layout, softmax_scale)


@window_attention_forward.register_fake
def _(q, k, v, layout_spec, softmax_scale, backend):
    B, Q, H, D = q.shape
    return q.new_empty(B, Q, H, D), q.new_empty(B, H, Q, dtype=torch.float32)


@torch.library.custom_op("cos_kernels::window_attention_backward", mutates_args=())
def window_attention_backward(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    layout_spec: list[int],
    softmax_scale: float,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """-> dq (B, Q, H, D), dk and dv (B, S, N, H, D)."""
    layout = WindowLayout.from_spec(layout_spec)
    check_qkv(q, k, v, layout)
    return get_kernel(backend).backward(grad_out, q, k, v, out, lse, layout, softmax_scale)


@window_attention_backward.register_fake
def _(grad_out, q, k, v, out, lse, layout_spec, softmax_scale, backend):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, layout_spec, softmax_scale, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.args = (layout_spec, softmax_scale, backend)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, _grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = window_attention_backward(grad_out.contiguous(), q, k, v, out, lse, *ctx.args)
    return dq, dk, dv, None, None, None


window_attention_forward.register_autograd(_backward, setup_context=_setup_context)


def fused_window_attention(
    q: Tensor, k: Tensor, v: Tensor, layout: WindowLayout, softmax_scale: float, backend: str
) -> Tensor:
    out, _ = window_attention_forward(q, k, v, list(layout.to_spec()), softmax_scale, backend)
    return out
