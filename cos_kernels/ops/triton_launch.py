"""Every launch of the triton backend, built in one place: kernel, grid, arguments and constexprs.

``build_launches`` gives the forward's launch or the backward's two; ``TritonWindowAttention`` runs
them (``launch.kernel[launch.grid](*launch.args, **launch.constexprs)``) and scripts/compile_table.py
compiles the same launches ahead of time for sm_90. What depends only on (layout, head dim, dtype,
device), the block sizes, tile tables and constexprs, is built once and cached.

Forward: ONE launch over (query tile, batch image, head). Query tiles pack several small windows of
one scale into BLOCK_M rows (an in-tile window mask keeps each query on its own window's keys), or
split a window with more than BLOCK_M queries into BLOCK_M-row slices. Tiles are ordered by their
number of key slots, largest first, so the longest programs start first.

Backward: TWO launches, no atomics, so gradients are bitwise deterministic:
  1. bwd_dq, over query tiles (the forward's table): delta = rowsum(dO * O), saved for launch 2, and dQ;
  2. bwd_dkdv, over key tiles (BLOCK_N keys of a group of windows of one scale): dK and dV, iterating
     over the queries of those windows.
Each element of dq, dk, dv is written by exactly one program.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from ..layout import WindowLayout
from . import triton_kernels
from .triton_tiles import key_tiles, query_tiles

__all__ = ["KERNELS", "LaunchConfig", "launch_config", "Launch", "BackwardBuffers", "build_launches"]

LOG2E = 1.4426950408889634
MAX_GRID = 2**31 - 1

KERNELS = {  # launch name -> its triton.jit function
    "fwd": triton_kernels.window_attention_fwd_kernel,
    "bwd_dq": triton_kernels.window_attention_bwd_dq_kernel,
    "bwd_dkdv": triton_kernels.window_attention_bwd_dkdv_kernel,
}


def _pow2_at_least(n: int) -> int:
    """The smallest power of two >= max(n, 16): a tl.dot dimension."""
    return 1 << (max(16, int(n)) - 1).bit_length()


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
    every kernel from spilling registers on sm_90 (tests/test_sm90_compile.py holds them to it;
    benchmarks/COMPILE_SM90.md lists each kernel's registers, spills and shared memory, and
    benchmarks/NOTES.md what the other configurations spilled and whether GPU timings tuned them).

    fp16 / bf16 (tensor-core dots): BLOCK_M follows the largest window's query count (16..64), so
    4-16-query windows share a 16-row tile; 64 key slots per step, 4 warps, 3 stages; but
      - padded head dims above 64 (BLOCK_D 128): 32 key slots, and dK/dV steps of at most 32 queries;
      - masked head dims up to 64 (e.g. 40, in BLOCK_D 64): 32 key slots, and 8 warps at BLOCK_M above 16.

    fp32 (exact products: FMA dots, their operands spread over a warp's registers): BLOCK_M <= 32,
    32 key slots (16 above head dim 64), 16-query dK/dV steps, 8 warps, and no pipelining of the
    dK/dV query loop."""
    block_d = _pow2_at_least(head_dim)
    widest = _pow2_at_least(max(layout.queries_per_window))
    if dtype == torch.float32:
        block_m = min(widest, 32)
        block_n = 32 if block_d <= 64 else 16
        return LaunchConfig(block_m, block_n, block_d, 16, num_warps=8, num_stages=2, num_stages_kv=1)
    block_m = min(widest, 64)
    block_n, block_m_kv, num_warps = 64, block_m, 4
    if block_d > 64:
        block_n, block_m_kv = 32, min(block_m, 32)
    elif head_dim < block_d:
        block_n, num_warps = 32, 4 if block_m == 16 else 8
    return LaunchConfig(block_m, block_n, block_d, block_m_kv, num_warps, num_stages=3, num_stages_kv=3)


class Launch(NamedTuple):
    """One kernel launch, run as ``kernel[grid](*args, **constexprs)``."""

    name: str  # "fwd", "bwd_dq" or "bwd_dkdv": a key of KERNELS
    kernel: Any  # KERNELS[name], a triton.jit function
    grid: tuple[int]  # (tiles * B * H,): one program per (tile, batch image, head), tile-major
    args: tuple  # the runtime arguments: tensors, tile table, strides, sizes, scales
    constexprs: dict[str, Any]  # the constexprs, and the launch options num_warps and num_stages


class BackwardBuffers(NamedTuple):
    """What the backward's launches read and write besides q, k, v, out and lse."""

    grad_out: torch.Tensor  # (B, Q, H, D) dO, any strides
    delta: torch.Tensor  # (B, H, Q) fp32 contiguous: rowsum(dO * O), written by bwd_dq for bwd_dkdv
    dq: torch.Tensor  # (B, Q, H, D), unit stride on D
    dk: torch.Tensor  # (B, S, N, H, D), unit stride on D
    dv: torch.Tensor  # (B, S, N, H, D), the strides of dk


@dataclass(frozen=True)
class _Plan:
    """What every launch of one (layout, head dim, dtype, device) shares."""

    query_tiles: torch.Tensor  # (query tiles, len(QueryTileField)) int32
    key_tiles: torch.Tensor  # (key tiles, len(KeyTileField)) int32
    constexprs: dict[str, dict[str, Any]]  # launch name -> its constexprs and launch options


_PLANS: dict[tuple, _Plan] = {}


def _plan(layout: WindowLayout, head_dim: int, dtype: torch.dtype, device: torch.device) -> _Plan:
    """The cached plan of (layout, head_dim, dtype, device), built on first use."""
    key = (layout.to_spec(), head_dim, dtype, device)
    plan = _PLANS.get(key)
    if plan is None:
        cfg = launch_config(layout, head_dim, dtype)
        # fp32 inputs: exact fp32 products (no TF32), so fp32 results meet the fp32 error bound
        common = dict(HEAD_DIM=head_dim, BLOCK_N=cfg.block_n, BLOCK_D=cfg.block_d, num_warps=cfg.num_warps,
                      DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32")
        over_queries = dict(common, BLOCK_M=cfg.block_m, num_stages=cfg.num_stages)
        plan = _PLANS[key] = _Plan(
            torch.tensor(query_tiles(layout, cfg.block_m), dtype=torch.int32, device=device),
            torch.tensor(key_tiles(layout, cfg.block_n), dtype=torch.int32, device=device),
            {"fwd": over_queries, "bwd_dq": over_queries,
             "bwd_dkdv": dict(common, BLOCK_M=cfg.block_m_kv, num_stages=cfg.num_stages_kv)},
        )
    return plan


def _grid(tiles: torch.Tensor, num_bh: int) -> tuple[int]:
    n = tiles.shape[0] * num_bh
    if n > MAX_GRID:
        raise ValueError(
            f"the triton backend launches one program per (tile, image, head): {tiles.shape[0]} tiles x "
            f"{num_bh} images*heads = {n} exceeds the grid limit {MAX_GRID}; split the batch"
        )
    return (n,)


def build_launches(layout: WindowLayout, softmax_scale: float, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   out: torch.Tensor, lse: torch.Tensor, backward: BackwardBuffers | None = None) -> tuple[Launch, ...]:
    """The forward's launch (``backward`` None: it writes out and lse) or the backward's two, bwd_dq
    then bwd_dkdv, to be run in that order (it reads out and lse, writes ``backward``'s buffers).

    q (B, Q, H, D), k and v (B, S, N, H, D), any strides (q may be a stride-0 batch broadcast); out
    (B, Q, H, D) with unit stride on D; lse (B, H, Q) fp32 contiguous; one dtype among fp16, bf16,
    fp32, head dim 16..128, B * H >= 1. softmax_scale multiplies q . k."""
    B, Q, H, D = q.shape
    plan = _plan(layout, D, q.dtype, q.device)
    num_bh = B * H
    inputs = (*q.stride(), *k.stride(), *v.stride())
    sizes = (H, num_bh, Q, layout.grid[1])
    scale = float(softmax_scale)
    if backward is None:
        return (Launch("fwd", KERNELS["fwd"], _grid(plan.query_tiles, num_bh),
                       (q, k, v, out, lse, plan.query_tiles, *inputs, *out.stride()[:3], *sizes, scale * LOG2E),
                       plan.constexprs["fwd"]),)
    do, delta, dq, dk, dv = backward
    return (
        Launch("bwd_dq", KERNELS["bwd_dq"], _grid(plan.query_tiles, num_bh),
               (q, k, v, out, do, lse, delta, dq, plan.query_tiles, *inputs, *out.stride(), *do.stride(),
                *dq.stride()[:3], *sizes, scale, scale * LOG2E),
               plan.constexprs["bwd_dq"]),
        Launch("bwd_dkdv", KERNELS["bwd_dkdv"], _grid(plan.key_tiles, num_bh),
               (q, k, v, do, lse, delta, dk, dv, plan.key_tiles, *inputs, *do.stride(), *dk.stride()[:4],
                *sizes, scale, scale * LOG2E),
               plan.constexprs["bwd_dkdv"]),
    )
