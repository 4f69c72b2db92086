"""Shared machinery of the benchmarks: the device and environment, the session's measured ceilings
(copy bandwidth, dense-matmul throughput), backend availability, error checks against a float64
reference, peak memory, FLOP counts and pytest-benchmark's extra_info. Timing: device_timing.py.
"""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .device_timing import median_s
from .gpu_results import row

__all__ = [
    "BACKEND_NAMES", "backend_skip_reason", "error_line", "cuda_context_error", "BenchEnv", "make_env", "peak_bytes",
    "peak_memory", "record", "timed_ms", "check_close", "DTYPES", "param_bytes", "count_matmul_flops", "rel_error",
    "set_group",
]

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}

# Correctness check run before an implementation is timed (KERNELS.md's testing rule): its error
# against a float64 reference, relative to the reference's largest magnitude, may be at most twice
# the error of the eager torch path in the same dtype plus this allowance. A wrong implementation
# fails its benchmark instead of reporting a flattering number.
_ALLOWANCE = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 5e-3}


# ---- errors ---------------------------------------------------------------------------------------
def error_line(err: BaseException) -> str:
    """The exception's type and the first line of its message (at most 300 characters)."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0][:300] if lines else ''}"


def cuda_context_error() -> str | None:
    """None where this process has no CUDA context or its context still runs work (a synchronise and
    a tiny kernel), else the error that raised: a sticky error (an illegal address) poisons every
    later call in the process."""
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    try:
        torch.cuda.synchronize()
        torch.empty(1, device="cuda").add_(1).item()
    except Exception as err:  # noqa: BLE001 - torch.AcceleratorError / RuntimeError alike
        return error_line(err)
    return None


# ---- backends -------------------------------------------------------------------------------------
def _backend_names() -> list[str]:
    from cos_kernels.ops import BACKENDS

    return list(dict.fromkeys(["torch", "triton", "cuda", *(b for b in BACKENDS if b != "auto")]))


# every backend a build may have; those this build or machine lacks are skipped with the reason
BACKEND_NAMES = _backend_names()


def backend_skip_reason(name: str, head_dim: int, interpreted_ok: bool, env: "BenchEnv") -> str | None:
    """None where backend ``name`` can be benchmarked here, else why not. On a CPU the Triton
    interpreter (very slow) is only used at cases marked interpreted_ok."""
    from cos_kernels.ops import BACKENDS, resolve_backend

    if name not in BACKENDS:
        return f"backend {name!r} is not part of this build of cos_kernels (BACKENDS={list(BACKENDS)})"
    try:
        resolve_backend(name, env.device)
    except (RuntimeError, ValueError) as err:
        return str(err)
    if name != "torch":
        from cos_kernels.ops.registry import get_kernel

        kernel = get_kernel(name)
        if env.dtype not in kernel.dtypes:
            return f"backend {name!r} does not support {env.dtype}"
        if head_dim not in kernel.head_dims:
            return f"backend {name!r} does not support head dim {head_dim}"
        if env.device.type == "cpu" and not interpreted_ok:
            return (f"backend {name!r} runs on CPU only under the Triton interpreter (very slow): "
                    f"benchmarked at the tiny CPU case only")
        if env.device.type == "cpu" and env.dtype == torch.bfloat16:
            return (f"backend {name!r} on CPU runs under the Triton interpreter, which computes bf16 "
                    f"wrongly (numpy has no bf16); bf16 is benchmarked on a GPU")
    return None


# ---- environment ----------------------------------------------------------------------------------
def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def source_commit() -> str | None:
    """The commit of the code that runs (``git describe --always --dirty``: short hash, "-dirty" with
    uncommitted changes), None outside a git checkout."""
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=10"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def library_versions() -> dict:
    """Python's, torch's, the optional libraries' (None where absent) and the CUDA version, and the
    commit that made the numbers (source_commit)."""
    versions = {"commit": source_commit(), "python": platform.python_version(), "torch": torch.__version__}
    for name in ("triton", "transformers", "flash_attn", "cos_kernels"):
        try:
            module = __import__(name)
            versions[name] = getattr(module, "__version__", "unknown")
        except Exception:  # noqa: BLE001 - absent or broken: say so, don't fail the suite
            versions[name] = None
    versions["cuda"] = torch.version.cuda
    return versions


@dataclass
class BenchEnv:
    """What every benchmark of a session shares: the device, the dtype and the measured ceilings."""

    device: torch.device
    dtype: torch.dtype
    device_name: str
    versions: dict
    threads: int
    copy_bytes_per_s: float | None = None  # read + write counted
    copy_buffer_bytes: int = 0
    matmul_flops_per_s: float | None = None  # measured lazily (end-to-end MFU)
    started: str = field(default_factory=lambda: datetime.datetime.now(datetime.timezone.utc).isoformat())
    l2_flush: torch.Tensor | None = None

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def dtype_name(self) -> str:
        return DTYPE_NAMES.get(self.dtype, str(self.dtype))

    def synchronize(self) -> None:
        if self.is_cuda:
            torch.cuda.synchronize(self.device)

    def flush_l2(self) -> None:
        """Overwrite a buffer larger than any L2 cache (GPU only; enqueued, not synchronised)."""
        if self.is_cuda:
            if self.l2_flush is None:
                self.l2_flush = torch.empty(256 * 2**20, dtype=torch.uint8, device=self.device)
            self.l2_flush.zero_()

    def common_info(self) -> dict:
        return {
            "device": str(self.device),
            "device_name": self.device_name,
            "dtype": self.dtype_name,
            "versions": self.versions,
            "threads": self.threads,
            "copy_GBps": None if self.copy_bytes_per_s is None else self.copy_bytes_per_s / 1e9,
            "copy_buffer_MiB": self.copy_buffer_bytes / 2**20,
            "session_started": self.started,
            "command": "python -m pytest " + " ".join(sys.argv[1:]),
        }

    def matmul_peak(self) -> float:
        """Dense-matmul throughput of this device and dtype (FLOP/s), measured once per session."""
        if self.matmul_flops_per_s is None:
            self.matmul_flops_per_s = measure_matmul(self)
        return self.matmul_flops_per_s


def make_env(device: str, dtype: torch.dtype, measure: bool = True) -> BenchEnv:
    device = torch.device(device)
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        name = torch.cuda.get_device_name(device)
        props = torch.cuda.get_device_properties(device)
        name = f"{name} ({props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs)"
    else:
        name = f"{_cpu_name()} ({os.cpu_count()} logical CPUs, torch threads {torch.get_num_threads()})"
    env = BenchEnv(device=device, dtype=dtype, device_name=name, versions=library_versions(),
                   threads=torch.get_num_threads())
    if measure:
        env.copy_bytes_per_s, env.copy_buffer_bytes = measure_copy(env)
    return env


# ---- measured ceilings ----------------------------------------------------------------------------
def measure_copy(env: BenchEnv) -> tuple[float, int]:
    """Device-to-device copy bandwidth, read + write counted: 1 GiB on a GPU, 64 MiB on a CPU."""
    nbytes = 2**30 if env.is_cuda else 64 * 2**20
    src = torch.empty(nbytes, dtype=torch.uint8, device=env.device).fill_(1)
    dst = torch.empty_like(src)
    t = median_s(env, lambda: dst.copy_(src), 20 if env.is_cuda else 10)
    src = dst = None  # the buffers go before the cache is emptied
    if env.is_cuda:
        torch.cuda.empty_cache()
    return 2 * nbytes / t, nbytes


def measure_matmul(env: BenchEnv) -> float:
    """Dense matmul throughput in the session dtype (8192^3 on a GPU, 1024^3 on a CPU)."""
    n = 8192 if env.is_cuda else 1024
    dtype = env.dtype
    a = torch.randn(n, n, device=env.device, dtype=dtype)
    b = torch.randn(n, n, device=env.device, dtype=dtype)
    t = median_s(env, lambda: a @ b, 20 if env.is_cuda else 5)
    return 2 * n**3 / t


# ---- peak memory ----------------------------------------------------------------------------------
def _cpu_peak(fn) -> int | None:
    """High-water mark of bytes allocated by torch during fn(), above what was allocated before, from
    the profiler's allocation records (profile_memory=True): each op's own allocations (+) and frees
    (-) placed at its start (+) or end (-), summed in time order. None where the profiler fails."""
    try:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        points = []
        for e in prof.events():
            m = e.self_cpu_memory_usage
            if m:
                points.append((e.time_range.start if m > 0 else e.time_range.end, m))
        points.sort()
        cur = peak = 0
        for _, m in points:
            cur += m
            peak = max(peak, cur)
        return int(peak)
    except Exception:  # noqa: BLE001
        return None


def peak_bytes(env: BenchEnv, fn) -> tuple[int | None, int | None]:
    """(peak bytes of one fn() above what was allocated before it, peak bytes in all) -- GPU:
    torch.cuda.max_memory_allocated after reset_peak_memory_stats; CPU: _cpu_peak's profiler estimate
    (None where the profiler fails) and no total."""
    if env.is_cuda:
        env.synchronize()
        base = torch.cuda.memory_allocated(env.device)
        torch.cuda.reset_peak_memory_stats(env.device)
        fn()
        env.synchronize()
        peak = torch.cuda.max_memory_allocated(env.device)
        return int(peak - base), int(peak)
    return _cpu_peak(fn), None


def peak_memory(benchmark, env: BenchEnv, fn, setup=None) -> dict:
    """Peak memory of one call of fn(setup()) above what was allocated before it (setup excluded), by
    peak_bytes. Skipped (None) under --benchmark-disable."""
    if benchmark.disabled:
        return {"peak_mem_MiB": None, "peak_mem_method": "not measured (--benchmark-disable)"}
    state = setup() if setup is not None else None
    peak, total = peak_bytes(env, lambda: fn(state))
    if env.is_cuda:
        method = "torch.cuda.max_memory_allocated minus memory_allocated before the call"
    elif peak is not None:
        method = "torch.profiler(profile_memory=True) allocation records, high-water mark above the allocations before the call"
    else:
        method = "unavailable (the profiler failed)"
    return {"peak_mem_MiB": None if peak is None else peak / 2**20,
            "peak_mem_total_MiB": None if total is None else total / 2**20, "peak_mem_method": method}


# ---- results --------------------------------------------------------------------------------------
def timed_ms(stats) -> dict:
    """status, median_ms, min_ms, max_ms of pytest-benchmark's stats (seconds), for a row; "not
    timed" under --benchmark-disable (stats None)."""
    if stats is None:
        return dict(status="not timed", median_ms=None, min_ms=None, max_ms=None)
    return dict(status="ok", median_ms=stats.median * 1e3, min_ms=stats.min * 1e3, max_ms=stats.max * 1e3)


def record(benchmark, env: BenchEnv, stage: str, columns: dict, **info) -> None:
    """benchmark.extra_info: the environment, the stage's table row (gpu_results.row: the schema of
    every benchmark table) and ``info`` (shapes, configuration, validation errors, ...)."""
    benchmark.extra_info.update(env.common_info(), stage=stage, row=row(stage, **columns), **info)


def set_group(benchmark, suite: str, case: str, pass_: str) -> None:
    """pytest-benchmark's group (its console tables); must be set before the benchmark runs."""
    benchmark.group = f"{suite} | {case} | {pass_}"


def rel_error(got: torch.Tensor, ref: torch.Tensor, what: str) -> float:
    """Max |got - ref| relative to max |ref| (computed in float64)."""
    got, ref = got.detach().double(), ref.detach().double()
    if got.shape != ref.shape:
        raise AssertionError(f"{what}: shape {tuple(got.shape)} != reference {tuple(ref.shape)}")
    if not torch.isfinite(got).all():
        raise AssertionError(f"{what}: non-finite values")
    scale = ref.abs().max().item() or 1.0
    return (got - ref).abs().max().item() / scale


def check_close(got: torch.Tensor, ref: torch.Tensor, what: str, dtype: torch.dtype,
                eager_error: float) -> dict:
    """Error of ``got`` against the float64 ``ref``, at most 2 * eager_error + the dtype's allowance;
    raises AssertionError otherwise. Returns {"error", "limit"}."""
    err = rel_error(got, ref, what)
    limit = 2 * eager_error + _ALLOWANCE.get(dtype, 1e-3)
    if err > limit:
        raise AssertionError(
            f"{what}: max error {err:.3g} (relative to max |ref|) exceeds {limit:.3g} = 2 x the eager "
            f"torch error {eager_error:.3g} + {_ALLOWANCE.get(dtype, 1e-3):g}"
        )
    return {"error": err, "limit": limit}


def param_bytes(module: torch.nn.Module, trainable: bool | None = None) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters()
               if trainable is None or p.requires_grad == trainable)


def count_matmul_flops(fn) -> float | None:
    """FLOPs of the matrix products fn() runs (forward and backward if it runs one), counted by
    torch.utils.flop_counter, attention ops excluded (callers add attention FLOPs analytically, the
    same way for every implementation)."""
    try:
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter:
            fn()
        counts = counter.get_flop_counts().get("Global", {})
        return float(sum(v for op, v in counts.items() if "attention" not in str(op)))
    except Exception:  # noqa: BLE001
        return None
