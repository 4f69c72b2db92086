"""Module benchmarks: MultiScaleResampler forward and forward+backward, per attention backend,
fused (one normalisation and one K/V product for all scales) and unfused (the plain block structure).

GPU: the paper's widths (vision 1024, resampler 1024 with 16 heads, LLM 4096, two feature levels) at
cos-80 B=256, cos-336 B=64, cos-1296 B=64 in bf16. CPU: narrow widths (benchmarks/cases.py), fp32.
Features do not require grad (the ViT is frozen); forward+backward produces every parameter's grad.

Floor bytes: features + parameters read once + output written (forward); forward+backward adds the
parameters read again, their grads written and the output grad read. FLOPs: the matrix products
counted by torch.utils.flop_counter plus the windowed attention's useful FLOPs (test_kernel.py's
convention), the same for every backend. Before timing, each (backend, fused) model is checked against
the unfused torch model in float64 with the same weights (output and every parameter's grad), with
KERNELS.md's rule: at most 2x the error of the unfused torch model in the session dtype plus a small
allowance.
"""

from __future__ import annotations

import pytest
import torch

from cos_kernels import CoSConfig, MultiScaleResampler

from .common import (BACKEND_NAMES, backend_skip_reason, check_close, count_matmul_flops, param_bytes,
                     peak_memory, record, rel_error, set_group, time_call)

PASSES = ["fwd", "fwdbwd"]


def build(case, backend: str, fused: bool, device, dtype) -> MultiScaleResampler:
    cfg = CoSConfig.from_preset(case.preset, **dict(case.overrides))
    with torch.random.fork_rng(devices=[]), torch.device(device):  # initialised on the device
        torch.manual_seed(0)  # every build of a case has the same weights
        model = MultiScaleResampler(cfg, backend=backend, fused=fused)
    return model.to(device, dtype)


def features(model, batch: int, device, dtype, seed: int) -> list[torch.Tensor]:
    cfg = model.config
    g = torch.Generator(device=device).manual_seed(seed)
    return [torch.randn(batch, model.layout.num_patches, cfg.vision_dim, generator=g, device=device, dtype=dtype)
            for _ in range(cfg.num_levels)]


def _run(model, case, env, dtype=None) -> dict:
    """Output and every parameter's grad of ``model`` on the validation features (seed 1), the
    features and output grad cast to ``dtype`` (default: the session dtype)."""
    feats = features(model, case.batch, env.device, env.dtype, seed=1)
    g = torch.Generator(device=env.device).manual_seed(3)
    out_shape = (case.batch, model.num_tokens, model.config.llm_dim)
    dout = torch.randn(out_shape, generator=g, device=env.device, dtype=env.dtype)
    if dtype is not None:
        feats, dout = [f.to(dtype) for f in feats], dout.to(dtype)
    model.zero_grad(set_to_none=True)
    out = model(feats)
    out.backward(dout)
    result = {"out": out.detach()}
    result.update({name: p.grad.detach() for name, p in model.named_parameters()})
    model.zero_grad(set_to_none=True)
    return result


def _validate(store, case, backend, fused, model, env) -> dict:
    """Once per (backend, fused, case), on fresh features: output and every parameter's grad against
    the unfused torch model in float64 with the same weights; allowed error: 2x the unfused torch
    model's own error in the session dtype plus a small allowance (KERNELS.md's rule)."""
    key = ("module", case, backend, fused)
    if key in store.validated:
        return store.validated[key]

    def make_reference():
        ref = _run(build(case, "torch", False, env.device, torch.float64), case, env, torch.float64)
        eager = _run(build(case, "torch", False, env.device, env.dtype), case, env)
        return ref, {n: rel_error(eager[n], ref[n], n) for n in ref}

    ref, eager_err = store.reference(("module", case), make_reference)
    got = _run(model, case, env)
    checked = {n: check_close(got[n], ref[n], f"{backend} fused={fused} {n}", env.dtype, eager_err[n])
               for n in ref}
    worst = max((n for n in checked if n != "out"), key=lambda n: checked[n]["error"] / checked[n]["limit"])
    errors = {"out": checked["out"], "worst_param_grad": {"name": worst, **checked[worst]}}
    store.validated[key] = errors
    return errors


def floor_bytes(model, feats, batch: int, dtype, pass_: str) -> float:
    """Fewest bytes of one pass: features and parameters read and the output written (forward);
    forward+backward adds the parameters read again, their grads written and the output grad read."""
    e = torch.tensor([], dtype=dtype).element_size()
    feat = sum(f.numel() for f in feats) * e
    out = batch * model.num_tokens * model.config.llm_dim * e
    params = param_bytes(model)
    return float(feat + out + params if pass_ == "fwd" else feat + 2 * out + 3 * params)


def attention_flops(model, batch: int, pass_: str) -> float:
    cfg, layout = model.config, model.layout
    pairs = batch * sum(n * p for n, p in zip(layout.queries, layout.patches_per_window))
    per_pair = {"fwd": 4, "fwdbwd": 14}[pass_]
    return float(per_pair * cfg.dim * pairs * cfg.num_levels)


@pytest.mark.parametrize("pass_", PASSES)
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_module(benchmark, bench_env, store, module_case, backend, fused, pass_):
    env, case = bench_env, module_case
    cfg = CoSConfig.from_preset(case.preset, **dict(case.overrides))
    reason = backend_skip_reason(backend, cfg.head_dim, case.interpreted_ok, env)
    if reason is not None:
        pytest.skip(reason)

    model = build(case, backend, fused, env.device, env.dtype)
    errors = _validate(store, case, backend, fused, model, env)
    feats = features(model, case.batch, env.device, env.dtype, seed=0)
    out_shape = (case.batch, model.num_tokens, cfg.llm_dim)
    dout = torch.randn(out_shape, generator=torch.Generator(device=env.device).manual_seed(2), device=env.device,
                       dtype=env.dtype)

    if pass_ == "fwd":
        setup = None

        def fn(_):
            with torch.no_grad():
                model(feats)
    else:
        def setup():
            model.zero_grad(set_to_none=True)

        def fn(_):
            model(feats).backward(dout)

    set_group(benchmark, "module", case.label, pass_)
    stats = time_call(benchmark, env, fn, setup)
    mem = peak_memory(benchmark, env, fn, setup)

    flops = None
    if not benchmark.disabled:
        key = ("module-flops", case, fused, pass_)
        if key not in store.medians:
            # forward FLOPs counted with grad mode on (same products; torch's flop counter trips over
            # no_grad around expanded parameters), output discarded
            matmul = count_matmul_flops((lambda: model(feats)) if pass_ == "fwd" else (lambda: fn(setup())))
            store.medians[key] = None if matmul is None else matmul + attention_flops(model, case.batch, pass_)
        flops = store.medians[key]
    model.zero_grad(set_to_none=True)

    floor = floor_bytes(model, feats, case.batch, env.dtype, pass_)
    record(
        benchmark, env, stats, suite="module", case=case.label, impl=f"{backend} {'fused' if fused else 'unfused'}",
        pass_=pass_, bytes_floor=floor, flops=flops, impl_kind="backend", backend=backend, fused=fused,
        preset=case.preset, config=cfg.to_dict(), layout=repr(model.layout),
        shapes={"features": [list(f.shape) for f in feats], "out": list(out_shape)},
        parameters=sum(p.numel() for p in model.parameters()), validation_max_rel_error=errors, **mem,
    )
