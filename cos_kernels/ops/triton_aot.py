"""Ahead-of-time compiles of the triton backend's kernels for a GPU target, on a machine without a GPU.

For a (layout, head dim, dtype) the backend launches three kernels ("fwd", "bwd_dq", "bwd_dkdv").
``kernel_launches`` rebuilds their arguments exactly as ``triton_backend`` passes them, for the
resampler's typical call: q a batch-broadcast (stride-0) view of (1, Q, H, D), K and V strided views
of one fused (B, N, S, 2, H * D) projection, outputs contiguous. Built on the "meta" device they cost
no memory, yet carry the strides and (16-byte aligned) pointers a real call has.

``compile_launch`` runs them through Triton's own JIT binder (the argument types and the
specialisation it applies: stride-1 ints become constexprs, pointers and ints divisible by 16 get
``tt.divisibility``), then ``triton.compile`` of the ``ASTSource`` for ``GPUTarget("cuda", 90, 32)``
(sm_90: H100, H200) with the launch's num_warps / num_stages. ptxas (the one Triton bundles) prints
its resource usage when TRITON_DUMP_PTXAS_LOG=1; registers and spills are read from that log, shared
memory from the compiled kernel's metadata. No GPU is touched.

The kernels must be real ``triton.jit`` functions, so this cannot run in a process where
TRITON_INTERPRET=1 was set before triton was imported (as tests/conftest.py does on CPU).
``compile_cases`` therefore compiles in a fresh ``python -m cos_kernels.ops.triton_aot`` process,
with TRITON_INTERPRET removed and a fresh, temporary TRITON_CACHE_DIR: every kernel is really
compiled (ptxas runs, so its log exists, and compile times are honest) and the user's cache is
neither read nor filled.

Written against the binder API of Triton 3.6 .. 3.9 (``create_function_from_signature``,
``JITFunction._pack_args``); a Triton without it fails with a message saying so.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

import torch

from ..layout import WindowLayout
from . import triton_backend as tb

__all__ = [
    "KERNELS",
    "DTYPES",
    "CompileResult",
    "typical_inputs",
    "kernel_launches",
    "compile_launch",
    "preset_cases",
    "compile_cases",
]

KERNELS = {  # name in tables -> function in triton_kernels
    "fwd": "window_attention_fwd_kernel",
    "bwd_dq": "window_attention_bwd_dq_kernel",
    "bwd_dkdv": "window_attention_bwd_dkdv_kernel",
}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
SM90 = ("cuda", 90, 32)  # GPUTarget(backend, arch, warp size)


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


def kernel_launches(layout: WindowLayout, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    softmax_scale: float | None = None) -> dict[str, tuple[tuple, dict]]:
    """The three launches ``TritonWindowAttention`` makes for q (B, Q, H, D), k, v (B, S, N, H, D):
    kernel name -> (positional args, keyword args: constexprs and launch options), outputs and tile
    tables allocated on q's device. Mirrors ``triton_backend``'s forward and backward argument lists
    (tests/test_sm90_compile.py checks them against a recorded call)."""
    B, Q, H, D = q.shape
    dev, dt = q.device, q.dtype
    scale = D**-0.5 if softmax_scale is None else float(softmax_scale)
    cfg = tb.launch_config(layout, D, dt)
    qtiles = tb._table("q", layout, cfg.block_m, dev)
    ktiles = tb._table("k", layout, cfg.block_n, dev)
    out = torch.empty(B, Q, H, D, dtype=dt, device=dev)
    lse = torch.empty(B, H, Q, dtype=torch.float32, device=dev)
    grad_out, dq, delta = torch.empty_like(out), torch.empty_like(out), torch.empty_like(lse)
    dk = torch.empty(k.shape, dtype=dt, device=dev)
    dv = torch.empty(v.shape, dtype=dt, device=dev)
    sizes = (H, B * H, Q, layout.grid[1])
    common = dict(HEAD_DIM=D, BLOCK_N=cfg.block_n, BLOCK_D=cfg.block_d, DOT_PRECISION=tb._dot_precision(dt),
                  num_warps=cfg.num_warps)
    fwd = (
        (q, k, v, out, lse, qtiles, *q.stride(), *k.stride(), *v.stride(), *out.stride()[:3], *sizes,
         scale * tb._LOG2E),
        dict(common, BLOCK_M=cfg.block_m, num_stages=cfg.num_stages),
    )
    bwd_dq = (
        (q, k, v, out, grad_out, lse, delta, dq, qtiles, *q.stride(), *k.stride(), *v.stride(),
         *out.stride(), *grad_out.stride(), *dq.stride()[:3], *sizes, scale, scale * tb._LOG2E),
        dict(common, BLOCK_M=cfg.block_m, num_stages=cfg.num_stages),
    )
    bwd_dkdv = (
        (q, k, v, grad_out, lse, delta, dk, dv, ktiles, *q.stride(), *k.stride(), *v.stride(),
         *grad_out.stride(), *dk.stride()[:4], *sizes, scale, scale * tb._LOG2E),
        dict(common, BLOCK_M=cfg.block_m_kv, num_stages=cfg.num_stages_kv),
    )
    return {"fwd": fwd, "bwd_dq": bwd_dq, "bwd_dkdv": bwd_dkdv}


# ---- specialisation and compile (needs real triton.jit kernels) -----------------------------------
def _jit_function(kernel: str):
    fn = getattr(tb._tk, KERNELS[kernel])
    if type(fn).__name__ != "JITFunction":
        raise RuntimeError(
            f"{KERNELS[kernel]} is a {type(fn).__name__}, not a triton.jit function (TRITON_INTERPRET "
            "was set when triton was imported); compile through compile_cases, which uses a clean process"
        )
    return fn


def _specialize(fn, backend, args: tuple, kwargs: dict):
    """(options, signature, constexprs, attrs) as the JIT derives them for fn[grid](*args, **kwargs)."""
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
    bound, specialization, options = binder(*args, **kwargs)
    return pack_args(backend, kwargs, bound, specialization, options)


def specialization_key(kernel: str, args: tuple, kwargs: dict, target=SM90) -> str:
    """A string naming one compiled binary: two launches with equal keys compile identically."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    backend = make_backend(GPUTarget(*target))
    options, signature, constexprs, attrs = _specialize(_jit_function(kernel), backend, args, kwargs)
    return repr((kernel, target, signature, sorted(constexprs.items()), sorted(attrs.items()),
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


def compile_launch(kernel: str, args: tuple, kwargs: dict, target=SM90) -> CompileResult:
    """AOT-compile one launch (from ``kernel_launches``) for ``target``; needs TRITON_DUMP_PTXAS_LOG=1
    and an empty cache for this kernel (ptxas must run), which ``compile_cases`` provides."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    fn = _jit_function(kernel)
    gpu = GPUTarget(*target)
    options, signature, constexprs, attrs = _specialize(fn, make_backend(gpu), args, kwargs)
    log = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(log):  # Triton prints the ptxas log
        compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=gpu,
                                  options=options.__dict__)
    seconds = time.perf_counter() - start
    text = log.getvalue()
    usage, regs = _PTXAS_USAGE.search(text), _PTXAS_REGS.search(text)
    if usage is None or regs is None:
        raise RuntimeError(
            f"no ptxas resource usage for {kernel} (cached binary, or TRITON_DUMP_PTXAS_LOG unset?); "
            f"captured output: {text[-500:]!r}"
        )
    dtype = next(name for name, d in DTYPES.items() if d == args[0].dtype)
    return CompileResult(
        kernel, dtype, kwargs["HEAD_DIM"], kwargs["BLOCK_M"], kwargs["BLOCK_N"], kwargs["BLOCK_D"],
        compiled.metadata.num_warps, compiled.metadata.num_stages, int(regs.group(1)),
        int(usage.group(2)), int(usage.group(3)), int(usage.group(1)), compiled.metadata.shared,
        round(seconds, 2),
    )


# ---- cases, in a clean process ---------------------------------------------------------------------
SWEEP_HEAD_DIMS = (16, 32, 40, 64, 80, 96, 128)


def preset_cases(presets, head_dims=SWEEP_HEAD_DIMS, dtypes=tuple(DTYPES), kernels=tuple(KERNELS)) -> list[dict]:
    """``compile_cases`` cases for every combination, each labelled with its preset's name."""
    from ..config import CoSConfig

    return [
        dict(layout=CoSConfig.from_preset(p).layout.to_spec(), head_dim=d, dtype=dt, kernel=k, label=p)
        for p in presets for d in head_dims for dt in dtypes for k in kernels
    ]


def _launch_of(case: dict, heads: int, batch: int) -> tuple[tuple, dict]:
    """case {"layout": spec, "head_dim", "dtype": "fp16"|..., "kernel"} -> its launch (meta tensors)."""
    layout = WindowLayout.from_spec(case["layout"])
    q, k, v = typical_inputs(layout, batch, heads, case["head_dim"], DTYPES[case["dtype"]])
    return kernel_launches(layout, q, k, v)[case["kernel"]]


def _compile_case(case: dict, heads: int, batch: int) -> dict:
    return asdict(compile_launch(case["kernel"], *_launch_of(case, heads, batch)))


def _worker(cases: list[dict], heads: int, batch: int, jobs: int) -> list[dict]:
    """Compile each distinct binary among ``cases`` once (``jobs`` processes); one row per binary
    with the labels of the cases that share it, in first-seen order."""
    groups: dict[str, tuple[dict, list[str]]] = {}
    for case in cases:
        key = specialization_key(case["kernel"], *_launch_of(case, heads, batch))
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
    """AOT-compile for sm_90 the launches of ``cases`` in a fresh process (see the module docstring).

    cases: dicts {"layout": WindowLayout.to_spec(), "head_dim": int, "dtype": "fp16"|"bf16"|"fp32",
    "kernel": "fwd"|"bwd_dq"|"bwd_dkdv", "label": optional name (e.g. a preset)}; heads, batch: of
    the typical call. Identical binaries compile once. Returns {"rows": [CompileResult fields +
    "labels"], "triton": version, "ptxas": version line, "seconds": wall time}."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    with tempfile.TemporaryDirectory(prefix="cos_aot_") as tmp:
        env.update(TRITON_CACHE_DIR=os.path.join(tmp, "cache"), TRITON_DUMP_PTXAS_LOG="1")
        request, result = os.path.join(tmp, "cases.json"), os.path.join(tmp, "result.json")
        with open(request, "w") as f:
            json.dump(dict(cases=cases, heads=heads, batch=batch, jobs=jobs), f)
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "cos_kernels.ops.triton_aot", request, result], env=env,
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


def _main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="compile_cases' worker: cases JSON in, results JSON out")
    parser.add_argument("request")
    parser.add_argument("result")
    a = parser.parse_args(argv)
    with open(a.request) as f:
        req = json.load(f)
    rows = _worker(req["cases"], req["heads"], req["batch"], req["jobs"])
    with open(a.result, "w") as f:
        json.dump(dict(rows=rows, **_versions()), f)


if __name__ == "__main__":
    from cos_kernels.ops import triton_aot  # pool workers unpickle functions of the named module

    triton_aot._main()
