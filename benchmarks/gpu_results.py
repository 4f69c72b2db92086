"""The one row schema of every benchmark table (COLUMNS, ``row``), and the GPU check's results file:
one JSON object per line, appended and flushed as soon as it exists, so a process killed mid-stage
keeps every line it wrote. The pytest-benchmark suites record the same rows (extra_info["row"]),
which report.py renders with the GPU check's tables (gpu_summary.py).

Three kinds of line, each with the ``stage`` it belongs to (preflight, kernel, module, e2e, tests):
  rows     ``{"stage", "row": {...}}``: one measured (or failed, or skipped) table row; ``row`` makes
           them, with every column of the stage (COLUMNS) and nothing else;
  events   ``{"stage", "event": "start" | "done" | "poisoned", "item", "pid", "group"}``: written by a
           measuring process around each work item, so the driver knows which item a crashed or
           killed process was in;
  statuses ``{"stage", "group", "status", "wall_s", "log"}``: the driver's line per group of items
           (one process, restarted after a crash) and per test stage.
``check_results`` is the schema the CI dry run holds the files to, so that a GPU call is never lost
to a missing column.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

# The columns every row of a stage carries (None where not measured). Ratios between rows of
# different processes (x torch, x eager unfused, vs resampler-336) are computed when rendering.
COLUMNS = {
    "preflight": ("device", "device_name", "driver", "clocks", "python", "versions", "imports", "nvcc", "cuda_home",
                  "copy_GBps", "matmul_TFLOPs", "matmul_dtype"),
    # median/min/max: eager calls (do_bench, L2 flushed before each); graph_*: the same pass captured
    # in a CUDA graph (no host launch cost; L2 not flushed, the inputs are several times its size);
    # TFLOPs: useful FLOPs (harness.kernel_flops) over the median
    "kernel": ("case", "impl", "pass", "dtype", "status", "median_ms", "min_ms", "max_ms", "graph_ms",
               "graph_min_ms", "graph_max_ms", "bytes_floor", "GBps", "copy_fraction", "graph_copy_fraction",
               "TFLOPs", "peak_mem_MiB", "max_rel_error", "detail"),
    # floor_*: the module's fewest bytes and FLOPs for one pass, floor_ms the larger of bytes / copy
    # bandwidth and FLOPs / matmul rate
    "module": ("case", "impl", "backend", "fused", "pass", "dtype", "status", "median_ms", "min_ms", "max_ms",
               "peak_mem_MiB", "floor_bytes", "floor_flops", "floor_ms", "max_rel_error", "detail"),
    "e2e": ("case", "bridge", "model", "backend", "dtype", "status", "step_ms", "min_ms", "max_ms", "samples_per_s",
            "bridge_fwdbwd_ms", "bridge_share", "mfu", "peak_mem_GiB", "visual_tokens", "detail"),
}
# the numbers an ok row must have
MEASURED = {"kernel": ("median_ms", "min_ms", "max_ms", "GBps", "max_rel_error"),
            "module": ("median_ms", "max_rel_error", "floor_bytes", "floor_ms"),
            "e2e": ("step_ms", "samples_per_s", "bridge_share"),
            "preflight": ("copy_GBps", "matmul_TFLOPs")}


def append(path: Path, stage: str, **entry) -> None:
    """One JSON line, flushed to disk at once."""
    with open(path, "a") as f:
        f.write(json.dumps({"stage": stage, **entry}, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read(path: Path) -> list[dict]:
    """Every line of the file; a line cut short by a kill is skipped, the rest still count."""
    if not Path(path).is_file():
        return []
    out = []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def row(stage: str, **values) -> dict:
    """A row with every column of ``stage`` (unknown names refused: the schema is the contract)."""
    unknown = set(values) - set(COLUMNS[stage])
    if unknown:
        raise KeyError(f"{stage} row: unknown columns {sorted(unknown)}")
    return {c: values.get(c) for c in COLUMNS[stage]}


def rates(bytes_floor: float | None, flops: float | None, ms: float | None, copy_bytes_per_s: float | None) -> dict:
    """GBps, copy_fraction (of the measured copy bandwidth) and TFLOPs of a call of ``ms`` that moves
    ``bytes_floor`` and does ``flops``; None where a number is missing."""
    bytes_per_s = bytes_floor * 1e3 / ms if ms and bytes_floor else None
    return dict(GBps=bytes_per_s and bytes_per_s / 1e9,
                copy_fraction=bytes_per_s / copy_bytes_per_s if bytes_per_s and copy_bytes_per_s else None,
                TFLOPs=flops * 1e3 / ms / 1e12 if ms and flops else None)


def rows(entries: list[dict], stage: str) -> list[dict]:
    return [e["row"] for e in entries if e.get("stage") == stage and "row" in e]


def events(entries: list[dict], pid: int | None = None) -> list[dict]:
    return [e for e in entries if "event" in e and (pid is None or e.get("pid") == pid)]


def stage_statuses(entries: list[dict]) -> list[dict]:
    """The driver's status lines, in the order written."""
    return [e for e in entries if "status" in e and "row" not in e]


def check_results(entries: list[dict], want_groups) -> list[str]:
    """Problems with a results file: a wanted (stage, group) without a status line, a table group that
    ended ok without rows, a row missing a column, an ok row without its numbers, an item started
    but never ended. Empty where the file is sound."""
    problems = []
    ended = {(e["stage"], e.get("group")): e for e in stage_statuses(entries)}
    for stage, group in want_groups:
        if (stage, group) not in ended:
            problems.append(f"{stage}/{group}: no status line")
    for (stage, group), status in ended.items():
        if stage in COLUMNS and status["status"] == "ok" and not rows(entries, stage):
            problems.append(f"{stage}/{group}: ended ok but the stage has no rows")
    for stage in COLUMNS:
        for r in rows(entries, stage):
            missing = [c for c in COLUMNS[stage] if c not in r]
            if missing:
                problems.append(f"{stage}: a row lacks the columns {missing}")
            if stage == "preflight" or r.get("status") == "ok":
                empty = [c for c in MEASURED[stage] if r.get(c) is None]
                if empty:
                    who = " ".join(str(r.get(k)) for k in ("case", "impl", "bridge", "pass") if r.get(k))
                    problems.append(f"{stage}: an ok row ({who}) has no {empty}")
    started = {(e["stage"], e["item"]) for e in events(entries) if e["event"] == "start"}
    finished = {(e["stage"], e["item"]) for e in events(entries) if e["event"] in ("done", "lost")}
    for stage, item in sorted(started - finished):
        problems.append(f"{stage}: item {item} started but never ended")
    return problems
