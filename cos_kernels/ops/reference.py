"""The eager PyTorch backend: one SDPA per scale over window-folded K/V.

This is what public ports of the resampler do: every scale's windows are folded into the batch
(a gather of K/V into window-contiguous copies), then one scaled_dot_product_attention per scale.
Differentiable through autograd; runs on any device and dtype torch supports.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..layout import WindowLayout


def _fold_windows(x: torch.Tensor, wh: int, ww: int, grid: tuple[int, int]) -> torch.Tensor:
    """(B, N, H, D) patches in raster order -> (B, windows, H, wh*ww, D), windows in raster order."""
    B, _, H, D = x.shape
    nr, nc = grid[0] // wh, grid[1] // ww
    x = x.reshape(B, nr, wh, nc, ww, H, D).permute(0, 1, 3, 5, 2, 4, 6)
    return x.reshape(B, nr * nc, H, wh * ww, D)


def window_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: WindowLayout, softmax_scale: float
) -> torch.Tensor:
    """q: (B, Q, H, D); k, v: (B, S, N, H, D) -> (B, Q, H, D) in q's dtype."""
    B, _, H, D = q.shape
    outs = []
    for s, ((wh, ww), n, nw) in enumerate(
        zip(layout.windows, layout.queries, layout.windows_per_scale)
    ):
        start = layout.query_offsets[s]
        qs = q[:, start : start + n].reshape(B, nw, n // nw, H, D).transpose(2, 3)
        ks = _fold_windows(k[:, s], wh, ww, layout.grid)
        vs = _fold_windows(v[:, s], wh, ww, layout.grid)
        o = F.scaled_dot_product_attention(qs, ks, vs, scale=softmax_scale)  # (B, nw, H, qpw, D)
        outs.append(o.transpose(2, 3).reshape(B, n, H, D))
    return torch.cat(outs, dim=1)
