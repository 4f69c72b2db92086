"""A synthetic image-caption dataset whose captions need the global picture and local detail.

Each image is a plain background (global: its colour) with one to three small shapes, each in its
own cell of a 3x3 layout (local: shape, colour, position), e.g.
    "two shapes on a gray background: a red circle at top left, a blue triangle at bottom right."
Scenes are drawn from (seed, index) alone and rendered analytically at any resolution, so the same
scene can be shown at 224 px for pre-training and at 448 px for fine-tuning.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from ..validation import positive_int

__all__ = ["FIELDS", "Scene", "SyntheticCaptions", "label_maps", "make_scene", "render_scene"]

BACKGROUNDS = {"black": (0.05, 0.05, 0.05), "gray": (0.5, 0.5, 0.5), "white": (0.95, 0.95, 0.95)}
COLOURS = {"red": (0.9, 0.1, 0.1), "green": (0.1, 0.75, 0.2), "blue": (0.15, 0.25, 0.95),
           "yellow": (0.95, 0.85, 0.1), "purple": (0.6, 0.2, 0.8)}
SHAPES = ("circle", "square", "triangle")
POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
COUNTS = ("one shape", "two shapes", "three shapes")
FIELDS = ("count", "background", "colour", "kind", "position")  # the caption's content words (Scene.fields)


@dataclass(frozen=True)
class Shape:
    """A shape centred at (x, y) with radius r, all as fractions of the image side."""

    kind: str
    colour: str
    cell: int  # 0..8, raster order over the 3x3 layout (POSITIONS)
    x: float
    y: float
    r: float


@dataclass(frozen=True)
class Scene:
    background: str
    shapes: tuple[Shape, ...]  # in cell order

    @property
    def caption(self) -> str:
        return "".join(text for text, _ in self._pieces())

    @property
    def fields(self) -> list[tuple[str, int, int]]:
        """The caption's content words as (field, start, end) character spans, field one of FIELDS:
        "count" and "background" (global), "colour", "kind" and "position" (one each per shape)."""
        spans, at = [], 0
        for text, field in self._pieces():
            if field is not None:
                spans.append((field, at, at + len(text)))
            at += len(text)
        return spans

    def _pieces(self) -> list[tuple[str, str | None]]:
        """The caption as consecutive (text, field or None) pieces."""
        pieces = [(COUNTS[len(self.shapes) - 1], "count"), (" on a ", None), (self.background, "background"),
                  (" background: ", None)]
        for i, s in enumerate(self.shapes):
            pieces += [(", " if i else "", None), ("a ", None), (s.colour, "colour"), (" ", None),
                       (s.kind, "kind"), (" at ", None), (POSITIONS[s.cell], "position")]
        return [*pieces, (".", None)]


def make_scene(seed: int, index: int) -> Scene:
    """The scene of sample ``index`` of the dataset with ``seed``."""
    rng = np.random.default_rng([seed, index])
    background = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    cells = sorted(rng.choice(9, size=rng.integers(1, 4), replace=False).tolist())
    shapes = []
    for cell in cells:
        row, col = divmod(cell, 3)
        shapes.append(Shape(
            kind=SHAPES[rng.integers(len(SHAPES))],
            colour=list(COLOURS)[rng.integers(len(COLOURS))],
            cell=cell,
            x=(col + 0.5 + rng.uniform(-0.15, 0.15)) / 3,
            y=(row + 0.5 + rng.uniform(-0.15, 0.15)) / 3,
            r=rng.uniform(0.07, 0.1),
        ))
    return Scene(background, tuple(shapes))


def _shape_masks(scene: Scene, size: int):
    """(shape, boolean mask (size, size)) for each shape in drawing order; pixel centres are sampled."""
    centres = (np.arange(size) + 0.5) / size
    y, x = np.meshgrid(centres, centres, indexing="ij")
    for s in scene.shapes:
        dx, dy = x - s.x, y - s.y
        if s.kind == "circle":
            mask = dx**2 + dy**2 <= s.r**2
        elif s.kind == "square":
            mask = (np.abs(dx) <= s.r) & (np.abs(dy) <= s.r)
        else:  # triangle pointing up: apex at y - r, base of half-width r at y + r
            mask = (np.abs(dy) <= s.r) & (np.abs(dx) <= (dy + s.r) / 2)
        yield s, mask


def render_scene(scene: Scene, size: int) -> torch.Tensor:
    """The scene as an image (3, size, size) with values in [0, 1]; pixel centres are sampled."""
    image = np.empty((size, size, 3), dtype=np.float32)
    image[:] = BACKGROUNDS[scene.background]
    for s, mask in _shape_masks(scene, size):
        image[mask] = COLOURS[s.colour]
    return torch.from_numpy(image).permute(2, 0, 1).contiguous()


def label_maps(scene: Scene, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What each pixel of render_scene(scene, size) shows: (kind, colour), each (size, size) int64;
    0 is background, kind k + 1 is SHAPES[k], colour c + 1 is list(COLOURS)[c]."""
    kind = np.zeros((size, size), dtype=np.int64)
    colour = np.zeros((size, size), dtype=np.int64)
    for s, mask in _shape_masks(scene, size):
        kind[mask] = SHAPES.index(s.kind) + 1
        colour[mask] = list(COLOURS).index(s.colour) + 1
    return torch.from_numpy(kind), torch.from_numpy(colour)


class SyntheticCaptions(Dataset):
    """``num_samples`` scenes of ``seed`` at ``image_size`` px. Items: dict(pixel_values (3, H, W)
    in [0, 1], caption str, id str, skipped list of ids that could not be loaded (always empty here))."""

    def __init__(self, num_samples: int, image_size: int, seed: int = 0):
        self.num_samples = positive_int(num_samples, "num_samples")
        self.image_size = positive_int(image_size, "image_size")
        self.seed = seed

    def __len__(self) -> int:
        return self.num_samples

    def caption(self, index: int) -> str:
        """The caption of item ``index`` alone (no image rendered)."""
        return make_scene(self.seed, index).caption

    def fields(self, index: int) -> list[tuple[str, int, int]]:
        """The content-word spans of item ``index``'s caption (Scene.fields)."""
        return make_scene(self.seed, index).fields

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} samples")
        scene = make_scene(self.seed, index)
        return dict(pixel_values=render_scene(scene, self.image_size), caption=scene.caption,
                    id=f"synthetic-{self.seed}-{index}", skipped=[])
