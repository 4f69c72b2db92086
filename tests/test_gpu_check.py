"""scripts/gpu_check.py, the one GPU call: its dry run on the CPU writes every file and column the GPU
run would, and a crash of one implementation (an injected exception, a process that dies) costs no
other row; the supervisor restarts a group after a crash, a hang or a poisoned CUDA context; every
wait is bounded; the launch split, the pytest summary and the CUDA guard of the test stages work."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT))

import gpu_check  # noqa: E402

from benchmarks import device_timing, gpu_results, gpu_summary, headline  # noqa: E402
from benchmarks.cases import PRETRAIN_BRIDGES, headline_kernel_cases  # noqa: E402

pytest_plugins = ["pytester"]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("dry")
    t0 = time.monotonic()
    result = subprocess.run([sys.executable, str(ROOT / "scripts/gpu_check.py"), "--dry", "--out", str(out)],
                            capture_output=True, text=True, timeout=1500, cwd=out)
    return out, result, time.monotonic() - t0


@pytest.mark.slow
def test_dry_run_writes_every_file_and_column(dry_run):
    out, result, _ = dry_run
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted(set(gpu_check.OUTPUT_FILES) - {"build.log"})  # dry: no build, so no build log
    assert len(gpu_check.OUTPUT_FILES) <= 7  # the device tool brings back 8 files: one stays free
    entries = gpu_results.read(out / "results.jsonl")
    groups = [(s.stage, s.group) for s in gpu_check.DRY_PLAN] + [("build", "cuda")]
    assert gpu_results.check_results(entries, groups) == []
    for stage, group in groups:  # every group prints its wall time
        assert f"== {stage} {group}: " in result.stdout
    kernel = gpu_results.rows(entries, "kernel")
    cases = [c.label for c in headline_kernel_cases(dry=True)]
    assert {r["impl"] for r in kernel} == set(headline.KERNEL_IMPLS) | set(headline.FAULTS)
    ok = {(r["case"], r["impl"], r["pass"]) for r in kernel if r["status"] == "ok"}
    assert ok >= {(c, i, p) for c in cases for i in ("triton", "torch", "sdpa_mask") for p in headline.PASSES}
    assert all(r["min_ms"] <= r["median_ms"] <= r["max_ms"] for r in kernel if r["status"] == "ok")
    # the backward's launches apart: a GPU-only measurement, said so on the CPU
    launches = [r for r in kernel if r["pass"] in headline.LAUNCH_PASSES]
    assert {(r["case"], r["impl"], r["pass"]) for r in launches if r["impl"] == "triton"} == {
        (c, "triton", p) for c in cases for p in headline.LAUNCH_PASSES}
    assert all(r["status"] == "skipped" and "no device kernels" in r["detail"] for r in launches)
    for r in kernel:
        if r["impl"] in ("cuda", "flex", "flash_varlen"):
            assert r["status"] == "skipped" and r["detail"]


@pytest.mark.slow
def test_dry_run_a_crash_costs_only_its_own_rows(dry_run):
    out, result, _ = dry_run
    entries = gpu_results.read(out / "results.jsonl")
    kernel = gpu_results.rows(entries, "kernel")
    first, second = [c.label for c in headline_kernel_cases(dry=True)]
    raised = [r for r in kernel if r["impl"] == "fault_raise"]
    assert len(raised) == 2 and all(r["status"] == "failed" and "injected fault" in r["detail"] for r in raised)
    died = [r for r in kernel if r["impl"] == "fault_exit"]
    lost = [r for r in died if r["case"] == first]
    assert len(lost) == 1 and lost[0]["status"] == "failed"
    assert f"exited with code {headline.FAULT_EXIT_CODE}" in lost[0]["detail"] and "during this item" in lost[0]["detail"]
    assert {r["pass"] for r in died if r["case"] == second and r["status"] == "ok"} == set(headline.PASSES)
    status = {(e["stage"], e["group"]): e["status"] for e in gpu_results.stage_statuses(entries)}
    assert status["kernel", "fault_exit"] == f"fault_exit@{headline_kernel_cases(True)[0].key}: exited with code 7"
    assert status["kernel", "fault_raise"] == "ok"  # its process went on: both items ended
    # the groups after the crash still ran, in the plan's order: peers and torch, then the fused
    # backends, e2e, flex; the tests after every measurement
    order = [(e["stage"], e["group"]) for e in gpu_results.stage_statuses(entries)]
    assert order.index(("kernel", "sdpa_mask")) < order.index(("kernel", "triton")) < order.index(("kernel", "cuda"))
    assert order.index(("e2e", "tiny")) < order.index(("kernel", "flex")) < order.index(("tests", "cuda"))
    assert all(status[g] == "ok" for g in order if g[1] not in headline.FAULTS and g[0] not in ("build",)
               and not status[g].startswith("skipped"))


@pytest.mark.slow
def test_dry_run_module_e2e_and_summary(dry_run):
    out, result, _ = dry_run
    entries = gpu_results.read(out / "results.jsonl")
    module = {r["impl"]: r for r in gpu_results.rows(entries, "module")}
    assert {"torch unfused", "torch fused", "triton unfused", "triton fused", "cuda unfused", "cuda fused"} == set(module)
    for name in ("torch unfused", "torch fused", "triton unfused", "triton fused"):
        r = module[name]
        assert r["status"] == "ok" and r["peak_mem_MiB"] and r["floor_bytes"] > 0 and r["floor_flops"] > 0
        assert 0 < r["floor_ms"] < r["median_ms"]  # nothing beats its floor
    assert module["cuda fused"]["status"] == "skipped"
    e2e = {r["bridge"]: r for r in gpu_results.rows(entries, "e2e")}
    assert set(e2e) == {label for label, _, _ in PRETRAIN_BRIDGES} and all(r["status"] == "ok" for r in e2e.values())
    assert e2e["cos-80"]["backend"] == "torch" and e2e["linear-256"]["backend"] is None
    assert e2e["cos-80"]["visual_tokens"] == 80 and e2e["mlp-576"]["visual_tokens"] == 576
    ratios = gpu_summary.e2e_ratios(list(e2e.values()))
    step = e2e["cos-80"]["case"]
    assert ratios[step, "resampler-336"][0] == 1 and ratios[step, "mlp-576"][1] == 1
    summary = (out / "SUMMARY.md").read_text()
    for title in ("## Targets", "## Kernel", "## Module", "## Training step", "## GPU tests", "| tests | cuda | ok |",
                  "| kernel | flex | ok |", "vs mlp-576", "graph ms"):
        assert title in summary
    assert (out / "kernel.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---- the supervisor, with a fake measuring process ------------------------------------------------
FAKE_CHILD = textwrap.dedent('''
    import json, os, sys, time
    args = sys.argv[1:]
    stage, results = args[0], args[args.index("--results") + 1]
    group, work = args[args.index("--group") + 1], args[args.index("--items") + 1].split(",")
    def event(kind, item, **extra):
        with open(results, "a") as f:
            f.write(json.dumps({"stage": stage, "event": kind, "item": item, "group": group,
                                "pid": os.getpid(), **extra}) + "\\n")
    if work[0] == "dead-on-arrival":
        print("ImportError: the fake cannot start", flush=True)
        sys.exit(1)
    for item in work:
        event("start", item)
        if item == "crash":
            print("RuntimeError: a fault the process never survives", flush=True)
            os._exit(9)
        if item.startswith("hang"):
            time.sleep(600)
        if item == "poison":
            event("poisoned", item, error="AcceleratorError: an illegal memory access")
            event("done", item)
            os._exit(3)
        event("done", item)
''')


def _fake_check(tmp_path, budget_s=120.0):
    child = tmp_path / "fake_child.py"
    child.write_text(FAKE_CHILD)
    check = gpu_check.Check(tmp_path, budget_s, "dry")
    check.child = [sys.executable, str(child)]
    return check


def test_a_group_goes_on_after_a_crash_a_hang_and_a_poisoned_context(tmp_path):
    check = _fake_check(tmp_path)
    step = gpu_check.Step("preflight", "fake", 1, item_cap_s=2,
                          items=("ok1", "crash", "ok2", "hang", "ok3", "poison", "ok4"))
    t0 = time.monotonic()
    status = check.group(step)
    assert time.monotonic() - t0 < 30
    entries = gpu_results.read(tmp_path / "results.jsonl")
    done = [e["item"] for e in gpu_results.events(entries) if e["event"] == "done"]
    assert done == ["ok1", "ok2", "ok3", "poison", "ok4"]
    lost = {e["item"]: e["reason"] for e in gpu_results.events(entries) if e["event"] == "lost"}
    assert set(lost) == {"crash", "hang"}
    assert "exited with code 9 during this item" in lost["crash"] and "a fault the process never survives" in lost["crash"]
    assert "timed out after 2 s" in lost["hang"]
    assert status.split("; ") == ["crash: exited with code 9", "hang: timed out after 2 s",
                                  "after poison: exited with code 3 (CUDA context poisoned: AcceleratorError: an "
                                  "illegal memory access)"]
    assert gpu_results.check_results(entries, [("preflight", "fake")]) == []
    assert "| preflight | fake | crash: exited with code 9" in (tmp_path / "SUMMARY.md").read_text()


def test_a_process_that_dies_before_its_first_item_is_not_restarted(tmp_path):
    check = _fake_check(tmp_path)
    status = check.group(gpu_check.Step("preflight", "fake", 1, items=("dead-on-arrival", "never")))
    assert status == "the process exited with code 1 before its first item"
    entries = gpu_results.read(tmp_path / "results.jsonl")
    lost = {e["item"]: e["reason"] for e in gpu_results.events(entries) if e["event"] == "lost"}
    assert set(lost) == {"dead-on-arrival", "never"} and "the fake cannot start" in lost["never"]
    assert len([line for line in (tmp_path / "bench.log").read_text().splitlines() if line.startswith("====")]) == 1


def test_measurements_stop_at_their_share_of_the_budget(tmp_path):
    check = _fake_check(tmp_path, budget_s=3.0)
    status = check.group(gpu_check.Step("kernel", "torch", 1))
    assert status.endswith("not run: no time left")
    kernel = gpu_results.rows(gpu_results.read(tmp_path / "results.jsonl"), "kernel")
    assert [r["status"] for r in kernel] == ["not run"] * len(headline_kernel_cases(True))
    assert all(r["impl"] == "torch" and r["case"] for r in kernel)


def test_an_item_running_when_the_measurements_time_ends_is_stopped_not_failed(tmp_path):
    check = _fake_check(tmp_path, budget_s=7.0)
    key = headline_kernel_cases(True)[0].key  # kernel items named as the real ones, so they get rows
    status = check.group(gpu_check.Step("kernel", "torch", 1, item_cap_s=60, items=(f"hang@{key}", f"torch@{key}")))
    entries = gpu_results.read(tmp_path / "results.jsonl")
    lost = {e["item"]: e["reason"] for e in gpu_results.events(entries) if e["event"] == "lost"}
    assert "was stopped: the measurements' share of the budget ran out during this item" in lost[f"hang@{key}"]
    assert "no time left" in lost[f"torch@{key}"]
    assert [(r["impl"], r["status"]) for r in gpu_results.rows(entries, "kernel")] == [("hang", "not run"),
                                                                                       ("torch", "not run")]
    assert status.startswith(f"hang@{key}: was stopped") and status.endswith("1 item(s) not run: no time left")


DRIVER = textwrap.dedent('''
    import signal, sys
    from pathlib import Path
    sys.path[:0] = [{scripts!r}, {root!r}]
    import gpu_check
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, gpu_check.end_children)
    check = gpu_check.Check(Path({out!r}), 300, "dry")
    check.child = [sys.executable, {child!r}]
    check.group(gpu_check.Step("preflight", "fake", 1, item_cap_s=300, items=("hang",)))
''')


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL])
def test_a_driver_ended_by_a_signal_leaves_no_child_running(tmp_path, signum):
    """The device tool ends a call's processes when it returns, but not those of another session:
    every child stays in the driver's session, and dies with it, even when the driver is SIGKILLed."""
    child = tmp_path / "fake_child.py"
    child.write_text(FAKE_CHILD)
    script = tmp_path / "driver.py"
    script.write_text(DRIVER.format(scripts=str(ROOT / "scripts"), root=str(ROOT), out=str(tmp_path),
                                    child=str(child)))
    driver = subprocess.Popen([sys.executable, str(script)])
    results, pid = tmp_path / "results.jsonl", None
    for _ in range(200):
        started = [e for e in gpu_results.events(gpu_results.read(results)) if e["event"] == "start"]
        if started:
            pid = started[0]["pid"]
            break
        time.sleep(0.1)
    assert pid is not None, "the fake child never started"
    assert os.getsid(pid) == os.getsid(driver.pid) and os.getpgid(pid) == pid
    driver.send_signal(signum)
    driver.wait(timeout=30)
    for _ in range(100):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        os.kill(pid, signal.SIGKILL)
        pytest.fail(f"the child {pid} outlived its driver ({signal.Signals(signum).name})")


def test_a_command_that_overruns_is_killed_and_the_wait_is_bounded(tmp_path):
    check = gpu_check.Check(tmp_path, 60, "dry")
    t0 = time.monotonic()
    status = check.command("tests", "slow", [sys.executable, "-c", "import time; print('started', flush=True); "
                                            "time.sleep(60)"], timeout=6.0)
    assert status == "timed out after 6 s" and time.monotonic() - t0 < 25
    assert check.command("tests", "late", [sys.executable, "-c", "pass"], timeout=2.0) == "not run"
    assert "started" in (tmp_path / "tests.log").read_text()


def test_a_driver_bug_costs_its_step_and_a_render_bug_the_summary(tmp_path, monkeypatch):
    check = gpu_check.Check(tmp_path, 60, "dry")
    steps = tuple(gpu_check.Step("kernel", g, 1) for g in ("torch", "sdpa_mask", "triton"))
    ran = []

    def run_step(check, steps, n, step, build, workers):
        ran.append(step.group)
        if step.group == "sdpa_mask":
            raise KeyError("a bug in the driver")
        return build

    monkeypatch.setattr(gpu_check, "run_step", run_step)
    gpu_check.run(check, steps, workers=1)
    assert ran == ["torch", "sdpa_mask", "triton"]
    [status] = gpu_results.stage_statuses(gpu_results.read(check.results))
    assert status["group"] == "sdpa_mask" and status["status"] == "driver error: KeyError: 'a bug in the driver'"
    monkeypatch.setattr(gpu_summary, "render", lambda entries: 1 / 0)
    check.render()
    text = (tmp_path / "SUMMARY.md").read_text()
    assert "could not be rendered" in text and "ZeroDivisionError" in text


def test_the_plans_fit_the_budgets():
    """The default call leaves 4 of the 15 device minutes for a --quick call after the machine's
    start; each plan's expected seconds fit its budget; --quick is the kernel table of both fused
    backends; the CUDA groups wait for the build."""
    start_s = 120
    assert gpu_check.BUDGET_S["default"] <= 7 * 60 and 15 * 60 - start_s - gpu_check.BUDGET_S["default"] >= 4 * 60
    for mode in ("default", "quick"):
        assert sum(s.est_s for s in gpu_check.plan_for(mode)) <= gpu_check.BUDGET_S[mode]
    quick = gpu_check.plan_for("quick")
    assert {s.stage for s in quick} == {"preflight", "kernel"} and {"triton", "cuda"} <= {s.group for s in quick}
    for plan in (gpu_check.PLAN, gpu_check.QUICK_PLAN, gpu_check.DRY_PLAN):
        assert all(s.after_build == (s.group == "cuda" and s.stage != "tests") for s in plan)
        stages = [s.stage for s in plan]
        assert stages[0] == "preflight" and stages == sorted(stages, key=lambda x: x == "tests")
    measured = [(s.stage, s.group) for s in gpu_check.PLAN if s.stage != "tests"]
    assert ("e2e", "7b") in measured and ("e2e", "1b") in measured and measured[-1] == ("kernel", "flex")


def test_pytest_command_has_a_thread_timeout_workers_and_names(tmp_path):
    check = gpu_check.Check(tmp_path, 60, "dry")
    cmd = gpu_check.pytest_cmd(check, "cuda", 4)
    joined = " ".join(cmd)
    assert "-m gpu -k cuda" in joined and "-v" in cmd
    assert "--timeout-method thread" in joined and "-n 4 --max-worker-restart 8" in joined


def test_pytest_summary_and_failures_are_read_from_the_log(tmp_path):
    log = tmp_path / "tests.log"
    log.write_text("old run\nFAILED tests/test_old.py::x - nope\n")
    offset = log.stat().st_size
    with open(log, "a") as f:
        f.write("[gw1] PASSED tests/test_cuda.py::test_gpu_opcheck\n"
                "[gw0] node down: worker 'gw0' crashed while running 'tests/test_cuda.py::test_gpu_empty_batch'\n"
                "FAILED tests/test_cuda.py::test_gpu_plan_summary - AssertionError: x\n"
                "==== 95 passed, 1 failed, 3 skipped in 41.20s ====\n")
    got = gpu_check.parse_extra(log, offset)
    assert got["summary"] == "95 passed, 1 failed, 3 skipped in 41.20s"
    assert got["failed"] == ["tests/test_cuda.py::test_gpu_plan_summary",
                             "tests/test_cuda.py::test_gpu_empty_batch (worker gw0 crashed)"]


# ---- the measuring process ------------------------------------------------------------------------
def test_an_item_that_poisons_the_context_ends_the_process(tmp_path):
    results = tmp_path / "results.jsonl"
    ran, exits = [], []

    def run_one(item):
        ran.append(item)
        if item == "b":
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

    def exit_(code):
        exits.append(code)

    state = {"bad": None}

    def poisoned():
        return state["bad"]

    def run_one_poisoning(item):
        try:
            run_one(item)
        finally:
            if item == "b":
                state["bad"] = "AcceleratorError: an illegal memory access"

    headline.run_items("preflight", "g", ["a", "b", "c"], results, True, run_one_poisoning, poisoned=poisoned,
                       exit=exit_)
    assert ran == ["a", "b"] and exits == [headline.POISONED_EXIT]
    kinds = [(e["event"], e["item"]) for e in gpu_results.events(gpu_results.read(results))]
    assert kinds == [("start", "a"), ("done", "a"), ("start", "b"), ("poisoned", "b"), ("done", "b")]


def test_an_item_that_raises_gets_a_failed_row_and_the_next_runs(tmp_path):
    results = tmp_path / "results.jsonl"
    key = headline_kernel_cases(True)[0].key

    def run_one(item):
        if item.startswith("torch"):
            raise MemoryError("out of memory building the inputs")

    headline.run_items("kernel", "torch", [f"torch@{key}", f"triton@{key}"], results, True, run_one,
                       poisoned=lambda: None, exit=None)
    entries = gpu_results.read(results)
    [r] = gpu_results.rows(entries, "kernel")
    assert r["impl"] == "torch" and r["status"] == "failed" and "MemoryError: out of memory" in r["detail"]
    assert [e["item"] for e in gpu_results.events(entries) if e["event"] == "done"] == [f"torch@{key}", f"triton@{key}"]


def test_unknown_groups_and_items_are_refused():
    with pytest.raises(ValueError, match="unknown kernel group 'fault_raise'"):
        headline.items("kernel", "fault_raise", dry=False)  # the fakes exist in the dry run only
    with pytest.raises(ValueError, match=r"e2e groups: \['7b', '1b'\]"):
        headline.items("e2e", "tiny", dry=False)
    with pytest.raises(SystemExit):
        headline.main(["kernel", "--results", "x.jsonl", "--group", "torch", "--items", "torch@nope"])


def test_backward_launches_are_told_apart_from_a_trace(tmp_path):
    names = ["window_attention_bwd_dq_kernel", "window_attention_bwd_dkdv_kernel",
             "void cos_kernels::tc_dq_kernel<2, __nv_bfloat16>(cos_kernels::BwdParams)",
             "void cos_kernels::tc_dkv_kernel<2, __nv_bfloat16>(cos_kernels::BwdParams)"]
    for dq, dkdv in ((names[0], names[1]), (names[2], names[3])):
        events = []
        for call in range(3):
            ts = 1000 * call
            events += [{"cat": "kernel", "name": "elementwise_kernel<copy>", "ts": ts, "dur": 5.0},
                       {"cat": "kernel", "name": dkdv, "ts": ts + 60, "dur": 300.0 + call},
                       {"cat": "kernel", "name": dq, "ts": ts + 10, "dur": 200.0 + call},
                       {"cat": "cpu_op", "name": "aten::empty", "ts": ts, "dur": 1.0}]
        path = tmp_path / "trace.json"
        path.write_text(json.dumps({"traceEvents": events}))
        kernels = device_timing.trace_kernels(str(path))
        assert [n for n, _ in kernels[:3]] == ["elementwise_kernel<copy>", dq, dkdv]  # start order
        got = device_timing.classify_launches(kernels, calls=3)
        assert got == {"bwd_dq": [0.2, 0.201, 0.202], "bwd_dkdv": [0.3, 0.301, 0.302], "other": [0.005] * 3}
    # a launch that is not there once per call is not reported
    assert device_timing.classify_launches([(names[0], 1.0)], calls=2) == {}


def test_summary_ratios_targets_and_the_fused_order():
    def k(case, impl, pass_, ms, frac=None, dtype="bf16", status="ok"):
        return gpu_results.row("kernel", case=case, impl=impl, dtype=dtype, status=status, median_ms=ms, min_ms=ms,
                               max_ms=ms, copy_fraction=frac, **{"pass": pass_})

    kernel = [k("a", "cuda", "fwdbwd", 1.0), k("b", "cuda", "fwdbwd", 5.0), k("a", "triton", "fwdbwd", 2.0),
              k("b", "triton", "fwdbwd", 3.0), k("a", "torch", "fwdbwd", 3.0), k("a", "sdpa_mask", "fwdbwd", 2.5),
              k("a", "triton", "fwd", 0.1, frac=0.75), k("a", "triton", "bwd", 0.2, frac=0.4),
              k("a16", "triton", "fwdbwd", 0.5, dtype="fp16"), k("b16", "triton", "fwdbwd", 0.5, dtype="fp16"),
              k("a16", "cuda", "fwdbwd", 0.1, dtype="fp16"),
              k("b16", "cuda", "fwdbwd", None, dtype="fp16", status="failed")]
    assert gpu_summary.fused_order(kernel) == {"bf16": ["triton", "cuda"], "fp16": ["triton"]}
    assert gpu_summary.kernel_speedups(kernel)["a", "triton", "fwdbwd"] == (1.5, 1.25)
    module = [gpu_results.row("module", case="m", impl=impl, status="ok", median_ms=ms, peak_mem_MiB=mem,
                              **{"pass": "fwdbwd"})
              for impl, ms, mem in (("torch unfused", 10.0, 100.0), ("triton fused", 4.0, 60.0))]
    e2e = [gpu_results.row("e2e", case="s", model="7b", bridge=b, status="ok", step_ms=ms, bridge_share=share)
           for b, ms, share in (("resampler-336", 100.0, 0.05), ("cos-80", 38.0, 0.02), ("mlp-576", 160.0, 0.0))]
    entries = [{"stage": s, "row": r} for s, rs in (("kernel", kernel), ("module", module), ("e2e", e2e)) for r in rs]
    goals = {t: (m, met) for t, m, met in gpu_summary.targets(entries)}
    assert goals["a: best fused (triton) fwd >= 70% of copy bandwidth"] == ("75.0%", True)
    assert goals["a: best fused (triton) bwd >= 50% of copy bandwidth"] == ("40.0%", False)
    assert goals["a: fwd+bwd >= 2x every peer (timed: torch, sdpa_mask)"] == ("1.25x over sdpa_mask", False)
    assert goals["module m: triton fused fwd+bwd >= 2x eager unfused, less peak memory"] == ("2.50x, memory 0.60x", True)
    assert goals["7b: cos-80 step <= 0.40 of resampler-336's"] == ("0.380", True)
    assert goals["7b: cos-80 step <= 0.25 of mlp-576's"] == ("0.237", True)
    assert goals["7b: cos-80 resampler < 3% of the step"] == ("2.0%", True)
    text = gpu_summary.render(entries)
    assert "bf16: triton > cuda; fp16: triton" in text and "**no**" in text


def test_schema_check_catches_a_missing_column_and_an_unended_item(tmp_path):
    path = tmp_path / "results.jsonl"
    good = gpu_results.row("kernel", case="c", impl="triton", **{"pass": "fwd"}, status="ok", median_ms=1.0,
                           min_ms=0.9, max_ms=1.2, GBps=2.0, max_rel_error=1e-3)
    gpu_results.append(path, "kernel", row=good)
    gpu_results.append(path, "kernel", group="triton", status="ok", wall_s=1.0)
    assert gpu_results.check_results(gpu_results.read(path), [("kernel", "triton")]) == []
    broken = dict(good)
    del broken["copy_fraction"]
    gpu_results.append(path, "kernel", row={**broken, "median_ms": None})
    gpu_results.append(path, "kernel", event="start", item="triton@c", pid=1)
    problems = gpu_results.check_results(gpu_results.read(path), [("kernel", "triton"), ("module", "torch")])
    assert any("copy_fraction" in p for p in problems)
    assert any("has no ['median_ms']" in p for p in problems)
    assert any("module/torch: no status line" in p for p in problems)
    assert any("triton@c started but never ended" in p for p in problems)
    with pytest.raises(KeyError, match="unknown columns"):
        gpu_results.row("kernel", speed=1.0)
    with open(path, "a") as f:
        f.write('{"stage": "kernel", "row": {"cut')  # a line cut by a kill is skipped, the rest read
    assert len(gpu_results.read(path)) == 4


# ---- the CUDA guard of the test stages ------------------------------------------------------------
def test_a_broken_cuda_context_or_a_blocked_test_ends_only_its_worker(pytester, monkeypatch):
    """Under pytest-xdist with the thread-method timeout: a test stuck where no signal reaches it (a
    blocked CUDA synchronisation) is ended by the timeout, a test that leaves a sticky CUDA error
    ends its worker through tests/cuda_guard.py; xdist replaces the worker and the tests left run."""
    pytest.importorskip("xdist")
    pytest.importorskip("pytest_timeout")
    marker = pytester.path / "poisoned"
    pytester.makeini("[pytest]\nmarkers =\n    gpu: needs a CUDA device\n")
    pytester.makeconftest(textwrap.dedent(f'''
        import os
        import cuda_guard
        from cuda_guard import _cuda_context_guard  # noqa: F401

        def fake_cuda_error():  # a sticky error, once, after the test that caused it
            if os.path.exists({str(marker)!r}):
                os.remove({str(marker)!r})
                return "AcceleratorError: CUDA error: an illegal memory access was encountered"
            return None

        cuda_guard.cuda_error = fake_cuda_error
    '''))
    pytester.makepyfile(test_guard=textwrap.dedent(f'''
        import signal, time
        import pytest

        def test_blocked():
            signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGALRM])  # as a thread stuck in the driver
            time.sleep(60)

        @pytest.mark.gpu
        def test_poisons():
            open({str(marker)!r}, "w").close()

        @pytest.mark.gpu
        def test_after_the_crash():
            pass

        def test_last():
            pass
    '''))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]))
    t0 = time.monotonic()
    result = pytester.runpytest_subprocess("-n", "1", "-p", "no:cacheprovider", "--timeout", "3",
                                           "--timeout-method", "thread", "-v", timeout=120)
    assert time.monotonic() - t0 < 60
    text = result.stdout.str()
    assert "crashed while running 'test_guard.py::test_blocked'" in text
    assert "crashed while running 'test_guard.py::test_poisons'" in text
    assert "the CUDA context is unusable after test_guard.py::test_poisons" in text + result.stderr.str()
    assert "PASSED test_guard.py::test_after_the_crash" in text and "PASSED test_guard.py::test_last" in text
    assert result.parseoutcomes().get("failed") == 2  # the two crashes; test_poisons' own call passed
