"""The one Markdown table of every benchmark row (benchmarks/gpu_results.py's schema): SUMMARY.md and
kernel.png of the GPU check, from its results file, and the tables of report.py, from the rows the
pytest-benchmark suites record.

Ratios between rows are computed here, over the rows of one run (in the GPU check each
implementation was measured in its own process): kernel speed-ups over the torch backend and the
fastest peer, module speed-up and memory against the eager unfused resampler, step ratios against
resampler-336 and mlp-576 beside the paper's; then the targets of the standing GPU issue, each
measured value beside its bound.
"""

from __future__ import annotations

from pathlib import Path

from . import peers
from .gpu_results import rows, stage_statuses
from .headline import FAULTS, FUSED, LAUNCH_PASSES, PASSES

PEERS = ("torch", *peers.PEERS)  # what a fused backend must beat
IMPL_ORDER = (*FUSED, *PEERS, *FAULTS)  # the tables' order: fused backends first
PASS_ORDER = (*PASSES[:2], *LAUNCH_PASSES, *PASSES[2:], None)  # fwd, bwd, its launches, fwdbwd
# the paper's stage-1 wall-clock relative to resampler-336 (reference values, not measured here)
PAPER_RELATIVE = {"cos-80": 0.42, "linear-256": 0.82, "resampler-336": 1.00}


def _f(x, fmt: str = ".3g") -> str:
    return "-" if x is None else format(x, fmt)


def markdown_table(header: list[str], body: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in body]


def _section(title: str, note: str, header: list[str], body: list[list[str]]) -> list[str]:
    return ["", f"## {title}", "", note, "", *markdown_table(header, body)]


def _min_max(r, ok: bool) -> str:
    return f"{_f(r['min_ms'], '.4g')}-{_f(r['max_ms'], '.4g')}" if ok else "-"


def _error_or_why(r) -> str:
    """The worst validation error of an ok row, else why it is not."""
    return _f(r["max_rel_error"], ".2g") if r["status"] == "ok" else (r.get("detail") or "")[:90]


def _rank(order, x) -> int:
    return order.index(x) if x in order else len(order)


def _ok(r) -> bool:
    return r.get("status") == "ok" and r.get("median_ms") is not None


# ---- kernel ---------------------------------------------------------------------------------------
def kernel_speedups(kernel_rows: list[dict]) -> dict:
    """(case, impl, pass) -> (torch median / its median, fastest other peer's median / its median)."""
    ms = {(r["case"], r["impl"], r["pass"]): r["median_ms"] for r in kernel_rows if _ok(r)}
    out = {}
    for (case, impl, pass_), t in ms.items():
        others = [v for (c, i, p), v in ms.items() if c == case and p == pass_ and i in PEERS and i != impl]
        torch_t = ms.get((case, "torch", pass_))
        out[case, impl, pass_] = (None if torch_t is None else torch_t / t, min(others) / t if others else None)
    return out


def fused_order(kernel_rows: list[dict]) -> dict[str, list[str]]:
    """dtype name -> the fused backends timed in every case of that dtype, fastest first by the sum of
    their forward+backward medians: what cos_kernels.ops.AUTO_ORDER should say after this run."""
    out = {}
    for dtype in dict.fromkeys(r["dtype"] for r in kernel_rows):
        ok = [r for r in kernel_rows if r["dtype"] == dtype and r["pass"] == "fwdbwd" and _ok(r)]
        cases = {r["case"] for r in ok}
        totals = {}
        for impl in FUSED:
            times = [r["median_ms"] for r in ok if r["impl"] == impl]
            if times and len(times) == len(cases):
                totals[impl] = sum(times)
        if totals:
            out[dtype] = sorted(totals, key=totals.get)
    return out


def best_fused(kernel_rows: list[dict]) -> str | None:
    """The fused backend that passed validation in every case and is fastest forward+backward."""
    return next((order[0] for order in fused_order(kernel_rows).values()), None)


def kernel_section(kernel: list[dict]) -> list[str]:
    cases = list(dict.fromkeys(r["case"] for r in kernel))
    kernel = sorted(kernel, key=lambda r: (cases.index(r["case"]), _rank(IMPL_ORDER, r["impl"]),
                                           _rank(PASS_ORDER, r["pass"])))
    speedups = kernel_speedups(kernel)
    body = []
    for r in kernel:
        graph, med = r.get("graph_ms"), r.get("median_ms")
        sp = speedups.get((r["case"], r["impl"], r["pass"]), (None, None))
        body.append([
            r["case"], r["impl"], r["pass"] or "-", r["status"], _f(med, ".4g"), _min_max(r, _ok(r)),
            _f(graph, ".4g"), _f(med - graph if med is not None and graph is not None else None, ".3g"),
            _f(r.get("GBps"), ".4g"), _f(r.get("copy_fraction"), ".1%"), _f(r.get("graph_copy_fraction"), ".1%"),
            _f(r.get("TFLOPs"), ".3g"), _f(r.get("peak_mem_MiB"), ".4g"), _f(sp[0], ".2f"), _f(sp[1], ".2f"),
            _error_or_why(r)])
    out = _section(
        "Kernel", "Medians in ms per call (GPU: between CUDA events, L2 flushed before each), their min-max, and "
        "the same pass captured in a CUDA graph (the GPU check); launch = eager - graph (the host's share). GB/s "
        "over the floor bytes; of copy: fraction of the measured copy bandwidth (eager; graph); TFLOP/s of "
        "useful FLOPs. bwd_dq / bwd_dkdv: the backward's two launches alone (device time, profiler), each "
        "against its own floor. x torch / x best peer: that implementation's median over this one.",
        ["case", "impl", "pass", "status", "ms", "min-max", "graph ms", "launch ms", "GB/s", "of copy",
         "of copy (graph)", "TFLOP/s", "peak MiB", "x torch", "x best peer", "rel err / why"], body)
    order = fused_order(kernel)
    if order:
        out += ["", "Fused backends by forward+backward time, summed over the cases (for "
                    "cos_kernels.ops.AUTO_ORDER): " + "; ".join(f"{d}: {' > '.join(o)}" for d, o in order.items())]
    return out


# ---- module ---------------------------------------------------------------------------------------
def module_ratios(module_rows: list[dict]) -> dict:
    """(case, impl, pass) -> (eager unfused median / its median, its peak memory / eager unfused's)."""
    eager = {(r["case"], r["pass"]): r for r in module_rows if _ok(r) and r["impl"] == "torch unfused"}
    out = {}
    for r in module_rows:
        e = eager.get((r["case"], r["pass"]))
        if not _ok(r) or e is None:
            continue
        mem = r["peak_mem_MiB"] / e["peak_mem_MiB"] if r["peak_mem_MiB"] and e["peak_mem_MiB"] else None
        out[r["case"], r["impl"], r["pass"]] = (e["median_ms"] / r["median_ms"], mem)
    return out


def module_section(module: list[dict]) -> list[str]:
    ratios = module_ratios(module)
    body = []
    for r in module:
        x, mem = ratios.get((r["case"], r["impl"], r["pass"]), (None, None))
        body.append([r["case"], r["impl"], r["pass"] or "-", r["status"], _f(r["median_ms"], ".4g"),
                     _min_max(r, _ok(r)), _f(r["peak_mem_MiB"], ".4g"), _f(x, ".2f"), _f(mem, ".2f"),
                     _f(r["floor_bytes"] / 1e9 if r.get("floor_bytes") else None, ".3g"),
                     _f(r["floor_flops"] / 1e12 if r.get("floor_flops") else None, ".3g"), _f(r["floor_ms"], ".3g"),
                     _f(r["floor_ms"] / r["median_ms"] if _ok(r) and r["floor_ms"] else None, ".1%"), _error_or_why(r)])
    return _section(
        "Module", "Median ms (min-max) of the resampler's forward (fwd, no grad) or forward+backward (fwdbwd); "
        "peak memory above the inputs; floor: the larger of the fewest bytes over the copy bandwidth and the "
        "FLOPs over the matmul rate.",
        ["case", "impl", "pass", "status", "ms", "min-max", "peak MiB", "x eager unfused", "mem / eager",
         "floor GB", "floor TFLOP", "floor ms", "of floor", "rel err / why"], body)


# ---- training step --------------------------------------------------------------------------------
def e2e_ratios(e2e_rows: list[dict]) -> dict:
    """(case, bridge) -> (its step / resampler-336's, its step / mlp-576's) within one case (stage,
    model, batch, caption length)."""
    ms = {(r["case"], r["bridge"]): r["step_ms"] for r in e2e_rows if r["status"] == "ok" and r["step_ms"]}
    out = {}
    for (case, bridge), t in ms.items():
        ref, mlp = ms.get((case, "resampler-336")), ms.get((case, "mlp-576"))
        out[case, bridge] = (t / ref if ref else None, t / mlp if mlp else None)
    return out


def e2e_section(e2e: list[dict]) -> list[str]:
    ratios = e2e_ratios(e2e)
    body = []
    for r in e2e:
        rel, mlp = ratios.get((r["case"], r["bridge"]), (None, None))
        paper = PAPER_RELATIVE.get(r["bridge"]) if r["case"].startswith("stage 1") else None
        ok = r["status"] == "ok"
        body.append([r["case"], r["bridge"], r.get("backend") or "-", r["status"], _f(r["step_ms"], ".4g"),
                     _min_max(r, ok), _f(r["samples_per_s"], ".1f"), _f(r["visual_tokens"], "d"), _f(rel, ".3f"),
                     _f(paper, ".2f"), _f(mlp, ".3f"), _f(r["bridge_fwdbwd_ms"], ".3g"), _f(r["bridge_share"], ".1%"),
                     _f(r["mfu"], ".1%"), _f(r["peak_mem_GiB"], ".3g"), "" if ok else (r.get("detail") or "")[:80]])
    return _section(
        "Training step", "Median ms (min-max) of a whole training step (stage 1: ViT and LLM frozen, bridge "
        "trained; stage 2: bridge and LLM trained); the step against resampler-336's (and the paper's stage-1 "
        "ratio) and mlp-576's; the bridge's forward+backward alone and its share of the step; MFU over the "
        "measured matmul rate; peak memory.",
        ["case", "bridge", "backend", "status", "step ms", "min-max", "samples/s", "visual tokens",
         "vs resampler-336", "paper", "vs mlp-576", "bridge ms", "share", "MFU", "peak GiB", "why"], body)


# ---- targets --------------------------------------------------------------------------------------
def targets(entries: list[dict]) -> list[tuple[str, str, bool | None]]:
    """The standing GPU issue's targets: (target, measured, met; None where not measured)."""
    kernel, module, e2e = rows(entries, "kernel"), rows(entries, "module"), rows(entries, "e2e")
    out = []
    best = best_fused(kernel)
    cases = list(dict.fromkeys(r["case"] for r in kernel))
    ms = {(r["case"], r["impl"], r["pass"]): r for r in kernel if _ok(r)}
    for case in cases:
        for pass_, bound in (("fwd", 0.70), ("bwd", 0.50)):
            r = ms.get((case, best, pass_)) if best else None
            frac = r["copy_fraction"] if r else None
            out.append((f"{case}: best fused ({best or '-'}) {pass_} >= {bound:.0%} of copy bandwidth",
                        _f(frac, ".1%"), None if frac is None else frac >= bound))
        fb = ms.get((case, best, "fwdbwd")) if best else None
        timed = {p: ms[case, p, "fwdbwd"]["median_ms"] for p in PEERS if (case, p, "fwdbwd") in ms}
        if fb and timed:
            worst_peer = min(timed, key=timed.get)
            x = timed[worst_peer] / fb["median_ms"]
            out.append((f"{case}: fwd+bwd >= 2x every peer (timed: {', '.join(timed)})",
                        f"{x:.2f}x over {worst_peer}", x >= 2))
        else:
            out.append((f"{case}: fwd+bwd >= 2x every peer", "-", None))
    ratios = module_ratios(module)
    for case in dict.fromkeys(r["case"] for r in module):
        got = ratios.get((case, f"{best} fused", "fwdbwd")) if best else None
        out.append((f"module {case}: {best or 'best'} fused fwd+bwd >= 2x eager unfused, less peak memory",
                    "-" if got is None else f"{got[0]:.2f}x, memory {_f(got[1], '.2f')}x",
                    None if got is None else got[0] >= 2 and got[1] is not None and got[1] < 1))
    steps = e2e_ratios(e2e)
    model = "7b" if any(r["model"] == "7b" for r in e2e) else next((r["model"] for r in e2e), None)
    step_case = next((r["case"] for r in e2e if r["model"] == model and not r["case"].startswith("stage 2")), None)
    rel, mlp = steps.get((step_case, "cos-80"), (None, None))
    out.append((f"{model or '-'}: cos-80 step <= 0.40 of resampler-336's", _f(rel, ".3f"),
                None if rel is None else rel <= 0.40))
    out.append((f"{model or '-'}: cos-80 step <= 0.25 of mlp-576's", _f(mlp, ".3f"), None if mlp is None else mlp <= 0.25))
    share = next((r["bridge_share"] for r in e2e if r["case"] == step_case and r["bridge"] == "cos-80"
                  and r["status"] == "ok"), None)
    out.append((f"{model or '-'}: cos-80 resampler < 3% of the step", _f(share, ".1%"),
                None if share is None else share < 0.03))
    return out


def _tests_section(statuses: list[dict]) -> list[str]:
    tests = [e for e in statuses if e["stage"] == "tests"]
    if not tests:
        return []
    out = ["", "## GPU tests", ""]
    for e in tests:
        out.append(f"- {e['group']}: {e['status']}; {e.get('summary') or 'no pytest summary line'}")
        out += [f"  - {name}" for name in e.get("failed", [])[:40]]
    return out


def render(entries: list[dict]) -> str:
    """SUMMARY.md from the results lines: groups and their times, the targets, then each table."""
    out = ["# GPU check", ""]
    statuses = stage_statuses(entries)
    out += markdown_table(["stage", "group", "status", "wall s", "log", "note"],
                  [[e["stage"], str(e.get("group") or "-"), e["status"], _f(e.get("wall_s"), ".1f"), e.get("log", ""),
                    e.get("note") or ""] for e in statuses])
    pre = rows(entries, "preflight")
    if pre:
        p = pre[-1]
        v = p["versions"] or {}
        out += ["", f"Commit {v.get('commit') or '-'}. Device: {p['device_name']}, driver {p['driver']}; Python "
                    f"{p['python']}; torch {v.get('torch')} "
                    f"(CUDA {v.get('cuda')}), triton {v.get('triton')}, transformers {v.get('transformers')}; "
                    f"{p['nvcc']}; CUDA_HOME {p['cuda_home']}.",
                f"Measured: copy {_f(p['copy_GBps'], '.0f')} GB/s (read + write), {p['matmul_dtype']} matmul "
                f"{_f(p['matmul_TFLOPs'], '.1f')} TFLOP/s.",
                "Failed imports: " + (", ".join(k for k, v in p["imports"].items() if v.startswith("FAILED")) or "none")]
        if p["device"] == "cpu":
            out += ["", "**Dry run on a CPU**: tiny sizes, fp32, the Triton interpreter, two fake implementations "
                        "that fail on purpose; the numbers check the plumbing, not the speed."]
    goals = targets(entries)
    if any(met is not None for _, _, met in goals):
        out += ["", "## Targets", ""]
        out += markdown_table(["target", "measured", "met"],
                      [[t, m, "-" if met is None else ("yes" if met else "**no**")] for t, m, met in goals])
    if rows(entries, "kernel"):
        out += kernel_section(rows(entries, "kernel"))
    if rows(entries, "module"):
        out += module_section(rows(entries, "module"))
    if rows(entries, "e2e"):
        out += e2e_section(rows(entries, "e2e"))
    out += _tests_section(statuses)
    return "\n".join(out) + "\n"


def plot(entries: list[dict], path: Path) -> bool:
    """Bars of the kernel table: fraction of the copy bandwidth per implementation and pass (eager),
    a black tick at the CUDA-graph fraction."""
    passes = ("fwd", "bwd", "fwdbwd")
    ok = [r for r in rows(entries, "kernel") if _ok(r) and r["copy_fraction"] is not None and r["pass"] in passes]
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
        impls = sorted(dict.fromkeys(r["impl"] for r in ok if r["case"] == case), key=lambda i: _rank(IMPL_ORDER, i))
        for i, pass_ in enumerate(passes):
            got = {r["impl"]: r for r in ok if r["case"] == case and r["pass"] == pass_}
            xs = [j + (i - 1) * 0.27 for j in range(len(impls))]
            ax.bar(xs, [got[m]["copy_fraction"] if m in got else 0 for m in impls], 0.27, label=pass_)
            ticks = [(x, got[m]["graph_copy_fraction"]) for x, m in zip(xs, impls)
                     if m in got and got[m]["graph_copy_fraction"]]
            if ticks:
                ax.scatter(*zip(*ticks), marker="_", color="black", s=120, zorder=3,
                           label="CUDA graph" if i == 0 else None)
        ax.set_xticks(range(len(impls)), impls)
        ax.set_title(case)
        ax.set_ylabel("floor bytes / time / copy bandwidth")
        ax.legend()
    fig.suptitle(f"multiscale_window_attention, {ok[0]['dtype']} (higher is better; 1.0 = copy speed)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
