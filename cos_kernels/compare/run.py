"""The two recipes, run on the same data, seeds, step counts and batch.

    Chain-of-Sight: stage 1 cos-80 at the preset's resolution -> compound token scaling (resolution x2,
                    finer windows: cos-336 or cos-1296) -> stage 2, bridge + LLM trained
    baseline:       the same bridge (resampler-336, linear or mlp2x_gelu) in both stages, stage 2 at the
                    same doubled resolution (all tokens throughout)

Both recipes share the frozen components: the vision tower (pre-trained on synthetic scenes, see
tower.py, or vision_path) and the LLM (warmed up on captions, or llm_path), like CLIP and Vicuna in the
paper. A seed sets the bridge initialisation, the training data order and scenes, and the held-out
scenes, the same for every recipe. Each finished run is recorded in its folder (run.json); a rerun of
the comparison reuses the runs whose options are unchanged.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

from ..atomic_io import atomic_text
from ..mllm import MLLMConfig
from ..train.config import TrainConfig
from ..train.data import build_train_dataset
from ..train.distributed import setup_distributed
from ..train.trainer import Trainer
from ..train.trainer import check_inputs as check_run_inputs
from ..train.warmup import warm_up_llm
from .config import CompareConfig
from .probe import probe_tower
from .tower import TowerRecipe, pretrain_tower

__all__ = ["Recipe", "recipes", "check_inputs", "prepare_components", "run_recipe", "run_all", "COS"]

COS = "chain-of-sight"


@dataclass(frozen=True)
class Recipe:
    name: str
    pretrain_bridge: str
    finetune_bridge: str


def recipes(config: CompareConfig) -> list[Recipe]:
    """Chain-of-Sight first, then each baseline (its bridge in both stages)."""
    return [Recipe(COS, "cos-80", f"cos-{config.scaling}"), *(Recipe(b, b, b) for b in config.baselines)]


def stage_sizes(config: CompareConfig) -> tuple[int, int]:
    """(stage 1, stage 2) resolutions in px: the preset's, and twice it."""
    size = MLLMConfig.from_preset(config.model).image_size
    return size, 2 * size


def check_inputs(config: CompareConfig, log=print) -> None:
    """Everything the comparison takes from its user, checked before its first expensive step (the
    vision tower's pre-training): the TrainConfig of every stage, the device and the processes
    (torchrun's), then what cos-train checks of a run (train.trainer.check_inputs: the batch split,
    the backend on that device, the data file and its images) and the vision / LLM checkpoints given;
    a ValueError or OSError naming the option."""
    components = {"vision_path": config.vision_path, "llm_path": config.llm_path}
    # every stage's TrainConfig checks its options; they share the device, the batch and the data
    stages = [stage_configs(config, recipe, seed, components) for seed in config.seeds for recipe in recipes(config)]
    first = stages[0][0]
    check_run_inputs(first, setup_distributed(first), log)
    MLLMConfig.from_preset(config.model, **components).check_paths()


def prepare_components(config: CompareConfig, log=print) -> dict:
    """The shared frozen parts: {"vision_path", "llm_path", "probe": {px: {"random": {...}, "tower":
    {...}}} (linear-probe accuracies of the random and the used tower, where the tower is pre-trained
    here), "seconds"}."""
    start = time.perf_counter()
    model_config = MLLMConfig.from_preset(config.model, seed=0)
    sizes = stage_sizes(config)
    out = {"vision_path": config.vision_path, "llm_path": config.llm_path, "probe": {}}
    if config.vision_path is None:
        # trained at the stage-1 resolution only, like CLIP at 224 px used at 448 px in the paper
        recipe = TowerRecipe(steps=config.tower_steps, batch=config.tower_batch, resolutions=sizes[:1])
        out["vision_path"] = pretrain_tower(model_config, config.cache, recipe, config.device, log)
        for size in sizes:  # are the local fields visible in the features at all?
            scores = _probe(model_config, out["vision_path"], size, config.probe_scenes)
            out["probe"][size] = scores
            log(f"linear probe at {size} px, accuracy over occupied cells (chance: kind 33%, colour 20%): "
                f"random ViT kind {scores['random']['kind']:.0%} colour {scores['random']['colour']:.0%}; "
                f"pre-trained tower kind {scores['tower']['kind']:.0%} colour {scores['tower']['colour']:.0%}")
    if config.llm_path is None and config.llm_warmup_steps:
        train = _train_config(config, seed=0, stage="pretrain", out_dir=str(config.cache))
        env = setup_distributed(train)
        warmed = warm_up_llm(model_config, build_train_dataset(train, sizes[0]), config.llm_warmup_steps,
                             config.cache / f"llm-{config.model}", env, log)
        out["llm_path"] = warmed.llm_path
    out["seconds"] = time.perf_counter() - start
    return out


def _probe(model_config: MLLMConfig, vision_path: str, size: int, scenes: int) -> dict:
    """{"random": ..., "tower": ...} probe_tower accuracies of the random and the pre-trained tower,
    kept beside the tower (the same tower, size and scene count: the same result)."""
    cached = Path(vision_path) / f"probe-{size}px-{scenes}-scenes.json"
    if cached.is_file():
        return json.loads(cached.read_text())
    split = (scenes, max(1, scenes // 3))
    scores = {"random": probe_tower(model_config, size, *split),
              "tower": probe_tower(replace(model_config, vision_path=vision_path), size, *split)}
    atomic_text(cached, json.dumps(scores))
    return scores


def _train_config(config: CompareConfig, seed: int, **fields) -> TrainConfig:
    return TrainConfig(device=config.device, precision=config.precision, backend=config.backend, seed=seed, resume="auto",
                       global_batch=config.global_batch, micro_batch=config.micro_batch, data=config.data,
                       image_folder=config.image_folder, train_samples=config.train_samples,
                       log_every=config.log_every, **fields)


def stage_configs(config: CompareConfig, recipe: Recipe, seed: int, components: dict) -> tuple[TrainConfig, TrainConfig]:
    """The TrainConfigs of the recipe's two stages for ``seed``; resume="auto": a stage stopped by a
    signal continues from its checkpoint when the comparison is run again."""
    run_dir = Path(config.out_dir) / recipe.name / f"seed-{seed}"
    pre = _train_config(config, seed, stage="pretrain", model=config.model, bridge=recipe.pretrain_bridge,
                        vision_path=components["vision_path"], llm_path=components["llm_path"],
                        llm_warmup_steps=0, steps=config.pretrain_steps, lr=config.pretrain_lr, eval_samples=0,
                        out_dir=str(run_dir / "pretrain"))
    fine = _train_config(config, seed, stage="finetune", init_from=pre.out_dir, bridge=recipe.finetune_bridge,
                         image_size=stage_sizes(config)[1], steps=config.finetune_steps, lr=config.finetune_lr,
                         eval_samples=config.eval_samples, out_dir=str(run_dir / "finetune"))
    return pre, fine


def _curve(run_dir: str) -> list[list[float]]:
    """[[step, mean training loss since the previous point], ...] from the run's metrics.jsonl."""
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [[r["step"], r["loss"]] for r in map(json.loads, lines)]


_KEPT = ("train_time_s", "samples", "samples_per_s", "tokens_per_sample", "time_split", "flops_per_sample",
         "loss_first", "loss_last", "eval", "bridge", "image_size")


def run_recipe(config: CompareConfig, recipe: Recipe, seed: int, components: dict, log=print) -> dict:
    """Both stages of ``recipe`` for ``seed`` (or the recorded result of an identical earlier run):
    {"recipe", "seed", "pretrain": {...}, "finetune": {...}} with each stage's summary fields
    (train_time_s: the measured training-loop time), its wall time and its loss curve."""
    pre, fine = stage_configs(config, recipe, seed, components)
    record_path = Path(pre.out_dir).parent / "run.json"
    configs = {"pretrain": pre.to_dict(), "finetune": fine.to_dict()}
    if record_path.is_file():
        record = json.loads(record_path.read_text())
        if record.get("configs") == configs:
            log(f"{recipe.name} seed {seed}: reusing the finished run {record_path.parent}")
            return record["result"]
    result = {"recipe": recipe.name, "seed": seed}
    for stage, train in (("pretrain", pre), ("finetune", fine)):
        start = time.perf_counter()
        summary = Trainer(train, log=log).fit()
        result[stage] = {k: summary[k] for k in _KEPT} | {"wall_s": time.perf_counter() - start,
                                                          "curve": _curve(train.out_dir)}
    atomic_text(record_path, json.dumps({"configs": configs, "result": result}, indent=1))
    return result


def run_all(config: CompareConfig, log=print) -> tuple[dict, list[dict]]:
    """The shared components, then every (seed, recipe) run, seeds outermost so that a partial
    comparison already has every recipe; progress lines with elapsed time and an estimate of the rest.
    The inputs are checked first (check_inputs)."""
    check_inputs(config, log)
    components = prepare_components(config, log)
    plan = [(seed, recipe) for seed in config.seeds for recipe in recipes(config)]
    results, start = [], time.perf_counter()
    for k, (seed, recipe) in enumerate(plan):
        elapsed = time.perf_counter() - start
        eta = f", about {elapsed / k * (len(plan) - k) / 60:.0f} min left" if k else ""
        log(f"== run {k + 1}/{len(plan)}: {recipe.name} ({recipe.pretrain_bridge} -> {recipe.finetune_bridge}), "
            f"seed {seed}; {elapsed / 60:.1f} min so far{eta}")
        results.append(run_recipe(config, recipe, seed, components, log))
    return components, results
