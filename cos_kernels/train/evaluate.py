"""Evaluation on held-out synthetic data: caption loss and exact-match accuracy of greedy captions."""

from __future__ import annotations

import torch

from ..mllm import IGNORE_INDEX
from .distributed import DistEnv, all_reduce_max, all_reduce_sum

__all__ = ["evaluate"]


@torch.no_grad()
def evaluate(model, dataset, collator, micro_batch: int, env: DistEnv, autocast) -> dict:
    """{"caption_loss": mean per caption token, "exact_match": fraction of captions generated exactly
    (greedy, up to EOS), "samples": n}. Every rank takes every world_size-th sample of the first
    len(dataset) // world_size * world_size, in batches of the same sizes (sharded models stay in step)."""
    inner = env.unwrap(model)
    was_training = inner.training
    inner.eval()
    n = len(dataset) // env.world_size * env.world_size
    if n == 0:
        raise ValueError(f"eval_samples ({len(dataset)}) must be at least the number of processes ({env.world_size})")
    indices = list(range(env.rank, n, env.world_size))
    totals = torch.zeros(3, dtype=torch.float64, device=env.device)  # loss sum, tokens, exact matches
    for start in range(0, len(indices), micro_batch):
        batch = collator([dataset[i] for i in indices[start:start + micro_batch]])
        pixels, labels = batch["pixel_values"].to(env.device), batch["labels"].to(env.device)
        with autocast():
            loss_sum, count = model(pixels, batch["input_ids"].to(env.device),
                                    batch["attention_mask"].to(env.device), labels)
            targets = labels[:, 1:]  # caption tokens and EOS, padded with IGNORE_INDEX
            steps = targets.shape[1]
            if env.mode == "fsdp":  # sharded layers gather their weights collectively: equal step counts
                steps = int(all_reduce_max(torch.tensor(steps, device=env.device), env))
            generated = inner.generate(pixels, max_new_tokens=steps, stop_at_eos=env.mode != "fsdp")
        generated = torch.nn.functional.pad(generated, (0, steps - generated.shape[1]),
                                            value=inner.tokenizer.pad_id)[:, : targets.shape[1]]
        wanted = targets != IGNORE_INDEX
        exact = ((generated == targets) | ~wanted).all(dim=1)
        totals += torch.stack([loss_sum.double(), count.double(), exact.sum().double()])
    all_reduce_sum(totals, env)
    inner.train(was_training)
    return {"caption_loss": (totals[0] / totals[1]).item(), "exact_match": (totals[2] / n).item(), "samples": n}
