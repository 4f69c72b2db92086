"""grouped_linear: a different linear map for each consecutive segment of the rows (one per scale).

The resampler's query side applies one Linear per scale to that scale's queries, which lie side by
side along the query axis. Where a grouped GEMM exists (torch.nn.functional.grouped_mm, CUDA bf16 on
Hopper or newer) that is one kernel; elsewhere it is one F.linear per segment.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn.functional as F

__all__ = ["grouped_linear"]


def grouped_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, sizes
) -> torch.Tensor:
    """x (..., Q, in), Q split into consecutive segments of ``sizes`` (S of them); weight (S, out, in);
    bias (S, out) or None -> (..., Q, out): segment s is x_s @ weight[s].T + bias[s].

    On CUDA bf16 with compute capability >= 9.0 and 16-byte-aligned widths, the rows are packed
    segment-major and multiplied in one F.grouped_mm; otherwise one F.linear per segment, then a cat.
    """
    sizes = _check(x, weight, bias, sizes)
    if _grouped_mm_supported(x, weight):
        return _packed(x, weight, bias, sizes)
    biases = [None] * len(sizes) if bias is None else bias
    return torch.cat([F.linear(*args) for args in zip(x.split(sizes, dim=-2), weight, biases)], dim=-2)


def _check(x, weight, bias, sizes) -> list[int]:
    for name, t in (("x", x), ("weight", weight)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"grouped_linear: {name} must be a tensor, got {type(t).__name__}")
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise TypeError(f"grouped_linear: bias must be a tensor or None, got {type(bias).__name__}")
    if not isinstance(sizes, (list, tuple)) or not all(
        isinstance(n, int) and not isinstance(n, bool) for n in sizes
    ):
        raise TypeError(f"grouped_linear: sizes must be a list or tuple of ints, got {sizes!r}")
    if not sizes or min(sizes) < 0:
        raise ValueError(f"grouped_linear: sizes must be non-empty and non-negative, got {list(sizes)}")
    if x.dim() < 2 or sum(sizes) != x.shape[-2]:
        raise ValueError(
            f"grouped_linear: sizes {list(sizes)} (sum {sum(sizes)}) must split the rows of x, "
            f"expected shape (..., {sum(sizes)}, in), got x of shape {tuple(x.shape)}"
        )
    S, n_in = len(sizes), x.shape[-1]
    if weight.dim() != 3 or weight.shape[0] != S or weight.shape[2] != n_in:
        raise ValueError(
            f"grouped_linear: weight must have shape (S, out, in) = ({S}, out, {n_in}) for {S} sizes "
            f"and x of shape {tuple(x.shape)}, got {tuple(weight.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (S, weight.shape[1]):
        raise ValueError(
            f"grouped_linear: bias must have shape (S, out) = ({S}, {weight.shape[1]}), "
            f"got {tuple(bias.shape)}"
        )
    return list(sizes)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype F.linear would multiply x in: the autocast dtype where autocast is on, else x's."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def _grouped_mm_supported(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """F.grouped_mm exists, x has rows (an empty batch takes the per-segment path), is on CUDA with
    capability >= 9.0 and is (or autocasts to) bf16, and both widths are multiples of 16 bytes (its
    stride rule, for the forward and backward products)."""
    if not (hasattr(F, "grouped_mm") and x.numel() and x.is_cuda and _compute_dtype(x) == torch.bfloat16):
        return False
    aligned = weight.shape[1] % 8 == 0 and weight.shape[2] % 8 == 0  # 8 bf16 = 16 bytes
    return aligned and torch.cuda.get_device_properties(x.device).major >= 9


def _grouped_mm_packed(a: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """a (M, in) contiguous, its rows grouped by offsets (int32 (S,), offsets[s] = end of group s);
    weight (S, out, in) -> (M, out): group s times weight[s].T (mat_b (S, in, out), a transposed view)."""
    return F.grouped_mm(a, weight.transpose(-2, -1), offs=offsets)


@lru_cache(maxsize=64)
def _packing(batch: int, sizes: tuple[int, ...], device: torch.device):
    """Indices for the batch * Q rows of (batch, Q, in) taken segment-major, Q = sum(sizes):
    perm (batch * Q,) gathers the packed rows, inverse (batch * Q,) gathers them back, offsets (S,)
    int32 end each segment's packed rows, segment (Q,) is each query position's segment."""
    rows = torch.arange(batch * sum(sizes)).view(batch, -1).split(sizes, dim=1)
    perm = torch.cat([r.flatten() for r in rows])
    offsets = torch.tensor(sizes).mul(batch).cumsum(0).to(torch.int32)
    segment = torch.repeat_interleave(torch.tensor(sizes))
    return tuple(t.to(device) for t in (perm, perm.argsort(), offsets, segment))


def _packed(x, weight, bias, sizes):
    """One gather into segment-major rows, one grouped GEMM, one gather back, the bias per segment.
    x, weight and bias are cast to the compute dtype first, as autocast does for F.linear."""
    Q, n_in = x.shape[-2:]
    batch, dtype = math.prod(x.shape[:-2]), _compute_dtype(x)
    # Traced by torch.compile without the cache (dynamo would warn about the lru_cache otherwise).
    packing = _packing.__wrapped__ if torch.compiler.is_compiling() else _packing
    perm, inverse, offsets, segment = packing(batch, tuple(sizes), x.device)
    packed = x.reshape(batch * Q, n_in).index_select(0, perm).to(dtype)
    out = _grouped_mm_packed(packed, weight.to(dtype), offsets).index_select(0, inverse)
    out = out.view(*x.shape[:-1], weight.shape[1])
    return out if bias is None else out + bias.to(dtype).index_select(0, segment)
