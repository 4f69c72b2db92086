"""Checkpoints: trained weights, optimizer, scheduler, data position and RNG, written atomically.

A checkpoint is a directory ``<run>/checkpoints/step-NNNNNNN`` holding
    config.json        {"model": MLLMConfig, "train": TrainConfig, "frozen_checksums": {part: sum}}
    model.safetensors  the trainable parameters (full tensors, whatever the sharding)
    trainer.pt         optimizer and scheduler states, step, data position, every rank's RNG states,
                       the loss history and the meter's running totals
It is written under a temporary name and renamed into place, then ``<run>/checkpoints/latest`` is
rewritten (also by rename), so a crash never leaves a half-written checkpoint behind "latest".
Frozen parts are not saved: they are rebuilt from the config (seeded random init or a local path),
and their checksums are compared on load.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_optimizer_state_dict)

from .distributed import DistEnv

__all__ = ["save_checkpoint", "load_trainer_state", "load_weights", "resolve_checkpoint", "read_configs",
           "frozen_checksums", "check_frozen_checksums", "rng_state", "set_rng_state"]

CONFIG, WEIGHTS, TRAINER = "config.json", "model.safetensors", "trainer.pt"


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def frozen_checksums(model: nn.Module) -> dict[str, float]:
    """{component: float64 sum of its parameters} for each of vision / llm with no trainable weight."""
    sums = {}
    for name in ("vision", "llm"):
        params = list(getattr(model, name).parameters())
        if not any(p.requires_grad for p in params):
            sums[name] = float(sum(p.detach().double().sum() for p in params))
    return sums


def check_frozen_checksums(saved: dict[str, float], model: nn.Module, where: Path) -> None:
    """Refuse a checkpoint whose frozen parts differ from the ones rebuilt now (a different seed,
    local path, or library version would give other random weights)."""
    for name, value in saved.items():
        now = float(sum(p.detach().double().sum() for p in getattr(model, name).parameters()))
        if abs(now - value) > 1e-6 * max(1.0, abs(value)):
            raise ValueError(
                f"{where}: the frozen {name} weights rebuilt from the config (checksum {now:.6g}) differ from "
                f"those the checkpoint was trained with ({value:.6g}); rebuild with the same seed, local "
                f"paths and transformers version"
            )


def _atomic_dir(final: Path, write) -> None:
    """Call write(tmp_dir), then rename tmp_dir to ``final`` (replacing an older one)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        write(tmp)
        if final.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{final.name}.old.", dir=final.parent))
            os.replace(final, trash / final.name)
            os.replace(tmp, final)
            shutil.rmtree(trash)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _atomic_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def save_checkpoint(run_dir: str | Path, step: int, model: nn.Module, optimizer, scheduler, env: DistEnv,
                    configs: dict, trainer_state: dict, keep: int) -> Path:
    """Collective (every rank calls it); rank 0 writes. Returns the checkpoint directory."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    weights = get_model_state_dict(model, options=options)
    optim = get_optimizer_state_dict(model, optimizer, options=options)
    rngs = [None] * env.world_size
    if env.mode == "none":
        rngs = [rng_state()]
    else:
        dist.all_gather_object(rngs, rng_state())
    root = Path(run_dir) / "checkpoints"
    final = root / f"step-{step:07d}"
    if env.is_main:
        state = {**trainer_state, "step": step, "optimizer": optim, "scheduler": scheduler.state_dict(), "rng": rngs}

        def write(tmp: Path) -> None:
            save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp / WEIGHTS))
            torch.save(state, tmp / TRAINER)
            (tmp / CONFIG).write_text(json.dumps(configs, indent=2))

        _atomic_dir(final, write)
        _atomic_text(root / "latest", final.name)
        for old in sorted(root.glob("step-*"))[:-keep]:
            shutil.rmtree(old)
    env.barrier()
    return final


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, given it, a run directory or a checkpoints/ directory (-> its latest)."""
    path = Path(path)
    for root in (path / "checkpoints", path):
        if (root / "latest").is_file():
            path = root / (root / "latest").read_text().strip()
            break
    missing = [name for name in (CONFIG, WEIGHTS, TRAINER) if not (path / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{path} is not a checkpoint (it lacks {missing}) and names no latest checkpoint")
    return path


def read_configs(path: Path) -> dict:
    return json.loads((path / CONFIG).read_text())


def load_weights(path: Path, model: nn.Module) -> None:
    """Load the checkpoint's weights into the model (not yet wrapped; every rank reads the file)."""
    weights = load_file(str(path / WEIGHTS))
    params = dict(model.named_parameters())
    unknown = sorted(set(weights) - set(params))
    if unknown:
        raise ValueError(f"{path / WEIGHTS} holds tensors this model does not have: {unknown[:5]}")
    with torch.no_grad():
        for name, tensor in weights.items():
            if tensor.shape != params[name].shape:
                raise ValueError(f"{path / WEIGHTS}: {name} has shape {tuple(tensor.shape)}, the model "
                                 f"{tuple(params[name].shape)}")
            params[name].copy_(tensor)


def load_trainer_state(path: Path, model: nn.Module, optimizer, scheduler, env: DistEnv) -> dict:
    """Optimizer, scheduler and this rank's RNG from the checkpoint; returns the whole trainer state."""
    state = torch.load(path / TRAINER, weights_only=False, map_location="cpu", mmap=True)
    if len(state["rng"]) != env.world_size:
        raise ValueError(f"{path} was written by {len(state['rng'])} processes; this run has {env.world_size}")
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=env.mode != "none")
    set_optimizer_state_dict(model, optimizer, state["optimizer"] if env.is_main else {}, options=options)
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"][env.rank])
    return state
