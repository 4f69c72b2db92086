"""TrainConfig: every option of a training run (both stages), with its default and help text.

The CLI (cos_kernels.train.cli) makes one command-line option per field, so the two never drift.
Fields left None take a stage- or device-dependent default, which their help text names.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from ..config_io import DictConfig
from ..config_io import option as _opt
from ..mllm.config import BRIDGES, MODEL_PRESETS
from ..ops import BACKENDS

__all__ = ["TrainConfig", "STAGES", "check_path_options"]

STAGES = ("pretrain", "finetune")
DISTRIBUTED = ("auto", "none", "ddp", "fsdp")
PRECISIONS = ("auto", "fp32", "bf16")


@dataclass
class TrainConfig(DictConfig):
    stage: str = _opt("pretrain", "pretrain: ViT and LLM frozen, bridge trained; finetune: from a pretrain "
                      "checkpoint, compound token scaling, bridge and LLM trained", choices=STAGES)
    # ---- model ----
    model: str | None = _opt(None, "pretrain: model preset (default: tiny); finetune takes the pretrain "
                             "checkpoint's", choices=tuple(MODEL_PRESETS))
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
    reference_choices: str | None = _opt(None, "pretrain: where the paper and the public LLaVA port differ "
                                         "(feature layers, position interpolation, baseline levels; "
                                         "docs/REFERENCE.md), whose choices: paper (default) or port",
                                         choices=("paper", "port"))
    llm_warmup_steps: int | None = _opt(None, "caption-only language-model steps on a randomly initialised LLM "
                                        "before pretraining, a stand-in for a pretrained LLM; default 200 for "
                                        "the tiny preset, 0 otherwise")
    init_from: str | None = _opt(None, "finetune: the pretrain checkpoint (a run directory or checkpoint directory)")
    backend: str = _opt("auto", "resampler attention backend", choices=BACKENDS)
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
                              "newest intact checkpoint if there is one")
    allow_config_change: bool = _opt(False, "resume even where the training options that shape the run "
                                     "(global batch, seed, data, steps, lr, ...) differ from the checkpoint's")
    peak_tflops: float | None = _opt(None, "the device's peak TFLOP/s for the MFU estimate (default: known GPUs)")

    def __post_init__(self):
        self.check_types()
        check_path_options(self, PATH_OPTIONS)
        self.check_positive_ints(
            "steps", "global_batch", "log_every", "max_caption_tokens", "train_samples", "keep_checkpoints"
        )
        for name in ("micro_batch", "image_size"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"TrainConfig.{name} must be a positive integer or None, got {value!r}")
        for name in ("eval_samples", "save_every", "num_workers", "llm_warmup_steps", "seed"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"TrainConfig.{name} must be a non-negative integer, got {value!r}")
        if self.seed >= 2**63:
            raise ValueError(f"TrainConfig.seed must be below 2**63, got {self.seed}")
        if self.scale_source is not None and any(s < 0 for s in self.scale_source):
            raise ValueError(f"TrainConfig.scale_source must name pretrain scales (>= 0), got {self.scale_source}")
        if self.feature_layers is not None and any(layer < 1 for layer in self.feature_layers):
            raise ValueError(f"TrainConfig.feature_layers are 1-based ViT layers, got {self.feature_layers}")
        for name, low, high, what in (("lr", 0, None, "> 0"), ("peak_tflops", 0, None, "> 0"),
                                      ("weight_decay", None, None, ">= 0"), ("max_grad_norm", None, None, ">= 0 (0: off)"),
                                      ("warmup_ratio", None, 1, "in [0, 1)")):
            value = getattr(self, name)
            if value is None:
                continue
            ok = math.isfinite(value) and (value > low if low is not None else value >= 0)
            if not ok or (high is not None and value >= high):
                raise ValueError(f"TrainConfig.{name} must be a finite number {what}, got {value!r}")
        if self.stage == "finetune" and self.init_from is None and self.resume is None:
            raise ValueError("stage 'finetune' needs init_from (a pretrain checkpoint) or resume")
        ignored = [name for name in STAGE_ONLY[_other(self.stage)] if getattr(self, name) is not None]
        if ignored:
            flags = ", ".join("--" + name.replace("_", "-") for name in ignored)
            raise ValueError(f"TrainConfig: {flags} {'is' if len(ignored) == 1 else 'are'} for stage "
                             f"{_other(self.stage)!r} only; stage {self.stage!r} {STAGE_ONLY_WHY[self.stage]}")

    def batch_split(self, world_size: int) -> tuple[int, int]:
        """(micro_batch, accumulation steps) of one optimizer step over ``world_size`` processes; a
        ValueError where global_batch is not a multiple of micro_batch x processes, or where the
        synthetic training set is smaller than one micro-batch per process."""
        micro = self.micro_batch or max(1, self.global_batch // world_size)
        if self.global_batch % (micro * world_size):
            raise ValueError(f"global_batch={self.global_batch} must be a multiple of micro_batch ({micro}) x "
                             f"processes ({world_size})")
        if self.data == "synthetic" and self.train_samples < micro * world_size:
            raise ValueError(f"train_samples={self.train_samples} is less than one micro-batch of {micro} per "
                             f"process ({world_size} processes)")
        return micro, self.global_batch // (micro * world_size)

    def resume_conflicts(self, saved: dict) -> tuple[list[str], list[str]]:
        """Against a checkpoint's saved TrainConfig dict: (model options that differ: the model is the
        checkpoint's; training options that differ: the resumed run would not continue the saved one),
        each as "name: saved -> now"."""
        def differ(names):
            return [f"{n}: {saved.get(n)!r} -> {getattr(self, n)!r}" for n in names if saved.get(n) != getattr(self, n)]
        return differ(MODEL_OPTIONS), differ(TRAJECTORY_OPTIONS)

    def command_line(self) -> list[str]:
        """The cos-train arguments that rebuild this config (options left at their default omitted)."""
        args = [self.stage]
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "stage" or value == f.default:
                continue
            flag = "--" + f.name.replace("_", "-")
            if isinstance(value, bool):
                args.append(flag if value else "--no-" + f.name.replace("_", "-"))
            elif isinstance(value, list):
                args += [flag, *map(str, value)]
            else:
                args += [flag, str(value)]
        return args

    @property
    def peak_lr(self) -> float:
        if self.lr is not None:
            return self.lr
        return 1e-3 if self.stage == "pretrain" else 2e-5

    @property
    def run_dir(self) -> str:
        return self.out_dir or f"runs/{self.stage}"

    @property
    def model_preset(self) -> str:
        return self.model or "tiny"


# Options one stage takes and the other must not be given (they would be silently ignored).
STAGE_ONLY = {
    "pretrain": ("model", "vision_path", "llm_path", "tokenizer_path", "feature_layers", "reference_choices",
                 "llm_warmup_steps"),
    "finetune": ("init_from", "scale_source"),
}
STAGE_ONLY_WHY = {"pretrain": "builds its model from the preset and options",
                  "finetune": "takes its model from the pretrain checkpoint (init_from)"}
# On resume, the model comes from the checkpoint: these options must match it.
MODEL_OPTIONS = ("model", "bridge", "image_size", "scale_source", "vision_path", "llm_path", "tokenizer_path",
                 "feature_layers", "reference_choices", "llm_warmup_steps", "init_from")
# What shapes the trajectory: a resume with any of these changed does not continue the saved run.
TRAJECTORY_OPTIONS = ("global_batch", "seed", "data", "image_folder", "train_samples", "max_caption_tokens", "steps",
                      "lr", "warmup_ratio", "weight_decay", "max_grad_norm", "precision")


# The path options and what each expects (an empty string is refused: it would mean the current folder).
PATH_OPTIONS = {"vision_path": "a checkpoint folder", "llm_path": "a checkpoint folder",
                "tokenizer_path": "a tokenizer folder", "init_from": "a run or checkpoint directory",
                "data": "'synthetic' or a LLaVA JSON file", "image_folder": "a directory path",
                "out_dir": "a directory path", "resume": "a checkpoint or run directory, or 'auto'"}


def check_path_options(config, expected: dict[str, str]) -> None:
    """ValueError naming the field where a path option of ``config`` (a TrainConfig or CompareConfig)
    is an empty string (``expected``: field -> what it takes), or where image_folder is given with
    synthetic data, which never reads it."""
    name = type(config).__name__
    for field, what in expected.items():
        if getattr(config, field) == "":
            raise ValueError(f"{name}.{field} is empty; expected {what} (leave the option out for its default)")
    if config.image_folder is not None and config.data == "synthetic":
        raise ValueError(f"{name}.image_folder={config.image_folder!r} is only read with data=<a LLaVA JSON file>; "
                         f"with data='synthetic' the images are generated: give data too, or leave image_folder out")


def _other(stage: str) -> str:
    return "finetune" if stage == "pretrain" else "pretrain"
