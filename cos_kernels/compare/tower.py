"""A vision tower that has learnt to see the synthetic scenes: the ViT pre-trained on dense labels.

The recipe assumes a pretrained ViT (CLIP). A randomly initialised one barely tells a shape's kind
apart (examples/TOKEN_ABLATION.md: a linear probe finds 44% for 1 in 3), so no bridge could learn the
local fields of the captions. This is the stand-in: every patch of a synthetic scene is labelled with
what covers it (background colour; shape kind or none; shape colour or none, as pixel fractions), and
the ViT with one linear head per feature layer learns to predict those labels, at each resolution the
recipes run it at (position embeddings interpolated, as the MLLM does). The result is written with
save_pretrained into a cache folder named after its recipe, so later runs reuse it: pass the returned
path as MLLMConfig.vision_path.

Scenes come from their own seed (TOWER_SEED), never the captioning runs' training or held-out scenes.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..atomic_io import atomic_dir
from ..mllm import MLLMConfig
from ..mllm.synthetic import BACKGROUNDS, COLOURS, SHAPES, label_maps, make_scene, render_scene
from ..mllm.vision import build_vit, normalise
from ..train.trainer import cosine_with_warmup
from ..validation import positive_int, positive_real

__all__ = ["TowerRecipe", "pretrain_tower", "patch_targets", "TOWER_SEED"]

TOWER_SEED = 7_000_001
RECIPE = "tower-recipe.json"
VISION_FIELDS = ("vision_type", "vision_width", "vision_layers", "vision_heads", "vision_mlp", "patch_size",
                 "vision_image_size", "feature_layers", "seed")
# label groups predicted per patch: background colour, shape kind (0: none), shape colour (0: none)
GROUPS = {"background": len(BACKGROUNDS), "kind": len(SHAPES) + 1, "colour": len(COLOURS) + 1}


@dataclass(frozen=True)
class TowerRecipe:
    """How the tower is pre-trained: ``steps`` AdamW steps of ``batch`` scenes, peak ``lr`` with a
    5% linear warm-up and cosine decay; step s shows its scenes at resolutions[s % len(resolutions)] px."""

    steps: int = 300
    batch: int = 32
    lr: float = 1e-3
    resolutions: tuple[int, ...] = (64, 128)

    def __post_init__(self):
        for name in ("steps", "batch"):  # frozen: checked, not converted
            positive_int(getattr(self, name), f"TowerRecipe.{name}")
        positive_real(self.lr, "TowerRecipe.lr")
        if not isinstance(self.resolutions, (list, tuple)) or not self.resolutions:
            raise ValueError(f"TowerRecipe.resolutions must be a non-empty tuple of positive integers, "
                             f"got {self.resolutions!r}")
        for i, r in enumerate(self.resolutions):
            positive_int(r, f"TowerRecipe.resolutions[{i}]")


def patch_targets(scenes, size: int, patch: int) -> dict[str, torch.Tensor]:
    """Soft per-patch labels of scenes rendered at ``size`` px: {group: (B, N, classes)} with
    N = (size // patch) ** 2 in raster order, each row the fraction of the patch's pixels per class."""
    kinds, colours = zip(*(label_maps(s, size) for s in scenes))
    background = torch.tensor([list(BACKGROUNDS).index(s.background) for s in scenes])
    grid = size // patch

    def fractions(maps: torch.Tensor, classes: int) -> torch.Tensor:
        one_hot = F.one_hot(maps, classes).permute(0, 3, 1, 2).float()  # (B, classes, size, size)
        return F.avg_pool2d(one_hot, patch).flatten(2).transpose(1, 2)  # (B, N, classes)

    return {"background": F.one_hot(background, GROUPS["background"]).float()[:, None].expand(-1, grid * grid, -1),
            "kind": fractions(torch.stack(kinds), GROUPS["kind"]),
            "colour": fractions(torch.stack(colours), GROUPS["colour"])}


def pretrain_tower(model_config: MLLMConfig, cache_dir: str | Path, recipe: TowerRecipe = TowerRecipe(),
                   device: str | torch.device = "cpu", log=print) -> str:
    """Pre-train the config's (random) ViT on dense labels of synthetic scenes, or reuse the cached
    result of the same recipe; returns the checkpoint folder, for MLLMConfig.vision_path."""
    if model_config.vision_path is not None:
        raise ValueError(f"pretrain_tower trains a ViT from its config; vision_path "
                         f"{model_config.vision_path!r} is already a pretrained one")
    for size in recipe.resolutions:
        if size % model_config.patch_size:
            raise ValueError(f"TowerRecipe.resolutions: {size} px is not a multiple of the patch size "
                             f"{model_config.patch_size}")
    key = json.dumps({**{k: getattr(model_config, k) for k in VISION_FIELDS}, **asdict(recipe),
                      "tower_seed": TOWER_SEED}, sort_keys=True)
    path = (Path(cache_dir) / f"tower-{hashlib.sha1(key.encode()).hexdigest()[:12]}").resolve()
    if (path / RECIPE).is_file() and (path / RECIPE).read_text() == key:
        log(f"vision tower: reusing {path}")
        return str(path)

    device = torch.device(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(model_config.seed)  # the seed CoSMLLM gives its vision tower
        vit, kind = build_vit(replace(model_config, vision_path=None))
        layers = model_config.layers_for(vit.config.num_hidden_layers)
        heads = nn.ModuleList(nn.Linear(vit.config.hidden_size, sum(GROUPS.values())) for _ in layers)
    vit.to(device).train()
    heads.to(device)
    params = [*vit.parameters(), *heads.parameters()]
    optimizer = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=0.0)
    schedule = cosine_with_warmup(max(1, recipe.steps // 20), recipe.steps)
    native, patch = vit.config.image_size, vit.config.patch_size
    log(f"vision tower: pre-training the {kind} ViT ({sum(p.numel() for p in vit.parameters()) / 1e6:.2f}M "
        f"parameters) on dense labels of synthetic scenes: {recipe.steps} steps x {recipe.batch} at "
        f"{'/'.join(map(str, recipe.resolutions))} px, heads on layers {layers}")
    start, seen = time.perf_counter(), 0
    for step in range(recipe.steps):
        for group in optimizer.param_groups:
            group["lr"] = recipe.lr * schedule(step)
        size = recipe.resolutions[step % len(recipe.resolutions)]
        scenes = [make_scene(TOWER_SEED, step * recipe.batch + i) for i in range(recipe.batch)]
        pixels = torch.stack([render_scene(s, size) for s in scenes]).to(device)
        targets = {k: v.to(device) for k, v in patch_targets(scenes, size, patch).items()}
        hidden = vit(pixel_values=normalise(pixels, kind), output_hidden_states=True,
                     interpolate_pos_encoding=size != native).hidden_states
        covered = 1 - targets["kind"][..., 0]  # (B, N): the fraction of each patch a shape covers
        weights = {"background": torch.ones_like(covered), "kind": 0.1 + covered, "colour": 0.1 + covered}
        loss = 0.0
        for layer, head in zip(layers, heads):
            logits = head(hidden[layer][:, -covered.shape[1]:]).split(list(GROUPS.values()), dim=-1)
            for (name, target), logit in zip(targets.items(), logits):
                ce = F.cross_entropy(logit.transpose(1, 2), target.transpose(1, 2), reduction="none")
                loss = loss + (ce * weights[name]).sum() / weights[name].sum() / len(layers)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seen += recipe.batch
        if step == 0 or (step + 1) % max(1, recipe.steps // 6) == 0 or step + 1 == recipe.steps:
            shape = covered > 0.5  # the last head's kind accuracy on patches mostly covered by a shape
            correct = (logits[1].argmax(-1) == targets["kind"].argmax(-1))[shape].float().mean()
            log(f"vision tower step {step + 1}/{recipe.steps}: loss {loss.item():.3f}, kind of shape patches "
                f"{correct.item():.0%} ({size} px); {seen / (time.perf_counter() - start):.0f} images/s")

    def write(tmp: Path) -> None:
        vit.save_pretrained(tmp)
        (tmp / RECIPE).write_text(key)

    atomic_dir(path, write)
    log(f"vision tower: {time.perf_counter() - start:.0f} s -> {path}")
    return str(path)
