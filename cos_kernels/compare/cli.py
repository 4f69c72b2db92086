"""cos-compare: Chain-of-Sight's time saving and its quality against the baseline, in one command.

    cos-compare                               # CPU, tiny preset, 3 seeds, 80 -> 336 tokens, < 20 minutes
    cos-compare --scaling 1296                # the paper's 80 -> 1296
    cos-compare --preset gpu-1b               # one GPU, ViT-L/14-sized tower, TinyLlama-sized LLM, bf16
    cos-compare --preset gpu-7b --data blip_laion_cc_sbu_558k.json --image-folder images/ --vision-path clip-vit-l-14

Writes OUT_DIR/compare.md, compare.json and compare.png, and prints the table.
"""

from __future__ import annotations

import argparse
import dataclasses
import signal
import sys
from pathlib import Path

from ..validation import positive_int
from .config import COMPARE_PRESETS, CompareConfig, check_cuda

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    from ..train.cli import ArgumentParser, add_option

    parser = ArgumentParser(prog="cos-compare", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    parser.add_argument("--preset", default="cpu", choices=sorted(COMPARE_PRESETS),
                        help="named option set; any option given here overrides it (default: cpu)")
    for f in dataclasses.fields(CompareConfig):
        add_option(parser, f)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    for action in parser._actions:  # None: "not given", so the preset's value applies
        if action.dest not in ("help", "preset", "threads", "debug"):
            action.default = None
    return parser


def config_from_args(args: dict) -> CompareConfig:
    """The preset, overridden by the options given on the command line."""
    given = {k: v for k, v in args.items() if v is not None}
    return CompareConfig.from_preset(given.pop("preset"), **given)


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 done; 1 a stage stopped on a non-finite loss; 2 a usage error, reported in one
    line; 128 + N stopped by signal N (SIGINT 130, SIGTERM 143) after the current step, its checkpoint
    written. Run again, the same command reuses the finished runs and resumes the stopped one."""
    from ..train.cli import run_reporting_errors

    args = vars(build_parser().parse_args(argv))
    debug, threads = args.pop("debug"), args.pop("threads")
    source = f"--device {args['device']}" if args["device"] is not None else f"preset {args['preset']!r}"
    return run_reporting_errors("cos-compare", debug, lambda: _run(config_from_args(args), threads, source),
                                "interrupted; rerun the same command to continue (finished runs are reused)")


def _run(config: CompareConfig, threads: int | None, device_source: str) -> int:
    import torch
    from tqdm import tqdm
    from transformers.utils import logging as hf_logging

    from ..train.trainer import NonFiniteLossError, TrainingStopped
    from .report import write_report
    from .run import run_all

    if threads is not None:
        torch.set_num_threads(positive_int(threads, "--threads"))
    check_cuda(config.device, device_source)
    hf_logging.disable_progress_bar()
    log = tqdm.write
    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        components, results = run_all(config, log)
    except TrainingStopped as err:
        print(f"cos-compare: stopped by {signal.Signals(err.signum).name} (its state is written: the stage's "
              f"checkpoint, or the LLM warm-up's); rerun the same command to continue: finished runs are "
              f"reused, the stopped stage resumes",
              file=sys.stderr)
        return 128 + err.signum
    except NonFiniteLossError as err:
        print(f"cos-compare: {err}", file=sys.stderr)
        return 1
    device = _device_name(config.device)
    write_report(out_dir, config.to_dict(), components, results, device)
    print((out_dir / "compare.md").read_text())
    print(f"written: {out_dir / 'compare.md'}, {out_dir / 'compare.json'}, {out_dir / 'compare.png'}")
    return 0


def _device_name(device: str) -> str:
    import platform

    import torch

    if device != "cpu" and torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(torch.device(device if device != 'auto' else 'cuda'))}, torch {torch.__version__}"
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads), torch {torch.__version__}"


if __name__ == "__main__":
    sys.exit(main())
