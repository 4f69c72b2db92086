"""cos-train: the command line of both stages. One option per TrainConfig field.

    cos-train pretrain                                  # tiny preset, synthetic data, CPU, ~1 minute
    cos-train finetune --init-from runs/pretrain        # compound token scaling, bridge + LLM trained
    torchrun --nproc-per-node 8 -m cos_kernels.train pretrain --model vitl14-224-7b --global-batch 256 \\
        --micro-batch 32 --steps 2000 --distributed fsdp
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys

from .config import STAGES, TrainConfig

__all__ = ["main", "build_parser", "add_option", "run_reporting_errors", "ArgumentParser"]

_TYPES = {"int": int, "float": float, "str": str}
# What argparse takes for an option's value rather than an option name: "-" then a digit, a point and a
# digit, or inf / nan (Python 3.11's argparse knows only -5 and -0.5, and reads -1e-3 as an unknown option).
_NEGATIVE_NUMBER = re.compile(r"^-(\d|\.\d|inf(inity)?$|nan$)", re.IGNORECASE)


class ArgumentParser(argparse.ArgumentParser):
    """argparse.ArgumentParser that reads a negative number in any form float() takes (-1e-3, -.5,
    -inf) as an option's value, so ``--lr -1e-3`` reaches the config's range check, which names the
    field; its sub-parsers are of this class too."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = _NEGATIVE_NUMBER  # argparse's own: r"^-\d+$|^-\d*\.\d+$"


def add_option(parser: argparse.ArgumentParser, f: dataclasses.Field) -> None:
    """The command-line option of a config field declared with config_io.option (metadata: help, choices,
    nargs, type)."""
    meta, flag = f.metadata, "--" + f.name.replace("_", "-")
    default = f.default_factory() if f.default is dataclasses.MISSING else f.default
    shown = " ".join(map(str, default)) if isinstance(default, list) else default
    help_text = f"{meta['help']} (default: {shown})".replace("%", "%%")  # argparse %-formats help
    if f.type == "bool":
        parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
        return
    if "nargs" in meta:  # list options name their element type
        kind, extra = meta["type"], {"nargs": meta["nargs"]}
    else:
        kind, extra = _TYPES[f.type.split(" |")[0]], {}
    if "choices" in meta:
        extra["choices"] = meta["choices"]
    parser.add_argument(flag, type=kind, default=default, help=help_text, **extra)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="cos-train", description="Chain-of-Sight MLLM training (pretrain / finetune).")
    stages = parser.add_subparsers(dest="stage", required=True, metavar="{pretrain,finetune}")
    helps = {"pretrain": "stage 1: ViT and LLM frozen, the bridge trained (lr 1e-3, cosine, 3% warm-up)",
             "finetune": "stage 2: from a pretrain checkpoint, compound token scaling, bridge + LLM trained (lr 2e-5)"}
    for stage in STAGES:
        # help strings are %-formatted by argparse, descriptions are not
        sub = stages.add_parser(stage, help=helps[stage].replace("%", "%%"), description=helps[stage])
        for f in dataclasses.fields(TrainConfig):
            if f.name != "stage":
                add_option(sub, f)
        sub.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 done; 1 stopped on a non-finite loss; 2 a usage error (bad option, missing or
    unwritable path, incompatible checkpoint), reported in one line; 128 + N stopped by signal N
    (SIGINT 130, SIGTERM 143) after writing a checkpoint (or the LLM warm-up's partial state)."""
    args = vars(build_parser().parse_args(argv))
    debug = args.pop("debug")
    return run_reporting_errors("cos-train", debug, lambda: _run(args))


def run_reporting_errors(prog: str, debug: bool, run, interrupted: str = "interrupted") -> int:
    """``run()``'s exit code; a ValueError, TypeError or OSError is reported as one line
    "PROG: error: ..." (exit 2), a KeyboardInterrupt as "PROG: INTERRUPTED" (exit 130); with
    ``debug`` both propagate (the full traceback)."""
    try:
        return run()
    except (ValueError, TypeError, OSError) as err:
        if debug:
            raise
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{prog}: {interrupted}", file=sys.stderr)
        return 130


def _run(args: dict) -> int:
    config = TrainConfig(**args)
    from transformers.utils import logging as hf_logging

    from .trainer import NonFiniteLossError, Trainer, TrainingStopped

    hf_logging.disable_progress_bar()  # transformers' own bars would interleave with the training bar
    try:
        Trainer(config).fit()
    except NonFiniteLossError as err:
        print(f"cos-train: {err}", file=sys.stderr)
        return 1
    except TrainingStopped as err:
        print(f"cos-train: {err}", file=sys.stderr)
        return 128 + err.signum
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()  # no rank tears gloo down while another still talks to it
            dist.destroy_process_group()
    return 0
