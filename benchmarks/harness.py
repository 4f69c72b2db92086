"""What every benchmark measures, for the pytest-benchmark suites (test_kernel.py, test_module.py,
test_e2e.py) and the GPU check's stages (headline.py) alike: the implementation factory, the inputs,
the float64 validation, the callables of each pass, the floor bytes and the useful FLOPs.

Validation (KERNELS.md's testing rule): before an implementation is timed, its outputs and gradients
on fresh random inputs are compared with a float64 run of the eager path; the error may be at most
twice the eager path's own error in the session dtype plus a small allowance (common.check_close).
A wrong implementation fails instead of reporting a number.

Floor bytes and FLOPs are credited the same to every implementation:
  kernel  forward Q + O + K + V + logsumexp; backward reads Q, K, V, O, dO, logsumexp and writes dQ,
          dK, dV; forward+backward their sum. FLOPs 4*H*D per (query, key in its window) pair forward,
          10*H*D backward (scores recomputed, FlashAttention's 2.5x convention).
  module  features + parameters read once + output written (forward); forward+backward adds the
          parameters read again, their grads written and the output grad read. FLOPs: the matrix
          products torch.utils.flop_counter counts plus the windowed attention's.
  e2e     the weights once, the trained parameters' grads and AdamW state, the batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from cos_kernels import CoSConfig, MultiScaleResampler, multiscale_window_attention

from . import peers
from .common import (
    backend_skip_reason,
    check_close,
    count_matmul_flops,
    param_bytes,
    rel_error,
)


@dataclass
class Store:
    """Session-wide memo: validations done, medians other benchmarks refer to."""

    validated: dict = field(default_factory=dict)
    medians: dict = field(default_factory=dict)
    _reference: tuple = (None, None)

    def reference(self, key, make):
        """The float64 reference of ``key``, made on first use. Only the latest one is kept (at GPU
        sizes a reference holds gigabytes)."""
        if self._reference[0] != key:
            self.drop_reference()  # before make(): the old and the new never coexist
            self._reference = (key, make())
        return self._reference[1]

    def drop_reference(self) -> None:
        self._reference = (None, None)


def _window_pairs(layout, batch: int) -> int:
    """(query, key in its window) pairs of one batch."""
    return batch * sum(n * p for n, p in zip(layout.queries, layout.patches_per_window))


# ---- kernel ---------------------------------------------------------------------------------------
def kernel_layout(case):
    return CoSConfig.from_preset(case.preset).layout


def kernel_impl(name: str, case, layout, q_shape, env):
    """(fn(q, k, v), None) for a backend or peer (peers.PEERS) that runs here, else (None, why not)."""
    scale = case.head_dim ** -0.5
    if name in peers.PEERS:
        reason = peers.unavailable_reason(name, env.device, env.dtype)
        return (None, reason) if reason else (peers.make_peer(name, layout, q_shape, env.device, scale), None)
    reason = backend_skip_reason(name, case.head_dim, case.interpreted_ok, env)
    if reason:
        return None, reason

    def backend_fn(q, k, v):
        return multiscale_window_attention(q, k, v, layout, softmax_scale=scale, backend=name)
    return backend_fn, None


def kernel_inputs(case, layout, env, kv_layout: str, requires_grad: bool, seed: int = 0):
    """q (B, Q, H, D), views() -> k, v (B, S, N, H, D), the leaves and dout: K/V contiguous, or
    ("fused") views of one (B, N, S, 2, H, D) projection, as the fused resampler passes them."""
    g = torch.Generator(device=env.device).manual_seed(seed)  # generated on the device: fast at GPU sizes
    B, H, D = case.batch, case.heads, case.head_dim
    S, N, Q = layout.num_scales, layout.num_patches, layout.total_queries

    def rand(*shape):
        return torch.randn(*shape, generator=g, device=env.device, dtype=env.dtype).requires_grad_(requires_grad)

    q = rand(B, Q, H, D)
    leaves = [q, rand(B, N, S, 2, H, D)] if kv_layout == "fused" else [q, rand(B, S, N, H, D), rand(B, S, N, H, D)]
    dout = torch.randn(B, Q, H, D, generator=g, device=env.device, dtype=env.dtype)
    return q, _kv_views(leaves), leaves, dout


def _kv_views(leaves):
    """views() -> (k, v) of the leaves [q, k, v] or [q, kv (B, N, S, 2, H, D)]."""
    if len(leaves) == 2:
        return lambda: (leaves[1][:, :, :, 0].transpose(1, 2), leaves[1][:, :, :, 1].transpose(1, 2))
    return lambda: (leaves[1], leaves[2])


def _kernel_outputs(impl_fn, case, layout, env, kv_layout, dtype=None):
    """out, dq, dk, dv of impl_fn on the validation inputs (seed 1), optionally cast to ``dtype``."""
    _, _, leaves, dout = kernel_inputs(case, layout, env, kv_layout, requires_grad=True, seed=1)
    if dtype is not None:
        leaves = [t.detach().to(dtype).requires_grad_(True) for t in leaves]
        dout = dout.to(dtype)
    out = impl_fn(leaves[0], *_kv_views(leaves)())
    out.backward(dout)
    grads = [t.grad for t in leaves]
    if len(grads) == 2:  # k and v are views of one leaf
        grads = [grads[0], *_kv_views(grads)()]
    return [out.detach(), *(g.detach() for g in grads)]


def validate_kernel(store: Store, impl: str, impl_fn, case, layout, env, kv_layout: str) -> dict:
    """Once per (implementation, case, K/V layout): out, dq, dk, dv against a float64 run of the torch
    backend -> {name: {"error", "limit"}}; AssertionError where one is off."""
    key = (impl, case, kv_layout)
    if key in store.validated:
        return store.validated[key]
    torch_fn, _ = kernel_impl("torch", case, layout, None, env)

    def make_reference():
        ref = _kernel_outputs(torch_fn, case, layout, env, kv_layout, dtype=torch.float64)
        eager = _kernel_outputs(torch_fn, case, layout, env, kv_layout)
        return ref, {n: rel_error(e, r, n) for n, e, r in zip(("out", "dq", "dk", "dv"), eager, ref)}

    ref, eager_err = store.reference(("kernel", case, kv_layout), make_reference)
    got = _kernel_outputs(impl_fn, case, layout, env, kv_layout)
    errors = {n: check_close(g, r, f"{impl} {n} vs float64 reference", env.dtype, eager_err[n])
              for n, g, r in zip(("out", "dq", "dk", "dv"), got, ref)}
    store.validated[key] = errors
    return errors


def kernel_pass(impl_fn, q, views, dout, pass_: str):
    """(setup, run): run(setup()) is one call of ``pass_``; setup is untimed (a backward's forward).
    fwd runs under torch.no_grad() (inference); bwd keeps its graph, so run(state) may repeat."""
    if pass_ == "fwd":
        def run(_):
            with torch.no_grad():
                impl_fn(q, *views())
        return (lambda: None), run
    if pass_ == "bwd":
        return (lambda: impl_fn(q, *views())), (lambda out: out.backward(dout, retain_graph=True))
    return (lambda: None), (lambda _: impl_fn(q, *views()).backward(dout))


def kernel_floor_bytes(case, layout, dtype, pass_: str) -> float:
    """Fewest bytes of ``pass_``: fwd, bwd, fwdbwd (module docstring), or one of the fused backward's
    two launches: bwd_dq reads q, o, dO, k, v, lse and writes dq, delta; bwd_dkdv reads q, dO, k, v,
    lse, delta and writes dk, dv."""
    e = torch.tensor([], dtype=dtype).element_size()
    B, H, D = case.batch, case.heads, case.head_dim
    qb = B * layout.total_queries * H * D * e
    kvb = B * layout.num_scales * layout.num_patches * H * D * e
    lse = B * H * layout.total_queries * 4
    fwd = 2 * qb + 2 * kvb + lse
    bwd = 4 * qb + 4 * kvb + lse
    return {"fwd": fwd, "bwd": bwd, "fwdbwd": fwd + bwd,
            "bwd_dq": 4 * qb + 2 * kvb + 2 * lse, "bwd_dkdv": 2 * qb + 4 * kvb + 2 * lse}[pass_]


def kernel_flops(case, layout, pass_: str) -> float:
    per_pair = {"fwd": 4, "bwd": 10, "fwdbwd": 14}[pass_]
    return float(per_pair * case.heads * case.head_dim * _window_pairs(layout, case.batch))


# ---- module ---------------------------------------------------------------------------------------
def module_config(case) -> CoSConfig:
    return CoSConfig.from_preset(case.preset, **dict(case.overrides))


def build_resampler(case, backend: str, fused: bool, device, dtype) -> MultiScaleResampler:
    """The case's resampler, initialised on the device with the same weights for every build."""
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(0)
        model = MultiScaleResampler(module_config(case), backend=backend, fused=fused)
    return model.to(device, dtype)


def module_inputs(model, batch: int, env, seed: int):
    """(features, one per level (B, N, vision_dim), without grad: the ViT is frozen; output grad)."""
    cfg = model.config
    g = torch.Generator(device=env.device).manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g, device=env.device, dtype=env.dtype)

    feats = [rand(batch, model.layout.num_patches, cfg.vision_dim) for _ in range(cfg.num_levels)]
    return feats, rand(batch, model.num_tokens, cfg.llm_dim)


def _module_outputs(model, case, env, dtype=None) -> dict:
    """Output and every parameter's grad on the validation inputs (seed 1), cast to ``dtype``."""
    feats, dout = module_inputs(model, case.batch, env, seed=1)
    if dtype is not None:
        feats, dout = [f.to(dtype) for f in feats], dout.to(dtype)
    model.zero_grad(set_to_none=True)
    out = model(feats)
    out.backward(dout)
    result = {"out": out.detach(), **{name: p.grad.detach() for name, p in model.named_parameters()}}
    model.zero_grad(set_to_none=True)
    return result


def validate_module(store: Store, case, backend: str, fused: bool, model, env) -> dict:
    """Once per (backend, fused, case): output and every parameter's grad against the unfused torch
    model in float64 with the same weights -> {"out", "worst_param_grad"}; AssertionError where off."""
    key = ("module", case, backend, fused)
    if key in store.validated:
        return store.validated[key]

    def make_reference():
        ref = _module_outputs(build_resampler(case, "torch", False, env.device, torch.float64), case, env,
                              torch.float64)
        eager = _module_outputs(build_resampler(case, "torch", False, env.device, env.dtype), case, env)
        return ref, {n: rel_error(eager[n], ref[n], n) for n in ref}

    ref, eager_err = store.reference(("module", case), make_reference)
    got = _module_outputs(model, case, env)
    checked = {n: check_close(got[n], ref[n], f"{backend} fused={fused} {n}", env.dtype, eager_err[n])
               for n in ref}
    worst = max((n for n in checked if n != "out"), key=lambda n: checked[n]["error"] / checked[n]["limit"])
    errors = {"out": checked["out"], "worst_param_grad": {"name": worst, **checked[worst]}}
    store.validated[key] = errors
    return errors


def module_pass(model, feats, dout, pass_: str):
    """(setup, run) of ``pass_`` (fwd under no_grad, or fwdbwd; setup zeroes the grads)."""
    if pass_ == "fwd":
        def run(_):
            with torch.no_grad():
                model(feats)
        return (lambda: None), run
    return (lambda: model.zero_grad(set_to_none=True)), (lambda _: model(feats).backward(dout))


def module_floor_ms(env, nbytes: float, flops: float | None) -> float:
    """The module's floor: the larger of its bytes over the copy bandwidth and its FLOPs over the
    matmul rate (bytes alone where the FLOPs could not be counted)."""
    return 1e3 * max(nbytes / env.copy_bytes_per_s, 0.0 if flops is None else flops / env.matmul_peak())


def module_errors(errors: dict) -> dict:
    """The row's max_rel_error and detail from validate_module's errors."""
    return dict(max_rel_error=max(errors["out"]["error"], errors["worst_param_grad"]["error"]),
                detail=f"worst parameter grad: {errors['worst_param_grad']['name']}")


def module_floor_bytes(model, feats, dtype, pass_: str) -> float:
    e = torch.tensor([], dtype=dtype).element_size()
    feat = sum(f.numel() for f in feats) * e
    out = feats[0].shape[0] * model.num_tokens * model.config.llm_dim * e
    params = param_bytes(model)
    return float(feat + out + params if pass_ == "fwd" else feat + 2 * out + 3 * params)


def module_flops(model, feats, dout, pass_: str) -> float | None:
    """The matrix products' FLOPs that torch.utils.flop_counter counts (the forward with grad mode on:
    the counter trips over no_grad around expanded parameters) plus the windowed attention's."""
    matmul = count_matmul_flops((lambda: model(feats)) if pass_ == "fwd" else (lambda: model(feats).backward(dout)))
    model.zero_grad(set_to_none=True)
    if matmul is None:
        return None
    per_pair = {"fwd": 4, "fwdbwd": 14}[pass_]
    pairs = _window_pairs(model.layout, feats[0].shape[0])
    return matmul + float(per_pair * model.config.dim * pairs * model.config.num_levels)


# ---- end to end -----------------------------------------------------------------------------------
_SDPA_LIKE = ("sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")


def build_mllm(case, env, backend: str = "auto"):
    """CoSMLLM of an E2ECase, initialised on the device (nothing of it on the host: a random 7B would
    need 27 GB there); then the trainer's bf16 precision: the frozen weights in the session dtype, the
    trained ones fp32. The tiny model's image side is px * 64 / 224, the paper's grids (16/24/32)."""
    from cos_kernels.mllm import CoSMLLM, MLLMConfig

    if case.model == "tiny":
        cfg = MLLMConfig.from_preset("tiny", bridge=case.bridge, image_size=64 * case.image_px // 224)
    else:
        cfg = MLLMConfig.from_preset(f"vitl14-{case.image_px}-{case.model}", bridge=case.bridge)
    with torch.device(env.device):
        net = CoSMLLM(cfg, backend=backend)
    stray = [n for n, p in net.named_parameters() if p.device != env.device]
    if stray:
        raise RuntimeError(f"{len(stray)} parameters were not created on {env.device} (first: {stray[0]})")
    if env.dtype != torch.float32:
        net.vision.to(env.dtype)
        if case.stage == "pretrain":
            net.llm.to(env.dtype)
    return net, cfg


def make_batch(model, case, env, seed: int = 0) -> dict:
    """Random images and fixed-length captions (BOS, random byte tokens, EOS): every bridge sees the
    same text."""
    from cos_kernels.mllm import IGNORE_INDEX

    tok = model.tokenizer
    g = torch.Generator().manual_seed(seed)
    side = model.config.image_size
    ids = torch.randint(0, 256, (case.batch, case.caption_tokens), generator=g)
    ids[:, 0], ids[:, -1] = tok.bos_id, tok.eos_id
    labels = ids.clone()
    labels[:, 0] = IGNORE_INDEX
    return {"pixel_values": torch.rand(case.batch, 3, side, side, generator=g).to(env.device, env.dtype),
            "input_ids": ids.to(env.device), "attention_mask": torch.ones_like(ids).to(env.device),
            "labels": labels.to(env.device)}


def _autocast(env):
    return torch.autocast(env.device.type, dtype=env.dtype, enabled=env.dtype != torch.float32)


def train_step(model, case, env, batch):
    """(step(), trainable parameters): one step as cos_kernels.train.Trainer's, without data loading
    and logging: forward under autocast, loss on the caption tokens, backward, grad-norm clipping at
    1.0, AdamW (stage 1: lr 1e-3, LLM frozen; stage 2: lr 2e-5), zero_grad."""
    model.train()
    if case.stage == "pretrain":
        model.llm.requires_grad_(False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-3 if case.stage == "pretrain" else 2e-5, weight_decay=0.0)
    autocast = _autocast(env)

    def step():
        with autocast:
            loss_sum, n = model(**batch)
        (loss_sum / n).backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, trainable


def bridge_step(model, batch, env):
    """The bridge's forward+backward alone on the batch's features (computed once, untimed)."""
    autocast = _autocast(env)
    with autocast, torch.no_grad():
        feats = model.vision(batch["pixel_values"])
    with autocast:
        grad = torch.randn_like(model.bridge(feats))

    def step():
        with autocast:
            out = model.bridge(feats)
        out.backward(grad)

    return step


def e2e_floor_bytes(model, trainable, batch) -> float:
    trained = sum(p.numel() * p.element_size() for p in trainable)
    return float(param_bytes(model) + 7 * trained + sum(t.numel() * t.element_size() for t in batch.values()))


def _attn_impl(module) -> str:
    cfg = getattr(module, "config", None)
    return str(getattr(cfg, "_attn_implementation", None) or "sdpa")


def e2e_attention_flops(model, case) -> float:
    """Analytic attention FLOPs of one step (the matrix products around them are counted): ViT
    4*T^2*w per layer forward, LLM causal 2*T^2*w per layer forward and twice that backward, the
    resampler's windowed attention forward and backward."""
    B, flops = case.batch, 0.0
    vit_cfg = model.vision.vit.config
    if _attn_impl(model.vision.vit) in _SDPA_LIKE:
        t = (model.config.image_size // vit_cfg.patch_size) ** 2 + 1
        flops += B * max(model.vision.feature_layers) * 4 * t * t * vit_cfg.hidden_size
    llm_cfg = model.llm.config
    if _attn_impl(model.llm) in _SDPA_LIKE:
        t = model.num_visual_tokens + case.caption_tokens
        flops += B * llm_cfg.num_hidden_layers * 3 * 2 * t * t * llm_cfg.hidden_size
    layout = getattr(model.bridge, "layout", None)
    if layout is not None:
        flops += 14 * model.bridge.config.dim * _window_pairs(layout, B) * model.bridge.config.num_levels
    return float(flops)
