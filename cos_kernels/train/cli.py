"""cos-train: the command line of both stages. One option per TrainConfig field.

    cos-train pretrain                                  # tiny preset, synthetic data, CPU, ~1 minute
    cos-train finetune --init-from runs/pretrain        # compound token scaling, bridge + LLM trained
    torchrun --nproc-per-node 8 -m cos_kernels.train pretrain --model vitl14-224-7b --global-batch 256 \\
        --micro-batch 32 --steps 2000 --distributed fsdp
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from .config import STAGES, TrainConfig

__all__ = ["main", "build_parser"]

_TYPES = {"int": int, "float": float, "str": str}


def _add_option(parser: argparse.ArgumentParser, f: dataclasses.Field) -> None:
    meta, flag = f.metadata, "--" + f.name.replace("_", "-")
    help_text = f"{meta['help']} (default: {f.default})"
    if f.type == "bool":
        parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=help_text)
        return
    if "nargs" in meta:  # list options name their element type
        kind, extra = meta["type"], {"nargs": meta["nargs"]}
    else:
        kind, extra = _TYPES[f.type.split(" |")[0]], {}
    if "choices" in meta:
        extra["choices"] = meta["choices"]
    parser.add_argument(flag, type=kind, default=f.default, help=help_text, **extra)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cos-train", description="Chain-of-Sight MLLM training (pretrain / finetune).")
    stages = parser.add_subparsers(dest="stage", required=True, metavar="{pretrain,finetune}")
    helps = {"pretrain": "stage 1: ViT and LLM frozen, the bridge trained (lr 1e-3, cosine, 3% warm-up)",
             "finetune": "stage 2: from a pretrain checkpoint, compound token scaling, bridge + LLM trained (lr 2e-5)"}
    for stage in STAGES:
        sub = stages.add_parser(stage, help=helps[stage], description=helps[stage])
        for f in dataclasses.fields(TrainConfig):
            if f.name != "stage":
                _add_option(sub, f)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = vars(build_parser().parse_args(argv))
    try:
        config = TrainConfig(**args)
    except ValueError as err:
        print(f"cos-train: error: {err}", file=sys.stderr)
        return 2
    from transformers.utils import logging as hf_logging

    from .trainer import NonFiniteLossError, Trainer

    hf_logging.disable_progress_bar()  # transformers' own bars would interleave with the training bar
    try:
        Trainer(config).fit()
    except NonFiniteLossError as err:
        print(f"cos-train: {err}", file=sys.stderr)
        return 1
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()  # no rank tears gloo down while another still talks to it
            dist.destroy_process_group()
    return 0
