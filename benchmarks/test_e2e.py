"""End-to-end benchmarks: training steps of the reference MLLM (cos_kernels.mllm.CoSMLLM).

Stage 1 (pre-training; ViT and LLM frozen, bridge trained with AdamW lr 1e-3, weight decay 0) with
the issue's bridges: resampler-336, cos-80, linear-256 (224 px) and mlp-576 (LLaVA's mlp2x_gelu,
336 px). Stage 2 (fine-tuning; bridge and LLM trained, AdamW lr 2e-5) with cos-1296 at 448 px.
Model: the "7b" proxy (CLIP ViT-L/14 + LLaMA-2-7B architecture, random weights) on GPUs with the
memory, else "1b"; "tiny" on a CPU, whose 8-px patches at 128/192/256 px give the paper's grids
(16/24/32), so every bridge has the paper's token count. Precision as the trainer's (TrainConfig
precision "bf16" on a GPU): frozen weights stored in bf16, trained weights fp32, forward under bf16
autocast; fp32 on a CPU. Resampler attention backend "auto" (the best one on the device).

One timed step, as cos_kernels.train.Trainer's (without data loading and logging) = forward (ViT
under no_grad, bridge, LLM) under autocast, loss on caption tokens, backward, grad-norm clipping at
1.0, AdamW step, zero_grad. Each sample: a random image and a caption of fixed length (BOS, random
byte tokens, EOS) so every bridge sees the same text.

Recorded: samples/s, visual and LLM tokens/s, MFU estimate (FLOPs per step / step time / this
device's measured dense-matmul throughput in the session dtype; FLOPs = matrix products counted by
torch.utils.flop_counter on one step + attention FLOPs computed analytically: ViT 4*T^2*w per layer,
LLM causal 2*T^2*w per layer forward and 2x that backward, resampler as in test_kernel.py; also
against the datasheet bf16 peak of cos_kernels.train.metrics where it knows the GPU), the
step time relative to resampler-336's (pre-training), and the bridge's share of the step: the bridge's
forward+backward timed alone on the same features, over the step's median.
"""

from __future__ import annotations

import pytest
import torch

from .common import _median_time, count_matmul_flops, param_bytes, peak_memory, record, set_group, time_call

PAPER_RELATIVE = {"cos-80": 0.42, "linear-256": 0.82, "resampler-336": 1.00}
TINY_PX = {224: 128, 336: 192, 448: 256}  # tiny ViT (patch 8): the paper's grids 16, 24, 32
_SDPA_LIKE = ("sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")


def build_model(case, env):
    from cos_kernels.mllm import CoSMLLM, MLLMConfig

    if case.model == "tiny":
        cfg = MLLMConfig.from_preset("tiny", bridge=case.bridge, image_size=TINY_PX[case.image_px])
    else:
        cfg = MLLMConfig.from_preset(f"vitl14-{case.image_px}-{case.model}", bridge=case.bridge)
    try:
        with torch.device(env.device):  # random init directly on the device (fast for 7B weights)
            model = CoSMLLM(cfg, backend="auto")
    except Exception:  # noqa: BLE001 - a library that does not honour the device context: init on CPU
        model = CoSMLLM(cfg, backend="auto")
    model.to(env.device)  # anything the device context missed
    if env.dtype != torch.float32:
        # the trainer's "bf16" precision: frozen weights stored in the low dtype, trained weights fp32,
        # forward under autocast
        model.vision.to(env.dtype)
        if case.stage == "pretrain":
            model.llm.to(env.dtype)
    return model, cfg


def make_batch(model, case, env, seed: int = 0) -> dict:
    from cos_kernels.mllm import IGNORE_INDEX

    tok = model.tokenizer
    g = torch.Generator().manual_seed(seed)
    side = model.config.image_size
    B, T = case.batch, case.caption_tokens
    ids = torch.randint(0, 256, (B, T), generator=g)
    ids[:, 0], ids[:, -1] = tok.bos_id, tok.eos_id
    labels = ids.clone()
    labels[:, 0] = IGNORE_INDEX
    return {
        "pixel_values": torch.rand(B, 3, side, side, generator=g).to(env.device, env.dtype),
        "input_ids": ids.to(env.device),
        "attention_mask": torch.ones_like(ids).to(env.device),
        "labels": labels.to(env.device),
    }


def _attn_impl(module) -> str:
    cfg = getattr(module, "config", None)
    return str(getattr(cfg, "_attn_implementation", None) or "sdpa")


def attention_flops(model, case) -> float:
    """Analytic attention FLOPs of one step (the matrix products around them are counted)."""
    B, flops = case.batch, 0.0
    vit_cfg = model.vision.vit.config
    if _attn_impl(model.vision.vit) in _SDPA_LIKE:
        t = (model.config.image_size // vit_cfg.patch_size) ** 2 + 1
        flops += B * max(model.vision.feature_layers) * 4 * t * t * vit_cfg.hidden_size  # forward only
    llm_cfg = model.llm.config
    if _attn_impl(model.llm) in _SDPA_LIKE:
        t = model.num_visual_tokens + case.caption_tokens
        flops += B * llm_cfg.num_hidden_layers * 3 * 2 * t * t * llm_cfg.hidden_size  # causal, fwd + bwd
    layout = getattr(model.bridge, "layout", None)
    if layout is not None:  # resampler: windowed attention, forward + backward
        pairs = B * sum(n * p for n, p in zip(layout.queries, layout.patches_per_window))
        flops += 14 * model.bridge.config.dim * pairs * model.bridge.config.num_levels
    return float(flops)


def _nominal_peak(env) -> float | None:
    """The datasheet bf16 peak the trainer uses for its MFU (known GPUs only), if available."""
    try:
        from cos_kernels.train.metrics import peak_flops
    except Exception:  # noqa: BLE001 - the training package is optional here
        return None
    return peak_flops(env.device, None) if env.dtype == torch.bfloat16 else None


def _bridge_time(model, batch, env, reps: int) -> tuple[float, float]:
    """(vision forward, bridge forward+backward) seconds, medians, timed alone on one batch."""
    def vision():
        with torch.autocast(env.device.type, dtype=env.dtype, enabled=env.dtype != torch.float32):
            model.vision(batch["pixel_values"])

    vision_s = _median_time(env, vision, reps)
    autocast = torch.autocast(env.device.type, dtype=env.dtype, enabled=env.dtype != torch.float32)
    with autocast:
        feats = model.vision(batch["pixel_values"])
        out = model.bridge(feats)
    grad = torch.randn_like(out)
    del out

    def bridge_step():
        with autocast:
            out = model.bridge(feats)
        out.backward(grad)

    bridge_step()  # warm-up
    env.synchronize()
    bridge_s = _median_time(env, bridge_step, reps)
    model.bridge.zero_grad(set_to_none=True)
    return vision_s, bridge_s


def test_e2e(benchmark, bench_env, store, e2e_case):
    pytest.importorskip("transformers")
    from cos_kernels.ops import resolve_backend

    env, case = bench_env, e2e_case
    model, cfg = build_model(case, env)
    model.train()
    if case.stage == "pretrain":
        model.llm.requires_grad_(False)
        lr = 1e-3
    else:
        lr = 2e-5
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)  # as cos_kernels.train.Trainer
    batch = make_batch(model, case, env)

    autocast = torch.autocast(env.device.type, dtype=env.dtype, enabled=env.dtype != torch.float32)

    def step(_):
        with autocast:
            loss_sum, n = model(**batch)
        (loss_sum / n).backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)  # the trainer's default max_grad_norm
        opt.step()
        opt.zero_grad(set_to_none=True)

    set_group(benchmark, "e2e", f"{case.stage} {case.model} B={case.batch} T={case.caption_tokens}", "train_step")
    stats = time_call(benchmark, env, step)
    mem = peak_memory(benchmark, env, step)

    median = None if stats is None else float(stats.median)
    V, T, B = model.num_visual_tokens, case.caption_tokens, case.batch
    extra = {"vision_fwd_s": None, "bridge_fwd_bwd_s": None, "bridge_share": None, "mfu": None,
             "rel_step_time_vs_resampler_336": None}
    flops = None
    if median is not None:
        matmul = count_matmul_flops(lambda: step(None))
        flops = None if matmul is None else matmul + attention_flops(model, case)
        peak = env.matmul_peak()
        vision_s, bridge_s = _bridge_time(model, batch, env, reps=5 if env.is_cuda else 3)
        extra.update(vision_fwd_s=vision_s, bridge_fwd_bwd_s=bridge_s, bridge_share=bridge_s / median,
                     matmul_peak_TFLOPs=peak / 1e12, mfu=None if flops is None else flops / median / peak)
        nominal = _nominal_peak(env)
        if nominal and flops is not None:
            extra.update(nominal_peak_TFLOPs=nominal / 1e12, mfu_nominal=flops / median / nominal)
        key = ("e2e", case.stage, case.model, B, T)
        if case.label_bridge == "resampler-336":
            store.medians[key] = median
        if case.stage == "pretrain" and key in store.medians:
            extra["rel_step_time_vs_resampler_336"] = median / store.medians[key]

    trained = param_bytes(model, trainable=True)
    floor = param_bytes(model) + 7 * trained + sum(t.numel() * t.element_size() for t in batch.values())
    record(
        benchmark, env, stats, suite="e2e", case=f"{case.stage} {case.model} B={B} T={T}",
        impl=case.label_bridge, pass_="train_step", bytes_floor=float(floor), flops=flops,
        impl_kind="bridge", stage=case.stage, model=case.model, bridge=case.bridge,
        bridge_label=case.label_bridge, image_px=cfg.image_size, paper_image_px=case.image_px,
        grid=cfg.grid, batch=B, caption_tokens=T, visual_tokens=V, llm_tokens=V + T,
        resampler_backend=resolve_backend("auto", env.device) if hasattr(model.bridge, "layout") else None,
        trainable_parameters=sum(p.numel() for p in trainable),
        parameters=sum(p.numel() for p in model.parameters()),
        samples_per_s=None if median is None else B / median,
        visual_tokens_per_s=None if median is None else B * V / median,
        llm_tokens_per_s=None if median is None else B * (V + T) / median,
        paper_relative=PAPER_RELATIVE.get(case.label_bridge) if case.stage == "pretrain" else None,
        mllm_config=cfg.to_dict(), **extra, **mem,
    )
    del model, opt
    if env.is_cuda:
        torch.cuda.empty_cache()
