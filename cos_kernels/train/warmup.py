"""Caption-only language-model warm-up of a randomly initialised LLM.

The recipe starts from a pretrained LLM (Vicuna-7B). Without one, e.g. the tiny preset on a laptop,
a frozen random LLM cannot learn anything from the visual tokens, so the loss would barely move.
A few hundred next-token steps on the training captions (no images) stand in for that pretraining.
The result is saved with save_pretrained and used through MLLMConfig.llm_path, so checkpoints
keep rebuilding the frozen LLM from the config.

    <run>/llm-warmup/           the finished warm-up: the LLM (save_pretrained) and RECIPE, written
                                last, so a directory with the same recipe is a finished warm-up
    <run>/llm-warmup.partial/   a warm-up stopped by SIGINT / SIGTERM: PARTIAL_STATE holds the recipe,
                                the steps done, the LLM's and the optimizer's states; the next run with
                                the same recipe continues from it (to the same result as one run),
                                and removes it once the warm-up is finished
Stopping works as in training (stopping.StopSignals): the current step finishes, the state is
written, TrainingStopped is raised naming how to resume.
"""

from __future__ import annotations

import json
import math
import pickle
import shutil
import signal
from dataclasses import replace
from pathlib import Path

import torch

from ..atomic_io import atomic_dir
from ..mllm import MLLMConfig, build_llm, load_tokenizer
from ..mllm.collate import CaptionCollator
from .distributed import DistEnv, all_reduce_max
from .stopping import StopSignals, TrainingStopped

__all__ = ["warm_up_llm"]

BATCH, PEAK_LR = 8, 3e-3
RECIPE = "warmup-recipe.json"
PARTIAL_SUFFIX, PARTIAL_STATE = ".partial", "warmup-state.pt"


def warm_up_llm(model_config: MLLMConfig, captions, steps: int, run_dir: Path, env: DistEnv, log=print,
                resume_hint: str = "the same command") -> MLLMConfig:
    """Train the config's random LLM for ``steps`` steps on ``captions`` (a dataset with
    ``caption(index)``) on rank 0, save it under run_dir/llm-warmup with its recipe (a later run
    with the same recipe reuses it) and return the config pointing llm_path there.

    SIGINT / SIGTERM: the current step finishes, its state is saved in run_dir/llm-warmup.partial,
    TrainingStopped is raised on every rank, its message ending in ``resume_hint``."""
    path = (run_dir / "llm-warmup").resolve()
    llm_fields = ("llm_width", "llm_layers", "llm_heads", "llm_kv_heads", "llm_mlp", "vocab_size",
                  "max_positions", "tokenizer_path", "seed")
    recipe = json.dumps({**{k: getattr(model_config, k) for k in llm_fields}, "steps": steps,
                         "captions": [captions.caption(i) for i in range(min(4, len(captions)))]})
    done = (path / RECIPE).is_file() and (path / RECIPE).read_text() == recipe
    with StopSignals() as signals:
        trained = 0  # the other ranks wait for rank 0's warm-up
        if env.is_main:
            trained = steps if done else _train(model_config, captions, steps, recipe, path, env, log, signals)
        env.barrier()
        signum, trained = all_reduce_max(torch.tensor([signals.signum, trained], device=env.device), env).tolist()
    if signum:
        name = signal.Signals(signum).name
        if trained < steps:
            raise TrainingStopped(f"stopped by {name} during the LLM warm-up after step {trained} of {steps}; its "
                                  f"state is saved in {_partial(path)}; resume with: {resume_hint} (the warm-up "
                                  f"continues from step {trained})", signum)
        raise TrainingStopped(f"stopped by {name} after the LLM warm-up (saved in {path}); resume with: "
                              f"{resume_hint}", signum)
    return replace(model_config, llm_path=str(path))


def _partial(path: Path) -> Path:
    return path.with_name(path.name + PARTIAL_SUFFIX)


def _train(model_config: MLLMConfig, captions, steps: int, recipe: str, path: Path, env: DistEnv, log,
           signals: StopSignals) -> int:
    """The warm-up's steps from where a stopped one left off; returns the steps done (``steps``
    when finished and saved in ``path``, fewer when stopped and saved in its partial directory)."""
    tokenizer = load_tokenizer(model_config.tokenizer_path)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(model_config.seed + 2)  # the seed CoSMLLM gives its LLM
        llm = build_llm(model_config, tokenizer).to(env.device)
    collate = CaptionCollator(tokenizer)
    optimizer = torch.optim.AdamW(llm.parameters(), lr=PEAK_LR, weight_decay=0.0)
    start = _load_partial(_partial(path), recipe, llm, optimizer, log)
    order = torch.randperm(len(captions), generator=torch.Generator().manual_seed(model_config.seed))
    for step in range(start, steps):
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
        if signals.signum and step + 1 < steps:
            state = {"recipe": recipe, "step": step + 1, "llm": llm.state_dict(), "optimizer": optimizer.state_dict()}
            atomic_dir(_partial(path), lambda tmp: torch.save(state, tmp / PARTIAL_STATE))
            return step + 1

    def write(tmp: Path) -> None:
        llm.save_pretrained(tmp)
        (tmp / RECIPE).write_text(recipe)

    atomic_dir(path, write)
    shutil.rmtree(_partial(path), ignore_errors=True)
    return steps


def _load_partial(partial: Path, recipe: str, llm, optimizer, log) -> int:
    """The step a stopped warm-up of this recipe reached, its LLM and optimizer states loaded; 0 (a
    fresh start) where there is none, or one of another recipe or unreadable (said in the log)."""
    if not (partial / PARTIAL_STATE).is_file():
        return 0
    try:
        state = torch.load(partial / PARTIAL_STATE, weights_only=True, map_location="cpu")
        saved_recipe, step = state["recipe"], state["step"]
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, KeyError, TypeError) as err:
        log(f"warning: {partial / PARTIAL_STATE} cannot be read ({str(err).splitlines()[0]}): the LLM warm-up "
            f"starts again from step 0")
        return 0
    if saved_recipe != recipe:
        log(f"note: {partial} holds a stopped LLM warm-up of another recipe: this one starts from step 0")
        return 0
    llm.load_state_dict(state["llm"])
    optimizer.load_state_dict(state["optimizer"])
    log(f"resuming the LLM warm-up at step {step} from {partial}")
    return step
