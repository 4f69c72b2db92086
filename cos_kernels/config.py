"""CoSConfig: the resampler's hyper-parameters, named presets and JSON round-trip."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .config_io import DictConfig
from .layout import WindowLayout, _pair

__all__ = ["CoSConfig", "PRESETS"]


@dataclass
class CoSConfig(DictConfig):
    """Hyper-parameters of a MultiScaleResampler.

    grid: the ViT's patch grid, an int or (GH, GW); image side = grid * patch_size pixels.
    windows / queries: per scale, the window side (int or (wh, ww)) and total queries (WindowLayout).
    vision_dim: width C of the ViT features; dim: the resampler's width; llm_dim: the output width.
    num_levels: feature levels consumed in sequence (one block per level and scale).
    drop_cls: accept features with a leading CLS token (N + 1 tokens) and drop it.
    """

    grid: int | tuple[int, int] = 16
    windows: list = field(default_factory=lambda: [16, 4])
    queries: list = field(default_factory=lambda: [16, 64])
    patch_size: int = 14
    vision_dim: int = 1024
    dim: int = 1024
    num_heads: int = 16
    mlp_ratio: float = 4.0
    llm_dim: int = 4096
    num_levels: int = 2
    drop_cls: bool = True
    norm_eps: float = 1e-6
    init_std: float = 0.02

    def __post_init__(self):
        self.grid = _pair(self.grid, "grid")
        self.windows = [w if isinstance(w, int) else list(_pair(w, "window")) for w in self.windows]
        self.queries = list(self.queries)
        self.layout  # validates windows and queries against the grid
        self.check_positive_ints("patch_size", "vision_dim", "dim", "num_heads", "llm_dim", "num_levels")
        if self.dim % self.num_heads:
            raise ValueError(
                f"CoSConfig.dim = {self.dim} must be divisible by num_heads = {self.num_heads}"
            )
        if not self.mlp_ratio > 0 or int(self.dim * self.mlp_ratio) < 1:
            raise ValueError(f"CoSConfig.mlp_ratio must be positive, got {self.mlp_ratio!r}")

    @property
    def layout(self) -> WindowLayout:
        return WindowLayout(self.grid, self.windows, self.queries)

    @property
    def image_size(self) -> tuple[int, int]:
        return self.grid[0] * self.patch_size, self.grid[1] * self.patch_size

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def hidden_dim(self) -> int:
        return int(self.dim * self.mlp_ratio)

    @property
    def num_tokens(self) -> int:
        return sum(self.queries)

    # ---- presets and serialisation ----------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str, **overrides) -> "CoSConfig":
        """A named preset (see PRESETS), with any field overridden by keyword."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; known presets: {sorted(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> "CoSConfig":
        """From a JSON string or the path of a JSON file."""
        text = str(text_or_path)
        if not text.lstrip().startswith("{"):
            text = Path(text_or_path).read_text()
        try:
            d = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"CoSConfig JSON is malformed: {err}") from None
        if not isinstance(d, dict):
            raise ValueError(f"CoSConfig JSON must be an object, got {type(d).__name__}")
        return cls.from_dict(d)


PRESETS: dict[str, dict] = {
    # Pre-training at 224 px (grid 16): one global window + sixteen 4x4 windows, 80 tokens.
    "cos-80": dict(grid=16, windows=[16, 4], queries=[16, 64]),
    # Fine-tuning at 448 px (grid 32) after compound token scaling (SPEC.md).
    "cos-336": dict(grid=32, windows=[32, 16, 4], queries=[16, 64, 256]),
    "cos-528": dict(grid=32, windows=[32, 8, 4], queries=[16, 256, 256]),
    "cos-1296": dict(grid=32, windows=[32, 8, 2], queries=[16, 256, 1024]),
    # Baselines: the same module with one global window, at 224 px.
    "resampler-80": dict(grid=16, windows=[16], queries=[80]),
    "resampler-336": dict(grid=16, windows=[16], queries=[336]),
}
