"""scripts/gpu_check.py, the one GPU call: its dry run on the CPU writes every file and every column
the GPU run would (so no GPU minute is lost to a script error), a stage that overruns is killed and
recorded while the later ones still run, and the schema check catches a missing column."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT))

import gpu_check  # noqa: E402
from benchmarks import headline  # noqa: E402


@pytest.mark.slow
def test_dry_run_writes_every_file_and_column(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "scripts/gpu_check.py"), "--dry", "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=1500, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == sorted(set(gpu_check.OUTPUT_FILES) - {"build.log"})  # dry: no build, so no build log
    assert len(gpu_check.OUTPUT_FILES) <= 8  # the device tool brings back at most 8 files
    entries = headline.read(tmp_path / "results.jsonl")
    assert headline.check_results(entries) == []
    for stage in headline.CHECK_STAGES:  # every stage prints its wall time
        assert f"== {stage}: " in result.stdout and " s (" in result.stdout
    kernel = headline.rows(entries, "kernel")
    assert {r["impl"] for r in kernel} == set(headline.KERNEL_IMPLS)  # every backend and peer has a row
    assert {(r["impl"], r["pass"]) for r in kernel if r["status"] == "ok"} >= {
        (impl, p) for impl in ("triton", "torch", "sdpa_mask") for p in headline.PASSES}
    module = {r["impl"]: r for r in headline.rows(entries, "module")}
    assert {"torch unfused", "torch fused", "triton unfused", "triton fused"} <= set(module)
    assert all(r["status"] == "ok" and r["peak_mem_MiB"] for r in module.values())
    e2e = {r["bridge"]: r for r in headline.rows(entries, "e2e")}
    assert set(e2e) == {"cos-80", "resampler-336", "linear-256"} and e2e["resampler-336"]["rel_step_vs_resampler_336"] == 1
    summary = (tmp_path / "SUMMARY.md").read_text()
    for title in ("## Kernel", "## Module", "## Stage-1 step", "| tests_triton | ok |", "| flex | ok |"):
        assert title in summary
    assert (tmp_path / "kernel.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_stage_that_overruns_is_killed_and_the_next_still_runs(tmp_path):
    check = gpu_check.Check(tmp_path, budget_s=60, dry=True)
    check.limits = {"slow": 1.0, "fast": 30.0}
    t0 = time.monotonic()
    slow = check.run("slow", [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"],
                     "bench.log")
    assert slow.startswith("timed out") and time.monotonic() - t0 < 20
    assert check.run("fast", [sys.executable, "-c", "print('fine')"], "bench.log") == "ok"
    entries = headline.read(tmp_path / "results.jsonl")
    assert [(e["stage"], e["status"][:9]) for e in entries] == [("slow", "timed out"), ("fast", "ok")]
    log = (tmp_path / "bench.log").read_text()
    assert "started" in log and "fine" in log
    assert "| slow | timed out" in (tmp_path / "SUMMARY.md").read_text()


def test_a_stage_gets_no_more_than_the_budget_left(tmp_path):
    check = gpu_check.Check(tmp_path, budget_s=2, dry=True)
    check.limits = {"late": 100.0}
    assert check.run("late", [sys.executable, "-c", "print('never')"], "bench.log") == "not run"
    assert headline.read(tmp_path / "results.jsonl")[-1]["status"].startswith("not run")


def test_schema_check_catches_a_missing_column_and_an_empty_stage(tmp_path):
    path = tmp_path / "results.jsonl"
    good = headline.row("kernel", case="c", impl="triton", **{"pass": "fwd"}, status="ok", median_ms=1.0, GBps=2.0,
                        max_rel_error=1e-3)
    headline.append(path, "kernel", row=good)
    headline.append(path, "kernel", status="ok", wall_s=1.0)
    assert headline.check_results(headline.read(path), want_stages=("kernel",)) == []
    broken = dict(good)
    del broken["copy_fraction"]
    headline.append(path, "kernel", row={**broken, "median_ms": None})
    problems = headline.check_results(headline.read(path), want_stages=("kernel", "module"))
    assert any("copy_fraction" in p for p in problems)
    assert any("has no ['median_ms']" in p for p in problems)
    assert any("stage module: no status line" in p for p in problems)
    with pytest.raises(KeyError, match="unknown columns"):
        headline.row("kernel", speed=1.0)
    with open(path, "a") as f:
        f.write('{"stage": "kernel", "row": {"cut')  # a line cut by a kill is skipped, the rest read
    assert len(headline.read(path)) == 3
    json.dumps(headline.read(path))


def test_fused_order_ranks_the_fused_backends_per_dtype():
    """SUMMARY.md's order for cos_kernels.ops.AUTO_ORDER: per dtype, the fused backends timed in every
    case, fastest first by summed forward+backward medians; peers, other passes, failures and a
    backend missing a case are left out."""
    def r(case, impl, pass_, ms, dtype="bf16", status="ok"):
        return headline.row("kernel", case=case, impl=impl, dtype=dtype, status=status, median_ms=ms,
                            **{"pass": pass_})

    rows = [r("a", "cuda", "fwdbwd", 1.0), r("b", "cuda", "fwdbwd", 5.0), r("a", "triton", "fwdbwd", 2.0),
            r("b", "triton", "fwdbwd", 3.0), r("a", "torch", "fwdbwd", 0.1), r("a", "cuda", "fwd", 9.0),
            r("a", "triton", "fwdbwd", 0.5, dtype="fp16"), r("b", "triton", "fwdbwd", 0.5, dtype="fp16"),
            r("a", "cuda", "fwdbwd", 0.1, dtype="fp16"), r("b", "cuda", "fwdbwd", None, dtype="fp16", status="failed")]
    assert headline.fused_order(rows) == {"bf16": ["triton", "cuda"], "fp16": ["triton"]}
    text = headline.render([{"stage": "kernel", "row": x} for x in rows])
    assert "bf16: triton > cuda; fp16: triton" in text
