"""Kernel benchmarks: multiscale_window_attention forward, backward and forward+backward, for every
backend that can run here and every peer (benchmarks/peers.py), at the sizes of benchmarks/cases.py.

Floor (KERNELS.md): forward moves Q + O + K + V + logsumexp at least once; backward reads Q, K, V,
O, dO, logsumexp and writes dQ, dK, dV (about twice the forward); forward+backward is their sum.
Useful FLOPs: 4*H*D per (query, key-in-its-window) pair forward, 10*H*D backward (scores recomputed,
FlashAttention's 2.5x convention); every implementation is credited the same FLOPs and bytes.

Before an implementation is first timed at a case, its output and dq, dk, dv on fresh random inputs
are checked against a float64 run of the eager torch backend: the error may be at most twice the
torch backend's own error in the session dtype plus a small allowance (KERNELS.md's rule); a
mismatch fails the benchmark (and every later one of that implementation and case).
Forward benchmarks run under torch.no_grad() (inference); backward benchmarks time out.backward()
after an untimed forward.
"""

from __future__ import annotations

import pytest
import torch

from cos_kernels import CoSConfig, multiscale_window_attention

from . import peers
from .common import (BACKEND_NAMES, backend_skip_reason, check_close, peak_memory, record, rel_error,
                     set_group, time_call)

IMPLS = [*BACKEND_NAMES, *peers.PEERS]
PASSES = ["fwd", "bwd", "fwdbwd"]


def make_inputs(case, layout, env, kv_layout: str, requires_grad: bool, seed: int = 0):
    """q (B, Q, H, D) and k, v (B, S, N, H, D): contiguous, or views of one (B, N, S, 2, H, D)."""
    g = torch.Generator(device=env.device).manual_seed(seed)  # generated on the device: fast at GPU sizes
    B, H, D = case.batch, case.heads, case.head_dim
    S, N, Q = layout.num_scales, layout.num_patches, layout.total_queries

    def rand(*shape):
        return torch.randn(*shape, generator=g, device=env.device, dtype=env.dtype).requires_grad_(requires_grad)

    q = rand(B, Q, H, D)
    if kv_layout == "fused":
        kv = rand(B, N, S, 2, H, D)
        leaves = [q, kv]

        def views():
            return kv[:, :, :, 0].transpose(1, 2), kv[:, :, :, 1].transpose(1, 2)
    else:
        k, v = rand(B, S, N, H, D), rand(B, S, N, H, D)
        leaves = [q, k, v]

        def views():
            return k, v
    dout = torch.randn(B, Q, H, D, generator=g, device=env.device, dtype=env.dtype)
    return q, views, leaves, dout


def _grads(leaves):
    """dq, dk, dv from the leaves' grads (k and v may be views of one (B, N, S, 2, H, D) leaf)."""
    if len(leaves) == 2:
        g = leaves[1].grad
        return [leaves[0].grad, g[:, :, :, 0].transpose(1, 2), g[:, :, :, 1].transpose(1, 2)]
    return [t.grad for t in leaves]


def _run(impl_fn, case, layout, env, kv_layout, dtype=None):
    """out, dq, dk, dv of impl_fn on the validation inputs (seed 1), optionally cast to ``dtype``."""
    q, views, leaves, dout = make_inputs(case, layout, env, kv_layout, requires_grad=True, seed=1)
    if dtype is not None:
        leaves = [t.detach().to(dtype).requires_grad_(True) for t in leaves]
        q, dout = leaves[0], dout.to(dtype)
        if kv_layout == "fused":
            def views():
                return leaves[1][:, :, :, 0].transpose(1, 2), leaves[1][:, :, :, 1].transpose(1, 2)
        else:
            def views():
                return leaves[1], leaves[2]
    k, v = views()
    out = impl_fn(q, k, v)
    out.backward(dout)
    return [out.detach(), *(g.detach() for g in _grads(leaves))]


def _validate(store, impl, impl_fn, case, layout, scale, env, kv_layout) -> dict:
    """Once per (implementation, case, K/V layout), on fresh random inputs: out, dq, dk, dv against
    a float64 run of the torch backend; allowed error: 2x the torch backend's own error in the
    session dtype plus a small allowance (KERNELS.md's rule)."""
    key = (impl, case, kv_layout)
    if key in store.validated:
        return store.validated[key]

    def torch_fn(q, k, v):
        return multiscale_window_attention(q, k, v, layout, softmax_scale=scale, backend="torch")

    def make_reference():
        ref = _run(torch_fn, case, layout, env, kv_layout, dtype=torch.float64)
        eager = _run(torch_fn, case, layout, env, kv_layout)
        return ref, {n: rel_error(e, r, n) for n, e, r in zip(("out", "dq", "dk", "dv"), eager, ref)}

    ref, eager_err = store.reference(("kernel", case, kv_layout), make_reference)
    got = _run(impl_fn, case, layout, env, kv_layout)
    errors = {n: check_close(g, r, f"{impl} {n} vs float64 reference", env.dtype, eager_err[n])
              for n, g, r in zip(("out", "dq", "dk", "dv"), got, ref)}
    store.validated[key] = errors
    return errors


def floor_bytes(case, layout, env, pass_: str) -> float:
    """Fewest bytes of ``pass_``: fwd, bwd, fwdbwd (module docstring), or one of the fused backward's
    two launches: bwd_dq reads q, o, dO, k, v, lse and writes dq, delta; bwd_dkdv reads q, dO, k, v,
    lse, delta and writes dk, dv."""
    e = torch.tensor([], dtype=env.dtype).element_size()
    B, H, D = case.batch, case.heads, case.head_dim
    qb = B * layout.total_queries * H * D * e
    kvb = B * layout.num_scales * layout.num_patches * H * D * e
    lse = B * H * layout.total_queries * 4
    fwd = 2 * qb + 2 * kvb + lse
    bwd = 4 * qb + 4 * kvb + lse
    return {"fwd": fwd, "bwd": bwd, "fwdbwd": fwd + bwd,
            "bwd_dq": 4 * qb + 2 * kvb + 2 * lse, "bwd_dkdv": 2 * qb + 4 * kvb + 2 * lse}[pass_]


def useful_flops(case, layout, pass_: str) -> float:
    pairs = case.batch * sum(n * p for n, p in zip(layout.queries, layout.patches_per_window))
    per_pair = {"fwd": 4, "bwd": 10, "fwdbwd": 14}[pass_]
    return float(per_pair * case.heads * case.head_dim * pairs)


@pytest.mark.parametrize("pass_", PASSES)
@pytest.mark.parametrize("impl", IMPLS)
def test_kernel(benchmark, bench_env, store, kv_layout, kernel_case, impl, pass_):
    env, case = bench_env, kernel_case
    layout = CoSConfig.from_preset(case.preset).layout
    scale = case.head_dim ** -0.5
    is_peer = impl in peers.PEERS
    reason = (peers.unavailable_reason(impl, env.device, env.dtype) if is_peer
              else backend_skip_reason(impl, case.head_dim, case.interpreted_ok, env))
    if reason is not None:
        pytest.skip(reason)

    grads = pass_ != "fwd"
    q, views, leaves, dout = make_inputs(case, layout, env, kv_layout, requires_grad=grads)
    if is_peer:
        impl_fn = peers.make_peer(impl, layout, tuple(q.shape), env.device, scale)
    else:
        def impl_fn(q, k, v):
            return multiscale_window_attention(q, k, v, layout, softmax_scale=scale, backend=impl)

    errors = _validate(store, impl, impl_fn, case, layout, scale, env, kv_layout)

    def clear():
        for t in leaves:
            t.grad = None

    if pass_ == "fwd":
        def setup():
            return None

        def fn(_):
            with torch.no_grad():
                k, v = views()
                impl_fn(q, k, v)
    elif pass_ == "bwd":
        def setup():
            clear()
            k, v = views()
            return impl_fn(q, k, v)

        def fn(out):
            out.backward(dout)
    else:
        def setup():
            clear()

        def fn(_):
            k, v = views()
            impl_fn(q, k, v).backward(dout)

    set_group(benchmark, "kernel", case.label, pass_)
    stats = time_call(benchmark, env, fn, setup, flush_l2=True)
    mem = peak_memory(benchmark, env, fn, setup)
    clear()
    k, v = views()
    record(
        benchmark, env, stats, suite="kernel", case=case.label, impl=impl, pass_=pass_,
        bytes_floor=floor_bytes(case, layout, env, pass_), flops=useful_flops(case, layout, pass_),
        impl_kind="peer" if is_peer else "backend", preset=case.preset, layout=repr(layout),
        shapes={"q": list(q.shape), "k": list(k.shape), "v": list(v.shape)},
        kv_layout=kv_layout, kv_strides=list(k.stride()), validation_max_rel_error=errors, **mem,
    )
