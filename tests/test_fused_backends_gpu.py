"""GPU tests that are the same for both fused backends, each run for "triton" and for "cuda".

Values and dq/dk/dv are checked against the float64 loop reference of tests/oracle.py by the 2x-eager
rule (kernel_cases.check_case) on the full presets, random layouts, every head dim with fused-KV
views, a stride-0 q and K/V strided on D, the benchmark shapes in bf16 and a case over 2**31
elements; the backward is checked for bitwise determinism. Every test fills the tested backend's
outputs with NaN (its poison hook), so an element no program or thread writes fails the finiteness
check. A backend's parameters skip, with the reason, where it cannot run: no CUDA device, or (cuda)
the extension cos_kernels._C not built. Tests of one backend alone stay in test_triton.py and
test_cuda.py.

Where the two backends' former tests drew different cases (numbers of random layouts, head dims,
batch sizes), each backend keeps its own, in the per-backend tables below.
"""

from __future__ import annotations

import pytest
import torch
from kernel_cases import (
    ALL_DTYPES,
    ATOL,
    DTYPE_IDS,
    FUSED_BACKENDS,
    HAS_CUDA,
    HEAD_DIMS,
    check_case,
    fused_kernel,
    gpu_skip_reason,
    make_inputs,
    poisoned_outputs,
    random_case,
)
from oracle import assert_within_eager_error, random_layout, reference_attention, seeded_rng

from cos_kernels import PRESETS, CoSConfig, WindowLayout
from cos_kernels.ops import reference

pytestmark = pytest.mark.gpu

SKIP_REASON = {backend: gpu_skip_reason(backend) for backend in FUSED_BACKENDS}


def on(backend: str, *values, id: str | None = None):
    """One parameter set (backend, *values), skipped with the backend's reason where it cannot run."""
    reason = SKIP_REASON[backend]
    marks = [pytest.mark.skip(reason=reason)] if reason else []
    return pytest.param(backend, *values, marks=marks, id=id or backend)


BACKENDS = [on(backend) for backend in FUSED_BACKENDS]


@pytest.fixture(autouse=True)
def poison_outputs(backend):
    """Every output buffer of the tested backend's kernels starts as NaN."""
    with poisoned_outputs(backend):
        yield


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_gpu_presets(backend, preset, dtype):
    """A full preset, a random head dim, batch 1-4, 1-8 heads."""
    rng = seeded_rng()
    layout = CoSConfig.from_preset(preset).layout
    random_case(rng, layout, dtype, "cuda", backend=backend, B=rng.randint(1, 4), H=rng.randint(1, 8))


# per backend, one (max_grid, max_batch, max_heads) per case
RANDOM_LAYOUT_CASES = {
    "triton": [(32, 4, 8)] * 6,
    "cuda": [(32 if case % 2 else 12, 3, 4) for case in range(8)],
}


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(
    "backend, max_grid, max_batch, max_heads",
    [on(b, *spec, id=f"{b}-{case}") for b, specs in RANDOM_LAYOUT_CASES.items()
     for case, spec in enumerate(specs)],
)
def test_gpu_random_layouts(backend, max_grid, max_batch, max_heads, dtype):
    """Rectangular grids and windows, 1-3 scales, 1-16 queries per window, a random head dim."""
    rng = seeded_rng()
    layout = random_layout(rng, max_scales=3, max_qpw=16, max_grid=max_grid)
    B, H = rng.randint(1, max_batch), rng.randint(1, max_heads)
    random_case(rng, layout, dtype, "cuda", backend=backend, B=B, H=H)


# per backend: (head dims, most queries per window of the first scale)
HEAD_DIM_CASES = {"triton": (HEAD_DIMS, 100), "cuda": (HEAD_DIMS + (17, 100), 150)}


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(
    "backend, D, max_qpw",
    [on(b, D, max_qpw, id=f"{b}-{D}") for b, (dims, max_qpw) in HEAD_DIM_CASES.items() for D in dims],
)
def test_gpu_head_dims_strided(backend, D, max_qpw, dtype):
    """Every head dim with fused-KV views + stride-0 q, and with K/V of stride 2 on the head dim;
    windows with more queries than a block has rows next to 1-query windows."""
    rng = seeded_rng()
    queries = [rng.randint(1, max_qpw), 16 * rng.randint(1, 8), 48 * rng.randint(1, 3)]
    layout = WindowLayout((8, 12), [(8, 12), (2, 3), (1, 2)], queries)
    for fused_kv, broadcast_q, strided_d in ((True, True, False), (False, False, True)):
        q, k, v = make_inputs(layout, 3, 4, D, dtype, "cuda", fused_kv=fused_kv, broadcast_q=broadcast_q,
                              strided_d=strided_d)
        check_case(layout, q, k, v, backend=backend)


@pytest.mark.parametrize("preset", ["cos-80", "cos-1296"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_gpu_large_batch_bf16(backend, preset):
    """Benchmark shapes (cos-80 B=256, cos-1296 B=64; 16 heads of 64, bf16), fused K/V views."""
    seeded_rng()
    layout = CoSConfig.from_preset(preset).layout
    B = 256 if preset == "cos-80" else 64
    q, k, v = make_inputs(layout, B, 16, 64, torch.bfloat16, "cuda", fused_kv=True, broadcast_q=False)
    check_case(layout, q, k, v, backend=backend)


@pytest.mark.skipif(HAS_CUDA and torch.cuda.get_device_properties(0).total_memory < 40 * 2**30,
                    reason="needs a GPU with 40 GiB")
@pytest.mark.parametrize("backend", BACKENDS)
def test_gpu_over_2_31_elements(backend):
    """K/V of more than 2**31 elements (int64 offsets): the last images are checked against the oracle,
    every element of out, dk, dv is finite."""
    seeded_rng()
    kernel = fused_kernel(backend)
    layout = WindowLayout(32, [32, 4], [16, 64 * 4])
    S, N, H, D = layout.num_scales, layout.num_patches, 16, 128
    B = 2**31 // (S * N * H * D) + 2
    assert B * S * N * H * D > 2**31
    kv = torch.randn(B, N, S, 2, H, D, device="cuda", dtype=torch.bfloat16)
    k, v = kv[:, :, :, 0].transpose(1, 2), kv[:, :, :, 1].transpose(1, 2)
    q = torch.randn(B, layout.total_queries, H, D, device="cuda", dtype=torch.bfloat16)
    scale = D**-0.5
    out, lse = kernel.forward(q, k, v, layout, scale)
    g = torch.randn_like(out)
    dq, dk, dv = kernel.backward(g, q, k, v, out, lse, layout, scale)
    tail = slice(B - 2, B)
    qt, kt, vt = (t[tail].detach().clone().requires_grad_() for t in (q, k, v))
    check = [t.double().detach().requires_grad_() for t in (qt, kt, vt)]
    ref = reference_attention(*check, layout, scale)
    eager = reference.window_attention(qt, kt, vt, layout, scale)
    atol = ATOL[torch.bfloat16]
    assert_within_eager_error("out", out[tail], ref, eager, atol)
    grads64 = torch.autograd.grad(ref, check, g[tail].double())
    grads_e = torch.autograd.grad(eager, (qt, kt, vt), g[tail])
    for name, got, r, e in zip(("dq", "dk", "dv"), (dq[tail], dk[tail], dv[tail]), grads64, grads_e):
        assert_within_eager_error(name, got, r, e, atol)
    assert torch.isfinite(out).all() and torch.isfinite(dk).all() and torch.isfinite(dv).all()


# per backend: the dtypes, and whether a random layout (B=3) follows cos-1296 (B=8)
DETERMINISM_CASES = {"triton": ([torch.bfloat16], False), "cuda": (ALL_DTYPES, True)}


@pytest.mark.parametrize(
    "backend, dtype, random_too",
    [on(b, dtype, random_too, id=f"{b}-{DTYPE_IDS[ALL_DTYPES.index(dtype)]}")
     for b, (dtypes, random_too) in DETERMINISM_CASES.items() for dtype in dtypes],
)
def test_gpu_deterministic_backward(backend, dtype, random_too):
    """Backward four times on the same inputs: contiguous, finite and bitwise equal dq, dk, dv."""
    rng = seeded_rng()
    kernel = fused_kernel(backend)
    cases = [(CoSConfig.from_preset("cos-1296").layout, 8)]
    if random_too:
        cases.append((random_layout(rng, max_grid=16), 3))
    for layout, B in cases:
        q, k, v = make_inputs(layout, B, 16, 64, dtype, "cuda", fused_kv=True, broadcast_q=False)
        out, lse = kernel.forward(q, k, v, layout, 0.125)
        g = torch.randn_like(out)
        first = kernel.backward(g, q, k, v, out, lse, layout, 0.125)
        for a in first:
            assert a.is_contiguous() and torch.isfinite(a).all()
        for _ in range(3):
            again = kernel.backward(g, q, k, v, out, lse, layout, 0.125)
            for name, a, b in zip(("dq", "dk", "dv"), first, again):
                assert torch.equal(a, b), f"{name} differs between two identical backward calls"
