"""The one timer of the benchmarks: one clock (clock: CUDA events on a GPU, time.perf_counter on a
CPU) under every timing, each a list of per-call milliseconds so that rows carry their spread.

  eager_times    each call alone between two CUDA events, a 256 MB buffer overwritten before it so L2
                 holds none of the inputs (as triton.testing.do_bench); the host's launch cost counts
                 wherever the device waits for it (the flush gives the host only ~65 us of head start)
  graph_times    the same calls captured in one CUDA graph and replayed: no host launch cost, so
                 eager - graph is the launch overhead; L2 is not flushed inside the graph (the
                 headline inputs are 10-20x its size)
  launch_times   device time of each kernel a call launches, from the profiler's trace, grouped by a
                 classifier (the backward's dQ+delta and dK/dV launches apart)
  time_rounds    the pytest-benchmark suites: pytest-benchmark's rounds on the same clock, each
                 round's setup untimed, warmed up and counted by eager_times
On a CPU (the dry run) eager_times is the host clock around synchronous calls, and the other two
are unavailable (ValueError saying why).
"""

from __future__ import annotations

import json
import math
import os
import re
import statistics
import tempfile
import time

import torch


def spread(times_ms: list[float]) -> tuple[float, float, float]:
    """(min, median, max) of a list of times."""
    return min(times_ms), statistics.median(times_ms), max(times_ms)


class _CudaStamp:
    """A CUDA event recorded on the current stream; ``end - start`` is the elapsed seconds."""

    __slots__ = ("event",)

    def __init__(self):
        self.event = torch.cuda.Event(enable_timing=True)
        self.event.record()

    def __sub__(self, other: "_CudaStamp") -> float:
        self.event.synchronize()
        return other.event.elapsed_time(self.event) / 1e3


def clock(env):
    """The clock of every timing here and of pytest-benchmark's rounds: clock() is a stamp, ``end -
    start`` seconds. GPU: a CUDA event recorded on the current stream (device time; the difference
    waits for the end event); CPU: time.perf_counter (the calls are synchronous)."""
    return _CudaStamp if env.is_cuda else time.perf_counter


def _reset(grads) -> None:
    for t in grads:
        t.grad = None


def eager_times(env, fn, grads=(), rep_ms: float = 60.0, max_calls: int = 200, calls: int | None = None,
                flush_l2: bool = True) -> list[float]:
    """Milliseconds of each of several fn() calls; the tensors in ``grads`` get .grad = None and (GPU,
    ``flush_l2``) L2 is overwritten before each call, untimed. 2 warm-up calls on a GPU, 1 on a CPU;
    then ``calls`` calls, by default on a GPU as many as fill ``rep_ms`` (at least 5, at most
    ``max_calls``), on a CPU 3. Every stamp is enqueued before the first is read."""
    for _ in range(2 if env.is_cuda else 1):
        _reset(grads)
        fn()
    env.synchronize()
    if calls is None and env.is_cuda:
        t0 = time.perf_counter()
        _reset(grads)
        fn()
        env.synchronize()
        calls = max(5, min(max_calls, int(rep_ms / max((time.perf_counter() - t0) * 1e3, 1e-3))))
    stamp, stamps = clock(env), []
    for _ in range(calls or 3):
        _reset(grads)
        if flush_l2:
            env.flush_l2()
        start = stamp()
        fn()
        stamps.append((start, stamp()))
    return [(end - start) * 1e3 for start, end in stamps]


def median_s(env, fn, calls: int) -> float:
    """Median seconds of ``calls`` fn() calls (eager_times, L2 not flushed)."""
    return statistics.median(eager_times(env, fn, calls=calls, flush_l2=False)) / 1e3


def time_rounds(benchmark, env, fn, setup=None, *, flush_l2: bool = False):
    """pytest-benchmark's rounds of ``fn(state)``, ``state = setup()`` untimed each round (and L2
    overwritten after it where ``flush_l2``), on this module's clock; eager_times warms up and sets
    the round count (--benchmark-max-time / --benchmark-min-rounds). Returns pytest-benchmark's
    Stats (seconds), or None under --benchmark-disable (then the body ran exactly once)."""

    def make_state():
        state = setup() if setup is not None else None
        if flush_l2:
            env.flush_l2()
        return (state,), {}

    benchmark.extra_info.update(l2_flushed_between_rounds=bool(flush_l2 and env.is_cuda), timer=clock_name(env))
    if benchmark.disabled:
        benchmark.pedantic(fn, setup=make_state, rounds=1)
        return None
    (state,), _ = make_state()
    estimate_s = statistics.median(eager_times(env, lambda: fn(state), flush_l2=flush_l2)) / 1e3
    state = None  # a backward's forward graph goes before the rounds
    max_time = float(getattr(benchmark, "_max_time", 1.0) or 1.0)
    min_rounds = int(getattr(benchmark, "_min_rounds", 5) or 5)
    rounds = max(min_rounds, min(1000, math.ceil(max_time / max(estimate_s, 1e-7))))
    benchmark._timer = clock(env)
    benchmark.pedantic(fn, setup=make_state, rounds=rounds, warmup_rounds=0)
    env.synchronize()
    return benchmark.stats.stats if benchmark.stats is not None else None


def clock_name(env) -> str:
    if env.is_cuda:
        return "cuda-events (device time per call; L2 flushed before each round where l2_flushed_between_rounds)"
    return "time.perf_counter (host wall time per synchronous call)"


def graph_times(env, make_fn, grads=(), target_ms: float = 20.0, replays: int = 10) -> list[float]:
    """Per-call milliseconds of fn = make_fn() captured ``n`` times in one CUDA graph (``n`` calls fill
    about ``target_ms``), over ``replays`` replays. make_fn runs on the capture stream, so a backward
    over a graph it builds runs there too (autograd runs a backward on its forward's stream)."""
    if not env.is_cuda:
        raise ValueError("CUDA-graph timing needs a CUDA device")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn = make_fn()
        for _ in range(2):  # warm-up on the capture stream, as capture requires
            _reset(grads)
            fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        _reset(grads)
        fn()
        end.record()
    torch.cuda.synchronize()
    calls = max(1, min(100, int(target_ms / max(start.elapsed_time(end), 1e-3))))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        for _ in range(calls):
            _reset(grads)
            fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        out.append(start.elapsed_time(end) / calls)
    del graph
    return out


# The backward's launches of both fused backends, by kernel name: Triton's
# window_attention_bwd_dq_kernel / _bwd_dkdv_kernel, CUDA's (tc_)dq_kernel / (tc_)dkv_kernel.
BACKWARD_LAUNCHES = (("bwd_dq", re.compile(r"dq_kernel")), ("bwd_dkdv", re.compile(r"dkdv_kernel|dkv_kernel")))


def classify_launches(kernels: list[tuple[str, float]], calls: int, kinds=BACKWARD_LAUNCHES) -> dict[str, list[float]]:
    """kernels: (name, ms) of every device kernel of ``calls`` calls, in launch order -> kind ->
    per-call ms. A kind is reported only where exactly one of its kernels ran per call; kernels no
    kind claims are summed per call as "other"."""
    by_kind: dict[str, list[float]] = {name: [] for name, _ in kinds}
    other = 0.0
    for name, ms in kernels:
        kind = next((k for k, pattern in kinds if pattern.search(name)), None)
        if kind is None:
            other += ms
        else:
            by_kind[kind].append(ms)
    out = {k: v for k, v in by_kind.items() if len(v) == calls}
    if out:
        out["other"] = [other / calls] * calls
    return out


def trace_kernels(path: str) -> list[tuple[str, float]]:
    """(name, ms) of the device kernels in a chrome trace written by torch.profiler, in start order."""
    with open(path) as f:
        trace = json.load(f)
    events = [e for e in trace.get("traceEvents", []) if e.get("cat") == "kernel" and "dur" in e]
    events.sort(key=lambda e: e.get("ts", 0))
    return [(e["name"], e["dur"] / 1e3) for e in events]


def launch_times(env, fn, grads=(), calls: int = 10, kinds=BACKWARD_LAUNCHES) -> dict[str, list[float]]:
    """kind -> device ms per call of each of fn()'s launches that ``kinds`` names (classify_launches),
    from ``calls`` calls under torch.profiler. ValueError where the profiler records no device kernels
    (a CPU) or none of the kinds."""
    from torch.profiler import ProfilerActivity, profile

    _reset(grads)
    fn()  # warm: compilation and caches stay out of the trace
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if env.is_cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(calls):
            _reset(grads)
            fn()
        env.synchronize()
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        prof.export_chrome_trace(path)
        kernels = trace_kernels(path)
    finally:
        os.unlink(path)
    if not kernels:
        raise ValueError("the profiler recorded no device kernels" + ("" if env.is_cuda else " (CPU run)"))
    out = classify_launches(kernels, calls, kinds)
    if not out:
        names = sorted({n for n, _ in kernels})[:6]
        raise ValueError(f"no launch matched {[k for k, _ in kinds]} once per call; kernels seen: {names}")
    return out
