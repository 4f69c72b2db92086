"""CoSConfig: the resampler's hyper-parameters, named presets and JSON round-trip."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from .config_io import DictConfig
from .layout import WindowLayout
from .validation import check_bool, pair, positive_int

__all__ = ["CoSConfig", "PRESETS"]


@dataclass
class CoSConfig(DictConfig):
    """Hyper-parameters of a MultiScaleResampler (see PRESETS for the paper's).

    Args:
        grid: the ViT's patch grid, an int or (GH, GW); the image side is grid * patch_size pixels.
        windows: per scale, the window side, an int or (wh, ww), each dividing the grid's.
        queries: per scale, the total number of learnable queries, a multiple of its windows.
        patch_size: the ViT's patch side in pixels.
        vision_dim: width C of the ViT features, which arrive as (B, N, C) per level.
        dim: the resampler's width, split into num_heads heads of dim // num_heads.
        num_heads: attention heads; must divide dim.
        mlp_ratio: each block's MLP hidden width over dim (hidden_dim = int(dim * mlp_ratio)).
        llm_dim: the output width, the LLM's hidden size: the output is (B, num_tokens, llm_dim).
        num_levels: feature levels consumed in sequence (one block per level and scale).
        drop_cls: accept features with a leading CLS token (N + 1 tokens) and drop it.
        concat_levels: also accept the levels as one tensor, side by side on the channel axis,
            (B, N, num_levels * vision_dim): LLaVA's form for a list vision_feature_layer.
        norm_eps: the LayerNorms' epsilon (1e-5, nn.LayerNorm's default and the public port's;
            checkpoints store theirs).
        init_std: the std of the normal initialisation, cut at +-2 absolute (timm's trunc_normal_
            bounds: at std 0.02 nothing is cut in practice).

    Integers are numbers.Integral (not bool) > 0, stored as int; mlp_ratio, norm_eps and init_std
    finite numbers.Real > 0, stored as float; windows and queries lists or tuples, one entry per
    scale. A wrong type raises TypeError, a wrong value ValueError, each naming the field.
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
    concat_levels: bool = False
    norm_eps: float = 1e-5
    init_std: float = 0.02

    def __post_init__(self):
        self.check_positive_ints("patch_size", "vision_dim", "dim", "num_heads", "llm_dim", "num_levels")
        self.check_positive_reals("mlp_ratio", "norm_eps", "init_std")
        for name in ("drop_cls", "concat_levels"):
            check_bool(getattr(self, name), f"CoSConfig.{name}")
        self.grid = pair(self.grid, "CoSConfig.grid")
        for name in ("windows", "queries"):
            value = getattr(self, name)
            if not isinstance(value, (list, tuple)):
                raise TypeError(
                    f"CoSConfig.{name} must be a list or tuple with one entry per scale, got {value!r} "
                    f"({type(value).__name__})"
                )
        self.windows = [_window(w, f"CoSConfig.windows[{s}]") for s, w in enumerate(self.windows)]
        self.queries = [positive_int(n, f"CoSConfig.queries[{s}]") for s, n in enumerate(self.queries)]
        WindowLayout(self.grid, self.windows, self.queries)  # raises unless they fit the grid
        if self.dim % self.num_heads:
            raise ValueError(
                f"CoSConfig.dim = {self.dim} must be divisible by num_heads = {self.num_heads}"
            )
        if self.hidden_dim < 1:
            raise ValueError(
                f"CoSConfig.mlp_ratio = {self.mlp_ratio!r} gives hidden_dim = int(dim * mlp_ratio) = "
                f"{self.hidden_dim} for dim = {self.dim}; it must be at least 1"
            )

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
    def for_grid(cls, name: str, grid: int, **overrides) -> "CoSConfig":
        """The preset ``name`` on a square ``grid`` of patches, its window sides scaled from the
        preset's grid (cos-80's [16, 4] on 16 becomes [32, 8] on 32), any field overridden by keyword."""
        preset = cls.from_preset(name)
        (preset_grid, _), windows = preset.grid, []
        for w in preset.windows:
            side = w * grid / preset_grid
            if side != int(side) or grid % int(side):
                raise ValueError(
                    f"preset {name!r} (windows {preset.windows} on grid {preset_grid}) cannot be rescaled to "
                    f"grid {grid}: window {w} would become {side:g} patches; the grid must be a multiple "
                    f"of {preset_grid // min(preset.windows)}"
                )
            windows.append(int(side))
        return cls.from_preset(name, **{"grid": grid, "windows": windows, **overrides})

    @classmethod
    def from_json(cls, text_or_path: str | os.PathLike) -> "CoSConfig":
        """From JSON text (a str whose stripped text starts with "{" or "[") or the path of a JSON
        file (any other str, or an os.PathLike); a file's errors name it."""
        if isinstance(text_or_path, str) and text_or_path.lstrip()[:1] in ("{", "["):
            return cls.from_json_text(text_or_path)
        if not isinstance(text_or_path, (str, os.PathLike)):
            raise TypeError(
                f"CoSConfig.from_json takes JSON text or a file path (str or os.PathLike), got "
                f"{type(text_or_path).__name__}"
            )
        path = Path(text_or_path)
        if not path.is_file():
            raise FileNotFoundError(
                f"CoSConfig.from_json: {str(path)!r} is neither JSON text (starting with '{{' or "
                f"'[') nor an existing file"
            )
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(f"{path} is not UTF-8 text ({err}): expected a JSON object of CoSConfig fields") from None
        return cls.from_json_text(text, str(path))

    @classmethod
    def from_json_text(cls, text: str, source: str = "CoSConfig JSON") -> "CoSConfig":
        """From JSON text holding an object of CoSConfig fields; every error (ValueError, or TypeError
        for a field's type) begins with ``source``, what the text came from."""
        if not text.strip():
            raise ValueError(f"{source} is empty: expected a JSON object of CoSConfig fields")
        try:
            d = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{source} is malformed JSON ({err}): expected a JSON object of CoSConfig "
                             f"fields") from None
        if not isinstance(d, dict):
            raise ValueError(f"{source} must be a JSON object {{...}} of CoSConfig fields, got "
                             f"{type(d).__name__} {text.strip()[:40]!r}")
        try:
            return cls.from_dict(d)
        except (TypeError, ValueError) as err:
            raise type(err)(f"{source}: {err}") from None


def _window(value, what: str) -> int | list[int]:
    """A window side as stored in the config: an int (square) or a list [wh, ww]."""
    if isinstance(value, (list, tuple)):
        return list(pair(value, what))
    return positive_int(value, what)


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
"""Named configs: preset name -> the CoSConfig fields it sets (the rest keep their defaults).
``CoSConfig.from_preset(name, **overrides)`` builds one; the number in a name is its visual tokens."""
