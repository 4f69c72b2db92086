"""CompareConfig: the options of a Chain-of-Sight vs baseline comparison, with named presets."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..config_io import DictConfig
from ..config_io import option as _opt
from ..mllm.config import MODEL_PRESETS, PROJECTOR_BRIDGES
from ..ops import BACKENDS
from ..resampler import check_device
from ..train.config import check_path_options

__all__ = ["CompareConfig", "COMPARE_PRESETS", "SCALINGS", "BASELINES", "check_cuda"]

SCALINGS = ("336", "1296")  # compound token scaling targets of cos-80: cos-336 or cos-1296
BASELINES = ("resampler-336", *PROJECTOR_BRIDGES)


@dataclass
class CompareConfig(DictConfig):
    model: str = _opt("tiny", "model preset of both recipes (stage 1 at its resolution, stage 2 at twice it)",
                      choices=tuple(MODEL_PRESETS))
    scaling: str = _opt("336", "Chain-of-Sight's stage 2: cos-80 scaled up to cos-336 or cos-1296 tokens",
                        choices=SCALINGS)
    baselines: list = _opt(["resampler-336"], "baseline recipes, the same bridge in both stages: "
                           "resampler-336 and / or linear, mlp2x_gelu", nargs="+", type=str)
    seeds: list = _opt([0, 1, 2], "seeds; each seed runs every recipe (bridge init, data order, held-out "
                       "scenes)", nargs="+", type=int)
    pretrain_steps: int = _opt(150, "stage 1 optimizer steps")
    finetune_steps: int = _opt(180, "stage 2 optimizer steps")
    global_batch: int = _opt(8, "samples per optimizer step, both stages")
    micro_batch: int | None = _opt(None, "samples per forward pass (default: global_batch)")
    pretrain_lr: float = _opt(1e-3, "stage 1 peak learning rate (bridge)")
    finetune_lr: float = _opt(5e-4, "stage 2 peak learning rate (bridge + LLM)")
    eval_samples: int = _opt(128, "held-out synthetic scenes scored after stage 2")
    train_samples: int = _opt(100_000, "size of the synthetic training set")
    data: str = _opt("synthetic", "'synthetic' or a LLaVA pre-training JSON file (both stages)")
    image_folder: str | None = _opt(None, "image folder of a LLaVA JSON file (default: the JSON's folder)")
    vision_path: str | None = _opt(None, "a local CLIP/SigLIP checkpoint (default: the preset's ViT pre-trained "
                                   "on dense labels of synthetic scenes, cached)")
    tower_steps: int = _opt(150, "steps of that vision-tower pre-training")
    tower_batch: int = _opt(32, "scenes per vision-tower step")
    probe_scenes: int = _opt(450, "scenes the linear probe of the tower is fitted on (a third as many score it)")
    llm_path: str | None = _opt(None, "a local causal LM (default: the preset's LLM warmed up on captions, cached)")
    llm_warmup_steps: int = _opt(200, "steps of that caption-only LLM warm-up (0: a random frozen LLM)")
    device: str = _opt("cpu", "cpu, cuda, cuda:N or auto")
    precision: str = _opt("fp32", "fp32 or bf16 (autocast, frozen weights in bf16)", choices=("fp32", "bf16"))
    backend: str = _opt("auto", "resampler attention backend", choices=BACKENDS)
    log_every: int = _opt(10, "steps between metric lines (and loss-curve points)")
    out_dir: str = _opt("runs/compare", "where the runs, compare.md, compare.json and compare.png go")
    cache_dir: str | None = _opt(None, "cached vision tower and LLM warm-up (default: $XDG_CACHE_HOME/cos_kernels "
                                 "or ~/.cache/cos_kernels)")

    def __post_init__(self):
        self.check_types()
        check_path_options(self, PATH_OPTIONS)
        self.check_positive_ints("pretrain_steps", "finetune_steps", "global_batch", "eval_samples", "train_samples",
                                 "tower_steps", "tower_batch", "probe_scenes", "log_every")
        if self.micro_batch is not None:
            self.check_positive_ints("micro_batch")
        self.check_positive_reals("pretrain_lr", "finetune_lr")
        if self.llm_warmup_steps < 0:
            raise ValueError(f"CompareConfig.llm_warmup_steps must be >= 0, got {self.llm_warmup_steps}")
        bad = [b for b in self.baselines if b not in BASELINES]
        if bad:
            raise ValueError(f"CompareConfig.baselines must be among {list(BASELINES)}, got {bad}")
        if len(set(self.baselines)) != len(self.baselines) or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"CompareConfig: baselines {self.baselines} and seeds {self.seeds} must not repeat")
        if any(s < 0 or s >= 2**63 for s in self.seeds):
            raise ValueError(f"CompareConfig.seeds must be in [0, 2**63), got {self.seeds}")

    @property
    def cache(self) -> Path:
        if self.cache_dir is not None:
            return Path(self.cache_dir)
        return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cos_kernels"

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "CompareConfig":
        if name not in COMPARE_PRESETS:
            raise ValueError(f"unknown comparison preset {name!r}; known presets: {sorted(COMPARE_PRESETS)}")
        return cls.from_dict({**COMPARE_PRESETS[name], **overrides})


PATH_OPTIONS = {"data": "'synthetic' or a LLaVA JSON file", "image_folder": "a directory path",
                "vision_path": "a checkpoint folder", "llm_path": "a checkpoint folder", "out_dir": "a directory path",
                "cache_dir": "a directory path"}


def check_cuda(device: str, source: str) -> None:
    """check_device's ValueError, saying where the device came from (``source``, e.g. "preset
    'gpu-1b'" or "--device cuda"), where ``device`` names a CUDA device that is not available."""
    try:
        check_device(device, fix="--device cpu runs it on the CPU")
    except ValueError as err:
        raise ValueError(f"{source} needs a CUDA device: {err}") from None


_GPU = dict(device="cuda", precision="bf16", scaling="1296", global_batch=64, micro_batch=32, pretrain_steps=1000,
            finetune_steps=500, eval_samples=256, tower_steps=600, tower_batch=64, llm_warmup_steps=300)
COMPARE_PRESETS: dict[str, dict] = {
    # 2-core CPU, under 20 minutes: the tiny preset, 80 -> 336 tokens, 3 seeds
    "cpu": {},
    # one GPU: CLIP-L/14-sized ViT at 224 -> 448 px with the TinyLlama-1.1B- or LLaMA-2-7B-sized LLM, 80 -> 1296
    "gpu-1b": dict(_GPU, model="vitl14-224-1b", finetune_lr=1e-4),
    "gpu-7b": dict(_GPU, model="vitl14-224-7b", finetune_lr=2e-5, micro_batch=16),
}
