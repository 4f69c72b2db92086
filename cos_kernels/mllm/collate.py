"""CaptionCollator: dataset items -> a padded training batch for CoSMLLM."""

from __future__ import annotations

import torch

from ..validation import positive_int
from .model import IGNORE_INDEX

__all__ = ["CaptionCollator"]


class CaptionCollator:
    """Stacks images and tokenises captions as [BOS] caption [EOS], right-padded.

    Returns dict(pixel_values (B, 3, H, W), input_ids (B, S), attention_mask (B, S), labels (B, S)
    = input_ids on caption tokens and EOS, IGNORE_INDEX on BOS and padding, captions, ids, skipped:
    the ids of unreadable images skipped while loading this batch). Captions longer than
    ``max_caption_tokens`` are cut (their EOS kept).
    """

    def __init__(self, tokenizer, max_caption_tokens: int = 256):
        self.tokenizer = tokenizer
        self.max_caption_tokens = positive_int(max_caption_tokens, "max_caption_tokens")

    def __call__(self, items: list[dict]) -> dict:
        tok = self.tokenizer
        rows = [[tok.bos_id, *tok.encode(it["caption"])[: self.max_caption_tokens], tok.eos_id] for it in items]
        S = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), S), tok.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), S), dtype=torch.long)
        for i, r in enumerate(rows):
            input_ids[i, : len(r)] = torch.tensor(r)
            attention_mask[i, : len(r)] = 1
        labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
        labels[:, 0] = IGNORE_INDEX
        return dict(
            pixel_values=torch.stack([it["pixel_values"] for it in items]),
            input_ids=input_ids, attention_mask=attention_mask, labels=labels,
            captions=[it["caption"] for it in items], ids=[it["id"] for it in items],
            skipped=[s for it in items for s in it["skipped"]],
        )
