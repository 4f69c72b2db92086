"""VisionTower: a frozen CLIP or SigLIP ViT returning the patch features of chosen layers."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from .config import MLLMConfig

__all__ = ["VisionTower", "build_vit", "normalise", "interpolate_positions"]

# Per-channel normalisation the ViTs were trained with (images arrive in [0, 1]).
_NORMALISATION = {
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    "siglip": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}


def build_vit(config: MLLMConfig) -> tuple[nn.Module, str]:
    """The transformers vision model, whole (no layer removed), and its kind ("clip" | "siglip"):
    random init from the config, or loaded from vision_path."""
    from transformers import (AutoConfig, CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig,
                              SiglipVisionModel)

    models = {"clip": CLIPVisionModel, "siglip": SiglipVisionModel}
    if config.vision_path is not None:
        model_type = AutoConfig.from_pretrained(config.vision_path, local_files_only=True).model_type
        kind = "siglip" if model_type.startswith("siglip") else "clip" if model_type.startswith("clip") else None
        if kind is None:
            raise ValueError(
                f"vision_path {config.vision_path!r} holds a {model_type!r} model; expected CLIP or SigLIP"
            )
        return models[kind].from_pretrained(config.vision_path, local_files_only=True), kind
    common = dict(hidden_size=config.vision_width, num_hidden_layers=config.vision_layers,
                  num_attention_heads=config.vision_heads, intermediate_size=config.vision_mlp,
                  image_size=config.vision_image_size, patch_size=config.patch_size)
    if config.vision_type == "clip":
        return CLIPVisionModel(CLIPVisionConfig(**common)), "clip"
    return SiglipVisionModel(SiglipVisionConfig(**common, vision_use_head=False)), "siglip"


def normalise(pixel_values: torch.Tensor, kind: str) -> torch.Tensor:
    """Images (B, 3, H, W) in [0, 1] -> the per-channel normalised input the ``kind`` ViT was trained on."""
    mean, std = (torch.tensor(v, device=pixel_values.device, dtype=pixel_values.dtype).view(1, 3, 1, 1)
                 for v in _NORMALISATION[kind])
    return (pixel_values - mean) / std


def interpolate_positions(table: torch.Tensor, grid: tuple[int, int], has_cls: bool,
                          align_corners: bool) -> torch.Tensor:
    """A ViT's position table (P, D), the CLS position first when ``has_cls``, then a square grid of
    patch positions in raster order -> (1, [1 +] GH * GW, D), the patch part resized bicubically to
    ``grid`` = (GH, GW)."""
    cls, patches = (table[:1], table[1:]) if has_cls else (table[:0], table)
    side, dim = round(patches.shape[0] ** 0.5), table.shape[1]
    square = patches.reshape(1, side, side, dim).permute(0, 3, 1, 2)
    resized = F.interpolate(square, size=grid, mode="bicubic", align_corners=align_corners)
    return torch.cat([cls, resized.permute(0, 2, 3, 1).reshape(-1, dim)]).unsqueeze(0)


def _aligned_interpolation(embeddings: nn.Module, _embedded: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """transformers' interpolate_pos_encoding(embeddings, height, width) with align_corners=True."""
    table = embeddings.position_embedding.weight
    grid = (height // embeddings.patch_size, width // embeddings.patch_size)
    return interpolate_positions(table, grid, hasattr(embeddings, "class_embedding"), align_corners=True)


class VisionTower(nn.Module):
    """Frozen ViT (both training stages keep it frozen): images -> patch features of some layers.

    forward(pixel_values (B, 3, H, W) in [0, 1], H and W multiples of patch_size)
        -> list, one (B, GH * GW, width) tensor per feature layer, CLS dropped, patches in raster order.
    At a resolution other than the ViT's own, its position embeddings are interpolated bicubically
    (align_corners=config.pos_align_corners). Layers after the last feature layer are removed: they
    would never be used.
    """

    def __init__(self, config: MLLMConfig):
        super().__init__()
        self.vit, self.kind = build_vit(config)
        vit_config = self.vit.config
        self.width = vit_config.hidden_size
        self.patch_size = vit_config.patch_size
        self.native_image_size = vit_config.image_size
        self.feature_layers = config.layers_for(vit_config.num_hidden_layers)
        self._truncate(max(self.feature_layers))
        if config.pos_align_corners:
            embeddings = self.vit.get_submodule("embeddings")
            embeddings.interpolate_pos_encoding = functools.partial(_aligned_interpolation, embeddings)
        self.requires_grad_(False)
        self.eval()

    def _truncate(self, num_layers: int) -> None:
        encoder = next(m for m in self.vit.modules() if isinstance(getattr(m, "layers", None), nn.ModuleList))
        encoder.layers = encoder.layers[:num_layers]

    def train(self, mode: bool = True) -> "VisionTower":
        """Always in eval mode: the tower is frozen."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        if pixel_values.dim() != 4 or pixel_values.shape[1] != 3:
            raise ValueError(f"pixel_values must have shape (B, 3, H, W), got {tuple(pixel_values.shape)}")
        H, W = pixel_values.shape[-2:]
        if H % self.patch_size or W % self.patch_size:
            raise ValueError(
                f"pixel_values is {H}x{W} px; both sides must be multiples of the patch size {self.patch_size}"
            )
        x = normalise(pixel_values, self.kind)
        out = self.vit(
            pixel_values=x,
            output_hidden_states=True,
            interpolate_pos_encoding=(H, W) != (self.native_image_size,) * 2,
        )
        num_patches = (H // self.patch_size) * (W // self.patch_size)
        return [out.hidden_states[layer][:, -num_patches:] for layer in self.feature_layers]
