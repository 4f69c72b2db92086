"""Checkpoints: trained weights, optimizer, scheduler, data position and RNG, written atomically.

A checkpoint is a directory ``<run>/checkpoints/step-NNNNNNN`` holding
    config.json        {"model": MLLMConfig, "train": TrainConfig, "frozen_checksums": {part: sum},
                        "relative_paths": {MLLMConfig path field: its path relative to the run directory}}
    bridge/            a resampler bridge as MultiScaleResampler.save_pretrained writes it (config.json,
                       model.safetensors): MultiScaleResampler.from_pretrained loads it as it is
    model.safetensors  the other trainable parameters (full tensors, whatever the sharding): a per-patch
                       projector bridge, the LLM in finetune; none at all in a resampler's pretrain
    trainer.pt         optimizer and scheduler states, step, data position, every rank's RNG states,
                       the loss history and the meter's running totals (TRAINER_STATE): tensors and
                       plain Python values only, read back with torch.load(weights_only=True)
    manifest.json      {file: {"bytes": size, "sha256": hex digest}} of model.safetensors, trainer.pt and
                       bridge/model.safetensors, written last
Checkpoints written before bridge/ hold a resampler bridge in model.safetensors too (as "bridge.*");
they still resume, and export.load_bridge reads their bridge.
It is written under a temporary name and renamed into place, then ``<run>/checkpoints/latest`` is
rewritten (also by rename), so a crash never leaves a half-written checkpoint behind "latest".
Frozen parts are not saved: they are rebuilt from the config (seeded random init or a local path),
and their checksums are compared on load. Paths inside the config are kept both as given and
relative to the run directory, so a run directory can be moved or copied.

What is verified on load (verify_checkpoint: on every resume, init_from and export.load_bridge), in
this order:
  1. config.json, model.safetensors and trainer.pt are all present, and bridge/model.safetensors
     where the checkpoint has a bridge/ or its manifest lists one;
  2. where manifest.json exists: it parses, and the weight files and trainer.pt have the byte
     sizes it lists and, where it records one (checkpoints written since content hashes were
     added; older manifests list sizes only and are still read), the SHA-256 of their contents;
  3. config.json parses and its "model", "train" and "frozen_checksums" (and "relative_paths",
     where present) are JSON objects;
  4. each weight file has a readable safetensors header;
  5. trainer.pt unpickles with torch.load(weights_only=True) and holds a dict with the keys and
     types of TRAINER_STATE.
The config.json files are not hashed: they may be edited by hand (a local path, say), so they are
checked by parsing instead (bridge/config.json by from_pretrained, against its weights' metadata).
Where the latest checkpoint fails any of these, ``--resume auto`` warns naming the
file and takes the newest intact checkpoint before it; an explicit checkpoint (--resume PATH,
init_from, load_bridge) is refused with a ValueError naming the file. One failure is never
skipped over: a trainer.pt that holds something other than tensors and plain values (refused by
weights_only; a crash does not write that) is refused even under ``--resume auto``
(UnsafeCheckpointError). After these checks, loading compares the frozen parts' checksums and the
weights' names and shapes with the model rebuilt from config.json.
Hashing reads the files once more on save and on load: about a second per GB.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_optimizer_state_dict)

from ..atomic_io import atomic_dir, atomic_text
from ..resampler import MultiScaleResampler
from .distributed import DistEnv

__all__ = ["save_checkpoint", "load_trainer_state", "load_weights", "resolve_checkpoint", "read_configs",
           "list_checkpoints", "prune_checkpoints", "verify_checkpoint", "relative_paths", "checkpoints_root",
           "frozen_checksums", "check_frozen_checksums", "rng_state", "set_rng_state", "UnsafeCheckpointError",
           "check_trainer_state", "TRAINER_STATE", "CHECKPOINT_FORMS"]

CONFIG, WEIGHTS, TRAINER, MANIFEST = "config.json", "model.safetensors", "trainer.pt", "manifest.json"
BRIDGE = "bridge"  # the folder of a resampler bridge, in MultiScaleResampler.save_pretrained's form
BRIDGE_WEIGHTS = f"{BRIDGE}/{WEIGHTS}"
BRIDGE_PREFIX = "bridge."  # the bridge's parameter names in the model
HASHED = (WEIGHTS, TRAINER)  # and BRIDGE_WEIGHTS where written; config.json files are checked by parsing them
# trainer.pt's entries and their types: what save_checkpoint writes (it checks) and loading needs
TRAINER_STATE = {"step": int, "data_position": int, "losses": list, "meter_totals": dict, "optimizer": dict,
                 "scheduler": dict, "rng": list}
CONFIG_SECTIONS = ("model", "train", "frozen_checksums")
# what a checkpoint option may name (the errors of resolve_checkpoint say it)
CHECKPOINT_FORMS = "a checkpoint directory, a run directory or its checkpoints/ directory"
PATH_FIELDS = ("vision_path", "llm_path", "tokenizer_path")  # MLLMConfig fields naming local files
# MLLMConfig fields added after checkpoints were first written, with the value those checkpoints used.
LEGACY_MODEL_FIELDS = {"bridge_norm_eps": 1e-6}
_STEP = re.compile(r"step-(\d+)$")


class UnsafeCheckpointError(ValueError):
    """trainer.pt holds something other than tensors and plain values: refused, never skipped over."""


def rng_state() -> dict:
    """Every generator's state as tensors and plain Python values (loadable with weights_only=True)."""
    np_state = np.random.get_state(legacy=False)
    np_state["state"]["key"] = torch.from_numpy(np_state["state"]["key"].astype(np.int64))
    state = {"python": random.getstate(), "numpy": np_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np_state = {**state["numpy"], "state": dict(state["numpy"]["state"])}
    np_state["state"]["key"] = np_state["state"]["key"].numpy().astype(np.uint32)
    np.random.set_state(np_state)
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


def step_of(path: Path) -> int:
    """The step of a checkpoint directory named step-NNNNNNN."""
    return int(_STEP.match(path.name).group(1))


def list_checkpoints(root: Path) -> list[Path]:
    """The step-NNNNNNN directories under ``root`` (a checkpoints/ directory), in step order."""
    found = [p for p in root.glob("step-*") if p.is_dir() and _STEP.match(p.name)] if root.is_dir() else []
    return sorted(found, key=step_of)


def relative_paths(model_config: dict, run_dir: Path) -> dict[str, str]:
    """{field: path relative to run_dir} for the model config's local paths."""
    return {name: os.path.relpath(Path(model_config[name]).resolve(), run_dir.resolve())
            for name in PATH_FIELDS if model_config.get(name) is not None}


def _sha256(path: Path) -> str:
    """The hex SHA-256 of a file's contents, read in chunks."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _hashed_files(path: Path, listed=()) -> list[str]:
    """The checkpoint's files that the manifest covers: HASHED, and BRIDGE_WEIGHTS where the checkpoint
    has a bridge/ or ``listed`` (the manifest's entries) names it."""
    return [*HASHED, *([BRIDGE_WEIGHTS] if (path / BRIDGE).exists() or BRIDGE_WEIGHTS in listed else [])]


def _manifest(directory: Path) -> dict[str, dict]:
    """{file: {"bytes": size, "sha256": digest}} of the checkpoint's binary files (_hashed_files)."""
    return {name: {"bytes": (directory / name).stat().st_size, "sha256": _sha256(directory / name)}
            for name in _hashed_files(directory)}


def _manifest_entry(manifest: Path, entries: dict, name: str) -> tuple[int, str | None]:
    """(size, sha256 or None) that the manifest lists for ``name``; older manifests list the size alone."""
    entry = entries.get(name)
    if isinstance(entry, int) and not isinstance(entry, bool):
        return entry, None
    if isinstance(entry, dict) and isinstance(entry.get("bytes"), int) and isinstance(entry.get("sha256"), str):
        return entry["bytes"], entry["sha256"]
    raise ValueError(f"{manifest} is corrupt: its entry for {name} is {entry!r}; expected "
                     f"{{\"bytes\": SIZE, \"sha256\": HEX}}")


def _read_manifest(path: Path) -> dict | None:
    """manifest.json's entries; None for checkpoints from before manifests (nothing to compare)."""
    manifest = path / MANIFEST
    if not manifest.is_file():
        return None
    try:
        entries = json.loads(manifest.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{manifest} is corrupt: {err}") from None
    if not isinstance(entries, dict):
        raise ValueError(f"{manifest} is corrupt: it holds a {type(entries).__name__}, expected a JSON object")
    return entries


def _check_manifest(path: Path, entries: dict, names: list[str]) -> None:
    """ValueError naming the file unless the files ``names`` have the sizes and content hashes the
    manifest's ``entries`` list."""
    for name in names:
        size, digest = _manifest_entry(path / MANIFEST, entries, name)
        found = (path / name).stat().st_size
        if found != size:
            raise ValueError(f"{path / name} is corrupt: {found} bytes, the manifest says {size}")
        if digest is not None and _sha256(path / name) != digest:
            raise ValueError(f"{path / name} is corrupt: its content hash (sha256) differs from the one "
                             f"{path / MANIFEST} records (same size, other bytes)")


def check_trainer_state(state, where: Path) -> None:
    """ValueError naming ``where`` unless ``state`` is a dict with TRAINER_STATE's keys and types."""
    expected = ", ".join(f"{key} ({kind.__name__})" for key, kind in TRAINER_STATE.items())
    if not isinstance(state, dict):
        raise ValueError(f"{where} is not a trainer state: it holds a {type(state).__name__}; expected a dict "
                         f"of {expected}")
    missing = [key for key in TRAINER_STATE if key not in state]
    wrong = [f"its {key} is a {type(state[key]).__name__}" for key, kind in TRAINER_STATE.items()
             if key in state and not (isinstance(state[key], kind) and not isinstance(state[key], bool))]
    problems = ([f"it lacks {missing}"] if missing else []) + wrong
    if problems:
        raise ValueError(f"{where} is not a trainer state cos-train wrote: {'; '.join(problems)}; expected a dict "
                         f"of {expected}")


def _check_space(root: Path, tensors: list[dict]) -> None:
    """Refuse up front (nothing written) when the checkpoint cannot fit on root's filesystem."""
    def nbytes(obj) -> int:
        if isinstance(obj, torch.Tensor):
            return obj.numel() * obj.element_size()
        if isinstance(obj, dict):
            return sum(nbytes(v) for v in obj.values())
        if isinstance(obj, (list, tuple)):
            return sum(nbytes(v) for v in obj)
        return 0

    root.mkdir(parents=True, exist_ok=True)
    need, free = nbytes(tensors), shutil.disk_usage(root).free
    if need > free:
        raise OSError(errno.ENOSPC, f"no space left on the device for a checkpoint in {root}: it needs about "
                                    f"{need / 2**20:.1f} MiB, {free / 2**20:.1f} MiB are free")


def save_checkpoint(run_dir: str | Path, step: int, model: nn.Module, optimizer, scheduler, env: DistEnv,
                    configs: dict, trainer_state: dict) -> Path:
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
        check_trainer_state(state, final / TRAINER)  # what verify_checkpoint will ask of it
        bridge = env.unwrap(model).bridge
        bridge_state = ({k[len(BRIDGE_PREFIX):]: weights.pop(k) for k in list(weights) if k.startswith(BRIDGE_PREFIX)}
                        if isinstance(bridge, MultiScaleResampler) else {})
        _check_space(root, [weights, bridge_state, state])

        def write(tmp: Path) -> None:
            if bridge_state:  # weights as trained: a NaN stop never saves non-finite ones
                resampler = MultiScaleResampler.from_state_dict(bridge.config, bridge_state, allow_nonfinite=True)
                resampler.save_pretrained(tmp / BRIDGE)
            save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp / WEIGHTS))
            torch.save(state, tmp / TRAINER)
            (tmp / CONFIG).write_text(json.dumps(configs, indent=2))
            (tmp / MANIFEST).write_text(json.dumps(_manifest(tmp)))

        atomic_dir(final, write)
        atomic_text(root / "latest", final.name)
    env.barrier()
    return final


def prune_checkpoints(checkpoints: list[Path], keep: int) -> list[Path]:
    """Delete all but the ``keep`` latest (by step) of ``checkpoints``; returns the kept ones."""
    ordered = sorted(set(checkpoints), key=step_of)
    for old in ordered[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return ordered[-keep:]


def verify_checkpoint(path: Path) -> None:
    """Raise ValueError naming the broken file unless ``path`` is a complete, intact checkpoint: the
    checks listed in the module docstring."""
    entries = _read_manifest(path)
    hashed = _hashed_files(path, entries or ())
    missing = [name for name in (CONFIG, *hashed) if not (path / name).is_file()]
    if missing:
        raise ValueError(f"{path} is not a complete checkpoint: it lacks {missing}")
    if entries is not None:
        _check_manifest(path, entries, hashed)
    read_configs(path)
    for name in hashed:
        if name.endswith(".safetensors"):
            try:
                with safe_open(str(path / name), framework="pt") as f:
                    list(f.keys())
            except (SafetensorError, OSError) as err:
                raise ValueError(f"{path / name} is corrupt: {err}") from None
    read_trainer_state(path)


def checkpoints_root(path: Path) -> Path | None:
    """The checkpoints/ directory ``path`` is (or holds, for a run directory), or None."""
    return next((r for r in (path / "checkpoints", path) if (r / "latest").is_file() or list_checkpoints(r)), None)


def _check_checkpoint_path(path: str | Path, what: str, forms: str) -> Path:
    """``path`` as a Path, or an error saying what ``what`` must name: not empty, existing, a directory."""
    if isinstance(path, str) and not path.strip():
        raise ValueError(f"{what}={path!r} is empty: give {forms}")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist ({forms})")
    if path.is_file():
        if path.name in (CONFIG, WEIGHTS, TRAINER, MANIFEST) and (path.parent / CONFIG).is_file():
            raise ValueError(f"{what} {str(path)!r} is a file of the checkpoint {path.parent}; point {what} at "
                             f"the checkpoint directory {path.parent} (or the run directory)")
        raise ValueError(f"{what} {str(path)!r} is a file; expected {forms}")
    return path


def resolve_checkpoint(path: str | Path, fallback: bool = False, warn=print, what: str = "checkpoint",
                       forms: str = CHECKPOINT_FORMS) -> Path:
    """A checkpoint directory, given it, a run directory or a checkpoints/ directory (-> its latest);
    ``what`` names the option it came from in the errors, ``forms`` what that option may name.

    fallback: where the latest is missing or broken, take the newest intact checkpoint beside it,
    with a warning naming each broken one (``--resume auto``). Without it a broken checkpoint is a
    ValueError naming the broken file. An UnsafeCheckpointError is raised either way."""
    path = _check_checkpoint_path(path, what, forms)
    root = checkpoints_root(path)
    if root is None:
        verify_checkpoint(path)
        return path
    candidates = []
    if (root / "latest").is_file():
        candidates.append(root / (root / "latest").read_text().strip())
    if fallback:
        candidates += [p for p in reversed(list_checkpoints(root)) if p not in candidates]
    for candidate in candidates:
        try:
            verify_checkpoint(candidate)
            return candidate
        except UnsafeCheckpointError:
            raise
        except ValueError as err:
            if not fallback:
                raise
            warn(f"warning: skipping a broken checkpoint: {err}")
    raise FileNotFoundError(f"{path} holds no intact checkpoint")


def read_configs(path: Path) -> dict:
    """config.json of a checkpoint, its model paths taken relative to the run directory where they
    exist there (a moved run), else as written; model fields it predates get the value it was
    trained with (LEGACY_MODEL_FIELDS)."""
    try:
        configs = json.loads((path / CONFIG).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path / CONFIG} is corrupt: {err}") from None
    if not isinstance(configs, dict) or not set(CONFIG_SECTIONS) <= set(configs):
        raise ValueError(f"{path / CONFIG} is not a checkpoint config (it lacks model / train / frozen_checksums)")
    sections = [*CONFIG_SECTIONS, *(["relative_paths"] if "relative_paths" in configs else [])]
    wrong = [f"{name!r} is a {type(configs[name]).__name__}" for name in sections
             if not isinstance(configs[name], dict)]
    if wrong:
        raise ValueError(f"{path / CONFIG} is not a checkpoint config: {', '.join(sections)} must be JSON objects "
                         f"(dicts), but {', '.join(wrong)}")
    configs["model"] = {**LEGACY_MODEL_FIELDS, **configs["model"]}
    run_dir = path.resolve().parent.parent
    for name, relative in configs.get("relative_paths", {}).items():
        if (run_dir / relative).exists():
            configs["model"][name] = str((run_dir / relative).resolve())
    return configs


def load_weights(path: Path, model: nn.Module) -> None:
    """Load the checkpoint's weights into the model (not yet wrapped; every rank reads the files):
    model.safetensors, and bridge/model.safetensors where the checkpoint has one."""
    params = dict(model.named_parameters())
    for name, prefix in ((WEIGHTS, ""), (BRIDGE_WEIGHTS, BRIDGE_PREFIX)):
        if name == WEIGHTS or (path / name).is_file():
            _copy_weights(path / name, prefix, params)


def _copy_weights(file: Path, prefix: str, params: dict[str, nn.Parameter]) -> None:
    """Copy the tensors of the safetensors ``file``, their names given ``prefix``, into ``params``."""
    try:
        weights = {prefix + k: v for k, v in load_file(str(file)).items()}
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{file} is corrupt: {err}") from None
    unknown = sorted(set(weights) - set(params))
    if unknown:
        raise ValueError(f"{file} holds tensors this model does not have: {unknown[:5]}")
    with torch.no_grad():
        for name, tensor in weights.items():
            if tensor.shape != params[name].shape:
                raise ValueError(f"{file}: {name} has shape {tuple(tensor.shape)}, the model "
                                 f"{tuple(params[name].shape)}")
            params[name].copy_(tensor)


def read_trainer_state(path: Path) -> dict:
    """trainer.pt, unpickled with weights_only=True (a crafted file cannot run code; it is an
    UnsafeCheckpointError) and memory-mapped, its entries checked against TRAINER_STATE."""
    try:
        state = torch.load(path / TRAINER, weights_only=True, map_location="cpu", mmap=True)
    except pickle.UnpicklingError as err:
        raise UnsafeCheckpointError(
            f"{path / TRAINER} holds something other than tensors and plain values (refused by "
            f"torch.load(weights_only=True)): {str(err).splitlines()[0]}") from None
    except (RuntimeError, EOFError, OSError) as err:
        raise ValueError(f"{path / TRAINER} is corrupt: {str(err).splitlines()[0]}") from None
    check_trainer_state(state, path / TRAINER)
    return state


def load_trainer_state(path: Path, model: nn.Module, optimizer, scheduler, env: DistEnv) -> dict:
    """Optimizer, scheduler and this rank's RNG from the checkpoint; returns the whole trainer state."""
    state = read_trainer_state(path)
    if len(state["rng"]) != env.world_size:
        raise ValueError(f"{path} was written by {len(state['rng'])} processes; this run has {env.world_size}")
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=env.mode != "none")
    set_optimizer_state_dict(model, optimizer, state["optimizer"] if env.is_main else {}, options=options)
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"][env.rank])
    return state
