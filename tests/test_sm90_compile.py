"""The triton backend's kernels compiled ahead of time for sm_90 (H100 / H200), on a CPU.

``triton.compile`` of each launch's ``ASTSource`` for ``GPUTarget("cuda", 90, 32)`` runs without a
GPU (cos_kernels/ops/triton_aot.py; in a fresh process, since tests/conftest.py may have switched the
interpreter on). CI compiles a representative subset, below; the full sweep (every preset, head dims
16..128, three dtypes) is ``python scripts/compile_table.py``, which writes benchmarks/COMPILE_SM90.md.

Spill bounds, per thread:

- fp16 / bf16 at head dim 64 (the presets'): nothing.
- everything else: at most ``SPILL_BOUND`` = 32 bytes of spill stores and of spill loads.

With launch_config's configurations the full sweep spills nothing at all, on triton 3.6 (ptxas 12.8,
what the H200 runs) and triton 3.9 (ptxas 13.4, CI): at most 241 registers (fp16 / bf16 bwd_dkdv at
D=64, BLOCK_M 64) and 134 in fp32. Before, with the fp16 configuration for every dtype, fp32 spilled
0.5 to 31 KB per thread (at BLOCK_M 64 ptxas fell back to 32 registers), and fp16 / bf16 spilled at
a masked head dim (D=40) with BLOCK_M 64 (bwd_dq 52 / 8 bytes on ptxas 12.8 / 13.4, bwd_dkdv 80 /
440) and in bwd_dkdv at BLOCK_D 128 with 64-query steps (52 to 72 bytes on ptxas 13.4). 32 bytes
(eight 32-bit values, which stay in L1) lets another ptxas park a few values around a dot without
failing CI; every one of those configurations but one (that 8-byte bwd_dq) exceeds it.
"""

from __future__ import annotations

import os
import types

import pytest
import torch

from kernel_cases import HAS_CUDA

pytest.importorskip("triton")

from cos_kernels import WindowLayout  # noqa: E402
from cos_kernels.ops import triton_aot  # noqa: E402
from cos_kernels.ops import triton_backend as tb  # noqa: E402

SPILL_BOUND = 32  # bytes per thread, of spill stores and of spill loads (see the module docstring)

# Each kernel at the two BLOCK_M of the presets (cos-*: 16-query windows, resampler-*: 64-row
# tiles; cos-80 and cos-1296 compile alike) at D=64 in the three dtypes; then the other block shapes
# launch_config picks: a masked head dim (D=40: 32 key slots, 8 warps in fp16), BLOCK_D 128 (fp32:
# 16 key slots; bf16: 32-query dK/dV steps).
SUBSET = (
    triton_aot.preset_cases(["cos-80", "cos-1296", "resampler-336"], head_dims=(64,))
    + triton_aot.preset_cases(["resampler-336"], head_dims=(40,), dtypes=("fp16", "fp32"))
    + triton_aot.preset_cases(["resampler-336"], head_dims=(128,), dtypes=("fp32",))
    + triton_aot.preset_cases(["resampler-336"], head_dims=(80,), dtypes=("bf16",))
)


@pytest.fixture(scope="module")
def compiled() -> dict:
    """The subset's compile result (triton_aot.compile_cases), once per module: 29 binaries."""
    return triton_aot.compile_cases(SUBSET, jobs=min(2, os.cpu_count() or 1), timeout=900)


def _describe(r: dict) -> str:
    return (f"{r['kernel']} {r['dtype']} D={r['head_dim']} BLOCK_M={r['block_m']} BLOCK_N={r['block_n']} "
            f"({', '.join(r['labels'])}): {r['registers']} registers, spills {r['spill_stores']} B stored "
            f"/ {r['spill_loads']} B loaded")


def test_every_launch_compiles(compiled):
    rows = compiled["rows"]
    for kernel in triton_aot.KERNELS:
        for dtype in triton_aot.DTYPES:
            assert any(r["kernel"] == kernel and r["dtype"] == dtype for r in rows), (kernel, dtype)
    labels = {(r["kernel"], r["dtype"], r["head_dim"], label) for r in rows for label in r["labels"]}
    assert labels == {(c["kernel"], c["dtype"], c["head_dim"], c["label"]) for c in SUBSET}
    for r in rows:
        assert 0 < r["registers"] <= 255 and r["shared"] > 0, _describe(r)
        assert r["shared"] <= 227 * 1024, f"{_describe(r)}: {r['shared']} B of shared memory exceed sm_90's 227 KiB"


def test_fp16_bf16_head_dim_64_do_not_spill(compiled):
    rows = [r for r in compiled["rows"] if r["dtype"] in ("fp16", "bf16") and r["head_dim"] == 64]
    assert len(rows) == 2 * 3 * 2  # two dtypes, three kernels, two BLOCK_M
    spilling = [_describe(r) for r in rows if r["spill_stores"] or r["spill_loads"]]
    assert not spilling, "\n".join(spilling)


def test_no_kernel_spills_beyond_the_bound(compiled):
    over = [_describe(r) for r in compiled["rows"] if max(r["spill_stores"], r["spill_loads"]) > SPILL_BOUND]
    assert not over, f"triton {compiled['triton']}, ptxas {compiled['ptxas']}:\n" + "\n".join(over)


# ---- the AOT launches are the backend's ----------------------------------------------------------
class _Recorder:
    """Stands in for a triton.jit kernel: ``kernel[grid](*args, **kwargs)`` records the call."""

    def __init__(self):
        self.calls = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((args, kwargs))


def _same_arg(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
                and a.shape == b.shape and a.stride() == b.stride() and a.device == b.device
                and (a.dtype != torch.int32 or torch.equal(a, b)))  # tile tables: same rows
    return type(a) is type(b) and a == b


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
def test_kernel_launches_match_the_backend(monkeypatch, dtype):
    """triton_aot.kernel_launches builds the argument lists of the backend's forward and backward:
    the backend's own launches, recorded instead of run, agree argument by argument."""
    device = "cuda" if HAS_CUDA else "cpu"
    recorders = {name: _Recorder() for name in triton_aot.KERNELS}
    kernels = types.SimpleNamespace(TILE_FIELDS=tb._tk.TILE_FIELDS,
                                    **{fn: recorders[name] for name, fn in triton_aot.KERNELS.items()})
    monkeypatch.setattr(tb, "_tk", kernels)
    monkeypatch.setattr(tb, "_interpreted", lambda: True)  # CPU tensors accepted: nothing runs
    layout = WindowLayout((4, 8), [4, (2, 4)], [40, 8])
    q, k, v = triton_aot.typical_inputs(layout, 2, 3, 40, dtype, device)
    out, lse = tb.TRITON_KERNEL.forward(q, k, v, layout, 0.3)
    tb.TRITON_KERNEL.backward(torch.zeros_like(out), q, k, v, out, lse, layout, 0.3)
    want = triton_aot.kernel_launches(layout, q, k, v, 0.3)
    for name, rec in recorders.items():
        assert len(rec.calls) == 1, name
        (args, kwargs), (want_args, want_kwargs) = rec.calls[0], want[name]
        assert kwargs == want_kwargs, name
        assert len(args) == len(want_args), name
        bad = [i for i, (a, b) in enumerate(zip(args, want_args)) if not _same_arg(a, b)]
        assert not bad, f"{name}: arguments {bad} differ"
