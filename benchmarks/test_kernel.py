"""Kernel benchmarks: multiscale_window_attention forward, backward and forward+backward, for every
backend that can run here and every peer (benchmarks/peers.py), at the sizes of benchmarks/cases.py.

Everything but the timing loop is benchmarks/harness.py's: the implementation, the inputs, the
float64 validation before the first timing (a mismatch fails the benchmark), the callables of each
pass, the floor bytes and useful FLOPs. Forward benchmarks run under torch.no_grad() (inference);
backward benchmarks time out.backward() after an untimed forward.
"""

from __future__ import annotations

import pytest

from . import harness, peers
from .common import BACKEND_NAMES, peak_memory, record, set_group, timed_ms
from .device_timing import time_rounds
from .gpu_results import rates

IMPLS = [*BACKEND_NAMES, *peers.PEERS]
PASSES = ["fwd", "bwd", "fwdbwd"]


@pytest.mark.parametrize("pass_", PASSES)
@pytest.mark.parametrize("impl", IMPLS)
def test_kernel(benchmark, bench_env, store, kv_layout, kernel_case, impl, pass_):
    env, case = bench_env, kernel_case
    layout = harness.kernel_layout(case)
    q, views, leaves, dout = harness.kernel_inputs(case, layout, env, kv_layout, requires_grad=pass_ != "fwd")
    impl_fn, reason = harness.kernel_impl(impl, case, layout, tuple(q.shape), env)
    if reason is not None:
        pytest.skip(reason)
    errors = harness.validate_kernel(store, impl, impl_fn, case, layout, env, kv_layout)
    make_state, fn = harness.kernel_pass(impl_fn, q, views, dout, pass_)

    def setup():
        for t in leaves:
            t.grad = None
        return make_state()

    set_group(benchmark, "kernel", case.label, pass_)
    stats = time_rounds(benchmark, env, fn, setup, flush_l2=True)
    mem = peak_memory(benchmark, env, fn, setup)
    timed, floor = timed_ms(stats), harness.kernel_floor_bytes(case, layout, env.dtype, pass_)
    rounds = "" if stats is None else f"{stats.rounds} rounds, IQR {stats.iqr * 1e3:.3g} ms"
    k, v = views()
    record(
        benchmark, env, "kernel",
        dict(case=case.label, impl=impl, dtype=env.dtype_name, **{"pass": pass_}, **timed, bytes_floor=floor,
            **rates(floor, harness.kernel_flops(case, layout, pass_), timed["median_ms"], env.copy_bytes_per_s),
            peak_mem_MiB=mem["peak_mem_MiB"], max_rel_error=max(e["error"] for e in errors.values()), detail=rounds),
        impl_kind="peer" if impl in peers.PEERS else "backend", preset=case.preset, layout=repr(layout),
        shapes={"q": list(q.shape), "k": list(k.shape), "v": list(v.shape)}, kv_layout=kv_layout,
        kv_strides=list(k.stride()), validation_max_rel_error=errors, **mem,
    )
