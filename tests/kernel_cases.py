"""Cases and checks shared by the tests of the fused backends ("triton", "cuda").

Used by tests/test_triton.py, tests/test_cuda.py and tests/test_fused_backends_gpu.py: shrunk
presets, input makers (fused-KV views, stride-0 q, strided D), the check of a backend's values and
gradients against the float64 loop reference of tests/oracle.py by the 2x-eager rule, random cases,
a float64 logsumexp reference, the NaN poison of the kernels' outputs, and why a backend's GPU tests
cannot run here.
"""

from __future__ import annotations

import contextlib
import functools
import os
import subprocess
import sys
from pathlib import Path

import torch
from oracle import assert_within_eager_error, random_qkv, reference_attention, seeded_rng

from cos_kernels import PRESETS, MultiScaleResampler, WindowLayout, multiscale_window_attention
from cos_kernels.ops import cuda_backend as cb
from cos_kernels.ops import reference
from cos_kernels.ops import triton_backend as tb

ROOT = Path(__file__).resolve().parents[1]
HAS_CUDA = torch.cuda.is_available()
FUSED_BACKENDS = ("triton", "cuda")

ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
HEAD_DIMS = (16, 40, 64, 128)
ALL_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]


# ---- which backend can run ----------------------------------------------------------------------
@functools.cache
def extension_error() -> str | None:
    """Why cos_kernels._C cannot be used (None where it is built and loads)."""
    return cb.CUDA_KERNEL._ensure_loaded()


def extension_missing_reason() -> str:
    return (
        f"cos_kernels._C is not built ({extension_error()}); build with "
        "`COS_KERNELS_BUILD_CUDA=1 pip install --no-build-isolation .`"
    )


def gpu_skip_reason(backend: str) -> str | None:
    """Why the GPU tests of ``backend`` cannot run in this process; None where they can."""
    reasons = [] if HAS_CUDA else ["needs a CUDA device"]
    if backend == "triton":
        if tb._TRITON_IMPORT_ERROR is not None:
            reasons.append(f"the triton package cannot be imported ({tb._TRITON_IMPORT_ERROR})")
    elif backend == "cuda":
        if extension_error() is not None:
            reasons.append(extension_missing_reason())
    else:
        raise ValueError(f"not a fused backend: {backend!r}")
    return "; ".join(reasons) or None


def fused_kernel(backend: str):
    """The FusedKernel object (forward, backward) of ``backend``."""
    return {"triton": tb.TRITON_KERNEL, "cuda": cb.CUDA_KERNEL}[backend]


@contextlib.contextmanager
def poisoned_outputs(backend: str):
    """Inside the block every output buffer of ``backend``'s kernels starts as NaN (the backend's poison
    hook), so an element no program or thread writes fails the finiteness checks. For "cuda" a no-op
    where the extension is not built (its tests skip there)."""
    if backend == "triton":
        before = tb.POISON_OUTPUTS
        tb.POISON_OUTPUTS = True
        try:
            yield
        finally:
            tb.POISON_OUTPUTS = before
    elif backend == "cuda":
        if extension_error() is not None:
            yield
            return
        cb.set_poison_outputs(True)
        try:
            yield
        finally:
            cb.set_poison_outputs(False)
    else:
        raise ValueError(f"not a fused backend: {backend!r}")


# ---- layouts and inputs -------------------------------------------------------------------------
def shrunk_preset(name: str, factor: int) -> WindowLayout:
    """A preset on a grid ``factor`` times smaller: window sides shrink alike (at least 1 patch),
    each window keeps its number of queries."""
    p = PRESETS[name]
    G = p["grid"]
    g = G // factor
    windows, queries = [], []
    for w, n in zip(p["windows"], p["queries"]):
        qpw = n // (G // w) ** 2
        w2 = max(1, w // factor)
        windows.append(w2)
        queries.append((g // w2) ** 2 * qpw)
    return WindowLayout(g, windows, queries)


def make_inputs(layout, B, H, D, dtype, device, *, fused_kv, broadcast_q, strided_d=False):
    """q (B, Q, H, D) (a stride-0 batch broadcast with broadcast_q), k, v (B, S, N, H, D): strided
    views of one fused (B, N, S, 2, H, D) tensor with fused_kv, or with stride 2 on D with strided_d.
    All require grad (through their leaves)."""
    if fused_kv:  # built here: the views must be taken after the leaf requires grad
        S, N, Q = layout.num_scales, layout.num_patches, layout.total_queries
        q = torch.randn(B, Q, H, D, device=device, dtype=dtype, requires_grad=True)
        kv = torch.randn(B, N, S, 2, H, D, device=device, dtype=dtype, requires_grad=True)
        k, v = kv[:, :, :, 0].transpose(1, 2), kv[:, :, :, 1].transpose(1, 2)
        assert k.grad_fn is not None and v.grad_fn is not None
    else:
        q, k, v = random_qkv(layout, B, H, D, dtype, device, requires_grad=True)
    if broadcast_q:
        q0 = torch.randn(1, *q.shape[1:], device=device, dtype=dtype, requires_grad=True)
        q = q0.expand(B, -1, -1, -1)
        assert B == 1 or q.stride(0) == 0
    if strided_d:
        shape = (B, layout.num_scales, layout.num_patches, H, 2 * D)
        k = torch.randn(shape, device=device, dtype=dtype, requires_grad=True)[..., ::2]
        v = torch.randn(shape, device=device, dtype=dtype, requires_grad=True)[..., ::2]
        assert k.stride(-1) == 2
    if fused_kv:
        assert not k.is_contiguous() and k.untyped_storage().data_ptr() == v.untyped_storage().data_ptr()
    return q, k, v


# ---- checks -------------------------------------------------------------------------------------
def check_case(layout, q, k, v, *, backend, softmax_scale=None, backward=True):
    """The backend's out (and dq, dk, dv) vs the float64 oracle, within 2x the eager error + atol.
    Returns (out, (dq, dk, dv) or None, the output gradient g or None)."""
    dtype = q.dtype
    atol = ATOL[dtype]
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    out = multiscale_window_attention(q, k, v, layout, softmax_scale=softmax_scale, backend=backend)
    assert out.dtype == dtype and out.shape == q.shape and out.device == q.device

    leaves64 = [t.detach().double().requires_grad_(backward) for t in (q, k, v)]
    ref = reference_attention(*leaves64, layout, scale)
    leaves_e = [t.detach().clone().requires_grad_(backward) for t in (q, k, v)]
    eager = reference.window_attention(*leaves_e, layout, scale)
    assert_within_eager_error("out", out, ref, eager, atol)
    if not backward:
        return out, None, None
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    grads64 = torch.autograd.grad(ref, leaves64, g.double())
    grads_e = torch.autograd.grad(eager, leaves_e, g)
    for name, got, r, e in zip(("dq", "dk", "dv"), grads, grads64, grads_e):
        assert got.shape == r.shape and got.dtype == dtype
        assert_within_eager_error(name, got, r, e, atol)
    return out, grads, g


def random_case(rng, layout, dtype, device, *, backend, D=None, B=None, H=None):
    """check_case on random inputs: D from HEAD_DIMS, B in 1..3, H in 1..4 unless given; fused-KV views
    half the time, a stride-0 batch-broadcast q 30% of the time."""
    D = rng.choice(HEAD_DIMS) if D is None else D
    B = rng.randint(1, 3) if B is None else B
    H = rng.randint(1, 4) if H is None else H
    fused_kv, broadcast_q = rng.random() < 0.5, rng.random() < 0.3
    print(f"{layout} B={B} H={H} D={D} {dtype} fused_kv={fused_kv} broadcast_q={broadcast_q}")
    q, k, v = make_inputs(layout, B, H, D, dtype, device, fused_kv=fused_kv, broadcast_q=broadcast_q)
    check_case(layout, q, k, v, backend=backend)


def reference_lse(q, k, layout, scale):
    """float64 logsumexp (B, H, Q) of each query's scaled scores over its window."""
    q, k = q.double(), k.double()
    gw = layout.grid[1]
    cols = []
    for s in range(layout.num_scales):
        for w in range(layout.windows_per_scale[s]):
            rows, columns = layout.window_patches(s, w)
            patches = [y * gw + x for y in rows for x in columns]
            qpw = layout.queries_per_window[s]
            start = layout.query_offsets[s] + w * qpw
            scores = torch.einsum("bqhd,bphd->bhqp", q[:, start : start + qpw], k[:, s, patches]) * scale
            cols.append(torch.logsumexp(scores, dim=-1))
    return torch.cat(cols, dim=-1)


def assert_same_values_and_grads(got, want, inputs, tol):
    """Compiled vs eager: values within ``tol`` (atol = rtol), and so the gradients of ``inputs``
    for one random output gradient."""
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)
    g = torch.randn_like(want)
    for a, b in zip(torch.autograd.grad(got, inputs, g), torch.autograd.grad(want, inputs, g)):
        torch.testing.assert_close(a, b, atol=tol, rtol=tol)


def check_resampler_matches_torch_backend(cfg, backend, device, make_feats, *, tol, grad_tol):
    """A MultiScaleResampler on ``backend`` and one on the torch backend with the same weights: the
    outputs agree within ``tol`` and the parameter gradients of sum(y**2) within ``grad_tol``, each an
    (atol, rtol) pair. ``make_feats()`` makes the input features (after the models are initialised)."""
    torch.manual_seed(seeded_rng().randrange(2**31))
    model = MultiScaleResampler(cfg, backend=backend).to(device)
    ref = MultiScaleResampler(cfg, backend="torch").to(device)
    ref.load_state_dict(model.state_dict())
    feats = make_feats()
    y, y_ref = model(feats), ref(feats)
    torch.testing.assert_close(y, y_ref, atol=tol[0], rtol=tol[1])
    y.square().sum().backward()
    y_ref.square().sum().backward()
    for (name, p), p_ref in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, atol=grad_tol[0], rtol=grad_tol[1], msg=name)


# ---- processes ----------------------------------------------------------------------------------
def run_python(script: str, *, unset=(), env=None) -> subprocess.CompletedProcess:
    """``python -c script`` in a fresh process, in the repository root with it on PYTHONPATH;
    ``unset`` names variables to drop from the environment, ``env`` adds or overrides some."""
    environ = {name: value for name, value in os.environ.items() if name not in unset}
    environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [environ.get("PYTHONPATH")])])
    environ.update(env or {})
    return subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=str(ROOT), env=environ
    )
