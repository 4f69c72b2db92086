"""Compile every Triton kernel the backend launches for sm_90, ahead of time (no GPU), and write the
registers / spills / shared memory of each as a Markdown table.

    python scripts/compile_table.py                      # full sweep -> benchmarks/COMPILE_SM90.md
    python scripts/compile_table.py --jobs 8 --out /tmp/t.md --presets cos-80 --dtypes fp32

The sweep: every preset in cos_kernels.PRESETS x head dims 16, 32, 40, 64, 80, 96, 128 x fp16, bf16,
fp32 x the three kernels; launches that compile to the same binary (a preset's layout only matters
through launch_config's block sizes) are compiled once and list all their presets. How each kernel
is compiled: cos_kernels/ops/triton_aot.py. tests/test_sm90_compile.py compiles a subset in CI.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import sys
from pathlib import Path

from cos_kernels import PRESETS
from cos_kernels.ops import triton_aot

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "benchmarks" / "COMPILE_SM90.md"
COLUMNS = ("kernel", "dtype", "D", "BLOCK_M", "BLOCK_N", "BLOCK_D", "warps", "stages", "registers",
           "spill stores B", "spill loads B", "shared KiB", "compile s", "presets")


def _row(r: dict) -> list:
    return [f"`{r['kernel']}`", r["dtype"], r["head_dim"], r["block_m"], r["block_n"], r["block_d"],
            r["num_warps"], r["num_stages"], r["registers"], r["spill_stores"], r["spill_loads"],
            f"{r['shared'] / 1024:.1f}", f"{r['seconds']:.1f}", ", ".join(r["labels"])]


def render(result: dict, command: str, jobs: int) -> str:
    """The Markdown page for ``triton_aot.compile_cases``' result."""
    order = {k: i for i, k in enumerate(triton_aot.KERNELS)}
    dorder = {k: i for i, k in enumerate(triton_aot.DTYPES)}
    rows = sorted(result["rows"], key=lambda r: (order[r["kernel"]], dorder[r["dtype"]], r["head_dim"], r["block_m"]))
    spilling = [r for r in rows if r["spill_stores"] or r["spill_loads"]]
    worst = max(rows, key=lambda r: r["registers"])
    lines = [
        "# Triton kernels compiled for sm_90 (H100 / H200): registers, spills, shared memory",
        "",
        f"Regenerate: `{command}` (no GPU needed; about {result['seconds']:.0f} s with --jobs {jobs} on "
        f"{os.cpu_count()} CPUs). A subset is compiled in CI by `tests/test_sm90_compile.py`.",
        "",
        f"- date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}",
        f"- triton {result['triton']}, ptxas `{result['ptxas']}`, python {platform.python_version()}; "
        "target `GPUTarget(\"cuda\", 90, 32)`",
        "- each launch as `triton_backend` makes it for the fused resampler's call: q a batch-broadcast "
        "view, K/V strided views of one (B, N, S, 2, H*D) projection, B=2, H=16; specialised by Triton's "
        "own JIT binder (stride-1 constexprs, 16-divisibility), compiled with a fresh cache "
        "(`cos_kernels/ops/triton_aot.py`)",
        "- registers and spills per thread, from ptxas' log; shared memory per program from the "
        "compiled kernel's metadata; compile s is the wall time of `triton.compile`, with "
        f"{jobs} compiles running side by side",
        "- BLOCK_M is the kernel's own constexpr: the query tile of `fwd` / `bwd_dq`, the query step of "
        "`bwd_dkdv` (block_m_kv); stages: num_stages of that launch",
        f"- {len(rows)} distinct binaries; most registers: {worst['registers']} (`{worst['kernel']}` "
        f"{worst['dtype']} D={worst['head_dim']}); spilling: "
        + (", ".join(f"`{r['kernel']}` {r['dtype']} D={r['head_dim']} BLOCK_M={r['block_m']}" for r in spilling)
           if spilling else "none"),
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    lines += ["| " + " | ".join(str(x) for x in _row(r)) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compiles side by side")
    parser.add_argument("--presets", nargs="+", default=sorted(PRESETS), choices=sorted(PRESETS))
    parser.add_argument("--head-dims", nargs="+", type=int, default=list(triton_aot.SWEEP_HEAD_DIMS))
    parser.add_argument("--dtypes", nargs="+", default=list(triton_aot.DTYPES), choices=list(triton_aot.DTYPES))
    a = parser.parse_args(argv)
    cases = triton_aot.preset_cases(a.presets, a.head_dims, a.dtypes)
    result = triton_aot.compile_cases(cases, jobs=a.jobs)
    command = shlex.join(["python", "scripts/compile_table.py", *(sys.argv[1:] if argv is None else argv)])
    a.out.write_text(render(result, command, a.jobs))
    print(f"{len(result['rows'])} kernels compiled in {result['seconds']:.0f} s -> {a.out}")


if __name__ == "__main__":
    main()
