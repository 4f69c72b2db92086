"""Bridges from ViT features to LLM-width visual tokens: Chain-of-Sight's resampler and baselines.

Every bridge maps a list of feature levels, each (B, N, vision_width), to (B, num_tokens, llm_width)
and has ``num_tokens``. The resamplers (multi-scale "cos-*" and single-window "resampler-*") are
MultiScaleResampler; "linear" and "mlp2x_gelu" are LLaVA's per-patch projectors (one token per patch).
"""

from __future__ import annotations

import torch
from torch import nn

from ..resampler import MultiScaleResampler
from .config import MLLMConfig

__all__ = ["PatchProjector", "build_bridge", "default_scale_sources"]


class PatchProjector(nn.Module):
    """LLaVA's projector on one feature level: "linear" = Linear(C, D); "mlp2x_gelu" =
    Linear(C, D) -> GELU -> Linear(D, D). (B, N, C) -> (B, N, D), N = grid * grid tokens."""

    def __init__(self, kind: str, vision_width: int, llm_width: int, grid: int):
        super().__init__()
        if kind == "linear":
            self.proj = nn.Linear(vision_width, llm_width)
        elif kind == "mlp2x_gelu":
            self.proj = nn.Sequential(nn.Linear(vision_width, llm_width), nn.GELU(), nn.Linear(llm_width, llm_width))
        else:
            raise ValueError(f"kind must be 'linear' or 'mlp2x_gelu', got {kind!r}")
        self.kind = kind
        self.num_tokens = grid * grid

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        if len(features) != 1:
            raise ValueError(f"the {self.kind} projector takes one feature level, got {len(features)}")
        (f,) = features
        if f.shape[1] != self.num_tokens:
            raise ValueError(f"expected {self.num_tokens} patches, got features of shape {tuple(f.shape)}")
        return self.proj(f)


def build_bridge(config: MLLMConfig, vision_width: int, llm_width: int, num_levels: int,
                 backend: str = "auto") -> nn.Module:
    """The bridge named by config.bridge, randomly initialised."""
    if config.is_projector:
        return PatchProjector(config.bridge, vision_width, llm_width, config.grid)
    return MultiScaleResampler(config.resampler_config(vision_width, llm_width, num_levels), backend=backend)


def default_scale_sources(old_scales: int, new_scales: int) -> list[int]:
    """Which pre-trained scale each new scale inflates from (SPEC: 80 -> 1296 is [global, global,
    local]): the finest new scale from the finest old one, every other from the global scale 0."""
    if new_scales == 1:
        return [0]
    return [0] * (new_scales - 1) + [old_scales - 1]
