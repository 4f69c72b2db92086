"""Turn a pytest-benchmark JSON file into a Markdown report and PNG plots.

    python -m benchmarks.report benchmarks/results/cpu.json
        -> benchmarks/results/cpu.md, cpu_time.png, cpu_e2e.png
    python -m benchmarks.report out/bench.json --out out
        -> out/RESULTS.md, out/time.png, out/e2e.png   (a self-contained result folder)
    --name NAME sets the file names explicitly: NAME.md, NAME_time.png, NAME_e2e.png.

Tables (medians of pytest-benchmark's rounds, side by side):
  kernel   per case and pass: every backend and peer, median, GB/s over the floor bytes and that as a
           fraction of the session's measured copy bandwidth, TFLOP/s, peak memory, and the speed-up
           of each row over each peer (peer median / row median; "torch" is the eager reference).
  module   per case and pass: backend x fused/unfused, median, peak memory, TFLOP/s, speed-up of fused
           over unfused (same backend) and over the eager unfused path (torch unfused).
  e2e      per stage and model: each bridge's step time, samples/s, visual and LLM tokens/s, MFU
           estimate, step time relative to resampler-336 (measured, and the paper's), bridge share.
Nothing is hard-coded except the paper's reference ratios, which are labelled as such.
"""

from __future__ import annotations

import argparse
import json
import math
from collections import OrderedDict
from pathlib import Path

PEER_ORDER = ("torch", "sdpa_mask", "flex", "flash_varlen")
PASS_ORDER = ("fwd", "bwd", "fwdbwd", "train_step")
DEFAULT_DIR = Path(__file__).resolve().parent / "results"


# ---- loading --------------------------------------------------------------------------------------
def load(path: Path) -> tuple[dict, list[dict]]:
    data = json.loads(Path(path).read_text())
    rows = []
    for b in data.get("benchmarks", []):
        e = dict(b.get("extra_info") or {})
        if "suite" not in e:
            continue
        st = b.get("stats") or {}
        e["median"] = st.get("median")
        e["iqr"] = st.get("iqr")
        e["min"] = st.get("min")
        e["rounds"] = st.get("rounds")
        e["name"] = b.get("name")
        rows.append(e)
    return data, rows


def _fmt(x, digits: int = 3, scale: float = 1.0, suffix: str = "") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    v = x * scale
    if v == 0:
        return f"0{suffix}"
    if abs(v) >= 100:
        return f"{v:.0f}{suffix}"
    return f"{v:.{digits}g}{suffix}"


def _ms(x) -> str:
    return _fmt(x, 4, 1e3)


def _mib(x) -> str:
    return _fmt(x, 4, 1 / 2**20)


def _pct(x) -> str:
    return _fmt(x, 3, 100, "%")


def _ratio(num, den) -> str:
    if not num or not den:
        return "-"
    r = num / den
    return f"{r:.2f}x" if r >= 0.1 else f"{r:.2g}x"


def _table(header: list[str], body: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in body]
    return out


def _grouped(rows, keys) -> "OrderedDict[tuple, list[dict]]":
    groups: OrderedDict = OrderedDict()
    for r in rows:
        groups.setdefault(tuple(r.get(k) for k in keys), []).append(r)
    return groups


def _pass_key(p):
    return PASS_ORDER.index(p) if p in PASS_ORDER else len(PASS_ORDER)


# ---- header ---------------------------------------------------------------------------------------
def header(data: dict, rows: list[dict]) -> list[str]:
    first = rows[0] if rows else {}
    device = first.get("device", "?")
    name = first.get("device_name", "?")
    kind = "GPU" if str(device).startswith("cuda") else "CPU"
    versions = first.get("versions") or {}
    vers = ", ".join(f"{k} {v}" for k, v in versions.items() if v)
    out = [f"# cos_kernels benchmarks: {kind} numbers on {name}", ""]
    if kind == "CPU":
        out += ["**These are CPU numbers** (small sizes; eager torch, Triton only under its interpreter). "
                "They check that the suite runs and show relative costs on a CPU; they say nothing about "
                "GPU kernel performance.", ""]
    copy = first.get("copy_GBps")
    out += [
        f"- date: {data.get('datetime', first.get('session_started', '?'))}",
        f"- device: `{device}`, {name}; dtype {first.get('dtype', '?')}; torch threads {first.get('threads', '?')}",
        f"- versions: {vers}",
        f"- measured copy bandwidth (read + write, {first.get('copy_buffer_MiB', 0):.0f} MiB buffer): "
        f"{_fmt(copy)} GB/s",
        f"- timer: {first.get('timer', '?')}",
        "- times are medians over pytest-benchmark's rounds (ms); rates use the median and the floor "
        "bytes / useful FLOPs of benchmarks/test_kernel.py; `x vs P` = P's median / this row's median "
        "(above 1: this row is faster)",
        "",
    ]
    return out


# ---- kernel ---------------------------------------------------------------------------------------
def kernel_section(rows: list[dict]) -> list[str]:
    rows = [r for r in rows if r["suite"] == "kernel"]
    if not rows:
        return []
    peers_present = [p for p in PEER_ORDER if any(r["impl"] == p for r in rows)]
    out = ["## Kernel: multiscale_window_attention", ""]
    case_order = list(_grouped(rows, ("case",)))
    for (case, pass_), group in sorted(_grouped(rows, ("case", "pass_")).items(),
                                       key=lambda kv: (case_order.index((kv[0][0],)), _pass_key(kv[0][1]))):
        first = group[0]
        out += [f"### {case}, {pass_} ({first.get('dtype')}, {first.get('layout')}, "
                f"floor {_fmt(first.get('bytes_floor'), 4, 1e-6)} MB, K/V {first.get('kv_layout')})", ""]
        medians = {r["impl"]: r["median"] for r in group}
        hdr = ["impl", "kind", "median ms", "IQR ms", "rounds", "GB/s", "of copy BW", "TFLOP/s", "peak MiB"]
        hdr += [f"x vs {p}" for p in peers_present if p in medians]
        body = []
        for r in sorted(group, key=lambda r: (r["median"] is None, r["median"] or 0)):
            line = [f"`{r['impl']}`", r.get("impl_kind", ""), _ms(r["median"]), _ms(r["iqr"]),
                    str(r.get("rounds") or "-"), _fmt(r.get("achieved_GBps")), _pct(r.get("copy_bw_fraction")),
                    _fmt(r.get("achieved_TFLOPs")), _mib(r.get("peak_mem_bytes"))]
            line += [_ratio(medians[p], r["median"]) for p in peers_present if p in medians]
            body.append(line)
        out += _table(hdr, body) + [""]
    return out


# ---- module ---------------------------------------------------------------------------------------
def module_section(rows: list[dict]) -> list[str]:
    rows = [r for r in rows if r["suite"] == "module"]
    if not rows:
        return []
    out = ["## Module: MultiScaleResampler (fused vs unfused)", ""]
    hdr = ["case", "pass", "backend", "path", "median ms", "IQR ms", "peak MiB", "TFLOP/s", "GB/s",
           "fused speed-up (same backend)", "x vs torch unfused", "peak mem vs torch unfused"]
    body = []
    case_order = list(_grouped(rows, ("case",)))
    for (case, pass_), group in sorted(_grouped(rows, ("case", "pass_")).items(),
                                       key=lambda kv: (case_order.index((kv[0][0],)), _pass_key(kv[0][1]))):
        by = {(r.get("backend"), r.get("fused")): r for r in group}
        eager = by.get(("torch", False))
        for r in sorted(group, key=lambda r: (r.get("backend") or "", not r.get("fused"))):
            other = by.get((r.get("backend"), not r.get("fused")))
            fused_gain = _ratio(other["median"], r["median"]) if (other and r.get("fused")) else ""
            mem_ratio = "-"
            if eager and eager.get("peak_mem_bytes") and r.get("peak_mem_bytes"):
                mem_ratio = f"{r['peak_mem_bytes'] / eager['peak_mem_bytes']:.2f}"
            body.append([case, pass_, f"`{r.get('backend')}`", "fused" if r.get("fused") else "unfused",
                         _ms(r["median"]), _ms(r["iqr"]), _mib(r.get("peak_mem_bytes")),
                         _fmt(r.get("achieved_TFLOPs")), _fmt(r.get("achieved_GBps")), fused_gain,
                         _ratio(eager["median"], r["median"]) if eager else "-", mem_ratio])
    first = rows[0]
    cfg = first.get("config") or {}
    out += [f"Widths: dim {cfg.get('dim')}, vision {cfg.get('vision_dim')}, heads {cfg.get('num_heads')}, "
            f"LLM {cfg.get('llm_dim')}, levels {cfg.get('num_levels')} (first case; each row's config is in "
            f"the JSON). Peak memory: {first.get('peak_mem_method')}.", ""]
    out += _table(hdr, body) + [""]
    return out


# ---- end to end -----------------------------------------------------------------------------------
def e2e_relative(rows: list[dict]) -> dict:
    """(stage, model, batch, caption_tokens) -> resampler-336's median, from the JSON itself."""
    ref = {}
    for r in rows:
        if r["suite"] == "e2e" and r.get("bridge_label") == "resampler-336" and r["median"]:
            ref[(r.get("stage"), r.get("model"), r.get("batch"), r.get("caption_tokens"))] = r["median"]
    return ref


def e2e_section(rows: list[dict]) -> list[str]:
    rows = [r for r in rows if r["suite"] == "e2e"]
    if not rows:
        return []
    ref = e2e_relative(rows)
    out = ["## End to end: MLLM training steps", "",
           "Stage 1 = pre-training (ViT and LLM frozen, bridge trained); stage 2 = fine-tuning (bridge + "
           "LLM trained). MFU = FLOPs per step / step time / this device's measured dense-matmul "
           "throughput in the session dtype (and / the datasheet bf16 peak where known). Bridge share = the bridge's forward+backward timed alone / step time. "
           "`paper` = the paper's pre-training wall-clock relative to resampler-336 (reference values, "
           "not measured here).", ""]
    hdr = ["stage", "model", "bridge", "px", "visual tokens", "B", "step ms", "samples/s", "visual tok/s",
           "LLM tok/s", "MFU (measured peak)", "MFU (datasheet)", "rel. to resampler-336", "paper",
           "bridge share", "peak MiB", "backend"]
    body = []
    for r in rows:
        key = (r.get("stage"), r.get("model"), r.get("batch"), r.get("caption_tokens"))
        rel = "-"
        if r.get("stage") == "pretrain" and key in ref and r["median"]:
            rel = f"{r['median'] / ref[key]:.2f}"
        body.append([r.get("stage"), r.get("model"), r.get("bridge_label"),
                     f"{r.get('image_px')} ({r.get('paper_image_px')})", str(r.get("visual_tokens")),
                     str(r.get("batch")), _ms(r["median"]), _fmt(r.get("samples_per_s")),
                     _fmt(r.get("visual_tokens_per_s")), _fmt(r.get("llm_tokens_per_s")), _pct(r.get("mfu")), _pct(r.get("mfu_nominal")),
                     rel, "-" if r.get("paper_relative") is None else f"{r['paper_relative']:.2f}", _pct(r.get("bridge_share")),
                     _mib(r.get("peak_mem_bytes")), r.get("resampler_backend") or "-"])
    out += ["px: the model's input resolution (the paper's in brackets; the tiny CPU model uses 8-px "
            "patches so its grids match the paper's).", ""]
    out += _table(hdr, body) + [""]
    return out


# ---- plots ----------------------------------------------------------------------------------------
def plot_time(rows: list[dict], path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    for suite in ("kernel", "module"):
        srows = [r for r in rows if r["suite"] == suite and r["median"]]
        for pass_ in sorted({r["pass_"] for r in srows}, key=_pass_key):
            panels.append((suite, pass_, [r for r in srows if r["pass_"] == pass_]))
    if not panels:
        return False
    ncols = 3
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6 * ncols, 4.2 * nrows), squeeze=False)
    device = rows[0].get("device_name", "")
    cmap = plt.get_cmap("tab10")
    colour = {impl: cmap(i % 10) for i, impl in
              enumerate(OrderedDict.fromkeys(r["impl"] for _, _, prow in panels for r in prow))}
    for ax, (suite, pass_, prow) in zip(axes.flat, panels):
        cases = list(OrderedDict.fromkeys(r["case"] for r in prow))
        impls = list(OrderedDict.fromkeys(r["impl"] for r in prow))
        width = 0.8 / max(1, len(impls))
        for i, impl in enumerate(impls):
            xs, ys = [], []
            for j, c in enumerate(cases):
                m = next((r["median"] for r in prow if r["case"] == c and r["impl"] == impl), None)
                if m:
                    xs.append(j + (i - (len(impls) - 1) / 2) * width)
                    ys.append(m * 1e3)
            ax.bar(xs, ys, width=width, label=impl, color=colour[impl])
        ax.set_xticks(range(len(cases)))
        ax.set_xticklabels(cases, rotation=15, fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel("median time (ms, log)")
        ax.set_title(f"{suite} {pass_}", fontsize=10)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    kind = "GPU" if str(rows[0].get("device", "")).startswith("cuda") else "CPU"
    fig.suptitle(f"time per backend and size, {kind}: {device}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_e2e(rows: list[dict], path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    erows = [r for r in rows if r["suite"] == "e2e" and r.get("samples_per_s")]
    if not erows:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    labels = [f"{r['bridge_label']}\n{r['stage']} {r['model']}\n{r['visual_tokens']} tok" for r in erows]
    colours = ["tab:blue" if r["stage"] == "pretrain" else "tab:orange" for r in erows]
    bars = ax.bar(range(len(erows)), [r["samples_per_s"] for r in erows], color=colours)
    for b, r in zip(bars, erows):
        ax.annotate(f"{r['samples_per_s']:.3g}", (b.get_x() + b.get_width() / 2, b.get_height()),
                    ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(erows)))
    ax.set_xticklabels(labels, fontsize=7)
    ax.set_ylabel("samples / s (median step)")
    kind = "GPU" if str(erows[0].get("device", "")).startswith("cuda") else "CPU"
    ax.set_title(f"end-to-end training throughput per bridge, {kind}: {erows[0].get('device_name', '')}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ---- main -----------------------------------------------------------------------------------------
def render(data: dict, rows: list[dict]) -> str:
    lines = header(data, rows) + kernel_section(rows) + module_section(rows) + e2e_section(rows)
    if not rows:
        lines.append("No timed benchmarks in this file (was it written with --benchmark-disable?).")
    return "\n".join(lines).rstrip() + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.split("\n\n")[0])
    p.add_argument("json", type=Path, help="a file written by pytest --benchmark-json")
    p.add_argument("--out", type=Path, default=None,
                   help=f"output folder (default {DEFAULT_DIR}); given explicitly, files are named "
                        f"RESULTS.md, time.png, e2e.png unless --name is set")
    p.add_argument("--name", default=None, help="file name stem: NAME.md, NAME_time.png, NAME_e2e.png")
    args = p.parse_args(argv)

    data, rows = load(args.json)
    out_dir = args.out or DEFAULT_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.name:
        md, tpng, epng = f"{args.name}.md", f"{args.name}_time.png", f"{args.name}_e2e.png"
    elif args.out is not None:
        md, tpng, epng = "RESULTS.md", "time.png", "e2e.png"
    else:
        stem = args.json.stem
        md, tpng, epng = f"{stem}.md", f"{stem}_time.png", f"{stem}_e2e.png"
    text = render(data, rows)
    plots = []
    if plot_time(rows, out_dir / tpng):
        plots.append(tpng)
    if plot_e2e(rows, out_dir / epng):
        plots.append(epng)
    if plots:
        text += "\n" + "\n".join(f"![{p}]({p})" for p in plots) + "\n"
    (out_dir / md).write_text(text)
    print(text)
    print(f"wrote {out_dir / md}" + "".join(f", {out_dir / p}" for p in plots))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
