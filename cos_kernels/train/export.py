"""The resampler bridge of a cos-train run or checkpoint, verified, as a MultiScaleResampler."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..config import CoSConfig
from ..mllm.config import MLLMConfig
from ..resampler import MultiScaleResampler, shape_implied_fields
from .checkpoint import BRIDGE, BRIDGE_PREFIX, WEIGHTS, read_configs, resolve_checkpoint

__all__ = ["load_bridge"]


def load_bridge(path: str | os.PathLike, backend: str = "auto", fused: bool = True, *,
                dtype: torch.dtype | None = None, device: str | torch.device | None = None,
                allow_nonfinite: bool = False) -> MultiScaleResampler:
    """The trained resampler bridge of a cos-train run, its checkpoints/ directory (either: their
    latest checkpoint) or one checkpoint.

    The checkpoint is verified first, as on resume (checkpoint.verify_checkpoint: sizes and content
    hashes against its manifest, ...); a damaged one is refused with the file named. Its bridge/
    folder is then read by MultiScaleResampler.from_pretrained; a checkpoint written before bridge/
    existed holds the bridge in model.safetensors ("bridge.*"), read with the config rebuilt from the
    saved model config (the widths and levels off the weights: a local vision_path or llm_path need
    not exist here).

    Args:
        path: the run directory, its checkpoints/ directory or a checkpoint directory.
        backend, fused: as for MultiScaleResampler.
        dtype: the parameters' floating-point dtype (default: the saved one).
        device: where they go (default: the CPU).
        allow_nonfinite: load weights holding NaN or Inf (refused by default).
    Returns:
        the MultiScaleResampler: (B, N, vision_dim) features per level -> (B, num_tokens, llm_dim).
    """
    checkpoint = resolve_checkpoint(os.fsdecode(path), what="load_bridge path")
    model_config = MLLMConfig.from_dict(read_configs(checkpoint)["model"])
    if model_config.is_projector:
        raise ValueError(f"{checkpoint} trained a {model_config.bridge!r} projector, not a resampler")
    options = dict(dtype=dtype, device=device, allow_nonfinite=allow_nonfinite)
    if (checkpoint / BRIDGE).is_dir():
        return MultiScaleResampler.from_pretrained(checkpoint / BRIDGE, backend, fused, **options)
    config, state = _bridge_in_weights(checkpoint, model_config)
    return MultiScaleResampler.from_state_dict(config, state, backend, fused, where=checkpoint / WEIGHTS, **options)


def _bridge_in_weights(checkpoint: Path, model_config: MLLMConfig) -> tuple[CoSConfig, dict[str, torch.Tensor]]:
    """(config, state dict in MultiScaleResampler's names) of the bridge inside model.safetensors, as
    checkpoints written before bridge/ hold it."""
    weights = checkpoint / WEIGHTS
    try:
        with safe_open(str(weights), framework="pt") as f:
            state = {k[len(BRIDGE_PREFIX):]: f.get_tensor(k) for k in f.keys() if k.startswith(BRIDGE_PREFIX)}
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{weights} is corrupt: {err}") from None
    needed = ("levels.0.0.to_k.weight", "proj_out.weight")
    if any(k not in state for k in needed):
        raise ValueError(f"{weights} holds no resampler bridge (no {BRIDGE_PREFIX}{needed[0]} or "
                         f"{BRIDGE_PREFIX}{needed[1]}), and {checkpoint} has no {BRIDGE}/ folder")
    implied = shape_implied_fields(state)
    vision_dim, llm_dim, num_levels = (implied[field][0] for field in ("vision_dim", "llm_dim", "num_levels"))
    return model_config.resampler_config(vision_dim, llm_dim, num_levels), state
