"""Timings of the GPU check, each a list of per-call milliseconds so that rows carry their spread.

  eager_times    each call alone between two CUDA events, a 256 MB buffer overwritten before it so L2
                 holds none of the inputs (as triton.testing.do_bench); the host's launch cost counts
                 wherever the device waits for it (the flush gives the host only ~65 us of head start)
  graph_times    the same calls captured in one CUDA graph and replayed: no host launch cost, so
                 eager - graph is the launch overhead; L2 is not flushed inside the graph (the
                 headline inputs are 10-20x its size)
  launch_times   device time of each kernel a call launches, from the profiler's trace, grouped by a
                 classifier (the backward's dQ+delta and dK/dV launches apart)
On a CPU (the dry run) eager_times is the host clock around synchronous calls, and the other two
are unavailable (ValueError saying why).
"""

from __future__ import annotations

import json
import os
import re
import statistics
import tempfile
import time

import torch


def spread(times_ms: list[float]) -> tuple[float, float, float]:
    """(min, median, max) of a list of times."""
    return min(times_ms), statistics.median(times_ms), max(times_ms)


def _reset(grads) -> None:
    for t in grads:
        t.grad = None


def eager_times(env, fn, grads=(), rep_ms: float = 60.0, max_calls: int = 200) -> list[float]:
    """Milliseconds of each of several fn() calls; the tensors in ``grads`` get .grad = None before
    each call, untimed. GPU: 2 warm-up calls, then as many calls as fill ``rep_ms`` (at least 5, at
    most ``max_calls``); CPU: 1 warm-up call, then 3 calls."""
    if not env.is_cuda:
        _reset(grads)
        fn()
        out = []
        for _ in range(3):
            _reset(grads)
            t0 = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t0) * 1e3)
        return out
    for _ in range(2):
        _reset(grads)
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    _reset(grads)
    fn()
    torch.cuda.synchronize()
    estimate = (time.perf_counter() - t0) * 1e3
    calls = max(5, min(max_calls, int(rep_ms / max(estimate, 1e-3))))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(calls)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(calls)]
    for start, end in zip(starts, ends):
        _reset(grads)
        env.flush_l2()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) for s, e in zip(starts, ends)]


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
