"""Linear probe: can the vision tower's features tell what each cell of a synthetic scene holds?

Each scene has nine cells (the 3x3 layout its captions name). A cell's feature is the mean of the
frozen tower's last-feature-layer patch features whose centres lie in the cell; a multinomial logistic
regression on those features, fitted on some scenes and scored on others, predicts the cell's shape
kind (or empty) and its colour (or empty). Chance among occupied cells: 1 in 3 for kind, 1 in 5 for
colour. This says whether the local caption fields are learnable from the features at all, before
any bridge is trained on them.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F

from ..mllm import MLLMConfig, VisionTower
from ..mllm.synthetic import COLOURS, SHAPES, make_scene, render_scene

__all__ = ["probe_tower", "cell_features", "PROBE_SEED"]

PROBE_SEED = 8_000_009


@torch.no_grad()
def cell_features(tower: VisionTower, scenes, image_size: int, batch: int = 64) -> torch.Tensor:
    """(len(scenes), 9, width): per scene and cell (raster order), the mean patch feature of the
    tower's last feature layer over the patches whose centres lie in the cell."""
    grid = image_size // tower.patch_size
    centres = (torch.arange(grid) + 0.5) / grid
    band = (centres * 3).long()  # row / column band 0..2 of each patch
    cell = (band[:, None] * 3 + band[None, :]).flatten()  # (N,) the cell of each patch, raster order
    pool = F.one_hot(cell, 9).float()
    pool = pool / pool.sum(0, keepdim=True)  # (N, 9) averaging weights
    out = []
    for start in range(0, len(scenes), batch):
        pixels = torch.stack([render_scene(s, image_size) for s in scenes[start:start + batch]])
        features = tower(pixels)[-1].float()  # (b, N, width)
        out.append(torch.einsum("bnc,nk->bkc", features, pool))
    return torch.cat(out)


def _cell_labels(scenes) -> tuple[torch.Tensor, torch.Tensor]:
    """(S, 9) kind and colour per cell, 0 for an empty cell, k + 1 for SHAPES[k] / colour k."""
    kind = torch.zeros(len(scenes), 9, dtype=torch.long)
    colour = torch.zeros(len(scenes), 9, dtype=torch.long)
    for i, scene in enumerate(scenes):
        for s in scene.shapes:
            kind[i, s.cell] = SHAPES.index(s.kind) + 1
            colour[i, s.cell] = list(COLOURS).index(s.colour) + 1
    return kind, colour


def _fit_and_score(x_train, y_train, x_test, y_test, classes: int, iterations: int = 200) -> float:
    """Accuracy on the test cells that hold a shape, of an L2-regularised softmax regression."""
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    linear = torch.nn.Linear(x_train.shape[1], classes)
    optimizer = torch.optim.LBFGS(linear.parameters(), max_iter=iterations, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(linear(x_train), y_train) + 1e-3 * linear.weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    with torch.no_grad():
        occupied = y_test > 0
        return (linear(x_test).argmax(-1) == y_test)[occupied].float().mean().item()


def probe_tower(model_config: MLLMConfig, image_size: int, train_scenes: int = 1000, test_scenes: int = 300) -> dict:
    """{"kind": accuracy, "colour": accuracy} over occupied held-out cells, of linear probes on the
    tower of ``model_config`` (its vision_path, or its random initialisation) at ``image_size`` px."""
    tower = VisionTower(replace(model_config, image_size=image_size))
    scenes = [make_scene(PROBE_SEED, i) for i in range(train_scenes + test_scenes)]
    features = cell_features(tower, scenes, image_size).flatten(0, 1)  # (S * 9, width)
    kind, colour = (labels.flatten() for labels in _cell_labels(scenes))
    split = train_scenes * 9
    return {name: _fit_and_score(features[:split], labels[:split], features[split:], labels[split:], classes)
            for name, labels, classes in (("kind", kind, len(SHAPES) + 1), ("colour", colour, len(COLOURS) + 1))}
