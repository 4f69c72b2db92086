"""Trainer: Chain-of-Sight's two stages (pretrain, finetune) with AdamW and a cosine schedule.

One optimizer step = gradient accumulation over micro-batches:
    fetch every micro-batch of the step (data time)
    count the step's caption tokens over all ranks, so the loss is a mean over the global batch
    forward + backward each micro-batch (gradients reduced across ranks on the last one)
    clip, check the loss and gradient norm are finite, step optimizer and schedule (compute time)
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import shlex
import signal
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm

from ..mllm import IGNORE_INDEX, CaptionCollator, CoSMLLM, MLLMConfig
from ..mllm.config import PORT_CHOICES
from ..ops import resolve_backend
from ..resampler import MultiScaleResampler
from ..atomic_io import remove_stale
from .checkpoint import (CHECKPOINT_FORMS, check_frozen_checksums, frozen_checksums, list_checkpoints,
                         load_trainer_state, load_weights, prune_checkpoints, read_configs, relative_paths,
                         resolve_checkpoint, save_checkpoint, step_of)
from .config import TrainConfig
from .data import MicroBatchStream, build_eval_dataset, build_train_dataset, check_data
from .distributed import DistEnv, all_reduce_sum, setup_distributed, wrap_model
from .evaluate import evaluate
from .metrics import JsonlLog, StepMeter, peak_flops, peak_memory_gb, profile_components
from .stopping import StopSignals, TrainingStopped
from .warmup import warm_up_llm

__all__ = ["Trainer", "NonFiniteLossError", "TrainingStopped", "cosine_with_warmup"]

TRAINABLE = {"pretrain": ("bridge",), "finetune": ("bridge", "llm")}
TINY_LLM_WARMUP_STEPS = 200


class NonFiniteLossError(RuntimeError):
    """The loss or the gradient norm became NaN or Inf; the step was not applied."""


def cosine_with_warmup(warmup_steps: int, total_steps: int):
    """LR multiplier of step s (0-based): linear warm-up to 1 over warmup_steps, cosine to 0 at total_steps."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return factor


def check_inputs(config: TrainConfig, env: DistEnv, log=print) -> tuple[int, int]:
    """What a run takes from its user that can be checked before anything expensive (the model build,
    the LLM warm-up): global_batch split into micro-batches over env's processes, returned as
    (micro_batch, accumulation steps); the backend on env's device; the data file and its images
    (check_data). A ValueError or OSError naming the option."""
    split = config.batch_split(env.world_size)
    try:
        resolve_backend(config.backend, env.device)
    except RuntimeError as err:  # a known backend that cannot run on this device
        raise ValueError(str(err)) from None
    check_data(config, log)
    return split


class Trainer:
    """Builds the model for the stage, the data stream, optimizer, schedule; ``fit()`` trains."""

    def __init__(self, config: TrainConfig, log=None):
        self.config = config
        self.env: DistEnv = setup_distributed(config)
        self.run_dir = Path(config.run_dir)
        self.log = log or (lambda msg: tqdm.write(msg) if self.env.is_main else None)
        self.micro_batch, self.accum = check_inputs(config, self.env, self.log)
        self.precision = config.precision if config.precision != "auto" else (
            "bf16" if self.env.device.type == "cuda" else "fp32")
        torch.manual_seed(config.seed)

        # everything a user can get wrong is checked before the expensive work (model build, LLM warm-up)
        self._check_paths()
        resume = self._resume_checkpoint()
        self.init_source = None
        if resume is None and config.stage == "finetune":
            if config.init_from is None:
                raise ValueError(f"resume='auto' found no checkpoint in {self.run_dir} and init_from is not given: "
                                 f"a finetune run starts from a pretrain checkpoint (init_from)")
            self.init_source = resolve_checkpoint(config.init_from, what="init_from")
        self.model_name = config.model_preset
        self.model, self.checksums = self._build_model(resume)
        self.model_config: MLLMConfig = self.model.config
        self.collator = CaptionCollator(self.model.tokenizer, config.max_caption_tokens)
        self.train_data = build_train_dataset(config, self.model_config.image_size)
        self._cast_frozen()
        self.model.to(self.env.device)
        self.profile = profile_components(self.model, self._to_device(self.collator(
            [self.train_data[i] for i in range(min(self.micro_batch, len(self.train_data)))])), self.autocast)
        if config.grad_checkpointing:
            self.model.enable_gradient_checkpointing()
        self.wrapped = wrap_model(self.model, self.env)
        # compiled for the training step only; evaluation (incremental decoding) runs eagerly
        self.train_forward = torch.compile(self.wrapped) if config.compile else self.wrapped
        params = [p for p in self.wrapped.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=config.peak_lr, weight_decay=config.weight_decay)
        warmup = max(1, round(config.warmup_ratio * config.steps))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, cosine_with_warmup(warmup, config.steps))

        self.step, self.losses, self.meter, position = 0, [], StepMeter(), 0
        self.checkpoints: list[Path] = []  # what pruning may delete: this run's lineage, in step order
        self.last_saved: tuple[int, Path] | None = None
        if resume is not None:
            state = load_trainer_state(resume, self.wrapped, self.optimizer, self.scheduler, self.env)
            self.step, self.losses, position = state["step"], state["losses"], state["data_position"]
            self.meter.totals = state["meter_totals"]
            self.last_saved = (self.step, resume)
            self.log(f"resumed from {resume} at step {self.step}")
        self._adopt_checkpoints(resume)
        workers = config.num_workers if config.num_workers is not None else (4 if self.env.device.type == "cuda" else 0)
        self.stream = MicroBatchStream(self.train_data, self.collator, self.micro_batch, config.seed,
                                       self.env.rank, self.env.world_size, workers, position)
        self.jsonl = JsonlLog(self.run_dir / "metrics.jsonl", self.env.is_main,
                              keep_until=self.step if resume is not None else None)
        self.peak = peak_flops(self.env.device, config.peak_tflops)

    # ---- construction -----------------------------------------------------------------------
    def _check_paths(self) -> None:
        """The run directory is writable (and cleared of what killed writers left), the inputs exist."""
        cfg = self.config
        if self.env.is_main:
            try:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                tempfile.TemporaryFile(dir=self.run_dir).close()
            except OSError as err:
                raise PermissionError(f"out_dir {str(self.run_dir)!r} cannot be written: "
                                      f"{err.strerror or err}") from None
            for root in (self.run_dir, self.run_dir / "checkpoints"):
                for stale in remove_stale(root):
                    self.log(f"removed {stale}: an unfinished write of an interrupted run")

    def _resume_checkpoint(self) -> Path | None:
        """The checkpoint to resume: config.resume, or with "auto" the run directory's newest intact
        one if any; refused where it was trained with other options (see TrainConfig.resume_conflicts)."""
        cfg = self.config
        root = self.run_dir / "checkpoints"
        if cfg.resume is None or (cfg.resume == "auto" and not list_checkpoints(root)):
            if cfg.allow_config_change:
                nothing = ("resume is not given" if cfg.resume is None
                           else f"resume='auto' found no checkpoint in {root}")
                self.log(f"note: allow_config_change has no effect without a resumed checkpoint: {nothing}, so "
                         f"nothing is resumed")
            return None
        if cfg.resume == "auto":
            path = resolve_checkpoint(self.run_dir, fallback=True, warn=self.log)
        else:
            path = resolve_checkpoint(cfg.resume, what="resume", forms=f"{CHECKPOINT_FORMS}, or 'auto'")
        saved = read_configs(path)["train"]
        if saved["stage"] != cfg.stage:
            raise ValueError(f"resume={cfg.resume!r} is a {saved['stage']!r} checkpoint; this run's stage is {cfg.stage!r}")
        model_changes, run_changes = cfg.resume_conflicts(saved)
        if model_changes:
            raise ValueError(f"resume={cfg.resume!r}: {path} was trained with other model options "
                             f"({'; '.join(model_changes)}); a resumed run takes its model from the checkpoint: "
                             f"give the checkpoint's values or start a new run")
        if run_changes and not cfg.allow_config_change:
            raise ValueError(f"resume={cfg.resume!r}: {path} was trained with other options "
                             f"({'; '.join(run_changes)}), so this run would not continue it; give the "
                             f"checkpoint's values, or --allow-config-change to resume with the new ones")
        if run_changes:
            self.log(f"warning: resuming {path} with changed options: {'; '.join(run_changes)}")
        return path

    def _adopt_checkpoints(self, resume: Path | None) -> None:
        """The checkpoints already in the run directory that this run may prune: the one it resumed
        from and those before it. Later ones (another continuation) are kept, and replaced only
        where this run writes the same step."""
        root = self.run_dir / "checkpoints"
        present = list_checkpoints(root)
        if resume is not None and resume.resolve().parent == root.resolve():
            self.checkpoints = [p for p in present if step_of(p) <= self.step]
        others = [p.name for p in present if p not in self.checkpoints]
        if others and self.env.is_main:
            self.log(f"note: {root} holds checkpoints this run did not start from ({', '.join(others)}); "
                     f"they are kept, except any this run rewrites at the same step")

    def _build_model(self, resume: Path | None) -> tuple[CoSMLLM, dict]:
        """The model of the stage, its trainable parts set, and the checksums of its frozen parts."""
        cfg = self.config
        if resume is not None:
            saved = read_configs(resume)
            self.model_name = _preset_name(saved)
            model = _set_trainable(CoSMLLM(MLLMConfig.from_dict(saved["model"]), backend=cfg.backend), cfg.stage)
            check_frozen_checksums(saved["frozen_checksums"], model, resume)
            load_weights(resume, model)
            return model, frozen_checksums(model)
        if cfg.stage == "pretrain":
            model_config = self._pretrain_model_config()
            model = _set_trainable(CoSMLLM(model_config, backend=cfg.backend), cfg.stage)
            return model, frozen_checksums(model)
        source = self.init_source
        saved = read_configs(source)
        if saved["train"]["stage"] != "pretrain":
            raise ValueError(f"init_from={cfg.init_from!r} is a {saved['train']['stage']!r} checkpoint, not pretrain")
        self.model_name = _preset_name(saved)
        model = _set_trainable(CoSMLLM(MLLMConfig.from_dict(saved["model"]), backend=cfg.backend), "pretrain")
        check_frozen_checksums(saved["frozen_checksums"], model, source)
        load_weights(source, model)
        pre = model.config
        bridge = cfg.bridge or (("cos-1296" if pre.bridge.startswith("cos-") else pre.bridge))
        model.scale_up(cfg.image_size or 2 * pre.image_size, bridge, cfg.scale_source)
        self.log(f"fine-tuning from {source}: {pre.bridge} at {pre.image_size} px -> {bridge} at "
                 f"{model.config.image_size} px ({model.num_visual_tokens} visual tokens)")
        model = _set_trainable(model, cfg.stage)
        return model, frozen_checksums(model)

    def _pretrain_model_config(self) -> MLLMConfig:
        cfg = self.config
        overrides = {k: getattr(cfg, k) for k in ("bridge", "image_size", "vision_path", "llm_path",
                                                  "tokenizer_path", "feature_layers") if getattr(cfg, k) is not None}
        if cfg.reference_choices == "port":
            overrides.update(PORT_CHOICES)
        model_config = MLLMConfig.from_preset(cfg.model_preset, seed=cfg.seed, **overrides)
        model_config.check_paths()  # before the warm-up
        steps = cfg.llm_warmup_steps
        if steps is None:
            steps = TINY_LLM_WARMUP_STEPS if cfg.model_preset == "tiny" and model_config.llm_path is None else 0
        if steps and model_config.llm_path is None:
            captions = build_train_dataset(cfg, model_config.image_size)
            model_config = warm_up_llm(model_config, captions, steps, self.run_dir, self.env, self.log,
                                       resume_hint=self._resume_hint())
        return model_config

    def _cast_frozen(self) -> None:
        """With bf16, frozen parts are stored in bf16 (trainable ones stay fp32 master weights)."""
        if self.precision == "bf16":
            for name in ("vision", "llm"):
                if name not in TRAINABLE[self.config.stage]:
                    getattr(self.model, name).to(torch.bfloat16)

    def autocast(self):
        if self.precision == "bf16":
            return torch.autocast(self.env.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.env.device, non_blocking=True) if isinstance(v, torch.Tensor) else v
                for k, v in batch.items()}

    # ---- training ---------------------------------------------------------------------------
    def train_step(self) -> dict:
        """One optimizer step; returns its loss, grad norm, sample / token counts and times."""
        env, device = self.env, self.env.device
        start = time.perf_counter()
        micro = [self.stream.next() for _ in range(self.accum)]
        counts = torch.tensor([[(b["labels"] != IGNORE_INDEX).sum().item(), b["attention_mask"].sum().item(),
                                len(b["skipped"]), len(b["ids"])] for b in micro], dtype=torch.float64).sum(0)
        targets, text_tokens, skipped, samples = all_reduce_sum(counts.to(device), env).tolist()
        micro = [self._to_device(b) for b in micro]
        fetched = time.perf_counter()

        self.wrapped.train()
        loss_total = torch.zeros((), dtype=torch.float64, device=device)
        for i, b in enumerate(micro):
            with env.gradient_sync(self.wrapped, enabled=i == len(micro) - 1), self.autocast():
                loss_sum, _ = self.train_forward(b["pixel_values"], b["input_ids"], b["attention_mask"], b["labels"])
            (loss_sum * env.world_size / targets).backward()
            loss_total += loss_sum.detach().double()
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        norm = torch.nn.utils.clip_grad_norm_(params, self.config.max_grad_norm or float("inf"))
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        loss = (all_reduce_sum(loss_total, env) / targets).item()
        grad_norm = float(norm)
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLossError(
                f"non-finite {'loss' if not math.isfinite(loss) else 'gradient norm'} at step {self.step + 1} "
                f"(loss {loss}, grad norm {grad_norm}): stopping without applying the step"
            )
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        done = time.perf_counter()
        self.step += 1
        self.losses.append(loss)
        return dict(loss=loss, grad_norm=grad_norm, lr=lr, samples=int(samples), text_tokens=int(text_tokens),
                    skipped_images=int(skipped), data_time=fetched - start, compute_time=done - fetched)

    def save(self) -> Path:
        """Checkpoint the current state (collective), then prune this run's older checkpoints."""
        state = {"data_position": self.stream.position, "losses": self.losses, "meter_totals": self.meter.totals}
        model = self.model_config.to_dict()
        configs = {"model": model, "train": self.config.to_dict(), "frozen_checksums": self.checksums,
                   "relative_paths": relative_paths(model, self.run_dir), "model_preset": self.model_name}
        path = save_checkpoint(self.run_dir, self.step, self.wrapped, self.optimizer, self.scheduler, self.env,
                               configs, state)
        if self.env.is_main:
            self.checkpoints = prune_checkpoints([*self.checkpoints, path], self.config.keep_checkpoints)
        self.last_saved = (self.step, path)
        return path

    def _save_last_good(self) -> str:
        """After a non-finite step (not applied): where the last good state is on disk."""
        if self.last_saved is not None and self.last_saved[0] == self.step:
            return f"{self.last_saved[1]} (step {self.step})"
        trained = [p for p in self.wrapped.parameters() if p.requires_grad]
        if all(bool(torch.isfinite(p.detach()).all()) for p in trained):
            return (f"{self.save()} (step {self.step}; its data position is past the failed step's batches, "
                    f"so resuming skips them)")
        return (f"none written: the trained weights themselves are not finite; the last checkpoint: "
                f"{self.last_saved[1] if self.last_saved else 'none'}")

    def _resume_hint(self) -> str:
        args = shlex.join(dataclasses.replace(self.config, resume="auto").command_line())
        launcher = "torchrun --nproc-per-node N -m cos_kernels.train" if self.env.world_size > 1 else "cos-train"
        return f"{launcher} {args}"

    def fit(self) -> dict:
        """Train to config.steps, checkpointing and reporting on the way; evaluate; return the summary.

        SIGINT / SIGTERM: the current step finishes, a checkpoint is written, TrainingStopped is raised.
        A non-finite loss: the step is not applied, the last good state is checkpointed (unless it is
        already), NonFiniteLossError is raised."""
        cfg, env = self.config, self.env
        self.log(self._describe())
        if self.step >= cfg.steps:
            self.log(f"note: resumed at step {self.step}, which is already >= steps={cfg.steps}: nothing to train; "
                     f"the checkpoint is left as it is")
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not env.is_main, desc=cfg.stage, unit="step",
                   dynamic_ncols=True, mininterval=1.0)
        first_loss = self.losses[0] if self.losses else None
        with StopSignals() as signals:
            while self.step < cfg.steps:
                try:
                    out = self.train_step()
                except NonFiniteLossError as err:
                    bar.close()
                    raise NonFiniteLossError(f"{err}; the last good state: {self._save_last_good()}") from None
                first_loss = first_loss if first_loss is not None else out["loss"]
                self.meter.add(steps=1, **{k: v for k, v in out.items() if k != "lr"})
                bar.update(1)
                bar.set_postfix(loss=f"{out['loss']:.4f}", lr=f"{out['lr']:.2e}")
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    record = self.meter.report(self.step, out["lr"], self.model.num_visual_tokens,
                                               self.profile.flops_per_sample, self.peak, env.world_size,
                                               peak_memory_gb(env.device))
                    self.jsonl.write(record)
                    self.log(_format_record(record))
                if signals.requested(env):
                    break
                if cfg.save_every and self.step % cfg.save_every == 0 and self.step < cfg.steps:
                    self.save()
            bar.close()
            checkpoint = self.save() if self.last_saved is None or self.last_saved[0] != self.step else self.last_saved[1]
            signum = signals.requested(env)
            if signum:
                raise TrainingStopped(f"stopped by {signal.Signals(signum).name} after step {self.step} of "
                                      f"{cfg.steps}; checkpoint {checkpoint}; resume with: {self._resume_hint()}",
                                      signum)
        summary = self.summary(first_loss, checkpoint)  # a signal now: the default (the checkpoint is written)
        if env.is_main:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
            self.log(_format_summary(summary))
        return summary

    def summary(self, first_loss: float | None, checkpoint: Path) -> dict:
        cfg, t, env = self.config, self.meter.totals, self.env
        eval_result = None
        if cfg.eval_samples:
            eval_data = build_eval_dataset(cfg, self.model_config.image_size)
            eval_result = evaluate(self.wrapped, eval_data, self.collator, self.micro_batch, env, self.autocast)
        run_time = t["data_time"] + t["compute_time"]
        visual = self.model.num_visual_tokens
        text = t["text_tokens"] / t["samples"] if t["samples"] else 0.0
        return {
            "stage": cfg.stage, "model": self.model_name, "bridge": self.model_config.bridge,
            "image_size": self.model_config.image_size, "device": str(env.device), "processes": env.world_size,
            "steps": self.step, "samples": t["samples"], "train_time_s": run_time,
            "loss_first": first_loss, "loss_last": self.losses[-1] if self.losses else None,
            "samples_per_s": t["samples"] / run_time if run_time else None,
            "device_hours_per_1M_samples": run_time * env.world_size / t["samples"] * 1e6 / 3600 if t["samples"] else None,
            "tokens_per_sample": {"visual": visual, "text": text, "llm": visual + text},
            "time_split": self.profile.time_split(),
            "flops_per_sample": self.profile.flops_per_sample,
            "data_time_fraction": t["data_time"] / run_time if run_time else None,
            "skipped_images": t["skipped_images"],
            "eval": eval_result,
            "checkpoint": str(checkpoint),
        }

    def _describe(self) -> str:
        m, cfg, env = self.model, self.config, self.env
        n_train = sum(p.numel() for p in m.parameters() if p.requires_grad)
        n_all = sum(p.numel() for p in m.parameters())
        kind = "resampler" if isinstance(m.bridge, MultiScaleResampler) else "projector"
        return (f"{cfg.stage}: model {self.model_name}, {m.config.image_size} px, bridge {m.config.bridge} ({kind}, "
                f"{m.num_visual_tokens} visual tokens), {n_train / 1e6:.2f}M of {n_all / 1e6:.2f}M parameters "
                f"trained; {cfg.steps} steps x {cfg.global_batch} samples ({env.world_size} x {self.micro_batch} x "
                f"{self.accum} accumulation) on {env.device} ({self.precision}, {env.mode}); run dir {self.run_dir}")


def _preset_name(saved: dict) -> str:
    """The model preset a checkpoint's run started from (older checkpoints: the train config's)."""
    return saved.get("model_preset", saved["train"].get("model") or "tiny")


def _set_trainable(model: CoSMLLM, stage: str) -> CoSMLLM:
    for name in ("vision", "bridge", "llm"):
        getattr(model, name).requires_grad_(name in TRAINABLE[stage])
    return model


def _format_record(r: dict) -> str:
    mfu = f" mfu {r['mfu']:.1%}" if r["mfu"] is not None else ""
    return (f"step {r['step']:>6} | loss {r['loss']:.4f} | lr {r['lr']:.2e} | {r['samples_per_s']:.1f} samples/s "
            f"| {r['visual_tokens_per_s']:.0f} visual tok/s | {r['llm_tokens_per_s']:.0f} LLM tok/s | step "
            f"{r['step_time_s'] * 1000:.0f} ms (data {r['data_time_s'] * 1000:.0f}, compute "
            f"{r['compute_time_s'] * 1000:.0f}) | peak mem {r['peak_mem_gb']:.2f} GiB{mfu}")


def _format_summary(s: dict) -> str:
    hours = "GPU-hours" if s["device"].startswith("cuda") else "device-hours"
    split = ", ".join(f"{k} {v:.0%}" for k, v in s["time_split"].items())
    tok = s["tokens_per_sample"]
    lines = [
        f"done: {s['steps']} steps, {s['samples']} samples in {s['train_time_s']:.1f} s; loss "
        f"{s['loss_first']:.4f} -> {s['loss_last']:.4f}",
        f"  {s['samples_per_s']:.1f} samples/s; {s['device_hours_per_1M_samples']:.2f} {hours} per 1M samples "
        f"({s['processes']} process(es)); tokens per sample: {tok['visual']} visual + {tok['text']:.1f} text = "
        f"{tok['llm']:.1f} LLM",
        f"  time split: {split}; {s['flops_per_sample'] / 1e9:.2f} GFLOP per sample; data loading "
        f"{s['data_time_fraction']:.0%} of the step time; skipped images: {s['skipped_images']}",
    ]
    if s["eval"]:
        e = s["eval"]
        lines.append(f"  held-out eval ({e['samples']} samples): caption loss {e['caption_loss']:.4f}, "
                     f"exact match {e['exact_match']:.1%}")
        if "fields" in e:
            words = ", ".join(f"{f} {v['accuracy']:.0%}" for f, v in e["fields"].items())
            lines.append(f"  teacher-forced word accuracy: {words}")
    lines.append(f"  checkpoint: {s['checkpoint']}")
    return "\n".join(lines)
