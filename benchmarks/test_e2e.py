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

Recorded (the e2e row of benchmarks/gpu_results.py): samples/s, MFU estimate (FLOPs per step / step
time / this device's measured dense-matmul throughput in the session dtype; FLOPs = matrix products
counted by torch.utils.flop_counter on one step + attention FLOPs computed analytically), peak
memory, and the bridge's share of the step: the bridge's forward+backward timed alone on the same
features, over the step's median. The report puts the step beside resampler-336's and mlp-576's.
"""

from __future__ import annotations

import pytest
import torch

from . import harness
from .common import count_matmul_flops, peak_memory, record, set_group, timed_ms
from .device_timing import median_s, time_rounds


def test_e2e(benchmark, bench_env, e2e_case):
    pytest.importorskip("transformers")
    from cos_kernels.ops import resolve_backend

    env, case = bench_env, e2e_case
    model, cfg = harness.build_mllm(case, env)
    batch = harness.make_batch(model, case, env)
    step, trainable = harness.train_step(model, case, env, batch)

    set_group(benchmark, "e2e", case.step_label, "train_step")
    stats = time_rounds(benchmark, env, lambda _: step())
    mem = peak_memory(benchmark, env, lambda _: step())

    timed = timed_ms(stats)
    median, bridge_ms, mfu, flops = timed["median_ms"], None, None, None
    if median is not None:
        matmul = count_matmul_flops(step)
        flops = None if matmul is None else matmul + harness.e2e_attention_flops(model, case)
        mfu = None if flops is None else flops / (median * 1e-3) / env.matmul_peak()
        bridge_ms = median_s(env, harness.bridge_step(model, batch, env), 5 if env.is_cuda else 3) * 1e3
        model.bridge.zero_grad(set_to_none=True)
    backend = resolve_backend("auto", env.device) if hasattr(model.bridge, "layout") else None
    record(
        benchmark, env, "e2e",
        dict(case=case.step_label, bridge=case.label_bridge, model=case.model, backend=backend,
            dtype=env.dtype_name, status=timed["status"], step_ms=median, min_ms=timed["min_ms"],
            max_ms=timed["max_ms"], samples_per_s=median and case.batch / (median * 1e-3), bridge_fwdbwd_ms=bridge_ms,
            bridge_share=bridge_ms and bridge_ms / median, mfu=mfu,
            peak_mem_GiB=None if mem["peak_mem_MiB"] is None else mem["peak_mem_MiB"] / 2**10,
            visual_tokens=model.num_visual_tokens, detail=f"{cfg.image_size} px, grid {cfg.grid}"),
        bytes_floor=harness.e2e_floor_bytes(model, trainable, batch), flops=flops, training_stage=case.stage,
        mllm_bridge=case.bridge, paper_image_px=case.image_px, caption_tokens=case.caption_tokens,
        trainable_parameters=sum(p.numel() for p in trainable), parameters=sum(p.numel() for p in model.parameters()),
        mllm_config=cfg.to_dict(), **mem,
    )
    del model
    if env.is_cuda:
        torch.cuda.empty_cache()
