"""Evaluation on held-out synthetic data: caption loss, exact-match accuracy of greedy captions, and
teacher-forced accuracy per caption field (background, count: global; colour, kind, position: local)."""

from __future__ import annotations

import torch

from ..mllm import IGNORE_INDEX, ByteTokenizer
from ..mllm.synthetic import FIELDS
from .distributed import DistEnv, all_reduce_max, all_reduce_sum

__all__ = ["evaluate"]


@torch.no_grad()
def evaluate(model, dataset, collator, micro_batch: int, env: DistEnv, autocast) -> dict:
    """{"caption_loss": mean per caption token, "exact_match": fraction of captions generated exactly
    (greedy, up to EOS), "samples": n, and where the dataset names its captions' fields (the synthetic
    set, byte-level tokenizer) "fields": {field: {"accuracy": fraction of its words whose every token is
    the argmax under teacher forcing, "nll": mean nats per word}}}. Every rank takes every world_size-th
    sample of the first len(dataset) // world_size * world_size, in batches of the same sizes (sharded
    models stay in step)."""
    inner = env.unwrap(model)
    was_training = inner.training
    inner.eval()
    n = len(dataset) // env.world_size * env.world_size
    if n == 0:
        raise ValueError(f"eval_samples ({len(dataset)}) must be at least the number of processes ({env.world_size})")
    by_field = hasattr(dataset, "fields") and isinstance(inner.tokenizer, ByteTokenizer)
    indices = list(range(env.rank, n, env.world_size))
    totals = torch.zeros(3, dtype=torch.float64, device=env.device)  # loss sum, tokens, exact matches
    field_totals = torch.zeros(len(FIELDS), 3, dtype=torch.float64, device=env.device)  # words, right, nll
    for start in range(0, len(indices), micro_batch):
        chunk = indices[start:start + micro_batch]
        batch = collator([dataset[i] for i in chunk])
        pixels, labels = batch["pixel_values"].to(env.device), batch["labels"].to(env.device)
        with autocast():
            nll, correct = model(pixels, batch["input_ids"].to(env.device),
                                 batch["attention_mask"].to(env.device), labels, per_token=True)
            targets = labels[:, 1:]  # caption tokens and EOS, padded with IGNORE_INDEX
            steps = targets.shape[1]
            if env.mode == "fsdp":  # sharded layers gather their weights collectively: equal step counts
                steps = int(all_reduce_max(torch.tensor(steps, device=env.device), env))
            generated = inner.generate(pixels, max_new_tokens=steps, stop_at_eos=env.mode != "fsdp")
        generated = torch.nn.functional.pad(generated, (0, steps - generated.shape[1]),
                                            value=inner.tokenizer.pad_id)[:, : targets.shape[1]]
        wanted = targets != IGNORE_INDEX
        exact = ((generated == targets) | ~wanted).all(dim=1)
        totals += torch.stack([nll.sum().double(), wanted.sum().double(), exact.sum().double()])
        if by_field:
            field_totals += _field_totals(dataset, chunk, nll.double().cpu(), correct.cpu()).to(env.device)
    all_reduce_sum(totals, env)
    inner.train(was_training)
    result = {"caption_loss": (totals[0] / totals[1]).item(), "exact_match": (totals[2] / n).item(), "samples": n}
    if by_field:
        all_reduce_sum(field_totals, env)
        result["fields"] = {f: {"accuracy": (right / words).item(), "nll": (loss / words).item()}
                            for f, (words, right, loss) in zip(FIELDS, field_totals) if words > 0}
    return result


def _field_totals(dataset, indices: list[int], nll: torch.Tensor, correct: torch.Tensor) -> torch.Tensor:
    """(len(FIELDS), 3): words, words entirely right, summed nll, over the batch's captions.
    Byte-level tokens: caption character i is input token i + 1 (after BOS)."""
    out = torch.zeros(len(FIELDS), 3, dtype=torch.float64)
    for row, index in enumerate(indices):
        for field, start, end in dataset.fields(index):
            k = FIELDS.index(field)
            out[k] += torch.stack([torch.tensor(1.0), correct[row, start + 1:end + 1].all().double(),
                                   nll[row, start + 1:end + 1].sum()])
    return out
