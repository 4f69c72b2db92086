"""Throughput reporting: per-component time and FLOPs, step meters, JSONL records, peak memory, MFU."""

from __future__ import annotations

import json
import resource
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..atomic_io import atomic_text

__all__ = ["ComponentProfile", "profile_components", "peak_flops", "peak_memory_gb", "StepMeter", "JsonlLog"]

# Dense bf16 tensor-core peaks (TFLOP/s) of common GPUs, matched against the device name.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0, "L4": 121.0}


def peak_flops(device: torch.device, override_tflops: float | None) -> float | None:
    """The device's peak FLOP/s for MFU, or None (CPU, or a GPU not in PEAK_BF16_TFLOPS)."""
    if override_tflops is not None:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tf * 1e12 for key, tf in PEAK_BF16_TFLOPS.items() if key in name), None)


def peak_memory_gb(device: torch.device) -> float:
    """Peak allocated GPU memory, or on CPU the process's peak resident set size, in GiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class ComponentProfile:
    """Per training sample: seconds and FLOPs of the vision tower (forward), the bridge (forward +
    backward) and the LLM (forward + the backward the stage needs), measured on one micro-batch."""

    seconds: dict[str, float]
    flops: dict[str, float]

    @property
    def flops_per_sample(self) -> float:
        return sum(self.flops.values())

    def time_split(self) -> dict[str, float]:
        total = sum(self.seconds.values()) or 1.0
        return {k: v / total for k, v in self.seconds.items()}


def profile_components(model, batch: dict, autocast, repeats: int = 2) -> ComponentProfile:
    """Time and count FLOPs of each component on ``batch`` (already on the model's device), with the
    LLM's backward stopped at the visual tokens so that the bridge's backward is timed on its own.
    Gradients are accumulated and then cleared; nothing else changes. The first repeat warms up."""
    device = batch["pixel_values"].device
    B = batch["pixel_values"].shape[0]
    seconds, flops = {}, {}

    def timed(name: str, fn, counter: FlopCounterMode | None):
        _sync(device)
        start = time.perf_counter()
        with counter or nullcontext(), autocast():
            out = fn()
        _sync(device)
        seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - start
        return out

    for i in range(repeats):
        counters = {k: FlopCounterMode(display=False) for k in ("vision", "bridge", "llm")} if i == 0 else {}
        features = timed("vision", lambda: model.vision(batch["pixel_values"]), counters.get("vision"))
        visual = timed("bridge", lambda: model.bridge(features), counters.get("bridge"))
        cut = visual.detach().requires_grad_()

        def llm_step():
            loss_sum, n = model.caption_loss(cut, batch["input_ids"], batch["attention_mask"], batch["labels"])
            (loss_sum / n).backward()

        timed("llm", llm_step, counters.get("llm"))
        timed("bridge", lambda: visual.backward(cut.grad), counters.get("bridge"))
        if i == 0:
            flops = {k: c.get_total_flops() / B for k, c in counters.items()}
            seconds = {}
    model.zero_grad(set_to_none=True)
    return ComponentProfile({k: v / (repeats - 1) / B for k, v in seconds.items()}, flops)


@dataclass
class StepMeter:
    """Running totals of the steps since the last report, and of the whole run."""

    window: dict = field(default_factory=dict)
    totals: dict = field(default_factory=lambda: {"steps": 0, "samples": 0, "text_tokens": 0, "data_time": 0.0,
                                                  "compute_time": 0.0, "skipped_images": 0})

    def add(self, **values) -> None:
        for k, v in values.items():
            self.window[k] = self.window.get(k, 0) + v
            if k in self.totals:
                self.totals[k] += v

    def report(self, step: int, lr: float, visual_tokens: int, flops_per_sample: float | None,
               peak: float | None, world_size: int, memory_gb: float) -> dict:
        """The record of the window since the last report (then cleared)."""
        w, self.window = self.window, {}
        step_time = (w["data_time"] + w["compute_time"]) / w["steps"]
        samples_per_s = w["samples"] / (w["data_time"] + w["compute_time"])
        text_per_sample = w["text_tokens"] / w["samples"]
        record = {
            "step": step, "loss": w["loss"] / w["steps"], "lr": lr, "grad_norm": w["grad_norm"] / w["steps"],
            "samples_per_s": samples_per_s,
            "visual_tokens_per_s": samples_per_s * visual_tokens,
            "llm_tokens_per_s": samples_per_s * (visual_tokens + text_per_sample),
            "step_time_s": step_time,
            "data_time_s": w["data_time"] / w["steps"],
            "compute_time_s": w["compute_time"] / w["steps"],
            "peak_mem_gb": memory_gb,
            "mfu": None,
        }
        if flops_per_sample and peak:
            record["mfu"] = flops_per_sample * samples_per_s / world_size / peak
        return record


class JsonlLog:
    """One JSON object per line (rank 0 only). A fresh run (keep_until None) starts a new file; a
    resumed one keeps the records up to its checkpoint's step, keep_until, and appends after them
    (so a run resumed after a crash lists every step once, in order)."""

    def __init__(self, path: Path, enabled: bool, keep_until: int | None):
        self.path, self.enabled = path, enabled
        if enabled:
            path.parent.mkdir(parents=True, exist_ok=True)
            kept = []
            if keep_until is not None and path.is_file():
                for line in path.read_text().splitlines():
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:
                        continue  # a line cut short by a kill
                    if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= keep_until:
                        kept.append(line + "\n")
            atomic_text(path, "".join(kept))

    def write(self, record: dict) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
