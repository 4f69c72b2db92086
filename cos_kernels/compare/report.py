"""The comparison's table (Markdown, JSON) and plot (PNG): time and quality of each recipe over seeds.

Times are the measured training-loop times of the runs (summary train_time_s: data + compute of
every step, without model building and evaluation). The stage-1 time ratio is mean Chain-of-Sight
stage-1 time / mean baseline stage-1 time; the per-seed ratios (same seed, same machine, run one
after the other) give its spread.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from ..atomic_io import atomic_file, atomic_text
from ..mllm.synthetic import BACKGROUNDS, COLOURS, COUNTS, FIELDS, SHAPES
from .run import COS

__all__ = ["aggregate", "markdown", "write_report", "plot"]

# (key, label, higher is better) of the quality columns, from a finetune eval dict
QUALITY = [("caption_loss", "held-out caption loss", False), *((f, f, True) for f in FIELDS),
           ("exact_match", "exact match", True)]


# a uniform guess among the values of a field (position: the first shape's cell is not uniform)
CHANCE = {"count": 1 / len(COUNTS), "background": 1 / len(BACKGROUNDS), "colour": 1 / len(COLOURS),
          "kind": 1 / len(SHAPES)}


def _quality(eval_result: dict, key: str) -> float | None:
    if key in ("caption_loss", "exact_match"):
        return eval_result[key]
    field = eval_result.get("fields", {}).get(key)
    return None if field is None else field["accuracy"]


def _stats(values: list[float]) -> dict:
    """mean, sample std (0 for one value), min, max and the values."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "values": values}


def _metrics(run: dict) -> dict[str, float]:
    pre, fine = run["pretrain"], run["finetune"]
    out = {"stage1_time_s": pre["train_time_s"], "stage1_samples_per_s": pre["samples_per_s"],
           "stage1_visual_tokens": pre["tokens_per_sample"]["visual"], "stage1_llm_tokens": pre["tokens_per_sample"]["llm"],
           "stage2_visual_tokens": fine["tokens_per_sample"]["visual"], "stage2_time_s": fine["train_time_s"],
           "total_time_s": pre["train_time_s"] + fine["train_time_s"]}
    for key, _, _ in QUALITY:
        value = _quality(fine["eval"], key)
        if value is not None:
            out[key] = value
    return out


def aggregate(results: list[dict]) -> dict:
    """{"recipes": {name: {metric: stats}}, "baselines": {name: {"stage1_time_ratio": r, "per_seed_ratio":
    stats, "verdicts": {metric: text}}}} from run_recipe results; ratios of Chain-of-Sight over each baseline."""
    by_recipe: dict[str, list[dict]] = {}
    for run in results:
        by_recipe.setdefault(run["recipe"], []).append(run)
    metrics = {name: [_metrics(r) for r in runs] for name, runs in by_recipe.items()}
    table = {name: {key: _stats([m[key] for m in ms]) for key in ms[0]} for name, ms in metrics.items()}
    out = {"recipes": table, "baselines": {}}
    if COS not in by_recipe:
        return out
    cos_by_seed = {r["seed"]: m for r, m in zip(by_recipe[COS], metrics[COS])}
    for name, runs in by_recipe.items():
        if name == COS:
            continue
        paired = [(cos_by_seed[r["seed"]], m) for r, m in zip(runs, metrics[name]) if r["seed"] in cos_by_seed]
        ratio = table[COS]["stage1_time_s"]["mean"] / table[name]["stage1_time_s"]["mean"]
        verdicts = {key: _verdict(table[COS][key], table[name][key], [c[key] - b[key] for c, b in paired], higher,
                                  CHANCE.get(key))
                    for key, _, higher in QUALITY if key in table[COS] and key in table[name]}
        out["baselines"][name] = {
            "stage1_time_ratio": ratio,
            "total_time_ratio": table[COS]["total_time_s"]["mean"] / table[name]["total_time_s"]["mean"],
            "per_seed_ratio": _stats([c["stage1_time_s"] / b["stage1_time_s"] for c, b in paired]),
            "verdicts": verdicts,
        }
    return out


def _verdict(cos: dict, base: dict, paired: list[float], higher_is_better: bool, chance: float | None = None) -> str:
    """'better' / 'within the baseline's seed spread' / 'worse', judged on the means against the
    baseline's seed std (one seed: no spread, any difference decides); flagged where both recipes
    are within 5 points of chance (a field neither learnt, so the comparison says nothing of it)."""
    diff = cos["mean"] - base["mean"]
    gain = diff if higher_is_better else -diff
    spread = base["std"]
    word = "within the baseline's seed spread" if abs(diff) <= spread else ("better" if gain > 0 else "worse")
    mean_paired = statistics.fmean(paired) if paired else diff
    text = f"{word} (difference {diff:+.4f}, baseline std {spread:.4f}, mean paired difference {mean_paired:+.4f})"
    if chance is not None and max(cos["mean"], base["mean"]) <= chance + 0.05:
        text += f"; both at chance ({chance:.0%}): neither recipe learnt this field here"
    return text


def _cell(stats: dict, fmt: str, spread: bool = True) -> str:
    if not spread or stats["std"] == 0 and len(stats["values"]) == 1:
        return format(stats["mean"], fmt)
    return f"{format(stats['mean'], fmt)} ± {format(stats['std'], fmt)}"


def markdown(config: dict, components: dict, results: list[dict], summary: dict, device: str) -> str:
    """The report: the setup, the probe, the table (mean ± std over seeds) and the verdicts."""
    seeds = sorted({r["seed"] for r in results})
    lines = [f"# Chain-of-Sight vs all tokens throughout: {config['model']} preset, {len(seeds)} seed(s) {seeds}", "",
             f"Device: {device}, {config['precision']}. Both recipes: stage 1 {config['pretrain_steps']} steps "
             f"(bridge trained, lr {config['pretrain_lr']:g}), stage 2 {config['finetune_steps']} steps at twice the "
             f"resolution (bridge + LLM, lr {config['finetune_lr']:g}), {config['global_batch']} samples per step, "
             f"data {config['data']!r}; held-out: {config['eval_samples']} synthetic scenes per seed.", ""]
    if components.get("probe"):
        lines += ["Linear probe of the frozen tower (per 3x3 cell, accuracy over occupied held-out cells; chance: "
                  "kind 33%, colour 20%):", "", "| tower | px | kind | colour |", "|---|---:|---:|---:|"]
        for size, scores in components["probe"].items():
            for which in ("random", "tower"):
                name = "random init" if which == "random" else "pre-trained on synthetic scenes (used)"
                lines.append(f"| {name} | {size} | {scores[which]['kind']:.1%} | {scores[which]['colour']:.1%} |")
        lines.append("")
    first = next(iter(summary["baselines"]), None)
    header = ["recipe", "stage-1 visual tokens", "stage-1 LLM tokens / sample", "stage-1 time (s)",
              *([f"stage-1 time / {first}'s"] if first else []), "stage-1 samples/s", "stage-2 visual tokens",
              "total time (s)",
              *(label for key, label, _ in QUALITY if key in next(iter(summary["recipes"].values())))]
    lines += ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for name, t in summary["recipes"].items():
        row = [f"{name} ({_bridges(results, name)})", _cell(t["stage1_visual_tokens"], ".0f", False),
               _cell(t["stage1_llm_tokens"], ".1f", False), _cell(t["stage1_time_s"], ".1f"),
               *([f"{t['stage1_time_s']['mean'] / summary['recipes'][first]['stage1_time_s']['mean']:.2f}"] if first else []),
               _cell(t["stage1_samples_per_s"], ".1f"), _cell(t["stage2_visual_tokens"], ".0f", False),
               _cell(t["total_time_s"], ".1f")]
        for key, _, _ in QUALITY:
            if key in t:
                row.append(_cell(t[key], ".4f" if key == "caption_loss" else ".1%"))
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    for name, b in summary["baselines"].items():
        r = b["per_seed_ratio"]
        lines.append(f"**Stage-1 time ratio Chain-of-Sight / {name}: {b['stage1_time_ratio']:.2f}** (per seed "
                     f"{_cell(r, '.2f')}; the paper: 0.42 against a 336-token resampler); total time ratio "
                     f"{b['total_time_ratio']:.2f}.")
        lines.append("")
        lines += [f"- {label}: Chain-of-Sight is {b['verdicts'][key]}" for key, label, _ in QUALITY if key in b["verdicts"]]
        lines.append("")
    return "\n".join(lines)


def _bridges(results: list[dict], name: str) -> str:
    run = next(r for r in results if r["recipe"] == name)
    pre, fine = run["pretrain"], run["finetune"]
    return f"{pre['bridge']} @ {pre['image_size']} px -> {fine['bridge']} @ {fine['image_size']} px"


def plot(results: list[dict], summary: dict, path: Path) -> None:
    """Loss curves (mean over seeds, min-max band; stage 2 after stage 1's steps) and the held-out
    per-field accuracy (mean, std bars) of every recipe."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (curves, bars) = plt.subplots(1, 2, figsize=(13, 4.5), gridspec_kw={"width_ratios": [3, 2]})
    names = list(summary["recipes"])
    boundary = None
    for i, name in enumerate(names):
        runs = [r for r in results if r["recipe"] == name]
        offset = runs[0]["pretrain"]["curve"][-1][0]
        boundary = offset
        points = [[[s, v] for s, v in r["pretrain"]["curve"]] + [[s + offset, v] for s, v in r["finetune"]["curve"]]
                  for r in runs]
        steps = [s for s, _ in points[0]]
        values = list(zip(*[[v for _, v in p] for p in points]))
        mean = [statistics.fmean(v) for v in values]
        colour = f"C{i}"
        curves.plot(steps, mean, color=colour, label=f"{name} ({_bridges(results, name)})")
        curves.fill_between(steps, [min(v) for v in values], [max(v) for v in values], color=colour, alpha=0.2)
    if boundary is not None:
        curves.axvline(boundary, color="gray", linestyle=":", label="stage 1 | stage 2")
    curves.set_xlabel("optimizer step")
    curves.set_ylabel("training caption loss (nats / token)")
    curves.set_yscale("log")
    curves.set_title("training loss, mean over seeds (band: min-max)")
    curves.legend(fontsize=8)
    keys = [(k, label) for k, label, higher in QUALITY if higher and k in summary["recipes"][names[0]]]
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        t = summary["recipes"][name]
        bars.bar([j + i * width for j in range(len(keys))], [t[k]["mean"] for k, _ in keys], width,
                 yerr=[t[k]["std"] for k, _ in keys], color=f"C{i}", label=name, capsize=3)
    for j, (k, _) in enumerate(keys):  # chance: a uniform guess among the field's values
        if k in CHANCE:
            bars.hlines(CHANCE[k], j - width / 2, j + width * (len(names) - 0.5), colors="k", linestyles="--",
                        label="chance" if j == 0 else None)
    bars.set_xticks([j + width * (len(names) - 1) / 2 for j in range(len(keys))], [label for _, label in keys],
                    rotation=20)
    bars.set_ylim(0, 1)
    bars.set_title("held-out accuracy after stage 2 (mean ± std over seeds)")
    bars.legend(fontsize=8)
    fig.tight_layout()
    atomic_file(path, lambda p: fig.savefig(p, format="png", dpi=110))
    plt.close(fig)


def write_report(out_dir: Path, config: dict, components: dict, results: list[dict], device: str) -> dict:
    """compare.md, compare.json and compare.png in out_dir; returns the summary (aggregate)."""
    summary = aggregate(results)
    text = markdown(config, components, results, summary, device)
    atomic_text(out_dir / "compare.md", text + "\n")
    atomic_text(out_dir / "compare.json", json.dumps({"config": config, "device": device, "components": components,
                                                     "summary": summary, "runs": results}, indent=1))
    plot(results, summary, out_dir / "compare.png")
    return summary
