"""Turn a pytest-benchmark JSON file into a Markdown report and PNG plots.

    python -m benchmarks.report benchmarks/results/cpu.json
        -> benchmarks/results/cpu.md, cpu_time.png, cpu_e2e.png
    python -m benchmarks.report out/bench.json --out out
        -> out/RESULTS.md, out/time.png, out/e2e.png   (a self-contained result folder)
    --name NAME sets the file names explicitly: NAME.md, NAME_time.png, NAME_e2e.png.

The tables are the GPU check's (benchmarks/gpu_summary.py) over the rows the suites recorded
(extra_info["row"], benchmarks/gpu_results.py's schema): kernel, module and training-step rows with
their speed-ups over the peers, the eager unfused resampler and resampler-336. The header and every
plot name the commit that made the numbers, the device, the date and the library versions.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .gpu_summary import e2e_section, kernel_section, module_section

DEFAULT_DIR = Path(__file__).resolve().parent / "results"


def load(path: Path) -> tuple[dict, list[dict]]:
    """(the JSON's data, the extra_info of every benchmark that recorded a row)."""
    data = json.loads(Path(path).read_text())
    return data, [b["extra_info"] for b in data.get("benchmarks", []) if "row" in (b.get("extra_info") or {})]


def stamp(data: dict, infos: list[dict]) -> str:
    """Which commit, device and date made the numbers (the suites' own reading of the commit, else
    pytest-benchmark's)."""
    first = infos[0] if infos else {}
    commit = (first.get("versions") or {}).get("commit")
    if commit is None and data.get("commit_info", {}).get("id"):
        info = data["commit_info"]
        commit = info["id"][:10] + ("-dirty" if info.get("dirty") else "")
    return f"commit {commit or '?'}, {first.get('device_name', '?')}, {data.get('datetime', '?')[:16]} UTC"


def header(data: dict, infos: list[dict]) -> list[str]:
    first = infos[0] if infos else {}
    kind = "GPU" if str(first.get("device", "")).startswith("cuda") else "CPU"
    versions = ", ".join(f"{k} {v}" for k, v in (first.get("versions") or {}).items() if v and k != "commit")
    out = [f"# cos_kernels benchmarks: {kind} numbers on {first.get('device_name', '?')}", ""]
    if kind == "CPU":
        out += ["**These are CPU numbers** (small sizes; eager torch, Triton only under its interpreter). "
                "They check that the suite runs and show relative costs on a CPU; they say nothing about "
                "GPU kernel performance.", ""]
    copy = first.get("copy_GBps")
    out += [f"- made by: {stamp(data, infos)}",
            f"- command: `{first.get('command', '?')}`, then `python -m benchmarks.report`",
            f"- device: `{first.get('device', '?')}`; dtype {first.get('dtype', '?')}; torch threads "
            f"{first.get('threads', '?')}",
            f"- versions: {versions}",
            f"- measured copy bandwidth (read + write, {first.get('copy_buffer_MiB', 0):.0f} MiB buffer): "
            f"{'-' if copy is None else format(copy, '.3g')} GB/s",
            f"- timer: {first.get('timer', '?')}; times are pytest-benchmark's per-call statistics (median, "
            "min-max over its rounds)"]
    return out


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: Path) -> bool:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_time(rows: list[dict], title: str, path: Path) -> bool:
    """Median time per implementation and case, a panel per table (kernel, module) and pass."""
    panels = {}
    for r in rows:
        if r["stage"] in ("kernel", "module") and r["median_ms"] is not None:
            panels.setdefault((r["stage"], r["pass"]), []).append(r)
    if not panels:
        return False
    plt = _pyplot()
    ncols = 3
    fig, axes = plt.subplots(-(-len(panels) // ncols), ncols, figsize=(6 * ncols, 4.2 * -(-len(panels) // ncols)),
                             squeeze=False)
    impls = list(dict.fromkeys(r["impl"] for prow in panels.values() for r in prow))
    colour = {impl: plt.get_cmap("tab10")(i % 10) for i, impl in enumerate(impls)}
    for ax, ((stage, pass_), prow) in zip(axes.flat, panels.items()):
        cases = list(dict.fromkeys(r["case"] for r in prow))
        here = list(dict.fromkeys(r["impl"] for r in prow))
        width = 0.8 / len(here)
        for i, impl in enumerate(here):
            got = [(cases.index(r["case"]), r["median_ms"]) for r in prow if r["impl"] == impl]
            ax.bar([j + (i - (len(here) - 1) / 2) * width for j, _ in got], [ms for _, ms in got], width=width,
                   label=impl, color=colour[impl])
        ax.set_xticks(range(len(cases)), cases, rotation=15, fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel("median time (ms, log)")
        ax.set_title(f"{stage} {pass_}", fontsize=10)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(f"time per implementation and size; {title}", fontsize=10)
    return _save(plt, fig, path)


def plot_e2e(rows: list[dict], title: str, path: Path) -> bool:
    """Samples/s of each training step's bridge."""
    steps = [r for r in rows if r["stage"] == "e2e" and r["samples_per_s"]]
    if not steps:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4))
    bars = ax.bar(range(len(steps)), [r["samples_per_s"] for r in steps],
                  color=["tab:blue" if r["case"].startswith("stage 1") else "tab:orange" for r in steps])
    for b, r in zip(bars, steps):
        ax.annotate(f"{r['samples_per_s']:.3g}", (b.get_x() + b.get_width() / 2, b.get_height()), ha="center",
                    va="bottom", fontsize=7)
    ax.set_xticks(range(len(steps)), [f"{r['bridge']}\n{r['case']}\n{r['visual_tokens']} tok" for r in steps],
                  fontsize=6)
    ax.set_ylabel("samples / s (median step)")
    ax.set_title(f"training throughput per bridge\n{title}", fontsize=8)
    return _save(plt, fig, path)


def render(data: dict, infos: list[dict]) -> str:
    by_stage = {stage: [i["row"] for i in infos if i["stage"] == stage] for stage in ("kernel", "module", "e2e")}
    lines = header(data, infos)
    for stage, section in (("kernel", kernel_section), ("module", module_section), ("e2e", e2e_section)):
        if by_stage[stage]:
            lines += section(by_stage[stage])
    if not infos:
        lines += ["", "No benchmarks in this file."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.split("\n\n")[0])
    p.add_argument("json", type=Path, help="a file written by pytest --benchmark-json")
    p.add_argument("--out", type=Path, default=None,
                   help=f"output folder (default {DEFAULT_DIR}); given explicitly, files are named "
                        f"RESULTS.md, time.png, e2e.png unless --name is set")
    p.add_argument("--name", default=None, help="file name stem: NAME.md, NAME_time.png, NAME_e2e.png")
    args = p.parse_args(argv)

    data, infos = load(args.json)
    out_dir = args.out or DEFAULT_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = args.name or (None if args.out is not None else args.json.stem)
    md, tpng, epng = (f"{stem}.md", f"{stem}_time.png", f"{stem}_e2e.png") if stem else ("RESULTS.md", "time.png",
                                                                                        "e2e.png")
    text = render(data, infos)
    rows = [{"stage": i["stage"], **i["row"]} for i in infos]
    plots = [name for name, plot in ((tpng, plot_time), (epng, plot_e2e))
             if plot(rows, stamp(data, infos), out_dir / name)]
    if plots:
        text += "\n" + "\n".join(f"![{name}]({name})" for name in plots) + "\n"
    (out_dir / md).write_text(text)
    print(text)
    print(f"wrote {out_dir / md}" + "".join(f", {out_dir / name}" for name in plots))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
