"""The resampler bridge of a cos-train run or checkpoint, for MultiScaleResampler.from_pretrained."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..config import CoSConfig
from ..mllm.config import MLLMConfig
from ..resampler import shape_implied_fields
from .checkpoint import MANIFEST, TRAINER, WEIGHTS, checkpoints_root, read_configs, resolve_checkpoint

__all__ = ["read_bridge"]

_PREFIX = "bridge."


def read_bridge(path: str | Path) -> tuple[CoSConfig, dict[str, torch.Tensor], Path]:
    """(the bridge's CoSConfig, its state dict in MultiScaleResampler's names, the weights file) of
    ``path``: a cos-train run directory or its checkpoints/ directory (their latest checkpoint) or
    one checkpoint. The widths and levels are read off the weights (a local vision_path or llm_path
    need not exist here); the layout, heads and epsilon off the saved model config.

    The checkpoint is verified as on resume (checkpoint.verify_checkpoint: sizes and content hashes
    against its manifest, ...); a damaged one is refused with the file named."""
    try:
        checkpoint = resolve_checkpoint(path, what="MultiScaleResampler.from_pretrained path")
    except ValueError as err:
        if _is_cos_train_output(Path(path)):
            raise
        raise ValueError(f"{path} is neither a directory save_pretrained wrote (config.json and "
                         f"model.safetensors) nor a cos-train run or checkpoint: {err}") from None
    model_config = MLLMConfig.from_dict(read_configs(checkpoint)["model"])
    if model_config.is_projector:
        raise ValueError(f"{checkpoint} trained a {model_config.bridge!r} projector, not a resampler")
    weights = checkpoint / WEIGHTS
    try:
        with safe_open(str(weights), framework="pt") as f:
            state = {k[len(_PREFIX):]: f.get_tensor(k) for k in f.keys() if k.startswith(_PREFIX)}
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{weights} is corrupt: {err}") from None
    needed = ("levels.0.0.to_k.weight", "proj_out.weight")
    if any(k not in state for k in needed):
        raise ValueError(f"{weights} holds no resampler bridge (no {_PREFIX}{needed[0]} or {_PREFIX}{needed[1]})")
    implied = shape_implied_fields(state)
    vision_dim, llm_dim, num_levels = (implied[field][0] for field in ("vision_dim", "llm_dim", "num_levels"))
    return model_config.resampler_config(vision_dim, llm_dim, num_levels), state, weights


def _is_cos_train_output(path: Path) -> bool:
    """A run directory, its checkpoints/ directory or a checkpoint (its errors are then its own)."""
    return checkpoints_root(path) is not None or any((path / name).is_file() for name in (MANIFEST, TRAINER))
