"""TrainConfig: every option of a training run (both stages), with its default and help text.

The CLI (cos_kernels.train.cli) makes one command-line option per field, so the two never drift.
Fields left None take a stage- or device-dependent default, which their help text names.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ..config_io import DictConfig
from ..mllm.config import BRIDGES, MODEL_PRESETS

__all__ = ["TrainConfig", "STAGES"]

STAGES = ("pretrain", "finetune")
DISTRIBUTED = ("auto", "none", "ddp", "fsdp")
PRECISIONS = ("auto", "fp32", "bf16")


def _opt(default, help: str, **kw):
    """A field with its CLI help; ``choices``, ``nargs`` and ``type`` (of list items) go to argparse."""
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig(DictConfig):
    stage: str = _opt("pretrain", "pretrain: ViT and LLM frozen, bridge trained; finetune: from a pretrain "
                      "checkpoint, compound token scaling, bridge and LLM trained", choices=STAGES)
    # ---- model ----
    model: str = _opt("tiny", "model preset (pretrain)", choices=tuple(MODEL_PRESETS))
    bridge: str | None = _opt(None, "bridge: a resampler preset or linear / mlp2x_gelu; default: the "
                              "preset's cos-80 for pretrain, cos-1296 for finetune (a projector stays)",
                              choices=BRIDGES)
    image_size: int | None = _opt(None, "input resolution in px; default: the preset's for pretrain, "
                                  "twice the pretrain resolution for finetune")
    scale_source: list | None = _opt(None, "finetune: the pretrain scale each new resampler scale is "
                                     "inflated from; default: finest from finest, others from global", nargs="+", type=int)
    vision_path: str | None = _opt(None, "local CLIP/SigLIP checkpoint for the vision tower (default: random init)")
    llm_path: str | None = _opt(None, "local causal-LM checkpoint (default: random init)")
    tokenizer_path: str | None = _opt(None, "local tokenizer (default: byte-level, built in-process)")
    feature_layers: list | None = _opt(None, "ViT layers feeding the bridge (default: SPEC's 16 and 23 of 24, "
                                       "scaled to the ViT's depth)", nargs="+", type=int)
    llm_warmup_steps: int | None = _opt(None, "caption-only language-model steps on a randomly initialised LLM "
                                        "before pretraining, a stand-in for a pretrained LLM; default 200 for "
                                        "the tiny preset, 0 otherwise")
    init_from: str | None = _opt(None, "finetune: the pretrain checkpoint (a run directory or checkpoint directory)")
    backend: str = _opt("auto", "resampler attention backend")
    # ---- data ----
    data: str = _opt("synthetic", "'synthetic' or the path of a LLaVA pre-training JSON file")
    image_folder: str | None = _opt(None, "image folder of a LLaVA JSON file (default: the JSON's folder)")
    train_samples: int = _opt(100_000, "size of the synthetic training set")
    eval_samples: int = _opt(32, "held-out synthetic samples for the final evaluation (0: none)")
    max_caption_tokens: int = _opt(256, "captions are cut to this many tokens")
    num_workers: int | None = _opt(None, "data-loader workers per process (default: 0 on CPU, 4 on GPU)")
    # ---- optimisation ----
    steps: int = _opt(250, "optimizer steps")
    global_batch: int = _opt(8, "samples per optimizer step over all processes (SPEC: 256)")
    micro_batch: int | None = _opt(None, "samples per forward pass per process (default: global_batch / processes)")
    lr: float | None = _opt(None, "peak learning rate (default: 1e-3 pretrain, 2e-5 finetune)")
    warmup_ratio: float = _opt(0.03, "fraction of the steps with a linear warm-up, then cosine decay to 0")
    weight_decay: float = _opt(0.0, "AdamW weight decay")
    max_grad_norm: float = _opt(1.0, "gradient clipping norm (0: off)")
    seed: int = _opt(0, "seed of the initialisation, the data order and the held-out set")
    # ---- execution ----
    device: str = _opt("auto", "cpu, cuda, cuda:N or auto (cuda when available)")
    precision: str = _opt("auto", "bf16 autocast (frozen weights stored in bf16) or fp32; auto: bf16 on GPU",
                          choices=PRECISIONS)
    grad_checkpointing: bool = _opt(False, "recompute the bridge's and LLM layers' activations in the backward")
    compile: bool = _opt(False, "torch.compile the model's training forward (evaluation stays eager)")
    distributed: str = _opt("auto", "under torchrun: ddp or fsdp (FSDP2); auto: ddp when launched by torchrun",
                            choices=DISTRIBUTED)
    # ---- outputs ----
    out_dir: str | None = _opt(None, "run directory: checkpoints, metrics.jsonl, summary.json (default: runs/<stage>)")
    log_every: int = _opt(10, "steps between metric lines / JSONL records")
    save_every: int = _opt(0, "steps between checkpoints (0: only at the end)")
    keep_checkpoints: int = _opt(2, "checkpoints kept in the run directory")
    resume: str | None = _opt(None, "checkpoint (or run directory) to resume from; 'auto': the run directory's "
                              "latest checkpoint if there is one")
    peak_tflops: float | None = _opt(None, "the device's peak TFLOP/s for the MFU estimate (default: known GPUs)")

    def __post_init__(self):
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices and value is not None and value not in choices:
                raise ValueError(f"TrainConfig.{f.name} must be one of {list(choices)}, got {value!r}")
        self.check_positive_ints(
            "steps", "global_batch", "log_every", "max_caption_tokens", "train_samples", "keep_checkpoints"
        )
        for name in ("eval_samples", "save_every", "num_workers", "micro_batch", "llm_warmup_steps", "image_size"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"TrainConfig.{name} must be a non-negative integer, got {value!r}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"TrainConfig.warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}")
        if self.stage == "finetune" and self.init_from is None and self.resume is None:
            raise ValueError("stage 'finetune' needs init_from (a pretrain checkpoint) or resume")

    @property
    def peak_lr(self) -> float:
        if self.lr is not None:
            return self.lr
        return 1e-3 if self.stage == "pretrain" else 2e-5

    @property
    def run_dir(self) -> str:
        return self.out_dir or f"runs/{self.stage}"

