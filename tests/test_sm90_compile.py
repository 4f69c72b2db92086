"""The triton backend's kernels compiled ahead of time for sm_90 (H100 / H200), on a CPU.

``triton.compile`` of each launch's ``ASTSource`` for ``GPUTarget("cuda", 90, 32)`` runs without a
GPU (scripts/compile_table.py; in a fresh process, since tests/conftest.py may have switched the
interpreter on). CI compiles a representative subset, below; the full sweep (every preset, head dims
16..128, three dtypes) is ``python scripts/compile_table.py``, which writes benchmarks/COMPILE_SM90.md.

Spill bounds, per thread:

- fp16 / bf16 at head dim 64 (the presets'): nothing.
- everything else: at most ``SPILL_BOUND`` = 32 bytes of spill stores and of spill loads: eight
  32-bit values, which stay in L1, so another ptxas may park a few values around a dot without
  failing CI, while all but one of the configurations launch_config moved away from spilled more
  (benchmarks/NOTES.md has their figures).
"""

from __future__ import annotations

import inspect
import os
import sys
from pathlib import Path

import pytest
import torch
from kernel_cases import HAS_CUDA

pytest.importorskip("triton")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

import compile_table  # noqa: E402

from cos_kernels import WindowLayout  # noqa: E402
from cos_kernels.ops import triton_backend as tb  # noqa: E402
from cos_kernels.ops import triton_launch  # noqa: E402

SPILL_BOUND = 32  # bytes per thread, of spill stores and of spill loads (see the module docstring)

# Each kernel at the two BLOCK_M of the presets (cos-*: 16-query windows, resampler-*: 64-row
# tiles; cos-80 and cos-1296 compile alike) at D=64 in the three dtypes; then the other block shapes
# launch_config picks: a masked head dim (D=40: 32 key slots, 8 warps in fp16), BLOCK_D 128 (fp32:
# 16 key slots; bf16: 32-query dK/dV steps).
SUBSET = (
    compile_table.preset_cases(["cos-80", "cos-1296", "resampler-336"], head_dims=(64,))
    + compile_table.preset_cases(["resampler-336"], head_dims=(40,), dtypes=("fp16", "fp32"))
    + compile_table.preset_cases(["resampler-336"], head_dims=(128,), dtypes=("fp32",))
    + compile_table.preset_cases(["resampler-336"], head_dims=(80,), dtypes=("bf16",))
)


@pytest.fixture(scope="module")
def compiled() -> dict:
    """The subset's compile result (compile_table.compile_cases), once per module: 29 binaries."""
    return compile_table.compile_cases(SUBSET, jobs=min(2, os.cpu_count() or 1), timeout=900)


def _describe(r: dict) -> str:
    return (f"{r['kernel']} {r['dtype']} D={r['head_dim']} BLOCK_M={r['block_m']} BLOCK_N={r['block_n']} "
            f"({', '.join(r['labels'])}): {r['registers']} registers, spills {r['spill_stores']} B stored "
            f"/ {r['spill_loads']} B loaded")


def test_every_launch_compiles(compiled):
    rows = compiled["rows"]
    for kernel in triton_launch.KERNELS:
        for dtype in compile_table.DTYPES:
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
        return lambda *args, **kwargs: self.calls.append((grid, args, kwargs))


def _same_arg(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
                and a.shape == b.shape and a.stride() == b.stride() and a.device == b.device
                and (a.dtype != torch.int32 or torch.equal(a, b)))  # tile tables: same rows
    return type(a) is type(b) and a == b


def _fits(kernel, launch: triton_launch.Launch) -> bool:
    """``launch`` passes ``kernel`` one positional argument per runtime parameter and a keyword per
    constexpr (plus the launch options)."""
    params = inspect.signature(kernel.fn).parameters.values()
    constexprs = {p.name for p in params if "constexpr" in str(p.annotation)}
    return (len(launch.args) == len(params) - len(constexprs)
            and set(launch.constexprs) == constexprs | {"num_warps", "num_stages"})


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
def test_compiled_launches_are_the_backends(monkeypatch, dtype):
    """compile_table.launches, with its own output buffers, builds the launches the backend's forward
    and backward make: the backend's own launches, recorded instead of run, agree argument by
    argument, and each fits its kernel's signature."""
    device = "cuda" if HAS_CUDA else "cpu"
    recorders = {name: _Recorder() for name in triton_launch.KERNELS}
    kernels = dict(triton_launch.KERNELS)
    for name, recorder in recorders.items():
        monkeypatch.setitem(triton_launch.KERNELS, name, recorder)
    monkeypatch.setattr(tb, "_interpreted", lambda: True)  # CPU tensors accepted: nothing runs
    layout = WindowLayout((4, 8), [4, (2, 4)], [40, 8])
    q, k, v = compile_table.typical_inputs(layout, 2, 3, 40, dtype, device)
    out, lse = tb.TRITON_KERNEL.forward(q, k, v, layout, 0.3)
    tb.TRITON_KERNEL.backward(torch.zeros_like(out), q, k, v, out, lse, layout, 0.3)
    want = compile_table.launches(layout, q, k, v, 0.3)
    assert list(want) == list(recorders)
    for name, rec in recorders.items():
        assert len(rec.calls) == 1, name
        (grid, args, kwargs), launch = rec.calls[0], want[name]
        assert launch.kernel is rec and grid == launch.grid, name
        assert kwargs == launch.constexprs, name
        assert len(args) == len(launch.args), name
        bad = [i for i, (a, b) in enumerate(zip(args, launch.args)) if not _same_arg(a, b)]
        assert not bad, f"{name}: arguments {bad} differ"
        assert _fits(kernels[name], launch), name
