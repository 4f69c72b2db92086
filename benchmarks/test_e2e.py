"""End-to-end benchmarks: training steps of the reference MLLM (cos_kernels.mllm.CoSMLLM).

Stage 1 (pre-training; ViT and LLM frozen, bridge trained with AdamW lr 1e-3, weight decay 0) with
the issue's bridges: resampler-336, cos-80, linear-256 (224 px) and mlp-576 (LLaVA's mlp2x_gelu,
336 px). Stage 2 (fine-tuning; bridge and LLM trained, AdamW lr 2e-5) with cos-1296 at 448 px.
Model: the "7b" proxy (CLIP ViT-L/14 + LLaMA-2-7B architecture, random weights) on GPUs with the
memory, else "1b"; "tiny" on a CPU, at the paper's grids (16/24/32), so every bridge has the paper's
token count. Precision as the trainer's (TrainConfig precision "bf16" on a GPU): frozen weights
stored in bf16, trained weights fp32, forward under bf16 autocast; fp32 on a CPU. Resampler
attention backend "auto" (the best one on the device). The model, the batch, the step, the floor
bytes and the attention FLOPs are benchmarks/harness.py's.

Recorded: samples/s, visual and LLM tokens/s, MFU estimate (FLOPs per step / step time / this
device's measured dense-matmul throughput in the session dtype; FLOPs = matrix products counted by
torch.utils.flop_counter on one step + attention FLOPs computed analytically; also against the
datasheet bf16 peak of cos_kernels.train.metrics where it knows the GPU), the step time relative to
resampler-336's (pre-training), and the bridge's share of the step: the bridge's forward+backward
timed alone on the same features, over the step's median.
"""

from __future__ import annotations

import pytest
import torch

from . import harness
from .common import count_matmul_flops, peak_memory, record, set_group
from .device_timing import median_s, time_rounds

PAPER_RELATIVE = {"cos-80": 0.42, "linear-256": 0.82, "resampler-336": 1.00}


def _nominal_peak(env) -> float | None:
    """The datasheet bf16 peak the trainer uses for its MFU (known GPUs only), if available."""
    try:
        from cos_kernels.train.metrics import peak_flops
    except Exception:  # noqa: BLE001 - the training package is optional here
        return None
    return peak_flops(env.device, None) if env.dtype == torch.bfloat16 else None


def test_e2e(benchmark, bench_env, store, e2e_case):
    pytest.importorskip("transformers")
    from cos_kernels.ops import resolve_backend

    env, case = bench_env, e2e_case
    model, cfg = harness.build_mllm(case, env)
    batch = harness.make_batch(model, case, env)
    step, trainable = harness.train_step(model, case, env, batch)

    set_group(benchmark, "e2e", case.step_label, "train_step")
    stats = time_rounds(benchmark, env, lambda _: step())
    mem = peak_memory(benchmark, env, lambda _: step())

    median = None if stats is None else float(stats.median)
    V, T, B = model.num_visual_tokens, case.caption_tokens, case.batch
    extra = {"bridge_fwd_bwd_s": None, "bridge_share": None, "mfu": None, "rel_step_time_vs_resampler_336": None}
    flops = None
    if median is not None:
        matmul = count_matmul_flops(step)
        flops = None if matmul is None else matmul + harness.e2e_attention_flops(model, case)
        peak = env.matmul_peak()
        bridge_s = median_s(env, harness.bridge_step(model, batch, env), 5 if env.is_cuda else 3)
        model.bridge.zero_grad(set_to_none=True)
        extra.update(bridge_fwd_bwd_s=bridge_s, bridge_share=bridge_s / median, matmul_peak_TFLOPs=peak / 1e12,
                     mfu=None if flops is None else flops / median / peak)
        nominal = _nominal_peak(env)
        if nominal and flops is not None:
            extra.update(nominal_peak_TFLOPs=nominal / 1e12, mfu_nominal=flops / median / nominal)
        key = ("e2e", case.step_label)
        if case.label_bridge == "resampler-336":
            store.medians[key] = median
        if case.stage == "pretrain" and key in store.medians:
            extra["rel_step_time_vs_resampler_336"] = median / store.medians[key]

    record(
        benchmark, env, stats, suite="e2e", case=case.step_label, impl=case.label_bridge, pass_="train_step",
        bytes_floor=harness.e2e_floor_bytes(model, trainable, batch), flops=flops, impl_kind="bridge",
        stage=case.stage, model=case.model, bridge=case.bridge, bridge_label=case.label_bridge,
        image_px=cfg.image_size, paper_image_px=case.image_px, grid=cfg.grid, batch=B, caption_tokens=T,
        visual_tokens=V, llm_tokens=V + T,
        resampler_backend=resolve_backend("auto", env.device) if hasattr(model.bridge, "layout") else None,
        trainable_parameters=sum(p.numel() for p in trainable), parameters=sum(p.numel() for p in model.parameters()),
        samples_per_s=None if median is None else B / median,
        visual_tokens_per_s=None if median is None else B * V / median,
        llm_tokens_per_s=None if median is None else B * (V + T) / median,
        paper_relative=PAPER_RELATIVE.get(case.label_bridge) if case.stage == "pretrain" else None,
        mllm_config=cfg.to_dict(), **extra, **mem,
    )
    del model
    if env.is_cuda:
        torch.cuda.empty_cache()
