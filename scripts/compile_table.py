"""Compile every Triton kernel the backend launches for sm_90, ahead of time (no GPU), and write the
registers / spills / shared memory of each as a Markdown table.

    python scripts/compile_table.py                      # full sweep -> benchmarks/COMPILE_SM90.md
    python scripts/compile_table.py --jobs 8 --out /tmp/t.md --presets cos-80 --dtypes fp32

The sweep: every preset in cos_kernels.PRESETS x head dims 16, 32, 40, 64, 80, 96, 128 x fp16, bf16,
fp32 x the three kernels; launches that compile to the same binary (a preset's layout only matters
through launch_config's block sizes) are compiled once and list all their presets.
tests/test_sm90_compile.py compiles a subset in CI.

Each launch is the backend's own (``triton_launch.build_launches``) for the resampler's typical call
(``typical_inputs``), its tensors on the "meta" device: no memory, yet the strides and (16-byte
aligned) pointers of a real call. Triton's own JIT binder specialises it (stride-1 ints become
constexprs, pointers and ints divisible by 16 get ``tt.divisibility``); ``triton.compile`` of the
``ASTSource`` for ``GPUTarget("cuda", 90, 32)`` (sm_90: H100, H200) prints ptxas' resource usage
under TRITON_DUMP_PTXAS_LOG=1 (registers, spills); shared memory comes from the kernel's metadata.

Compiles need real ``triton.jit`` kernels, not the interpreter's (tests/conftest.py may set
TRITON_INTERPRET=1), so ``compile_cases`` runs them in a fresh ``compile_table.py --worker`` process
without TRITON_INTERPRET and with an empty, temporary TRITON_CACHE_DIR: every kernel is really
compiled (ptxas runs and logs, compile times are honest) and the user's cache is neither read nor
filled. Written against the binder API of Triton 3.6 .. 3.9 (``create_function_from_signature``,
``JITFunction._pack_args``); another Triton fails with a message saying so.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import cos_kernels
from cos_kernels import PRESETS, CoSConfig, WindowLayout
from cos_kernels.ops.triton_launch import KERNELS, BackwardBuffers, Launch, build_launches

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "benchmarks" / "COMPILE_SM90.md"
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
SM90 = ("cuda", 90, 32)  # GPUTarget(backend, arch, warp size)
SWEEP_HEAD_DIMS = (16, 32, 40, 64, 80, 96, 128)
COLUMNS = ("kernel", "dtype", "D", "BLOCK_M", "BLOCK_N", "BLOCK_D", "warps", "stages", "registers",
           "spill stores B", "spill loads B", "shared KiB", "compile s", "presets")


# ---- the backend's launches -----------------------------------------------------------------------
def typical_inputs(layout: WindowLayout, batch: int, heads: int, head_dim: int, dtype: torch.dtype,
                   device="meta") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q (B, Q, H, D) with batch stride 0, k and v (B, S, N, H, D) strided views of one
    (B, N, S, 2, H * D) projection: what the fused resampler passes the op."""
    B, H, D, S, N = batch, heads, head_dim, layout.num_scales, layout.num_patches
    q = torch.empty(1, layout.total_queries, H, D, dtype=dtype, device=device).expand(B, -1, -1, -1)
    kv = torch.empty(B, N, S, 2, H * D, dtype=dtype, device=device)
    k, v = (kv[:, :, :, i].transpose(1, 2).view(B, S, N, H, D) for i in range(2))
    return q, k, v


def launches(layout: WindowLayout, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             softmax_scale: float | None = None) -> dict[str, Launch]:
    """The three launches of a forward and a backward of q (B, Q, H, D), k, v (B, S, N, H, D), by name,
    with the buffers the backend allocates (contiguous, in q's dtype; lse and delta fp32) on q's device."""
    B, Q, H, D = q.shape
    scale = D**-0.5 if softmax_scale is None else float(softmax_scale)
    out = torch.empty(B, Q, H, D, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, H, Q, dtype=torch.float32, device=q.device)
    grads = BackwardBuffers(torch.empty_like(out), torch.empty_like(lse), torch.empty_like(out),
                            torch.empty(k.shape, dtype=q.dtype, device=q.device),
                            torch.empty(v.shape, dtype=q.dtype, device=q.device))
    built = build_launches(layout, scale, q, k, v, out, lse) + build_launches(layout, scale, q, k, v, out, lse, grads)
    return {launch.name: launch for launch in built}


# ---- specialisation and compile (needs real triton.jit kernels) -----------------------------------
def _specialize(launch: Launch, backend):
    """(options, signature, constexprs, attrs) as the JIT derives them for ``launch``."""
    fn = launch.kernel
    if type(fn).__name__ != "JITFunction":
        raise RuntimeError(
            f"the {launch.name} kernel is a {type(fn).__name__}, not a triton.jit function (TRITON_INTERPRET "
            "was set when triton was imported); compile through compile_cases, which uses a clean process"
        )
    try:
        from triton.runtime.jit import create_function_from_signature
        pack_args = fn._pack_args
    except (ImportError, AttributeError) as err:
        import triton
        raise RuntimeError(
            f"cannot reproduce the JIT's specialisation with triton {triton.__version__} (written for "
            f"the binder of 3.6 .. 3.9): {type(err).__name__}: {err}"
        ) from err
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*launch.args, **launch.constexprs)
    return pack_args(backend, launch.constexprs, bound, specialization, options)


def specialization_key(launch: Launch, target=SM90) -> str:
    """A string naming one compiled binary: two launches with equal keys compile identically."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    options, signature, constexprs, attrs = _specialize(launch, make_backend(GPUTarget(*target)))
    return repr((launch.name, target, signature, sorted(constexprs.items()), sorted(attrs.items()),
                 sorted(options.__dict__.items())))


_PTXAS_USAGE = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_REGS = re.compile(r"Used (\d+) registers")


@dataclass
class CompileResult:
    """One compiled kernel: launch configuration and ptxas' resource usage (per thread)."""

    kernel: str
    dtype: str
    head_dim: int
    block_m: int  # the kernel's BLOCK_M constexpr (block_m_kv for bwd_dkdv)
    block_n: int
    block_d: int
    num_warps: int
    num_stages: int
    registers: int
    spill_stores: int  # bytes
    spill_loads: int  # bytes
    stack: int  # bytes of stack frame (local memory, spills included)
    shared: int  # bytes of shared memory per program
    seconds: float  # wall time of triton.compile (fresh cache)


def compile_launch(launch: Launch, target=SM90) -> CompileResult:
    """AOT-compile ``launch`` for ``target``; needs TRITON_DUMP_PTXAS_LOG=1 and an empty cache for
    this kernel (ptxas must run), which ``compile_cases`` provides."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    gpu = GPUTarget(*target)
    options, signature, constexprs, attrs = _specialize(launch, make_backend(gpu))
    log = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(log):  # Triton prints the ptxas log
        compiled = triton.compile(ASTSource(launch.kernel, signature, constexprs, attrs), target=gpu,
                                  options=options.__dict__)
    seconds = time.perf_counter() - start
    text = log.getvalue()
    usage, regs = _PTXAS_USAGE.search(text), _PTXAS_REGS.search(text)
    if usage is None or regs is None:
        raise RuntimeError(
            f"no ptxas resource usage for {launch.name} (cached binary, or TRITON_DUMP_PTXAS_LOG unset?); "
            f"captured output: {text[-500:]!r}"
        )
    dtype = next(name for name, d in DTYPES.items() if d == launch.args[0].dtype)
    c = launch.constexprs
    return CompileResult(
        launch.name, dtype, c["HEAD_DIM"], c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_D"],
        compiled.metadata.num_warps, compiled.metadata.num_stages, int(regs.group(1)),
        int(usage.group(2)), int(usage.group(3)), int(usage.group(1)), compiled.metadata.shared,
        round(seconds, 2),
    )


# ---- cases, in a clean process ---------------------------------------------------------------------
def preset_cases(presets, head_dims=SWEEP_HEAD_DIMS, dtypes=tuple(DTYPES), kernels=tuple(KERNELS)) -> list[dict]:
    """``compile_cases`` cases for every combination, each labelled with its preset's name."""
    return [
        dict(layout=CoSConfig.from_preset(p).layout.to_spec(), head_dim=d, dtype=dt, kernel=k, label=p)
        for p in presets for d in head_dims for dt in dtypes for k in kernels
    ]


def _launch_of(case: dict, heads: int, batch: int) -> Launch:
    """case {"layout": spec, "head_dim", "dtype": "fp16"|..., "kernel"} -> its launch (meta tensors)."""
    layout = WindowLayout.from_spec(case["layout"])
    q, k, v = typical_inputs(layout, batch, heads, case["head_dim"], DTYPES[case["dtype"]])
    return launches(layout, q, k, v)[case["kernel"]]


def _compile_case(case: dict, heads: int, batch: int) -> dict:
    return asdict(compile_launch(_launch_of(case, heads, batch)))


def _worker(cases: list[dict], heads: int, batch: int, jobs: int) -> list[dict]:
    """Compile each distinct binary among ``cases`` once (``jobs`` processes); one row per binary
    with the labels of the cases that share it, in first-seen order."""
    groups: dict[str, tuple[dict, list[str]]] = {}
    for case in cases:
        key = specialization_key(_launch_of(case, heads, batch))
        _, labels = groups.setdefault(key, (case, []))
        if case.get("label") and case["label"] not in labels:
            labels.append(case["label"])
    todo = list(groups.values())
    if jobs > 1 and len(todo) > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(min(jobs, len(todo)), mp_context=multiprocessing.get_context("spawn")) as pool:
            rows = list(pool.map(_compile_case, [c for c, _ in todo], [heads] * len(todo), [batch] * len(todo)))
    else:
        rows = [_compile_case(c, heads, batch) for c, _ in todo]
    return [dict(row, labels=labels) for row, (_, labels) in zip(rows, todo)]


def compile_cases(cases: list[dict], *, heads: int = 16, batch: int = 2, jobs: int = 1,
                  timeout: float | None = None) -> dict:
    """AOT-compile for sm_90 the launches of ``cases`` in a fresh process (see the module docstring),
    with the cos_kernels this process imported.

    cases: dicts {"layout": WindowLayout.to_spec(), "head_dim": int, "dtype": "fp16"|"bf16"|"fp32",
    "kernel": "fwd"|"bwd_dq"|"bwd_dkdv", "label": optional name (e.g. a preset)}; heads, batch: of
    the typical call. Identical binaries compile once. Returns {"rows": [CompileResult fields +
    "labels"], "triton": version, "ptxas": version line, "seconds": wall time}."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    package_root = str(Path(cos_kernels.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    with tempfile.TemporaryDirectory(prefix="cos_aot_") as tmp:
        env.update(TRITON_CACHE_DIR=os.path.join(tmp, "cache"), TRITON_DUMP_PTXAS_LOG="1")
        request, result = os.path.join(tmp, "cases.json"), os.path.join(tmp, "result.json")
        with open(request, "w") as f:
            json.dump(dict(cases=cases, heads=heads, batch=batch, jobs=jobs), f)
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, __file__, "--worker", request, result], env=env,
                              capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"AOT compile process failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
        with open(result) as f:
            out = json.load(f)
    out["seconds"] = round(time.perf_counter() - start, 1)
    return out


def _versions() -> dict:
    import triton
    from triton.backends.nvidia import compiler

    lines = compiler.get_ptxas_version(SM90[1]).strip().splitlines()
    # "Cuda compilation tools, release 12.8, V12.8.93" -> "release 12.8, V12.8.93"
    release = next((line for line in lines if "release" in line), lines[-1])
    return {"triton": triton.__version__, "ptxas": release.split(",", 1)[-1].strip()}


def _work(request: str, result: str) -> None:
    """The worker process: cases JSON in, results JSON out."""
    with open(request) as f:
        req = json.load(f)
    rows = _worker(req["cases"], req["heads"], req["batch"], req["jobs"])
    with open(result, "w") as f:
        json.dump(dict(rows=rows, **_versions()), f)


# ---- the Markdown page ----------------------------------------------------------------------------
def _row(r: dict) -> list:
    return [f"`{r['kernel']}`", r["dtype"], r["head_dim"], r["block_m"], r["block_n"], r["block_d"],
            r["num_warps"], r["num_stages"], r["registers"], r["spill_stores"], r["spill_loads"],
            f"{r['shared'] / 1024:.1f}", f"{r['seconds']:.1f}", ", ".join(r["labels"])]


def render(result: dict, command: str, jobs: int) -> str:
    """The Markdown page for ``compile_cases``' result."""
    order = {k: i for i, k in enumerate(KERNELS)}
    dorder = {k: i for i, k in enumerate(DTYPES)}
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
        "- each launch as `triton_launch.build_launches` makes it for the fused resampler's call: q a "
        "batch-broadcast view, K/V strided views of one (B, N, S, 2, H*D) projection, B=2, H=16; "
        "specialised by Triton's own JIT binder (stride-1 constexprs, 16-divisibility), compiled with a "
        "fresh cache (`scripts/compile_table.py`)",
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
    parser.add_argument("--head-dims", nargs="+", type=int, default=list(SWEEP_HEAD_DIMS))
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--worker", nargs=2, metavar=("REQUEST", "RESULT"), help=argparse.SUPPRESS)
    a = parser.parse_args(argv)
    if a.worker:
        _work(*a.worker)
        return
    result = compile_cases(preset_cases(a.presets, a.head_dims, a.dtypes), jobs=a.jobs)
    command = shlex.join(["python", "scripts/compile_table.py", *(sys.argv[1:] if argv is None else argv)])
    a.out.write_text(render(result, command, a.jobs))
    print(f"{len(result['rows'])} kernels compiled in {result['seconds']:.0f} s -> {a.out}")


if __name__ == "__main__":
    main()
