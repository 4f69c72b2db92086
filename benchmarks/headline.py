"""The GPU check's measurements: preflight, then the kernel, module and stage-1 step tables, as work
items that one process runs in order.

scripts/gpu_check.py starts one process per implementation (a group of items) and restarts it for
the items left when it crashes, hangs or finds its CUDA context poisoned:

    python -m benchmarks.headline STAGE --results FILE --group G --items A,B,... [--backend B] [--dry]

Items: preflight ("preflight"); kernel "IMPL@CASE" (a backend or peer at a case, CASE its key such
as "cos-80:256x16x64"); module "BACKEND@CASE" (unfused and fused resampler); e2e "MODEL@BRIDGE" (a
stage-1 step). Around each
item the process appends a start and a done event to FILE (benchmarks/gpu_results.py), and its rows
as soon as each exists, so a killed process keeps every row it finished and the driver knows the
item it was in. After an item fails, the process synchronises the device: if the CUDA context is
unusable (a sticky error such as an illegal address) it writes a "poisoned" event and exits with
POISONED_EXIT, and the driver goes on in a fresh process.

Sizes: on the GPU, bf16, cos-80 B=256 and cos-1296 B=64 (H=16, D=64; the paper's widths for the
module), the "7b" and "1b" proxies (ViT-L/14 + LLaMA-2-7B / TinyLlama-1.1B architectures, random
weights) at B=16 with 64 caption tokens for the stage-1 step. ``--dry`` (CPU, CI): fp32, tiny
cases, Triton under its interpreter, the "tiny" MLLM, and two fake implementations that fail on
purpose (FAULTS): it checks the plumbing, not the speed.

The implementations, inputs, float64 validation, pass callables, floors and FLOPs are those of the
pytest-benchmark suites (benchmarks/harness.py): an implementation that fails its validation is
recorded as failed, with its error, and not timed. Timing: benchmarks/device_timing.py (eager calls
with L2 flushed, the same calls in a CUDA graph, the backward's launches from the profiler), each
row with min, median and max.
"""

from __future__ import annotations

import argparse
import functools
import importlib
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

from . import harness  # noqa: E402
from .cases import (  # noqa: E402
    PRETRAIN_BRIDGES,
    case_by_key,
    headline_e2e_cases,
    headline_kernel_cases,
    headline_module_cases,
)
from .common import BACKEND_NAMES, backend_skip_reason, count_matmul_flops, peak_bytes  # noqa: E402
from .common import cuda_context_error as context_poisoned  # noqa: E402
from .common import error_line as _error  # noqa: E402
from .common import make_env as _make_env  # noqa: E402
from .device_timing import eager_times, graph_times, launch_times, median_s, spread  # noqa: E402
from .gpu_results import append, rates, read, row, rows  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
STAGES = ("preflight", "kernel", "module", "e2e")
PASSES = ("fwd", "bwd", "fwdbwd")
LAUNCH_PASSES = ("bwd_dq", "bwd_dkdv")  # the backward's two launches, fused backends only
FUSED = tuple(b for b in BACKEND_NAMES if b != "torch")  # every fused backend of the package
PEERS_FIRST = ("torch", "sdpa_mask", "flash_varlen")  # then the fused backends; flex (compiles) last
KERNEL_IMPLS = (*PEERS_FIRST, *FUSED, "flex")
# Dry-run fakes: fault_raise raises inside every call (a failed row, the process goes on);
# fault_exit kills its process at the first case without a word (the driver records it and restarts
# the group for the second case, where it is the torch backend).
FAULTS = ("fault_raise", "fault_exit")
POISONED_EXIT = 3
FAULT_EXIT_CODE = 7
PACKAGES = ("torch", "triton", "numpy", "transformers", "safetensors", "tqdm", "PIL", "matplotlib",
            "pytest", "pytest_benchmark", "pytest_timeout", "xdist", "ninja", "pybind11", "cos_kernels",
            "cos_kernels.ops.triton_backend", "cos_kernels.mllm", "torch.nn.attention.flex_attention")


class ContextPoisoned(RuntimeError):
    """The CUDA context cannot run anything more: the process must end."""


# ---- environment ----------------------------------------------------------------------------------
def session(dry: bool):
    """(device, dtype) of the stage: the GPU in bf16, or (dry) the CPU in fp32."""
    if dry:
        return torch.device("cpu"), torch.float32
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run on a GPU, or pass --dry for the CPU plumbing check")
    return torch.device("cuda", torch.cuda.current_device()), torch.bfloat16


def make_env(dry: bool, entries: list[dict]):
    """benchmarks.common.BenchEnv of this process, with the copy bandwidth and matmul rate measured by
    the preflight stage (measured here again where the preflight row is missing)."""
    device, dtype = session(dry)
    pre = [r for r in rows(entries, "preflight") if r["copy_GBps"]]
    env = _make_env(str(device), dtype, measure=not pre)
    if pre:
        env.copy_bytes_per_s = pre[-1]["copy_GBps"] * 1e9
        if pre[-1]["matmul_TFLOPs"] and pre[-1]["matmul_dtype"] == str(dtype):
            env.matmul_flops_per_s = pre[-1]["matmul_TFLOPs"] * 1e12
    return env


def _free(env) -> None:
    if env.is_cuda and context_poisoned() is None:
        torch.cuda.empty_cache()


# ---- item identities (the driver writes a lost item's row with them) ------------------------------
def items(stage: str, group: str, dry: bool) -> list[str]:
    """The work items of one group: kernel/module: the group's implementation at every case; e2e: the
    group's model with every bridge."""
    groups = {"preflight": ("preflight",), "kernel": KERNEL_IMPLS + (FAULTS if dry else ()),
              "module": ("torch", *FUSED), "e2e": ("tiny",) if dry else ("7b", "1b")}
    if stage not in groups:
        raise ValueError(f"unknown stage {stage!r}; stages: {list(groups)}")
    if group not in groups[stage]:
        raise ValueError(f"unknown {stage} group {group!r}; {stage} groups{' (dry)' if dry else ''}: "
                         f"{list(groups[stage])}")
    if stage == "preflight":
        return ["preflight"]
    if stage == "kernel":
        return [f"{group}@{c.key}" for c in headline_kernel_cases(dry)]
    if stage == "module":
        return [f"{group}@{c.key}" for c in headline_module_cases(dry)]
    return [f"{group}@{label}" for label, _, _ in PRETRAIN_BRIDGES]


def lost_row(stage: str, item: str, dry: bool, status: str, detail: str) -> dict | None:
    """The row the driver writes for an item that its process never finished (None for preflight)."""
    dtype = "fp32" if dry else "bf16"
    name, _, key = item.partition("@")
    if stage == "kernel":
        return row("kernel", case=case_by_key(headline_kernel_cases(dry), key).label, impl=name, dtype=dtype,
                   status=status, detail=detail)
    if stage == "module":
        return row("module", case=case_by_key(headline_module_cases(dry), key).label,
                   impl=f"{name} (unfused and fused)", backend=name, dtype=dtype, status=status, detail=detail)
    if stage == "e2e":
        return row("e2e", case=headline_e2e_cases(name)[0].step_label, bridge=key, model=name, dtype=dtype,
                   status=status, detail=detail)
    return None


# ---- the item loop --------------------------------------------------------------------------------
def run_items(stage: str, group: str, work: list[str], results: Path, dry: bool, run_one, poisoned=context_poisoned,
              exit=os._exit) -> None:
    """run_one(item) for each item, between a start and a done event. An item that raises gets a
    failed row (run_one writes its own rows otherwise); then, if ``poisoned()`` names an error, a
    poisoned event is written and the process ends with POISONED_EXIT."""
    pid = os.getpid()
    for item in work:
        append(results, stage, event="start", item=item, group=group, pid=pid, t=time.time())
        t0 = time.perf_counter()
        print(f"-- {stage} {item}", flush=True)
        failure = None
        try:
            run_one(item)
        except ContextPoisoned as err:  # the runner wrote its rows; the check below ends the process
            failure = _error(err)
        except Exception as err:  # noqa: BLE001 - one item's failure is its row, never the others'
            failure = _error(err)
            traceback.print_exc()
            r = lost_row(stage, item, dry, "failed", failure)
            if r is not None:
                append(results, stage, row=r)
        bad = poisoned()
        if bad is not None:
            append(results, stage, event="poisoned", item=item, group=group, pid=pid, error=bad)
        append(results, stage, event="done", item=item, group=group, pid=pid, wall_s=round(time.perf_counter() - t0, 2))
        print(f"-- {stage} {item}: {'FAILED ' + failure if failure else 'done'} in {time.perf_counter() - t0:.1f} s",
              flush=True)
        if bad is not None:
            print(f"-- {stage} {item}: the CUDA context is unusable ({bad}); ending this process", flush=True)
            exit(POISONED_EXIT)
            return  # where ``exit`` returns (a test's)


# ---- preflight ------------------------------------------------------------------------------------
def _run(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        return (out.stdout or out.stderr).strip()
    except (OSError, subprocess.SubprocessError) as err:
        return f"unavailable ({_error(err)})"


def stage_preflight(results: Path, dry: bool) -> None:
    from .common import library_versions

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


# ---- kernel table ---------------------------------------------------------------------------------
def _kernel_impl(name, case, cases, layout, q_shape, env):
    """harness.kernel_impl, and the dry run's fakes: fault_raise raises in every call; fault_exit
    ends its process at the first case, as a segfault would, and is the torch backend after."""
    if name not in FAULTS:
        return harness.kernel_impl(name, case, layout, q_shape, env)
    if env.device.type != "cpu":
        raise ValueError(f"{name} is a dry-run fake; it never runs on a GPU")
    if name == "fault_raise":
        def fn(q, k, v):
            raise RuntimeError("injected fault: this fake backend raises in every call")
        return fn, None
    if case == cases[0]:
        def fn(q, k, v):
            print("fault_exit: ending the process without a word", flush=True)
            os._exit(FAULT_EXIT_CODE)
        return fn, None
    return harness.kernel_impl("torch", case, layout, q_shape, env)


class Runner:
    """What the items of one process share: the results file, the environment, the float64
    references of the latest case (harness.Store) and the stage's cases."""

    def __init__(self, results: Path, dry: bool, cases=()):
        self.results, self.dry, self.cases = results, dry, cases
        self.env = make_env(dry, read(results))
        self.store = harness.Store()

    def failed(self, stage: str, base: dict, err: Exception, what: str = "") -> None:
        """A failed row for ``err``; ContextPoisoned where the CUDA context broke with it."""
        append(self.results, stage, row=row(stage, **base, status="failed", detail=what + _error(err)))
        print(f"  {' '.join(str(v) for v in base.values())}: FAILED {what}{_error(err)}", flush=True)
        if context_poisoned():
            raise ContextPoisoned(_error(err)) from err


class KernelRunner(Runner):
    """Kernel items of one process: inputs and the float64 reference kept per case."""

    def __init__(self, results: Path, dry: bool):
        super().__init__(results, dry, headline_kernel_cases(dry))
        self.inputs = (None, None)

    def _inputs(self, case, layout):
        if self.inputs[0] != case:
            self.inputs = (None, None)  # the old case's tensors go before the new ones are made
            self.inputs = (case, harness.kernel_inputs(case, layout, self.env, "contiguous", requires_grad=True))
        return self.inputs[1]

    def _row(self, **values) -> None:
        append(self.results, "kernel", row=row("kernel", **values))

    def __call__(self, item: str) -> None:
        name, _, key = item.partition("@")
        case, env = case_by_key(self.cases, key), self.env
        layout = harness.kernel_layout(case)
        base = dict(case=case.label, impl=name, dtype=env.dtype_name)
        q, views, leaves, dout = self._inputs(case, layout)
        try:
            fn, reason = _kernel_impl(name, case, self.cases, layout, tuple(q.shape), env)
        except Exception as err:  # noqa: BLE001 - a peer that cannot be built is a result too
            fn, reason = None, f"could not be built: {_error(err)}"
        if fn is None:
            self._row(**base, status="skipped", detail=reason)
            print(f"  {case.label} {name}: skipped ({reason})", flush=True)
            return
        try:
            errors = harness.validate_kernel(self.store, name, fn, case, layout, env, "contiguous")
        except Exception as err:  # noqa: BLE001 - wrong or broken: recorded, never timed
            self.failed("kernel", base, err, "validation: ")
            return
        worst = max(e["error"] for e in errors.values())
        for pass_ in PASSES:
            self._time_pass(base, case, layout, harness.kernel_pass(fn, q, views, dout, pass_), leaves, pass_, worst)
        if name in FUSED:
            self._time_launches(base, case, layout, harness.kernel_pass(fn, q, views, dout, "bwd"), leaves, worst)

    def _time_pass(self, base, case, layout, calls, leaves, pass_, worst) -> None:
        """Eager calls, then the same calls in a CUDA graph (setup() run on the capture stream)."""
        setup, run = calls
        env, floor = self.env, harness.kernel_floor_bytes(case, layout, self.env.dtype, pass_)
        try:
            state = setup()
            lo, med, hi = spread(eager_times(env, lambda: run(state), leaves))
        except Exception as err:  # noqa: BLE001
            self.failed("kernel", {**base, "pass": pass_, "max_rel_error": worst}, err)
            return
        graph, note = (None, None, None), None
        if env.is_cuda:
            try:
                graph = spread(graph_times(env, lambda: functools.partial(run, setup()), leaves))
            except Exception as err:  # noqa: BLE001 - the eager numbers stand without it
                note = f"CUDA graph: {_error(err)}"
                if context_poisoned():
                    raise ContextPoisoned(note) from err
        copy = env.copy_bytes_per_s
        r = rates(floor, harness.kernel_flops(case, layout, pass_), med, copy)
        self._row(**base, **{"pass": pass_}, status="ok", median_ms=med, min_ms=lo, max_ms=hi, graph_ms=graph[1],
                  graph_min_ms=graph[0], graph_max_ms=graph[2], bytes_floor=floor, **r,
                  graph_copy_fraction=rates(floor, None, graph[1], copy)["copy_fraction"], max_rel_error=worst,
                  detail=note)
        print(f"  {case.label} {base['impl']:12s} {pass_:6s} {med:9.4f} ms [{lo:.4f}, {hi:.4f}]  graph "
              f"{'-' if graph[1] is None else format(graph[1], '.4f')} ms  {r['GBps']:8.1f} GB/s", flush=True)

    def _time_launches(self, base, case, layout, calls, leaves, worst) -> None:
        """The backward's dQ+delta and dK/dV launches apart, each against its own floor."""
        setup, run = calls
        env = self.env
        try:
            state = setup()
            launches = launch_times(env, lambda: run(state), leaves, calls=10 if env.is_cuda else 2)
        except Exception as err:  # noqa: BLE001
            status = "skipped" if not env.is_cuda else "failed"
            for pass_ in LAUNCH_PASSES:
                self._row(**base, **{"pass": pass_}, status=status, detail=f"launch times: {_error(err)}")
            print(f"  {case.label} {base['impl']} backward launches: {status} ({_error(err)})", flush=True)
            if context_poisoned():
                raise ContextPoisoned(_error(err)) from err
            return
        other = launches.get("other", [0.0])[0]
        for pass_ in LAUNCH_PASSES:
            if pass_ not in launches:
                self._row(**base, **{"pass": pass_}, status="failed",
                          detail=f"no {pass_} launch found once per call (found {sorted(launches)})")
                continue
            lo, med, hi = spread(launches[pass_])
            floor = harness.kernel_floor_bytes(case, layout, env.dtype, pass_)
            self._row(**base, **{"pass": pass_}, status="ok", median_ms=med, min_ms=lo, max_ms=hi, bytes_floor=floor,
                      **rates(floor, None, med, env.copy_bytes_per_s), max_rel_error=worst,
                      detail=f"device time from the profiler; other kernels {other:.4f} ms per call")
            print(f"  {case.label} {base['impl']:12s} {pass_:8s} {med:9.4f} ms (device)", flush=True)


# ---- module table ---------------------------------------------------------------------------------
class ModuleRunner(Runner):
    """Module items of one process: the backend's unfused and fused resampler at one case."""

    def __init__(self, results: Path, dry: bool):
        super().__init__(results, dry, headline_module_cases(dry))

    def __call__(self, item: str) -> None:
        backend, _, key = item.partition("@")
        case, env = case_by_key(self.cases, key), self.env
        reason = backend_skip_reason(backend, harness.module_config(case).head_dim, case.interpreted_ok, env)
        for fused in (False, True):
            base = dict(case=case.label, impl=f"{backend} {'fused' if fused else 'unfused'}", backend=backend,
                        fused=fused, dtype=env.dtype_name, **{"pass": "fwdbwd"})
            if reason:
                append(self.results, "module", row=row("module", **base, status="skipped", detail=reason))
                continue
            t0 = time.perf_counter()
            try:
                r = self._measure(case, backend, fused)
            except Exception as err:  # noqa: BLE001
                self.failed("module", base, err)
                continue
            finally:
                _free(env)
            append(self.results, "module", row=row("module", **base, status="ok", **r))
            print(f"  {case.label} {base['impl']:16s} fwd+bwd {r['median_ms']:9.3f} ms [{r['min_ms']:.3f}, "
                  f"{r['max_ms']:.3f}]  peak {r['peak_mem_MiB'] or 0:9.1f} MiB  floor {r['floor_ms']:.3f} ms  "
                  f"({time.perf_counter() - t0:.1f} s)", flush=True)
        self.store.drop_reference()

    def _measure(self, case, backend: str, fused: bool) -> dict:
        env = self.env
        model = harness.build_resampler(case, backend, fused, env.device, env.dtype)
        errors = harness.validate_module(self.store, case, backend, fused, model, env)
        feats, dout = harness.module_inputs(model, case.batch, env, seed=0)
        _, run = harness.module_pass(model, feats, dout, "fwdbwd")
        lo, med, hi = spread(eager_times(env, lambda: run(None), list(model.parameters()), rep_ms=300))
        model.zero_grad(set_to_none=True)
        peak, _ = peak_bytes(env, lambda: run(None))
        model.zero_grad(set_to_none=True)
        flops = harness.module_flops(model, feats, dout, "fwdbwd")
        nbytes = harness.module_floor_bytes(model, feats, env.dtype, "fwdbwd")
        return dict(median_ms=med, min_ms=lo, max_ms=hi, peak_mem_MiB=None if peak is None else peak / 2**20,
                    floor_bytes=nbytes, floor_flops=flops, floor_ms=harness.module_floor_ms(env, nbytes, flops),
                    **harness.module_errors(errors))


# ---- stage-1 step table ---------------------------------------------------------------------------
class E2ERunner(Runner):
    """Stage-1 step items of one process (one model size), the resampler on ``backend``."""

    def __init__(self, results: Path, dry: bool, backend: str):
        super().__init__(results, dry)
        self.backend = backend

    def __call__(self, item: str) -> None:
        model_size, _, label = item.partition("@")
        case = next(c for c in headline_e2e_cases(model_size) if c.label_bridge == label)
        resampler = not case.bridge.startswith(("linear", "mlp"))
        base = dict(case=case.step_label, bridge=label, model=model_size,
                    backend=self.backend if resampler else None, dtype=self.env.dtype_name)
        t0 = time.perf_counter()
        try:
            r = self._measure(case)
        except Exception as err:  # noqa: BLE001
            traceback.print_exc()
            self.failed("e2e", base, err)
            return
        finally:
            _free(self.env)
        append(self.results, "e2e", row=row("e2e", **base, status="ok", **r))
        print(f"  {model_size} {label:14s} step {r['step_ms']:9.2f} ms [{r['min_ms']:.2f}, {r['max_ms']:.2f}]  "
              f"{r['samples_per_s']:8.1f} samples/s  bridge {r['bridge_fwdbwd_ms']:7.2f} ms  peak "
              f"{r['peak_mem_GiB'] or 0:.1f} GiB  ({time.perf_counter() - t0:.1f} s)", flush=True)

    def _measure(self, case) -> dict:
        env = self.env
        net, cfg = harness.build_mllm(case, env, self.backend)
        data = harness.make_batch(net, case, env)
        step, _ = harness.train_step(net, case, env, data)
        if env.is_cuda:  # the steps' peak (weights, optimizer state, activations), not the fp32 init's
            torch.cuda.reset_peak_memory_stats(env.device)
        lo, med, hi = spread(eager_times(env, step, rep_ms=1500, max_calls=10))
        peak = torch.cuda.max_memory_allocated(env.device) / 2**30 if env.is_cuda else None
        matmul = count_matmul_flops(step)
        flops = None if matmul is None else matmul + harness.e2e_attention_flops(net, case)
        bridge_ms = median_s(env, harness.bridge_step(net, data, env), 5 if env.is_cuda else 2) * 1e3
        return dict(step_ms=med, min_ms=lo, max_ms=hi, samples_per_s=case.batch / (med * 1e-3),
                    bridge_fwdbwd_ms=bridge_ms, bridge_share=bridge_ms / med,
                    mfu=None if flops is None else flops / (med * 1e-3) / env.matmul_peak(), peak_mem_GiB=peak,
                    visual_tokens=net.num_visual_tokens,
                    detail=f"{cfg.image_size} px, grid {cfg.grid}, matmul peak {env.matmul_peak() / 1e12:.1f} TFLOP/s")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("stage", choices=STAGES)
    parser.add_argument("--results", type=Path, required=True, help="JSON-lines results file (appended)")
    parser.add_argument("--group", required=True, help="the implementation (kernel, module) or model (e2e)")
    parser.add_argument("--items", default=None, help="comma-separated work items (default: all of the group)")
    parser.add_argument("--backend", default="auto", help="e2e: the resampler's attention backend")
    parser.add_argument("--dry", action="store_true", help="CPU plumbing check: fp32, tiny sizes, interpreter")
    args = parser.parse_args(argv)
    try:
        known = items(args.stage, args.group, args.dry)
    except ValueError as err:
        parser.error(f"--group: {err}")
    work = args.items.split(",") if args.items else known
    if not set(work) <= set(known):
        parser.error(f"--items: unknown {sorted(set(work) - set(known))}; the {args.group} group's items: {known}")
    if args.stage == "preflight":
        runner = lambda _item: stage_preflight(args.results, args.dry)  # noqa: E731
    elif args.stage == "kernel":
        runner = KernelRunner(args.results, args.dry)
    elif args.stage == "module":
        runner = ModuleRunner(args.results, args.dry)
    else:
        runner = E2ERunner(args.results, args.dry, args.backend)
    run_items(args.stage, args.group, work, args.results, args.dry, runner)
    return 0


if __name__ == "__main__":
    sys.exit(main())
