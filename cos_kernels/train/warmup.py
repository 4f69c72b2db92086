"""Caption-only language-model warm-up of a randomly initialised LLM.

The recipe starts from a pretrained LLM (Vicuna-7B). Without one, e.g. the tiny preset on a laptop,
a frozen random LLM cannot learn anything from the visual tokens, so the loss would barely move.
A few hundred next-token steps on the training captions (no images) stand in for that pretraining.
The result is saved with save_pretrained and used through MLLMConfig.llm_path, so checkpoints
keep rebuilding the frozen LLM from the config.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import torch

from ..atomic_io import atomic_dir
from ..mllm import MLLMConfig, build_llm, load_tokenizer
from ..mllm.collate import CaptionCollator
from .distributed import DistEnv

__all__ = ["warm_up_llm"]

BATCH, PEAK_LR = 8, 3e-3
RECIPE = "warmup-recipe.json"


def warm_up_llm(model_config: MLLMConfig, captions, steps: int, run_dir: Path, env: DistEnv, log=print) -> MLLMConfig:
    """Train the config's random LLM for ``steps`` steps on ``captions`` (a dataset with
    ``caption(index)``) on rank 0, save it under run_dir/llm-warmup with its recipe (a later run
    with the same recipe reuses it) and return the config pointing llm_path there."""
    path = (run_dir / "llm-warmup").resolve()
    llm_fields = ("llm_width", "llm_layers", "llm_heads", "llm_kv_heads", "llm_mlp", "vocab_size",
                  "max_positions", "tokenizer_path", "seed")
    recipe = json.dumps({**{k: getattr(model_config, k) for k in llm_fields}, "steps": steps,
                         "captions": [captions.caption(i) for i in range(min(4, len(captions)))]})
    done = (path / RECIPE).is_file() and (path / RECIPE).read_text() == recipe
    if env.is_main and not done:
        tokenizer = load_tokenizer(model_config.tokenizer_path)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(model_config.seed + 2)  # the seed CoSMLLM gives its LLM
            llm = build_llm(model_config, tokenizer).to(env.device)
        collate = CaptionCollator(tokenizer)
        optimizer = torch.optim.AdamW(llm.parameters(), lr=PEAK_LR, weight_decay=0.0)
        order = torch.randperm(len(captions), generator=torch.Generator().manual_seed(model_config.seed))
        for step in range(steps):
            for group in optimizer.param_groups:
                group["lr"] = PEAK_LR * 0.5 * (1 + math.cos(math.pi * step / steps))
            idx = order[(step * BATCH + torch.arange(BATCH)) % len(captions)].tolist()
            batch = collate([dict(caption=captions.caption(i), pixel_values=torch.zeros(0), id="", skipped=[])
                             for i in idx])
            out = llm(input_ids=batch["input_ids"].to(env.device),
                      attention_mask=batch["attention_mask"].to(env.device), labels=batch["labels"].to(env.device))
            out.loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if step == 0 or (step + 1) % max(1, steps // 4) == 0:
                log(f"llm warm-up step {step + 1}/{steps}: caption-only loss {out.loss.item():.3f}")
        def write(tmp: Path) -> None:
            llm.save_pretrained(tmp)
            (tmp / RECIPE).write_text(recipe)

        atomic_dir(path, write)
    env.barrier()
    return replace(model_config, llm_path=str(path))
