"""The GPU check's measurements: preflight, the headline kernel, module and stage-1 step tables.

scripts/gpu_check.py runs each stage as its own process with a timeout:

    python -m benchmarks.headline {preflight,kernel,module,e2e} --results FILE [--dry]

Each stage appends one JSON object per line to FILE as soon as it has it (a killed stage keeps every
row it finished): ``{"stage": ..., "row": {...}}``; the driver adds ``{"stage": ..., "status": ...}``
lines and renders FILE into SUMMARY.md (``render``). ``check_results`` is the schema CI holds the
dry run's files to, so that a GPU call is never lost to a missing column.

Sizes: on the GPU, bf16, cos-80 B=256 and cos-1296 B=64 (H=16, D=64; the paper's widths for the
module), the "1b" proxy (ViT-L/14 + TinyLlama-1.1B architecture, random weights) at B=16 with 64
caption tokens for the stage-1 step. ``--dry`` (CPU, CI): fp32, tiny cases, Triton under its
interpreter, the "tiny" MLLM: it checks the plumbing, not the speed.

Timing: triton.testing.do_bench medians on a GPU (it flushes L2 between calls; fixed 10 ms warm-up
and 60 ms of repeats: no calibration), the median of a few synchronous calls on a CPU. Backward
passes reuse one forward graph (``retain_graph``) and reset the leaves' grads untimed. Every
implementation is checked against a float64 reference before it is timed (benchmarks/test_kernel.py
and test_module.py's rule: at most 2x the eager torch error in the same dtype plus a small
allowance); one that fails is recorded as failed, with its error, and not timed.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path

# The Triton kernels run on CPU tensors only under the interpreter, switched on before triton is
# imported (the dry run; tests/conftest.py does the same).
if "--dry" in sys.argv and "TRITON_INTERPRET" not in os.environ:
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
STAGES = ("preflight", "kernel", "module", "e2e")
PASSES = ("fwd", "bwd", "fwdbwd")
KERNEL_IMPLS = ("triton", "cuda", "torch", "sdpa_mask", "flex", "flash_varlen")  # fused first: most wanted
PACKAGES = ("torch", "triton", "numpy", "transformers", "safetensors", "tqdm", "PIL", "matplotlib",
            "pytest", "pytest_benchmark", "pytest_timeout", "xdist", "ninja", "pybind11", "cos_kernels",
            "cos_kernels.ops.triton_backend", "cos_kernels.mllm", "torch.nn.attention.flex_attention")

# The columns every row of a stage carries (None where not measured); check_results holds files to it.
COLUMNS = {
    "preflight": ("device", "device_name", "driver", "clocks", "python", "versions", "imports", "nvcc", "cuda_home",
                  "copy_GBps", "matmul_TFLOPs", "matmul_dtype"),
    "kernel": ("case", "impl", "pass", "dtype", "status", "median_ms", "bytes_floor", "GBps", "copy_fraction",
               "max_rel_error", "detail"),
    "module": ("case", "impl", "backend", "fused", "dtype", "status", "median_ms", "peak_mem_MiB",
               "speedup_vs_eager_unfused", "mem_vs_eager_unfused", "max_rel_error", "detail"),
    "e2e": ("case", "bridge", "model", "dtype", "status", "step_ms", "samples_per_s", "rel_step_vs_resampler_336",
            "bridge_fwdbwd_ms", "bridge_share", "mfu", "visual_tokens", "detail"),
}


# ---- results file ---------------------------------------------------------------------------------
def append(path: Path, stage: str, **entry) -> None:
    """One JSON line, flushed to disk at once (a stage killed at its timeout keeps what it wrote)."""
    with open(path, "a") as f:
        f.write(json.dumps({"stage": stage, **entry}, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read(path: Path) -> list[dict]:
    if not Path(path).is_file():
        return []
    out = []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a kill: the rest still counts
                continue
    return out


def stage_statuses(entries: list[dict]) -> list[dict]:
    """The driver's status lines ({"stage", "status", "wall_s", "log"}), in the order written."""
    return [e for e in entries if "status" in e and "row" not in e]


def rows(entries: list[dict], stage: str) -> list[dict]:
    return [e["row"] for e in entries if e.get("stage") == stage and "row" in e]


def row(stage: str, **values) -> dict:
    """A row with every column of ``stage`` (unknown names refused: the schema is the contract)."""
    unknown = set(values) - set(COLUMNS[stage])
    if unknown:
        raise KeyError(f"{stage} row: unknown columns {sorted(unknown)}")
    return {c: values.get(c) for c in COLUMNS[stage]}


# ---- environment and timing -----------------------------------------------------------------------
def session(dry: bool):
    """(device, dtype) of the stage: the GPU in bf16, or (dry) the CPU in fp32."""
    if dry:
        return torch.device("cpu"), torch.float32
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run on a GPU, or pass --dry for the CPU plumbing check")
    return torch.device("cuda", torch.cuda.current_device()), torch.bfloat16


def make_env(dry: bool, entries: list[dict]):
    """benchmarks.common.BenchEnv of this stage, with the copy bandwidth and matmul rate measured by
    the preflight stage (measured here again where the preflight row is missing)."""
    from .common import make_env as _make_env

    device, dtype = session(dry)
    pre = rows(entries, "preflight")
    env = _make_env(str(device), dtype, measure=not (pre and pre[-1]["copy_GBps"]))
    if pre and pre[-1]["copy_GBps"]:
        env.copy_bytes_per_s = pre[-1]["copy_GBps"] * 1e9
    if pre and pre[-1]["matmul_TFLOPs"] and pre[-1]["matmul_dtype"] == str(dtype):
        env.matmul_flops_per_s = pre[-1]["matmul_TFLOPs"] * 1e12
    return env


def median_ms(env, fn, grads=(), rep_ms: float = 60) -> float:
    """Median milliseconds of fn(); the tensors in ``grads`` get .grad = None before each call.
    GPU: do_bench with a 10 ms warm-up and ``rep_ms`` of repeats (after its own 5-call estimate), the
    grads reset untimed; CPU: one warm-up call, then the median of two."""
    if env.is_cuda:
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=10, rep=rep_ms, grad_to_none=list(grads) or None,
                                             return_mode="median"))
    from .common import _median_time

    def call():
        for t in grads:
            t.grad = None
        fn()

    call()
    return _median_time(env, call, 2) * 1e3


def peak_mib(env, fn) -> float | None:
    """Peak memory of one fn() above what was allocated before it (benchmarks.common.peak_bytes)."""
    from .common import peak_bytes

    peak, _ = peak_bytes(env, fn)
    return None if peak is None else peak / 2**20


def _error(err: BaseException) -> str:
    """The exception's type and the first line of its message (at most 300 characters)."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0][:300] if lines else ''}"


# ---- stage 1: preflight ---------------------------------------------------------------------------
def _run(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        return (out.stdout or out.stderr).strip()
    except (OSError, subprocess.SubprocessError) as err:
        return f"unavailable ({_error(err)})"


def stage_preflight(results: Path, dry: bool) -> None:
    from .common import library_versions, make_env as _make_env

    sys.path.insert(0, str(ROOT))
    from cuda_build import find_cuda_home

    imports = {}
    for name in PACKAGES:
        try:
            module = importlib.import_module(name)
            imports[name] = str(getattr(module, "__version__", "ok"))
        except Exception as err:  # noqa: BLE001 - report every missing or broken package
            imports[name] = f"FAILED {_error(err)}"
        print(f"  import {name}: {imports[name]}", flush=True)
    cuda_home = find_cuda_home()
    nvcc = _run([os.path.join(cuda_home, "bin", "nvcc"), "--version"]).splitlines()[-1] if cuda_home else None
    smi = _run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,"
                "clocks.max.mem,power.draw,temperature.gpu", "--format=csv"])
    device, dtype = session(dry)
    env = _make_env(str(device), dtype)
    matmul = env.matmul_peak()
    driver = smi.splitlines()[-1].split(",")[1].strip() if "," in smi else None
    entry = row("preflight", device=str(device), device_name=env.device_name, driver=driver, clocks=smi,
                python=platform.python_version(), versions=library_versions(), imports=imports, nvcc=nvcc,
                cuda_home=cuda_home, copy_GBps=env.copy_bytes_per_s / 1e9, matmul_TFLOPs=matmul / 1e12,
                matmul_dtype=str(dtype))
    append(results, "preflight", row=entry)
    print(f"  {env.device_name}; copy {entry['copy_GBps']:.0f} GB/s (read + write, "
          f"{env.copy_buffer_bytes / 2**20:.0f} MiB); {dtype} matmul {entry['matmul_TFLOPs']:.1f} TFLOP/s; "
          f"nvcc: {nvcc}; CUDA_HOME {cuda_home}", flush=True)


# ---- stage 5: kernel table ------------------------------------------------------------------------
def kernel_cases(dry: bool):
    from .cases import KernelCase

    if dry:
        return [KernelCase("cos-80", 1, 2, 32, interpreted_ok=True)]
    return [KernelCase("cos-80", 256, 16, 64), KernelCase("cos-1296", 64, 16, 64)]


def _kernel_impl(name, case, layout, q_shape, env, scale):
    """(fn(q, k, v), None) for a backend or peer that runs here, else (None, why not)."""
    from cos_kernels import multiscale_window_attention

    from . import peers
    from .common import backend_skip_reason

    if name in peers.PEERS:
        reason = peers.unavailable_reason(name, env.device, env.dtype)
        return (None, reason) if reason else (peers.make_peer(name, layout, q_shape, env.device, scale), None)
    reason = backend_skip_reason(name, case.head_dim, case.interpreted_ok, env)
    if reason:
        return None, reason

    def fn(q, k, v):
        return multiscale_window_attention(q, k, v, layout, softmax_scale=scale, backend=name)

    return fn, None


def stage_kernel(results: Path, dry: bool, impls=KERNEL_IMPLS) -> None:
    from cos_kernels import CoSConfig

    from .cases import Store
    from .test_kernel import _validate, floor_bytes, make_inputs

    env = make_env(dry, read(results))
    store = Store()
    for case in kernel_cases(dry):
        layout = CoSConfig.from_preset(case.preset).layout
        scale = case.head_dim ** -0.5
        q, views, leaves, dout = make_inputs(case, layout, env, "contiguous", requires_grad=True)
        k, v = views()
        for name in impls:
            t0 = time.perf_counter()
            base = dict(case=case.label, impl=name, dtype=env.dtype_name)
            try:
                fn, reason = _kernel_impl(name, case, layout, tuple(q.shape), env, scale)
            except Exception as err:  # noqa: BLE001 - a peer that cannot be built is a result too
                fn, reason = None, f"could not be built: {_error(err)}"
            if fn is None:
                append(results, "kernel", row=row("kernel", **base, status="skipped", detail=reason))
                print(f"  {case.label} {name}: skipped ({reason})", flush=True)
                continue
            try:
                errors = _validate(store, name, fn, case, layout, scale, env, "contiguous")
            except Exception as err:  # noqa: BLE001 - wrong or broken: recorded, never timed
                append(results, "kernel", row=row("kernel", **base, status="failed", detail=_error(err)))
                print(f"  {case.label} {name}: FAILED validation: {_error(err)}", flush=True)
                continue
            worst = max(e["error"] for e in errors.values())
            for pass_ in PASSES:
                try:
                    ms = _time_kernel_pass(env, fn, q, k, v, dout, leaves, pass_)
                except Exception as err:  # noqa: BLE001
                    append(results, "kernel", row=row("kernel", **base, **{"pass": pass_}, status="failed",
                                                      max_rel_error=worst, detail=_error(err)))
                    print(f"  {case.label} {name} {pass_}: FAILED: {_error(err)}", flush=True)
                    continue
                floor = floor_bytes(case, layout, env, pass_)
                gbps = floor / (ms * 1e-3) / 1e9
                append(results, "kernel", row=row(
                    "kernel", **base, **{"pass": pass_}, status="ok", median_ms=ms, bytes_floor=floor, GBps=gbps,
                    copy_fraction=gbps * 1e9 / env.copy_bytes_per_s if env.copy_bytes_per_s else None,
                    max_rel_error=worst))
                print(f"  {case.label} {name:12s} {pass_:6s} {ms:9.4f} ms  {gbps:8.1f} GB/s", flush=True)
            print(f"  {case.label} {name}: {time.perf_counter() - t0:.1f} s with compile and validation", flush=True)
        del q, k, v, leaves, dout
        store.drop_reference()  # free the float64 reference before the next case
        if env.is_cuda:
            torch.cuda.empty_cache()


def _time_kernel_pass(env, fn, q, k, v, dout, leaves, pass_: str) -> float:
    if pass_ == "fwd":
        def run():
            with torch.no_grad():
                fn(q, k, v)
        return median_ms(env, run)
    if pass_ == "bwd":
        out = fn(q, k, v)
        return median_ms(env, lambda: out.backward(dout, retain_graph=True), grads=leaves)
    return median_ms(env, lambda: fn(q, k, v).backward(dout), grads=leaves)


# ---- stage 6: module table ------------------------------------------------------------------------
def module_cases(dry: bool):
    from .cases import _CPU_TINY_MODULE, ModuleCase

    if dry:
        return [ModuleCase("cos-80", 1, _CPU_TINY_MODULE, interpreted_ok=True)]
    return [ModuleCase("cos-80", 256), ModuleCase("cos-1296", 64)]


def stage_module(results: Path, dry: bool) -> None:
    from cos_kernels import CoSConfig
    from cos_kernels.ops import resolve_backend

    from .cases import Store
    from .common import backend_skip_reason
    from .test_module import _validate, build, features

    env = make_env(dry, read(results))
    store = Store()
    # the best fused backend here (the dry run: the Triton kernels, under the interpreter)
    best = "triton" if dry else resolve_backend("auto", env.device)
    for case in module_cases(dry):
        cfg = CoSConfig.from_preset(case.preset, **dict(case.overrides))
        # the eager unfused path first: the others are quoted against it
        variants = [("torch", False), ("torch", True)] + ([(best, False), (best, True)] if best != "torch" else [])
        eager = {}
        for backend, fused in variants:
            base = dict(case=case.label, impl=f"{backend} {'fused' if fused else 'unfused'}", backend=backend,
                        fused=fused, dtype=env.dtype_name)
            reason = backend_skip_reason(backend, cfg.head_dim, case.interpreted_ok, env)
            if reason:
                append(results, "module", row=row("module", **base, status="skipped", detail=reason))
                continue
            t0 = time.perf_counter()
            try:
                model = build(case, backend, fused, env.device, env.dtype)
                errors = _validate(store, case, backend, fused, model, env)
                feats = features(model, case.batch, env.device, env.dtype, seed=0)
                dout = torch.randn(case.batch, model.num_tokens, cfg.llm_dim, device=env.device, dtype=env.dtype)
                params = list(model.parameters())

                def step():
                    model(feats).backward(dout)

                ms = median_ms(env, step, grads=params, rep_ms=300)  # 10-50 ms per step at these sizes
                model.zero_grad(set_to_none=True)
                mem = peak_mib(env, step)
            except Exception as err:  # noqa: BLE001
                append(results, "module", row=row("module", **base, status="failed", detail=_error(err)))
                print(f"  {case.label} {base['impl']}: FAILED: {_error(err)}", flush=True)
                continue
            finally:
                model = feats = None
            if (backend, fused) == ("torch", False):
                eager = {"ms": ms, "mem": mem}
            worst = max(errors["out"]["error"], errors["worst_param_grad"]["error"])
            append(results, "module", row=row(
                "module", **base, status="ok", median_ms=ms, peak_mem_MiB=mem,
                speedup_vs_eager_unfused=eager["ms"] / ms if eager else None,
                mem_vs_eager_unfused=mem / eager["mem"] if mem and eager.get("mem") else None, max_rel_error=worst,
                detail=f"worst parameter grad: {errors['worst_param_grad']['name']}"))
            print(f"  {case.label} {base['impl']:16s} fwd+bwd {ms:9.3f} ms  peak {mem or 0:9.1f} MiB  "
                  f"({time.perf_counter() - t0:.1f} s)", flush=True)
        store.drop_reference()
        if env.is_cuda:
            torch.cuda.empty_cache()


# ---- stage 7: stage-1 step table ------------------------------------------------------------------
E2E_BRIDGES = (("resampler-336", "resampler-336"), ("cos-80", "cos-80"), ("linear-256", "linear"))


def build_mllm(model: str, bridge: str, env):
    """CoSMLLM initialised on the device (nothing of it on the host: a random 7B would need 27 GB there),
    then the frozen ViT and LLM cast to the session dtype, the bridge kept fp32 (the trainer's bf16
    precision)."""
    from cos_kernels.mllm import CoSMLLM, MLLMConfig

    cfg = MLLMConfig.from_preset("tiny" if model == "tiny" else f"vitl14-224-{model}", bridge=bridge)
    with torch.device(env.device):
        net = CoSMLLM(cfg, backend="auto")
    stray = [n for n, p in net.named_parameters() if p.device != env.device]
    if stray:
        raise RuntimeError(f"{len(stray)} parameters were not created on {env.device} (first: {stray[0]})")
    if env.dtype != torch.float32:
        net.vision.to(env.dtype)
        net.llm.to(env.dtype)
    return net, cfg


def stage_e2e(results: Path, dry: bool) -> None:
    from .cases import E2ECase
    from .common import count_matmul_flops
    from .test_e2e import _bridge_time, attention_flops, make_batch

    env = make_env(dry, read(results))
    model_size, batch, tokens = ("tiny", 2, 16) if dry else ("1b", 16, 64)
    reference_ms = None
    for label, bridge in E2E_BRIDGES:
        case = E2ECase("pretrain", model_size, bridge, label, 224, batch, tokens)
        base = dict(case=f"stage 1, {model_size} B={batch} T={tokens}", bridge=label, model=model_size,
                    dtype=env.dtype_name)
        t0 = time.perf_counter()
        try:
            net, cfg = build_mllm(model_size, bridge, env)
            net.train()
            net.llm.requires_grad_(False)
            trainable = [p for p in net.parameters() if p.requires_grad]
            opt = torch.optim.AdamW(trainable, lr=1e-3, weight_decay=0.0)
            data = make_batch(net, case, env)
            autocast = torch.autocast(env.device.type, dtype=env.dtype, enabled=env.dtype != torch.float32)

            def step():
                with autocast:
                    loss_sum, n = net(**data)
                (loss_sum / n).backward()
                torch.nn.utils.clip_grad_norm_(trainable, 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)

            ms = median_ms(env, step, rep_ms=1500)  # ~10 steps of 100-200 ms
            matmul = count_matmul_flops(step)
            flops = None if matmul is None else matmul + attention_flops(net, case)
            _, bridge_s = _bridge_time(net, data, env, reps=5 if env.is_cuda else 2)
            peak = env.matmul_peak()
            visual = net.num_visual_tokens
        except Exception as err:  # noqa: BLE001
            append(results, "e2e", row=row("e2e", **base, status="failed", detail=_error(err)))
            print(f"  {label}: FAILED: {_error(err)}", flush=True)
            traceback.print_exc()
            continue
        finally:
            net = opt = None
            if env.is_cuda:
                torch.cuda.empty_cache()
        if label == "resampler-336":
            reference_ms = ms
        append(results, "e2e", row=row(
            "e2e", **base, status="ok", step_ms=ms, samples_per_s=batch / (ms * 1e-3),
            rel_step_vs_resampler_336=ms / reference_ms if reference_ms else None,
            bridge_fwdbwd_ms=bridge_s * 1e3, bridge_share=bridge_s * 1e3 / ms,
            mfu=None if flops is None else flops / (ms * 1e-3) / peak, visual_tokens=visual,
            detail=f"{cfg.image_size} px, grid {cfg.grid}, matmul peak {peak / 1e12:.1f} TFLOP/s"))
        print(f"  {label:14s} step {ms:9.2f} ms  {batch / (ms * 1e-3):8.1f} samples/s  bridge "
              f"{bridge_s * 1e3:7.2f} ms  ({time.perf_counter() - t0:.1f} s)", flush=True)


# ---- rendering and the schema check ---------------------------------------------------------------
def _f(x, fmt: str = ".3g") -> str:
    return "-" if x is None else format(x, fmt)


def _table(header: list[str], body: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in body]


def kernel_speedups(kernel_rows: list[dict]) -> dict:
    """(case, impl, pass) -> (torch median / its median, fastest peer's median / its median) over the
    rows measured in the same run."""
    from .peers import PEERS

    ms = {(r["case"], r["impl"], r["pass"]): r["median_ms"] for r in kernel_rows if r["status"] == "ok"}
    out = {}
    for (case, impl, pass_), t in ms.items():
        peers = [v for (c, i, p), v in ms.items() if c == case and p == pass_ and i in ("torch", *PEERS) and i != impl]
        torch_t = ms.get((case, "torch", pass_))
        out[case, impl, pass_] = (None if torch_t is None else torch_t / t, min(peers) / t if peers else None)
    return out


def fused_order(kernel_rows: list[dict]) -> dict[str, list[str]]:
    """dtype name -> the fused backends timed in every case of that dtype, fastest first by the sum of
    their forward+backward medians: what cos_kernels.ops.AUTO_ORDER should say after this run."""
    from cos_kernels.ops import AUTO_ORDER

    fused = {name for order in AUTO_ORDER.values() for name in order}
    out = {}
    for dtype in dict.fromkeys(r["dtype"] for r in kernel_rows):
        ok = [r for r in kernel_rows if r["dtype"] == dtype and r["pass"] == "fwdbwd" and r["status"] == "ok"]
        cases = {r["case"] for r in ok}
        totals = {}
        for impl in fused:
            times = [r["median_ms"] for r in ok if r["impl"] == impl]
            if times and len(times) == len(cases):
                totals[impl] = sum(times)
        if totals:
            out[dtype] = sorted(totals, key=totals.get)
    return out


def render(entries: list[dict]) -> str:
    """SUMMARY.md from the results lines: stage statuses and times, then each table."""
    out = ["# GPU check", ""]
    status = stage_statuses(entries)
    out += _table(["stage", "status", "wall s", "log"],
                  [[e["stage"], e["status"], _f(e.get("wall_s"), ".1f"), e.get("log", "")] for e in status])
    pre = rows(entries, "preflight")
    if pre:
        p = pre[-1]
        out += ["", f"Device: {p['device_name']}, driver {p['driver']}; Python {p['python']}; "
                    f"torch {p['versions'].get('torch')} (CUDA {p['versions'].get('cuda')}), triton "
                    f"{p['versions'].get('triton')}, transformers {p['versions'].get('transformers')}; {p['nvcc']}; "
                    f"CUDA_HOME {p['cuda_home']}.",
                f"Measured: copy {_f(p['copy_GBps'], '.0f')} GB/s (read + write), {p['matmul_dtype']} matmul "
                f"{_f(p['matmul_TFLOPs'], '.1f')} TFLOP/s.",
                "Failed imports: " + (", ".join(k for k, v in p["imports"].items() if v.startswith("FAILED")) or "none")]
    kernel = rows(entries, "kernel")  # flex rows come last in the file: order by case, then implementation
    cases = {c: i for i, c in enumerate(dict.fromkeys(r["case"] for r in kernel))}
    order = {name: i for i, name in enumerate(KERNEL_IMPLS)}
    kernel.sort(key=lambda r: (cases[r["case"]], order.get(r["impl"], len(order))))
    if kernel:
        out += ["", "## Kernel (median ms; GB/s over the floor bytes; fraction of the measured copy bandwidth)", ""]
        out += ["x torch: the torch backend's median over this one; x best peer: the fastest other peer's "
                "(torch backend, SDPA with mask, compiled FlexAttention, FlashAttention varlen) over this one.", ""]
        speedups = kernel_speedups(kernel)
        out += _table(["case", "impl", "pass", "status", "ms", "GB/s", "of copy", "x torch", "x best peer", "rel err"],
                      [[r["case"], r["impl"], r["pass"] or "-", r["status"], _f(r["median_ms"], ".4g"),
                        _f(r["GBps"], ".4g"), _f(r["copy_fraction"], ".1%"),
                        *(_f(x, ".2f") for x in speedups.get((r["case"], r["impl"], r["pass"]), (None, None))),
                        _f(r["max_rel_error"], ".2g") if r["status"] == "ok" else (r["detail"] or "")[:80]]
                       for r in kernel])
        order = fused_order(kernel)
        if order:
            out += ["", "Fused backends by forward+backward time, summed over the cases (for "
                        "cos_kernels.ops.AUTO_ORDER): " + "; ".join(f"{d}: {' > '.join(o)}" for d, o in order.items())]
    module = rows(entries, "module")
    if module:
        out += ["", "## Module (forward + backward, median ms; peak memory above the inputs)", ""]
        out += _table(["case", "impl", "status", "ms", "peak MiB", "x eager unfused", "mem / eager", "rel err"],
                      [[r["case"], r["impl"], r["status"], _f(r["median_ms"], ".4g"), _f(r["peak_mem_MiB"], ".0f"),
                        _f(r["speedup_vs_eager_unfused"], ".2f"), _f(r["mem_vs_eager_unfused"], ".2f"),
                        _f(r["max_rel_error"], ".2g") if r["status"] == "ok" else (r["detail"] or "")[:60]]
                       for r in module])
    e2e = rows(entries, "e2e")
    if e2e:
        out += ["", "## Stage-1 step (median ms; relative to resampler-336; bridge share of the step)", ""]
        out += _table(["case", "bridge", "status", "step ms", "samples/s", "vs resampler-336", "bridge ms", "share",
                       "MFU"],
                      [[r["case"], r["bridge"], r["status"], _f(r["step_ms"], ".4g"), _f(r["samples_per_s"], ".1f"),
                        _f(r["rel_step_vs_resampler_336"], ".3f"), _f(r["bridge_fwdbwd_ms"], ".3g"),
                        _f(r["bridge_share"], ".1%"), _f(r["mfu"], ".1%")] for r in e2e])
    return "\n".join(out) + "\n"


def plot(entries: list[dict], path: Path) -> bool:
    """Bar chart of the kernel table: fraction of the copy bandwidth per implementation and pass."""
    ok = [r for r in rows(entries, "kernel") if r["status"] == "ok" and r["copy_fraction"] is not None]
    if not ok:
        return False
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    cases = list(dict.fromkeys(r["case"] for r in ok))
    fig, axes = plt.subplots(1, len(cases), figsize=(6.5 * len(cases), 4.2), squeeze=False)
    for ax, case in zip(axes[0], cases):
        impls = list(dict.fromkeys(r["impl"] for r in ok if r["case"] == case))
        for i, pass_ in enumerate(PASSES):
            values = {r["impl"]: r["copy_fraction"] for r in ok if r["case"] == case and r["pass"] == pass_}
            ax.bar([j + (i - 1) * 0.27 for j in range(len(impls))], [values.get(m, 0) for m in impls], 0.27,
                   label=pass_)
        ax.set_xticks(range(len(impls)), impls)
        ax.set_title(case)
        ax.set_ylabel("floor bytes / time / copy bandwidth")
        ax.legend()
    fig.suptitle(f"multiscale_window_attention, {ok[0]['dtype']} (higher is better; 1.0 = copy speed)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# the driver's stages (scripts/gpu_check.py), and the table each one fills
CHECK_STAGES = ("preflight", "build", "tests_triton", "tests_cuda", "kernel", "module", "e2e", "flex")
ROW_STAGE = {"preflight": "preflight", "kernel": "kernel", "module": "module", "e2e": "e2e", "flex": "kernel"}
_MEASURED = {"kernel": ("median_ms", "GBps", "max_rel_error"), "module": ("median_ms", "max_rel_error"),
             "e2e": ("step_ms", "samples_per_s", "bridge_share"), "preflight": ("copy_GBps", "matmul_TFLOPs")}


def check_results(entries: list[dict], want_stages=CHECK_STAGES) -> list[str]:
    """Problems with a results file: a stage without a status line, a table stage that ended ok
    without rows, a row missing a column, an ok row without its numbers. Empty where it is sound."""
    problems = []
    ended = {e["stage"]: e for e in stage_statuses(entries)}
    for stage in want_stages:
        if stage not in ended:
            problems.append(f"stage {stage}: no status line")
            continue
        table = ROW_STAGE.get(stage)
        if table is None:
            continue
        got = [r for r in rows(entries, table) if stage != "flex" or r.get("impl") == "flex"]
        if ended[stage]["status"] == "ok" and not got:
            problems.append(f"stage {stage}: ended ok but wrote no rows")
        for r in got:
            missing = [c for c in COLUMNS[table] if c not in r]
            if missing:
                problems.append(f"stage {stage}: a row lacks the columns {missing}")
            if table == "preflight" or r.get("status") == "ok":
                empty = [c for c in _MEASURED[table] if r.get(c) is None]
                if empty:
                    problems.append(f"stage {stage}: an ok row ({r.get('case')} {r.get('impl') or r.get('bridge')}) "
                                    f"has no {empty}")
    return problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("stage", choices=STAGES)
    parser.add_argument("--results", type=Path, required=True, help="JSON-lines results file (appended)")
    parser.add_argument("--dry", action="store_true", help="CPU plumbing check: fp32, tiny sizes, interpreter")
    parser.add_argument("--impls", default=",".join(KERNEL_IMPLS),
                        help=f"kernel stage: comma-separated implementations (default: {','.join(KERNEL_IMPLS)})")
    args = parser.parse_args(argv)
    if args.stage == "kernel":
        impls = [i.strip() for i in args.impls.split(",") if i.strip()]
        unknown = sorted(set(impls) - set(KERNEL_IMPLS))
        if unknown:
            parser.error(f"--impls: unknown {unknown}; known: {list(KERNEL_IMPLS)}")
        stage_kernel(args.results, args.dry, impls)
    else:
        {"preflight": stage_preflight, "module": stage_module, "e2e": stage_e2e}[args.stage](args.results, args.dry)
    return 0


if __name__ == "__main__":
    sys.exit(main())
