"""MLLMConfig: the whole model (vision tower, bridge, LLM) as one dataclass, with named presets."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..config import PRESETS as RESAMPLER_PRESETS
from ..config import CoSConfig
from ..config_io import DictConfig

__all__ = ["MLLMConfig", "MODEL_PRESETS", "PROJECTOR_BRIDGES", "BRIDGES", "PORT_CHOICES"]

# LLaVA's per-patch projectors; every other bridge name is a CoSConfig preset (cos-*, resampler-*).
PROJECTOR_BRIDGES = ("linear", "mlp2x_gelu")
BRIDGES = (*RESAMPLER_PRESETS, *PROJECTOR_BRIDGES)
VISION_TYPES = ("clip", "siglip")
LAYER_CONVENTIONS = ("paper", "port")
# Where the public LLaVA port of Chain-of-Sight (Skip-Vision) differs from this package's defaults:
# MLLMConfig.from_preset(name, **PORT_CHOICES) builds the port's model (docs/REFERENCE.md).
PORT_CHOICES = dict(layer_convention="port", baseline_levels=1, pos_align_corners=True)


@dataclass
class MLLMConfig(DictConfig):
    """Hyper-parameters of a CoSMLLM: ViT -> bridge -> LLaMA-architecture LLM.

    Vision tower (ignored where ``vision_path`` names a local CLIP/SigLIP checkpoint):
      vision_type "clip" | "siglip"; vision_width / vision_layers / vision_heads / vision_mlp;
      patch_size; vision_image_size, the resolution its position table was made for.
    image_size: the input resolution in pixels; when it differs from vision_image_size the position
      embeddings are interpolated bicubically. grid = image_size // patch_size.
    pos_align_corners: that interpolation with align_corners=True (the public port's) instead of
      transformers' align_corners=False (the default).
    feature_layers: the ViT layers (1-based, 1..vision_layers: layer l's output is transformers'
      hidden_states[l]) whose patch outputs feed the bridge; None picks them by layer_convention.
    layer_convention: "paper" (default), the SPEC's (round(2L/3), L-1), i.e. 16 and 23 of 24; "port",
      the public port's hidden_states[15] and [22], i.e. one earlier each. A per-patch projector takes
      the single layer L-1 (LLaVA's -2) under both.
    baseline_levels: how many of those levels a "resampler-*" baseline consumes: 2 (default, the
      same two as Chain-of-Sight's bridge) or 1 (the later one alone, the port's baseline).
    bridge: a CoSConfig preset ("cos-80", "cos-1296", "resampler-80", ...), whose window sides are
      rescaled from the preset's grid to this grid, or "linear" / "mlp2x_gelu" (LLaVA's projectors).
    bridge_dim / bridge_heads: the resampler's width and heads; bridge_norm_eps its LayerNorms'
      epsilon (checkpoints written before this field existed used 1e-6: train.checkpoint restores it).
    LLM (ignored where ``llm_path`` names a local causal-LM checkpoint): LLaMA architecture with
      llm_width / llm_layers / llm_heads / llm_kv_heads / llm_mlp / vocab_size / max_positions.
    tokenizer_path: a local tokenizer; None builds the byte-level one in-process.
    seed: random initialisation seed (each component seeded on its own, see CoSMLLM).
    """

    vision_type: str = "clip"
    vision_path: str | None = None
    vision_width: int = 1024
    vision_layers: int = 24
    vision_heads: int = 16
    vision_mlp: int = 4096
    patch_size: int = 14
    vision_image_size: int = 224
    image_size: int = 224
    pos_align_corners: bool = False
    feature_layers: list | None = None
    layer_convention: str = "paper"
    baseline_levels: int = 2
    bridge: str = "cos-80"
    bridge_dim: int = 1024
    bridge_heads: int = 16
    bridge_norm_eps: float = 1e-5
    llm_path: str | None = None
    llm_width: int = 4096
    llm_layers: int = 32
    llm_heads: int = 32
    llm_kv_heads: int = 32
    llm_mlp: int = 11008
    vocab_size: int = 32000
    max_positions: int = 4096
    tokenizer_path: str | None = None
    seed: int = 0

    def __post_init__(self):
        if self.vision_type not in VISION_TYPES:
            raise ValueError(f"MLLMConfig.vision_type must be one of {VISION_TYPES}, got {self.vision_type!r}")
        if self.bridge not in BRIDGES:
            raise ValueError(f"MLLMConfig.bridge must be one of {list(BRIDGES)}, got {self.bridge!r}")
        if self.layer_convention not in LAYER_CONVENTIONS:
            raise ValueError(f"MLLMConfig.layer_convention must be one of {list(LAYER_CONVENTIONS)}, got "
                             f"{self.layer_convention!r}")
        if isinstance(self.baseline_levels, bool) or self.baseline_levels not in (1, 2):
            raise ValueError(f"MLLMConfig.baseline_levels must be 1 or 2, got {self.baseline_levels!r}")
        if not isinstance(self.pos_align_corners, bool):
            raise TypeError(f"MLLMConfig.pos_align_corners must be a bool (True or False), got "
                            f"{self.pos_align_corners!r} ({type(self.pos_align_corners).__name__})")
        self.check_positive_reals("bridge_norm_eps")
        self.check_positive_ints(
            "vision_width", "vision_layers", "vision_heads", "vision_mlp", "patch_size", "vision_image_size",
            "image_size", "bridge_dim", "bridge_heads", "llm_width", "llm_layers", "llm_heads", "llm_kv_heads",
            "llm_mlp", "vocab_size", "max_positions",
        )
        if self.image_size % self.patch_size:
            raise ValueError(
                f"MLLMConfig.image_size = {self.image_size} must be a multiple of patch_size = {self.patch_size}"
            )
        if self.feature_layers is not None:
            self.feature_layers = list(self.feature_layers)
            if not self.feature_layers:
                raise ValueError("MLLMConfig.feature_layers must name at least one layer, got []")
            if self.vision_path is None:
                self.check_feature_layers(self.vision_layers)
        if self.is_projector and self.feature_layers is not None and len(self.feature_layers) != 1:
            raise ValueError(
                f"bridge {self.bridge!r} takes one feature layer, got feature_layers={self.feature_layers}"
            )
        if not self.is_projector:  # the preset's windows must rescale to this grid: refused now, not after a build
            self.resampler_config(self.vision_width, self.llm_width, 1)

    def check_paths(self) -> None:
        """FileNotFoundError naming the field unless each local path given exists (nothing is
        downloaded: a missing path would otherwise surface as a hub "repo id" error)."""
        for name in ("vision_path", "llm_path", "tokenizer_path"):
            value = getattr(self, name)
            if value is not None and not Path(value).exists():
                raise FileNotFoundError(f"MLLMConfig.{name} {value!r} does not exist (models and tokenizers are "
                                        f"loaded from local paths only)")

    # ---- derived ----------------------------------------------------------------------------
    @property
    def grid(self) -> int:
        """Patches per side at image_size."""
        return self.image_size // self.patch_size

    @property
    def is_projector(self) -> bool:
        return self.bridge in PROJECTOR_BRIDGES

    def layers_for(self, num_vision_layers: int) -> list[int]:
        """The feature layers for a ViT with ``num_vision_layers`` layers (defaults filled in)."""
        if self.feature_layers is not None:
            return self.check_feature_layers(num_vision_layers)
        last = max(1, num_vision_layers - 1)
        if self.is_projector:
            return [last]
        shift = 1 if self.layer_convention == "port" else 0
        layers = sorted({max(1, round(2 * num_vision_layers / 3) - shift), max(1, last - shift)})
        if self.bridge.startswith("resampler-") and self.baseline_levels == 1:
            return layers[-1:]
        return layers

    def check_feature_layers(self, num_vision_layers: int) -> list[int]:
        for layer in self.feature_layers:
            if isinstance(layer, bool) or not isinstance(layer, int) or not 1 <= layer <= num_vision_layers:
                raise ValueError(
                    f"MLLMConfig.feature_layers = {self.feature_layers}: each must be a layer 1.."
                    f"{num_vision_layers} of the ViT, got {layer!r}"
                )
        return list(self.feature_layers)

    def resampler_config(self, vision_width: int, llm_width: int, num_levels: int) -> CoSConfig:
        """The CoSConfig of the bridge preset, its window sides rescaled to this grid."""
        if self.is_projector:
            raise ValueError(f"bridge {self.bridge!r} is a per-patch projector, not a resampler")
        try:
            return CoSConfig.for_grid(
                self.bridge, self.grid, vision_dim=vision_width, dim=self.bridge_dim, num_heads=self.bridge_heads,
                llm_dim=llm_width, num_levels=num_levels, drop_cls=False, norm_eps=self.bridge_norm_eps,
            )
        except ValueError as err:
            raise ValueError(f"bridge {self.bridge!r} at image_size {self.image_size} (patch {self.patch_size}): "
                             f"{err}") from None

    # ---- presets and serialisation ----------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str, **overrides) -> "MLLMConfig":
        """A named preset (see MODEL_PRESETS), with any field overridden by keyword."""
        if name not in MODEL_PRESETS:
            raise ValueError(f"unknown model preset {name!r}; known presets: {sorted(MODEL_PRESETS)}")
        return cls.from_dict({**MODEL_PRESETS[name], **overrides})




_VIT_L14 = dict(vision_width=1024, vision_layers=24, vision_heads=16, vision_mlp=4096, patch_size=14,
                bridge_dim=1024, bridge_heads=16)
# LLaMA-2-7B (Vicuna-7B, the paper's LLM) and TinyLlama-1.1B architectures.
_LLM_7B = dict(llm_width=4096, llm_layers=32, llm_heads=32, llm_kv_heads=32, llm_mlp=11008,
               vocab_size=32000, max_positions=4096)
_LLM_1B = dict(llm_width=2048, llm_layers=22, llm_heads=32, llm_kv_heads=4, llm_mlp=5632,
               vocab_size=32000, max_positions=4096)

MODEL_PRESETS: dict[str, dict] = {
    # CPU-sized: 64 px images, 4x4 patches -> a 16x16 grid (the paper's 256 patches at 224 px, so
    # cos-80 keeps its windows [16, 4] and 80 tokens compress 256 patches).
    "tiny": dict(vision_width=64, vision_layers=6, vision_heads=4, vision_mlp=256, patch_size=4,
                 vision_image_size=64, image_size=64, bridge_dim=64, bridge_heads=4,
                 llm_width=96, llm_layers=3, llm_heads=4, llm_kv_heads=4, llm_mlp=256,
                 vocab_size=320, max_positions=2048),
    # GPU-sized proxies: CLIP ViT-L/14 (position table of the 224 px model, or the 336 px one) with
    # random weights unless vision_path / llm_path are given.
    **{
        f"vitl14-{px}-{llm}": dict(**_VIT_L14, **llm_arch, image_size=px,
                                   vision_image_size=336 if px == 336 else 224)
        for px in (224, 336, 448)
        for llm, llm_arch in (("7b", _LLM_7B), ("1b", _LLM_1B))
    },
}
