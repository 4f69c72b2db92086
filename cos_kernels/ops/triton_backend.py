"""The "triton" fused backend: tile tables, launch code and its registration as a FusedKernel.

Forward: ONE launch over (query tile, batch image, head). Query tiles pack several small windows of
one scale into BLOCK_M rows (an in-tile window mask keeps each query on its own window's keys), or
split a window with more than BLOCK_M queries into BLOCK_M-row slices. Tiles are ordered by their
number of key slots, largest first, so the longest programs start first.

Backward: TWO launches, no atomics, so gradients are bitwise deterministic:
  1. query tiles (same table as the forward): delta = rowsum(dO * O), saved for launch 2, and dQ;
  2. key tiles (BLOCK_N keys of a group of windows of one scale): dK and dV, iterating over the
     queries of those windows.
Each element of dq, dk, dv is written by exactly one program.

K and V are read in place through their strides (views of a fused (B, N, S, 2, H, D) projection
work without copies); q may be a stride-0 batch broadcast. Offsets are int64 inside the kernels.

CPU tensors run under the Triton interpreter when TRITON_INTERPRET=1 was set before this module (and
triton) were first imported; otherwise only CUDA tensors are accepted.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..layout import WindowLayout
from .registry import register_kernel

try:
    from . import triton_kernels as _tk
except ImportError as err:  # triton missing or broken: the backend registers but reports why
    _tk = None
    _TRITON_IMPORT_ERROR = f"{type(err).__name__}: {err}"
else:
    _TRITON_IMPORT_ERROR = None

__all__ = ["TritonWindowAttention", "TRITON_KERNEL", "POISON_OUTPUTS", "launch_config"]

_LOG2E = 1.4426950408889634
_MAX_GRID = 2**31 - 1

# Test hook: when True, every output buffer (out, lse, dq, dk, dv, delta) is pre-filled with NaN
# instead of left uninitialised, so an element a kernel fails to write shows up as NaN.
POISON_OUTPUTS = False


def _interpreted() -> bool:
    """Whether the kernels were built for the Triton interpreter (TRITON_INTERPRET=1 at import)."""
    return _tk is not None and type(_tk.window_attention_fwd_kernel).__name__ == "InterpretedFunction"


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _clamp_pow2(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, _next_pow2(n)))


@dataclass(frozen=True)
class LaunchConfig:
    """Block sizes and launch options of one call; every tl.dot dimension is a power of two >= 16."""

    block_m: int  # query rows of a forward / dQ tile
    block_n: int  # key slots per step of a forward / dQ tile, and keys of a dK/dV tile
    block_d: int  # head dim padded to a power of two (masked)
    block_m_kv: int  # query rows per step of a dK/dV tile
    num_warps: int  # of all three launches
    num_stages: int  # software-pipelining depth of the forward / dQ key loop
    num_stages_kv: int  # ... and of the dK/dV query loop


def launch_config(layout: WindowLayout, head_dim: int, dtype: torch.dtype) -> LaunchConfig:
    """Block sizes and launch options for ``layout``, ``head_dim`` and ``dtype``: heuristics that keep
    every kernel from spilling registers on sm_90 (tests/test_sm90_compile.py; registers, spills and
    shared memory of each are in benchmarks/COMPILE_SM90.md), to be tuned against GPU timings.

    fp16 / bf16 (tensor-core dots): BLOCK_M follows the largest window's query count (16..64), so
    4-16-query windows share a 16-row tile; 64 key slots per step, 4 warps, 3 stages. Then, where
    ptxas would otherwise run out of registers and spill (measured with ptxas 12.8 and 13.4):
      - padded head dims above 64 (BLOCK_D 128): 32 key slots, and dK/dV steps of at most 32 queries
        (64 x 128 spills in bwd_dkdv with ptxas 13.4);
      - masked head dims up to 64 (e.g. 40, in BLOCK_D 64): 32 key slots, and 8 warps at BLOCK_M above
        16 (at BLOCK_M 64 with 4 warps bwd_dq / bwd_dkdv spill 50-440 bytes per thread).

    fp32 (exact products: FMA dots, their operands spread over a warp's registers) spilled heavily
    with the fp16 configuration: at BLOCK_M 64 ptxas fell back to 32 registers and up to 31 KB of
    spill stores per thread. fp32 uses BLOCK_M <= 32, 32 key slots (16 above head dim 64), 16-query
    dK/dV steps, 8 warps, and does not pipeline the dK/dV query loop (a second stage alone costs it
    110-180 registers, up to the 255 limit)."""
    block_d = _clamp_pow2(head_dim, 16, 1 << 30)
    widest = max(layout.queries_per_window)
    if dtype == torch.float32:
        block_m = _clamp_pow2(widest, 16, 32)
        block_n = 32 if block_d <= 64 else 16
        return LaunchConfig(block_m, block_n, block_d, 16, num_warps=8, num_stages=2, num_stages_kv=1)
    block_m = _clamp_pow2(widest, 16, 64)
    block_n, block_m_kv, num_warps = 64, block_m, 4
    if block_d > 64:
        block_n, block_m_kv = 32, min(block_m, 32)
    elif head_dim < block_d:
        block_n, num_warps = 32, 4 if block_m == 16 else 8
    return LaunchConfig(block_m, block_n, block_d, block_m_kv, num_warps, num_stages=3, num_stages_kv=3)


# ---- tile tables ----------------------------------------------------------------------------------
_TABLE_CACHE: dict[tuple, torch.Tensor] = {}


def _scales(layout: WindowLayout):
    """Per scale s: (s, wh, ww, queries per window, windows, windows per row, first query, patches
    per window)."""
    for s in range(layout.num_scales):
        wh, ww = layout.windows[s]
        qpw, nw = layout.queries_per_window[s], layout.windows_per_scale[s]
        yield s, wh, ww, qpw, nw, layout.window_grids[s][1], layout.query_offsets[s], wh * ww


def _window_runs(size: int, num_windows: int, block: int):
    """How a tile of ``block`` rows covers the windows of one scale, each window ``size`` rows (its
    queries, or its patches): as (first window, windows, first row inside the window, rows). Windows of
    at most ``block`` rows are packed ``block // size`` to a tile (from row 0); a larger window is cut
    into ``block``-row slices."""
    if size <= block:
        per = block // size
        for w0 in range(0, num_windows, per):
            n = min(per, num_windows - w0)
            yield w0, n, 0, n * size
    else:
        for w in range(num_windows):
            for first in range(0, size, block):
                yield w, 1, first, min(block, size - first)


def query_tiles(layout: WindowLayout, block_m: int) -> list[list[int]]:
    """Rows (q_start, rows, qpw, q_phase, scale, wh, ww, win_cols, win0, nkeys), longest first."""
    tiles = []
    for s, wh, ww, qpw, nw, win_cols, q0, P in _scales(layout):
        for w0, n, phase, rows in _window_runs(qpw, nw, block_m):
            tiles.append([q0 + w0 * qpw + phase, rows, qpw, phase, s, wh, ww, win_cols, w0, n * P])
    tiles.sort(key=lambda t: -t[9])  # stable: most key slots (longest program) first
    return tiles


def key_tiles(layout: WindowLayout, block_n: int) -> list[list[int]]:
    """Rows (k_begin, k_count, q_start, q_total, qpw, scale, wh, ww, win_cols, win0), longest first."""
    tiles = []
    for s, wh, ww, qpw, nw, win_cols, q0, P in _scales(layout):
        for w0, n, k_begin, k_count in _window_runs(P, nw, block_n):
            tiles.append([k_begin, k_count, q0 + w0 * qpw, n * qpw, qpw, s, wh, ww, win_cols, w0])
    tiles.sort(key=lambda t: -t[3])  # most queries to visit first
    return tiles


def _table(kind: str, layout: WindowLayout, block: int, device: torch.device) -> torch.Tensor:
    """The (num_tiles, 10) int32 table on ``device``, cached per (layout, kind, block, device)."""
    key = (layout.to_spec(), kind, block, device)
    table = _TABLE_CACHE.get(key)
    if table is None:
        rows = query_tiles(layout, block) if kind == "q" else key_tiles(layout, block)
        table = torch.tensor(rows, dtype=torch.int32, device=device)
        assert table.shape[1] == _tk.TILE_FIELDS
        _TABLE_CACHE[key] = table
    return table


# ---- launches -------------------------------------------------------------------------------------
def _new(shape, dtype, device) -> torch.Tensor:
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _grid(num_tiles: int, num_bh: int) -> tuple[int]:
    n = num_tiles * num_bh
    if n > _MAX_GRID:
        raise ValueError(
            f"the triton backend launches one program per (tile, image, head): {num_tiles} tiles x "
            f"{num_bh} images*heads = {n} exceeds the grid limit {_MAX_GRID}; split the batch"
        )
    return (n,)


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs: exact fp32 products (no TF32), so fp32 results meet the fp32 error bound
    return "ieee" if dtype == torch.float32 else "tf32"


class _DeviceGuard:
    def __init__(self, device: torch.device):
        self.ctx = torch.cuda.device(device) if device.type == "cuda" else None

    def __enter__(self):
        if self.ctx is not None:
            self.ctx.__enter__()

    def __exit__(self, *exc):
        if self.ctx is not None:
            return self.ctx.__exit__(*exc)
        return False


class TritonWindowAttention:
    """FusedKernel "triton": forward (one launch) and backward (two launches) in Triton."""

    name = "triton"
    dtypes = (torch.float32, torch.float16, torch.bfloat16)
    head_dims = range(16, 129)

    def unavailable_reason(self, device: torch.device) -> str | None:
        device = torch.device(device)
        if _tk is None:
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

    # -- checks shared by forward and backward (the dispatch validates too; the custom op may be
    # -- called directly)
    def _check(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: WindowLayout) -> None:
        reason = self.unavailable_reason(q.device)
        if reason is not None:
            raise RuntimeError(f"backend='triton' cannot run on {q.device}: {reason}")
        if q.dtype not in self.dtypes or k.dtype != q.dtype or v.dtype != q.dtype:
            raise TypeError(
                f"backend='triton' needs q, k, v of one dtype among {list(self.dtypes)}, got "
                f"{q.dtype}, {k.dtype}, {v.dtype}"
            )
        B, Q, H, D = q.shape
        if D not in self.head_dims:
            raise ValueError(f"backend='triton' supports head dims 16..128, got D={D}")
        want = (B, layout.num_scales, layout.num_patches, H, D)
        if Q != layout.total_queries or tuple(k.shape) != want or tuple(v.shape) != want:
            raise ValueError(
                f"backend='triton': q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not "
                f"match {layout} (want q (B, {layout.total_queries}, H, D) and k, v {want})"
            )

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: WindowLayout, softmax_scale: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """q (B, Q, H, D), k/v (B, S, N, H, D), any strides -> out (B, Q, H, D) contiguous in q's
        dtype, lse (B, H, Q) fp32 (natural log of each query's softmax denominator)."""
        self._check(q, k, v, layout)
        B, Q, H, D = q.shape
        out = _new((B, Q, H, D), q.dtype, q.device)
        lse = _new((B, H, Q), torch.float32, q.device)
        if B * H == 0:
            return out, lse
        cfg = launch_config(layout, D, q.dtype)
        tiles = _table("q", layout, cfg.block_m, q.device)
        num_bh = B * H
        with _DeviceGuard(q.device):
            _tk.window_attention_fwd_kernel[_grid(tiles.shape[0], num_bh)](
                q, k, v, out, lse, tiles,
                *q.stride(), *k.stride(), *v.stride(),
                out.stride(0), out.stride(1), out.stride(2),
                H, num_bh, Q, layout.grid[1],
                float(softmax_scale) * _LOG2E,
                HEAD_DIM=D, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=cfg.block_d,
                DOT_PRECISION=_dot_precision(q.dtype),
                num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            )
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
        self._check(q, k, v, layout)
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
        if B * H == 0:
            return dq, dk, dv
        delta = _new((B, H, Q), torch.float32, q.device)
        cfg = launch_config(layout, D, q.dtype)
        qtiles = _table("q", layout, cfg.block_m, q.device)
        ktiles = _table("k", layout, cfg.block_n, q.device)
        num_bh = B * H
        scale = float(softmax_scale)
        common = dict(
            HEAD_DIM=D, BLOCK_N=cfg.block_n, BLOCK_D=cfg.block_d,
            DOT_PRECISION=_dot_precision(q.dtype), num_warps=cfg.num_warps,
        )
        with _DeviceGuard(q.device):
            _tk.window_attention_bwd_dq_kernel[_grid(qtiles.shape[0], num_bh)](
                q, k, v, out, grad_out, lse, delta, dq, qtiles,
                *q.stride(), *k.stride(), *v.stride(), *out.stride(), *grad_out.stride(),
                dq.stride(0), dq.stride(1), dq.stride(2),
                H, num_bh, Q, layout.grid[1],
                scale, scale * _LOG2E,
                BLOCK_M=cfg.block_m, num_stages=cfg.num_stages, **common,
            )
            _tk.window_attention_bwd_dkdv_kernel[_grid(ktiles.shape[0], num_bh)](
                q, k, v, grad_out, lse, delta, dk, dv, ktiles,
                *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(),
                dk.stride(0), dk.stride(1), dk.stride(2), dk.stride(3),
                H, num_bh, Q, layout.grid[1],
                scale, scale * _LOG2E,
                BLOCK_M=cfg.block_m_kv, num_stages=cfg.num_stages_kv, **common,
            )
        return dq, dk, dv


TRITON_KERNEL = TritonWindowAttention()
register_kernel(TRITON_KERNEL)
