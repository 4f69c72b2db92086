"""Module benchmarks: MultiScaleResampler forward and forward+backward, per attention backend,
fused (one normalisation and one K/V product for all scales) and unfused (the plain block structure).

GPU: the paper's widths (vision 1024, resampler 1024 with 16 heads, LLM 4096, two feature levels) at
cos-80 B=256, cos-336 B=64, cos-1296 B=64 in bf16. CPU: narrow widths (benchmarks/cases.py), fp32.
Features do not require grad (the ViT is frozen); forward+backward produces every parameter's grad.
The model, its inputs, the float64 validation against the unfused torch model with the same weights,
the floor bytes and the FLOPs are benchmarks/harness.py's.
"""

from __future__ import annotations

import pytest

from . import harness
from .common import (
    BACKEND_NAMES,
    backend_skip_reason,
    peak_memory,
    record,
    set_group,
    timed_ms,
)
from .device_timing import time_rounds

PASSES = ["fwd", "fwdbwd"]


@pytest.mark.parametrize("pass_", PASSES)
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_module(benchmark, bench_env, store, module_case, backend, fused, pass_):
    env, case = bench_env, module_case
    cfg = harness.module_config(case)
    reason = backend_skip_reason(backend, cfg.head_dim, case.interpreted_ok, env)
    if reason is not None:
        pytest.skip(reason)
    model = harness.build_resampler(case, backend, fused, env.device, env.dtype)
    errors = harness.validate_module(store, case, backend, fused, model, env)
    feats, dout = harness.module_inputs(model, case.batch, env, seed=0)
    setup, fn = harness.module_pass(model, feats, dout, pass_)

    set_group(benchmark, "module", case.label, pass_)
    stats = time_rounds(benchmark, env, fn, setup)
    mem = peak_memory(benchmark, env, fn, setup)
    flops = None
    if not benchmark.disabled:
        key = ("module-flops", case, fused, pass_)
        if key not in store.medians:
            store.medians[key] = harness.module_flops(model, feats, dout, pass_)
        flops = store.medians[key]
    model.zero_grad(set_to_none=True)
    timed, floor = timed_ms(stats), harness.module_floor_bytes(model, feats, env.dtype, pass_)
    record(
        benchmark, env, "module",
        dict(case=case.label, impl=f"{backend} {'fused' if fused else 'unfused'}", backend=backend,
            fused=fused, dtype=env.dtype_name, **{"pass": pass_}, **timed, peak_mem_MiB=mem["peak_mem_MiB"],
            floor_bytes=floor, floor_flops=flops, floor_ms=harness.module_floor_ms(env, floor, flops),
            **harness.module_errors(errors)),
        preset=case.preset, config=cfg.to_dict(), layout=repr(model.layout),
        shapes={"features": [list(f.shape) for f in feats], "out": list(dout.shape)},
        parameters=sum(p.numel() for p in model.parameters()), validation_max_rel_error=errors, **mem,
    )
