"""Do more and finer visual tokens help on the synthetic captions? A same-budget bridge ablation, tiny preset.

    python examples/token_ablation.py [--bridges blind cos-80 resampler-80 cos-336 linear]
        [--pretrain-steps 200] [--finetune-steps 400] [--threads 2] [--out-dir DIR]

Every bridge gets the same recipe, seed and data order:
  0. one caption-only LLM warm-up (the tiny preset's stand-in for a pretrained LLM), shared by all runs;
  1. stage "pretrain": ViT and LLM frozen, the bridge trained (--pretrain-steps);
  2. stage "finetune" from that checkpoint at the same resolution and bridge (no token scaling), with
     bridge + LLM trained (--finetune-steps, --finetune-lr), so the LLM can learn to use the visual tokens.
Each run is evaluated on the same held-out synthetic scenes (another seed): caption loss per token and
exact match of greedy captions. "blind" is cos-80 trained and evaluated on blank (all-zero) images: the
text-only floor, what the LLM gets from the caption prior alone.

The synthetic captions (cos_kernels/mllm/synthetic.py) name the background colour (global), and for each
of 1-3 small shapes its colour, kind and 3x3 cell (local detail), so a lower loss than "blind" means the
visual tokens are used, and a lower loss for local windows / more tokens means finer tokens help.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bridges", nargs="+", default=["blind", "resampler-80", "cos-80", "cos-336", "linear"],
                   help="bridges to compare ('blind': cos-80 on blank images)")
    p.add_argument("--pretrain-steps", type=int, default=200)
    p.add_argument("--finetune-steps", type=int, default=400)
    p.add_argument("--finetune-lr", type=float, default=5e-4,
                   help="peak lr of the finetune stage (the CLI default 2e-5 is for a 7B LLM)")
    p.add_argument("--llm-warmup-steps", type=int, default=200)
    p.add_argument("--global-batch", type=int, default=8)
    p.add_argument("--eval-samples", type=int, default=64)
    p.add_argument("--train-samples", type=int, default=100_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch / OpenMP threads")
    p.add_argument("--out-dir", default=None, help="run directories (default: a fresh temporary directory)")
    p.add_argument("--json", default=None, help="also write the results as JSON here")
    return p.parse_args(argv)


ARGS = parse_args()
os.environ.setdefault("OMP_NUM_THREADS", str(ARGS.threads))
os.environ.setdefault("MKL_NUM_THREADS", str(ARGS.threads))

import torch  # noqa: E402  (after the thread settings)

from cos_kernels.mllm import MLLMConfig  # noqa: E402
from cos_kernels.mllm.synthetic import FIELDS  # noqa: E402
from cos_kernels.train import trainer as trainer_module  # noqa: E402
from cos_kernels.train.config import TrainConfig  # noqa: E402
from cos_kernels.train.data import build_train_dataset  # noqa: E402
from cos_kernels.train.distributed import setup_distributed  # noqa: E402
from cos_kernels.train.trainer import Trainer  # noqa: E402
from cos_kernels.train.warmup import warm_up_llm  # noqa: E402


def log(msg: str) -> None:
    print(msg, flush=True)


class BlankImages(torch.utils.data.Dataset):
    """The same captions with every image replaced by zeros: no visual information."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def caption(self, index):
        return self.dataset.caption(index)

    def fields(self, index):
        return self.dataset.fields(index)

    def __getitem__(self, index):
        item = dict(self.dataset[index])
        item["pixel_values"] = torch.zeros_like(item["pixel_values"])
        return item


@contextlib.contextmanager
def blank_images(enabled: bool):
    """While active, the Trainer's training and held-out sets serve blank images."""
    if not enabled:
        yield
        return
    saved = trainer_module.build_train_dataset, trainer_module.build_eval_dataset
    trainer_module.build_train_dataset = lambda *a, **k: BlankImages(saved[0](*a, **k))
    trainer_module.build_eval_dataset = lambda *a, **k: BlankImages(saved[1](*a, **k))
    try:
        yield
    finally:
        trainer_module.build_train_dataset, trainer_module.build_eval_dataset = saved


def run(config: TrainConfig, blind: bool) -> dict:
    start = time.perf_counter()
    with blank_images(blind):
        trainer = Trainer(config, log=lambda m: log(f"    {m}"))
        summary = trainer.fit()
    summary["wall_s"] = time.perf_counter() - start
    return summary


def main() -> int:
    args = ARGS
    torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    root = Path(args.out_dir or tempfile.mkdtemp(prefix="cos-token-ablation-"))
    root.mkdir(parents=True, exist_ok=True)
    log(f"token ablation: tiny preset, {args.pretrain_steps} pretrain + {args.finetune_steps} finetune steps x "
        f"{args.global_batch} samples, seed {args.seed}, {torch.get_num_threads()} threads; runs under {root}")
    common = dict(model="tiny", device="cpu", precision="fp32", seed=args.seed, global_batch=args.global_batch,
                  eval_samples=args.eval_samples, train_samples=args.train_samples, log_every=40)

    # 0. one shared caption-only LLM warm-up
    t0 = time.perf_counter()
    base = TrainConfig(stage="pretrain", out_dir=str(root / "shared"), **common)
    env = setup_distributed(base)
    model_config = MLLMConfig.from_preset("tiny", seed=args.seed)
    model_config = warm_up_llm(model_config, build_train_dataset(base, model_config.image_size),
                               args.llm_warmup_steps, root / "shared", env, lambda m: log(f"  {m}"))
    llm_path = model_config.llm_path
    log(f"  shared LLM warm-up: {time.perf_counter() - t0:.0f} s -> {llm_path}")

    results = []
    for name in args.bridges:
        blind = name == "blind"
        bridge = "cos-80" if blind else name
        log(f"== {name}: pretrain ({bridge}{', blank images' if blind else ''})")
        pre_dir = root / name / "pretrain"
        pre = run(TrainConfig(stage="pretrain", bridge=bridge, llm_path=llm_path, steps=args.pretrain_steps,
                              out_dir=str(pre_dir), **common), blind)
        log(f"== {name}: finetune (bridge + LLM, lr {args.finetune_lr:g})")
        fine = run(TrainConfig(stage="finetune", init_from=str(pre_dir), bridge=bridge, image_size=64,
                               steps=args.finetune_steps, lr=args.finetune_lr,
                               out_dir=str(root / name / "finetune"), **common), blind)
        row = dict(bridge=name, visual_tokens=fine["tokens_per_sample"]["visual"],
                   pretrain_eval=pre["eval"], finetune_eval=fine["eval"],
                   finetune_train_loss_last=fine["loss_last"], wall_s=pre["wall_s"] + fine["wall_s"])
        results.append(row)
        log(f"== {name}: held-out caption loss {pre['eval']['caption_loss']:.4f} after pretrain, "
            f"{fine['eval']['caption_loss']:.4f} after finetune; exact match {fine['eval']['exact_match']:.1%}; "
            f"{row['wall_s']:.0f} s")

    log("")
    log(f"held-out synthetic captions ({args.eval_samples} scenes), tiny preset, seed {args.seed}; word columns: "
        "teacher-forced accuracy after finetune")
    log("| bridge | visual tokens | caption loss after pretrain | caption loss after finetune | "
        + " | ".join(FIELDS) + " | exact match | wall (s) |")
    log("|---|" + "---:|" * (len(FIELDS) + 5))
    for r in results:
        fine = r["finetune_eval"]
        words = " | ".join(f"{fine['fields'][f]['accuracy']:.1%}" for f in FIELDS)
        log(f"| {r['bridge']} | {r['visual_tokens']} | {r['pretrain_eval']['caption_loss']:.4f} | "
            f"{fine['caption_loss']:.4f} | {words} | {fine['exact_match']:.1%} | {r['wall_s']:.0f} |")
    log(f"total wall time {time.perf_counter() - t0:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
