"""A reader for LLaVA's pre-training data: a JSON list of {id, image, conversations} + an image folder.

    [{"id": "004539375", "image": "00453/004539375.jpg",
      "conversations": [{"from": "human", "value": "<image>\\nRender a clear and concise summary."},
                        {"from": "gpt", "value": "select luxury furniture 3 - inch gel memory foam"}]}]

The caption is the first "gpt" turn (LLaVA's "plain" template drops the instruction). An image that
is missing or cannot be decoded is skipped and counted: the item at the next readable index takes its
place and lists the skipped ids, so batches keep their size and no worker crashes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

__all__ = ["LlavaPretrainDataset", "load_image"]


def load_image(path: str | Path, size: int) -> torch.Tensor:
    """An RGB image file -> (3, size, size) in [0, 1]: shorter side resized (bicubic) to ``size``,
    then centre-cropped."""
    with Image.open(path) as img:
        img = img.convert("RGB")
        w, h = img.size
        scale = size / min(w, h)
        img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
        left, top = (img.width - size) // 2, (img.height - size) // 2
        img = img.crop((left, top, left + size, top + size))
        array = np.asarray(img, dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def _caption(entry, i: int, path: Path) -> tuple[str, str, str]:
    """(id, image, caption) of entry i, or a ValueError naming what is wrong with it."""
    where = f"{path}: entry {i}"
    if not isinstance(entry, dict):
        raise ValueError(f"{where} must be an object with id, image, conversations; got {type(entry).__name__}")
    missing = [k for k in ("image", "conversations") if k not in entry]
    if missing:
        raise ValueError(f"{where} (id {entry.get('id')!r}) lacks {missing}; expected id, image, conversations")
    turns = entry["conversations"]
    captions = [t.get("value") for t in turns if isinstance(t, dict) and t.get("from") == "gpt"] \
        if isinstance(turns, list) else []
    if not captions or not isinstance(captions[0], str):
        raise ValueError(f"{where} (id {entry.get('id')!r}): conversations has no 'gpt' turn with a text value")
    return str(entry.get("id", i)), str(entry["image"]), captions[0].strip()


class LlavaPretrainDataset(Dataset):
    """Items: dict(pixel_values (3, image_size, image_size) in [0, 1], caption, id, skipped ids)."""

    def __init__(self, json_path: str | Path, image_folder: str | Path, image_size: int):
        self.json_path, self.image_folder, self.image_size = Path(json_path), Path(image_folder), image_size
        try:
            entries = json.loads(self.json_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(
                f"{self.json_path} is not valid JSON (line {err.lineno}, column {err.colno}: {err.msg}); "
                f"expected LLaVA's format, a list of {{id, image, conversations}}"
            ) from None
        if not isinstance(entries, list) or not entries:
            raise ValueError(
                f"{self.json_path} must hold a non-empty JSON list of {{id, image, conversations}}, "
                f"got {type(entries).__name__}{' (empty)' if entries == [] else ''}"
            )
        self.samples = [_caption(e, i, self.json_path) for i, e in enumerate(entries)]
        if not self.image_folder.is_dir():
            raise ValueError(f"image_folder {str(self.image_folder)!r} is not a directory")

    def __len__(self) -> int:
        return len(self.samples)

    def caption(self, index: int) -> str:
        """The caption of item ``index`` alone (no image read)."""
        return self.samples[index][2]

    def __getitem__(self, index: int) -> dict:
        skipped = []
        for k in range(len(self.samples)):
            sample_id, image, caption = self.samples[(index + k) % len(self.samples)]
            try:
                pixels = load_image(self.image_folder / image, self.image_size)
            except (OSError, UnidentifiedImageError, ValueError):
                skipped.append(sample_id)
                continue
            return dict(pixel_values=pixels, caption=caption, id=sample_id, skipped=skipped)
        raise RuntimeError(f"none of the {len(self.samples)} images listed in {self.json_path} could be read")
