"""One GPU call that returns the whole picture, whatever breaks in it: measurements first, each
implementation in its own process, every result written the moment it exists.

    python scripts/gpu_check.py                  # on the GPU machine: at most 7 minutes, results in $OUT
    python scripts/gpu_check.py --quick          # a second call after a fix: the kernel table, ~3 minutes
    python scripts/gpu_check.py --dry --out DIR  # on a CPU (CI): tiny sizes, the Triton interpreter, no build

The plan (PLAN; QUICK_PLAN for --quick), in order, each step with its expected seconds on the H200:
  preflight       GPU, clocks, versions, imports, nvcc, measured copy bandwidth and bf16 matmul rate
  build           the CUDA extension for sm_90 only, in the background from here on
  kernel, module  peers and the torch backend first, then Triton; the CUDA backend once the build is
                  done; every row checked against float64 before it is timed
  e2e             stage-1 steps of the 7b, then the 1b proxy, the resampler on the fastest fused backend
                  whose kernel rows all passed (the rows say which)
  flex            the compiled FlexAttention peer (each shape and grad mode a torch.compile)
  tests           the GPU tests of the CUDA backend, then Triton's: several pytest-xdist workers, a
                  thread-method timeout per test, a worker whose CUDA context breaks is replaced
Each measuring group is one process over its items (benchmarks/headline.py); a process that crashes,
hangs past its item's limit or finds its CUDA context poisoned is killed, the item it was in gets a
failed row saying how, and a fresh process takes the items left. Measurements stop TESTS_RESERVE
seconds before the deadline so the tests keep their share. Every subprocess wait is bounded.

Files (at most 7 come back; these are 6): SUMMARY.md and kernel.png (rewritten after every group),
results.jsonl (rows, item events, statuses), build.log, bench.log (every measuring process), tests.log.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import gpu_results as results_file  # noqa: E402
from benchmarks import gpu_summary, headline  # noqa: E402

OUTPUT_FILES = ("SUMMARY.md", "kernel.png", "results.jsonl", "build.log", "bench.log", "tests.log")
LOGS = {"preflight": "bench.log", "kernel": "bench.log", "module": "bench.log", "e2e": "bench.log",
        "build": "build.log", "tests": "tests.log"}
BUDGET_S = {"default": 420, "quick": 180, "dry": 1800}  # the whole call's wall time
TESTS_RESERVE = {"default": 90, "quick": 0, "dry": 0}  # seconds the measurements leave to the tests
BUILD_CAP_S = 240  # ~60-90 s on 16 cores, sm_90 only
STARTUP_CAP_S = 90  # a process's imports and CUDA initialisation, before its first item starts
POLL_S = 0.5
PER_TEST_TIMEOUT_S = {"gpu": 90, "dry": 300}


@dataclass(frozen=True)
class Step:
    """One group of items (a process, restarted after a crash), or a test stage ("tests").
    est_s: expected seconds on the H200 (process start included); item_cap_s: the most one item may
    take before its process is killed."""

    stage: str
    group: str
    est_s: float
    item_cap_s: float = 60.0
    after_build: bool = False  # needs the CUDA extension (waits for the build first)
    items: tuple[str, ...] | None = None  # default: every item of the group (headline.items)

    def work(self, dry: bool) -> list[str]:
        return list(self.items) if self.items is not None else headline.items(self.stage, self.group, dry)


# The default call: 7 minutes of wall time. With the machine's start (1-2 min) that leaves at least
# 4 of the 15 minutes for a --quick call after a fix. Expected total: 405 s.
PLAN = (
    Step("preflight", "preflight", 15, 45),
    Step("kernel", "torch", 15), Step("kernel", "sdpa_mask", 15), Step("kernel", "flash_varlen", 6),
    Step("kernel", "triton", 30),  # its Triton compiles overlap the build
    Step("module", "torch", 20), Step("module", "triton", 25),
    Step("kernel", "cuda", 20, after_build=True), Step("module", "cuda", 20, after_build=True),
    Step("e2e", "7b", 75, 90), Step("e2e", "1b", 35),
    Step("kernel", "flex", 45, 90),  # what the measurements' share leaves, 4 compiles
    Step("tests", "cuda", 50), Step("tests", "triton", 40),
)
QUICK_PLAN = (
    Step("preflight", "preflight", 15, 45), Step("kernel", "torch", 15), Step("kernel", "triton", 30),
    Step("kernel", "cuda", 20, after_build=True),
)
# dry (CPU): the default plan's groups with the tiny model and the two fakes that fail on purpose
DRY_PLAN = (*PLAN[:5], Step("kernel", "fault_raise", 5), Step("kernel", "fault_exit", 5), *PLAN[5:9],
            Step("e2e", "tiny", 30), *PLAN[11:])


def plan_for(mode: str) -> tuple[Step, ...]:
    return {"default": PLAN, "quick": QUICK_PLAN, "dry": DRY_PLAN}[mode]


class Check:
    """The run: output folder, deadline, results file; ``group`` runs a group of items under watch."""

    def __init__(self, out: Path, budget_s: float, mode: str):
        self.out, self.mode, self.dry = out, mode, mode == "dry"
        self.started = time.monotonic()
        self.deadline = self.started + budget_s
        self.measure_deadline = self.deadline - TESTS_RESERVE[mode]
        self.results = out / "results.jsonl"
        self.python = sys.executable
        self.child = [self.python, "-m", "benchmarks.headline"]  # the measuring process (tests swap in a fake)
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                    "TOKENIZERS_PARALLELISM": "false"}
        if self.dry:
            self.env["TRITON_INTERPRET"] = "1"
        else:
            self.env.pop("TRITON_INTERPRET", None)

    def left(self, deadline: float | None = None) -> float:
        return (self.deadline if deadline is None else deadline) - time.monotonic()

    def record(self, stage: str, group: str, status: str, wall_s: float, **extra) -> None:
        results_file.append(self.results, stage, group=group, status=status, wall_s=round(wall_s, 1),
                            log=LOGS[stage], **extra)
        self.render()
        print(f"== {stage} {group}: {status} in {wall_s:.1f} s ({max(0, self.left()):.0f} s of the budget left)",
              flush=True)

    def render(self) -> None:
        """SUMMARY.md and kernel.png from the results so far; a rendering bug costs the summary, never
        the run (the results file holds everything)."""
        entries = results_file.read(self.results)
        try:
            text = gpu_summary.render(entries)
        except Exception:  # noqa: BLE001
            text = "# GPU check\n\nSUMMARY.md could not be rendered; results.jsonl holds every row.\n\n```\n" + \
                traceback.format_exc() + "```\n"
        (self.out / "SUMMARY.md").write_text(text)
        try:
            gpu_summary.plot(entries, self.out / "kernel.png")
        except Exception:  # noqa: BLE001
            traceback.print_exc()

    def lose(self, stage: str, work: list[str], status: str, detail: str) -> None:
        """Rows (and ended events) for items no process finished."""
        for item in work:
            r = headline.lost_row(stage, item, self.dry, status, detail)
            if r is not None:
                results_file.append(self.results, stage, row=r)
            results_file.append(self.results, stage, event="lost", item=item, reason=detail)

    # -- one group of items, one process at a time ---------------------------------------------------
    def group(self, step: Step, extra: list[str] = (), note: str | None = None) -> str:
        """Run the step's items, restarting after a crash, until each has ended or time is out;
        records and returns the group's status."""
        t0 = time.monotonic()
        work = step.work(self.dry)
        problems = []
        while work:
            if self.left(self.measure_deadline) < 5:
                self.lose(step.stage, work, "not run", "no time left in the measurements' share of the budget")
                problems.append(f"{len(work)} item(s) not run: no time left")
                break
            cmd = [*self.child, step.stage, "--results", str(self.results),
                   "--group", step.group, "--items", ",".join(work), *extra] + (["--dry"] if self.dry else [])
            proc, offset = self._start(cmd, LOGS[step.stage])
            outcome, current = self._watch(proc, step)
            mine = results_file.events(results_file.read(self.results), proc.pid)
            finished = [e["item"] for e in mine if e["event"] == "done"]
            poisoned = next((e["error"] for e in mine if e["event"] == "poisoned"), None)
            left = [i for i in work if i not in finished]
            if outcome == _exit_outcome(0):
                if left:
                    self.lose(step.stage, left, "failed", "its process ended without running it")
                    problems.append(f"{len(left)} item(s) never run")
                break
            why = outcome + (f" (CUDA context poisoned: {poisoned})" if poisoned else "")
            last = _last_error(self.out / LOGS[step.stage], offset)
            if current is not None:  # a process stopped for time did not fail: it ran out of it
                self.lose(step.stage, [current], "not run" if outcome.startswith("was stopped") else "failed",
                          f"its process {why} during this item" + (f"; last error: {last}" if last else ""))
                problems.append(f"{current}: {why}")
                left.remove(current)
            elif not finished:  # died before its first item: a fresh process would too
                self.lose(step.stage, left, "failed", f"its process {why} before the first item" +
                          (f"; last error: {last}" if last else ""))
                problems.append(f"the process {why} before its first item")
                break
            else:
                problems.append(f"after {finished[-1]}: {why}")
            if left:
                print(f"== {step.stage} {step.group}: {why}; a fresh process takes the {len(left)} item(s) left",
                      flush=True)
            work = left
        status = "ok" if not problems else "; ".join(problems)
        self.record(step.stage, step.group, status, time.monotonic() - t0, note=note)
        return status

    def _start(self, cmd: list[str], log: str, env: dict | None = None) -> tuple[subprocess.Popen, int]:
        """``cmd`` in the background (a child of this session, child_setup), its output appended to
        ``log`` -> (process, where its output starts in the log)."""
        path = self.out / log
        with open(path, "a") as f:
            f.write(f"\n==== {' '.join(cmd)}\n")
            f.flush()
            offset = f.tell()
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env or self.env, stdout=f, stderr=subprocess.STDOUT,
                                    preexec_fn=child_setup)
        RUNNING.add(proc)
        return proc, offset

    def _watch(self, proc: subprocess.Popen, step: Step) -> tuple[str, str | None]:
        """Wait for ``proc``: -> (outcome, the item it was in when it ended or was killed, if any).
        Killed when an item runs past step.item_cap_s, the start past STARTUP_CAP_S, or the
        measurements' share of the budget ends."""
        launched, seen = time.monotonic(), {}
        current = None
        while True:
            code = proc.poll()
            mine = results_file.events(results_file.read(self.results), proc.pid)
            for e in mine:
                seen.setdefault((e["event"], e["item"]), time.monotonic())
            started = [e["item"] for e in mine if e["event"] == "start"]
            done = {e["item"] for e in mine if e["event"] == "done"}
            current = next((i for i in reversed(started) if i not in done), None)
            if code is not None:
                return _exit_outcome(code), current
            now = time.monotonic()
            if current is not None and now - seen["start", current] > step.item_cap_s:
                kill(proc)
                return f"timed out after {step.item_cap_s:.0f} s", current
            if not started and now - launched > STARTUP_CAP_S:
                kill(proc)
                return f"did not start an item within {STARTUP_CAP_S} s", None
            if self.left(self.measure_deadline) <= 0:
                kill(proc)
                return "was stopped: the measurements' share of the budget ran out", current
            time.sleep(POLL_S)

    # -- plain commands (build, tests) ---------------------------------------------------------------
    def command(self, stage: str, group: str, cmd: list[str], timeout: float, **extra) -> str:
        if timeout < 5:
            self.record(stage, group, "not run: no time left in the budget", 0.0, **extra)
            return "not run"
        t0 = time.monotonic()
        proc, offset = self._start(cmd, LOGS[stage])
        status = wait(proc, timeout)
        extra.update(parse_extra(self.out / LOGS[stage], offset) if stage == "tests" else {})
        self.record(stage, group, status, time.monotonic() - t0, **extra)
        tail(self.out / LOGS[stage], 12 if status == "ok" else 30)
        return status


RUNNING: set[subprocess.Popen] = set()  # every child started, so that a signal can end them all


def child_setup() -> None:
    """In each child before it runs: its own process group (killpg ends it with its descendants),
    inside this session (the device tool ends a session's processes when the call returns, not those
    of another session), and SIGKILL when this driver dies, even by SIGKILL (Linux prctl)."""
    os.setpgid(0, 0)
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def end_children(signum, _frame) -> None:
    """SIGTERM / SIGINT / SIGHUP: kill every child's process group, then exit (the results so far stay)."""
    for proc in list(RUNNING):
        if proc.poll() is None:
            kill(proc, grace_s=5.0)
    print(f"gpu_check: ended by {signal.Signals(signum).name}; the results so far are in results.jsonl", flush=True)
    sys.exit(128 + signum)


def _exit_outcome(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def _last_error(path: Path, offset: int) -> str | None:
    """The last line that names an error in what a process wrote to ``path`` after ``offset``."""
    try:
        with open(path, errors="replace") as f:
            f.seek(offset)
            lines = f.read().splitlines()
    except OSError:
        return None
    hits = [line.strip() for line in lines if re.search(r"Error|error:|Exception|FAILED|fault", line)]
    return hits[-1][:240] if hits else None


def wait(proc: subprocess.Popen, timeout: float) -> str:
    """Status of ``proc`` after at most ``timeout`` seconds: ok, exit code N, or timed out (its whole
    process group killed)."""
    try:
        code = proc.wait(timeout=max(0.0, timeout))
    except subprocess.TimeoutExpired:
        kill(proc)
        return f"timed out after {timeout:.0f} s"
    return "ok" if code == 0 else _exit_outcome(code)


def kill(proc: subprocess.Popen, grace_s: float = 15.0) -> None:
    """SIGKILL to the process group, then at most ``grace_s`` for it to be reaped (a process stuck
    in the driver may never be: the check goes on without it)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        print(f"   ! process {proc.pid} not reaped {grace_s:.0f} s after SIGKILL; going on without it", flush=True)


def tail(path: Path, lines: int) -> None:
    text = path.read_text(errors="replace").splitlines() if path.is_file() else []
    for line in text[-lines:]:
        print(f"   | {line}", flush=True)


def parse_extra(path: Path, offset: int) -> dict:
    """pytest's summary line and the failed tests' names from what one run wrote after ``offset``."""
    with open(path, errors="replace") as f:
        f.seek(offset)
        text = f.read()
    summary = re.findall(r"^=+ (.*\b(?:passed|failed|error|errors|skipped|deselected)\b.*) =+$", text, re.M)
    failed = list(dict.fromkeys(re.findall(r"^(?:FAILED|ERROR) (\S+)", text, re.M)))
    crashed = re.findall(r"worker '?(gw\d+)'? crashed while running '?([^'\s]+)", text)
    return {"summary": summary[-1] if summary else None,
            "failed": failed + [f"{test} (worker {gw} crashed)" for gw, test in crashed if test not in failed]}


def has_module(python: str, name: str) -> bool:
    try:
        return subprocess.run([python, "-c", f"import {name}"], capture_output=True, timeout=60).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def pytest_cmd(check: Check, selection: str, workers: int) -> list[str]:
    """The GPU tests of one backend: -m gpu -k SELECTION, names and outcomes one per line, a per-test
    timeout that fires during a blocked CUDA call (thread method: it dumps the stacks and ends the
    worker, which pytest-xdist replaces), ``workers`` processes where pytest-xdist exists."""
    cmd = [check.python, "-m", "pytest", "-v", "-rfE", "-p", "no:cacheprovider", "tests", "-m", "gpu", "-k", selection]
    if has_module(check.python, "pytest_timeout"):
        cmd += ["--timeout", str(PER_TEST_TIMEOUT_S["dry" if check.dry else "gpu"]), "--timeout-method", "thread"]
    if workers > 1 and has_module(check.python, "xdist"):
        cmd += ["-n", str(workers), "--max-worker-restart", str(2 * workers)]
    return cmd


# ---- the build ------------------------------------------------------------------------------------
class Build:
    """The CUDA extension, sm_90 only, in place (pip install -e), in the background."""

    def __init__(self, check: Check):
        self.check, self.proc, self.status = check, None, None
        self.t0 = time.monotonic()
        if check.dry:
            self.status = "skipped: dry run (no extension build)"
            check.record("build", "cuda", self.status, 0.0)
            return
        env = {**check.env, "COS_KERNELS_BUILD_CUDA": "1", "TORCH_CUDA_ARCH_LIST": "9.0",
               "MAX_JOBS": str(max(2, (os.cpu_count() or 4) // 2))}
        cmd = [check.python, "-m", "pip", "install", "-v", "--no-build-isolation", "--no-deps", "-e", "."]
        with open(check.out / "build.log", "a") as f:
            f.write(f"==== build: TORCH_CUDA_ARCH_LIST=9.0, MAX_JOBS={env['MAX_JOBS']}\n")
        try:
            self.proc, _ = check._start(cmd, "build.log", env)
        except OSError as err:
            self.status = f"could not start: {type(err).__name__}: {err}"
            check.record("build", "cuda", self.status, 0.0)
            return
        print(f"== build: started in the background (pid {self.proc.pid})", flush=True)

    def running(self) -> bool:
        """Whether the build is still compiling (its nvcc jobs share the host with the timings)."""
        return self.proc is not None and self.status is None and self.proc.poll() is None

    def finish(self) -> bool:
        """Wait for the build (within BUILD_CAP_S of its start and the budget), then check that
        cos_kernels._C loads, within a minute."""
        if self.status is None:
            check = self.check
            status = wait(self.proc, min(BUILD_CAP_S - (time.monotonic() - self.t0), check.left(check.measure_deadline)))
            if status == "ok":
                try:
                    probe = subprocess.run(
                        [check.python, "-c", "import cos_kernels, cos_kernels._C; from cos_kernels.ops import "
                         "available_backends; print('backends on cuda:', available_backends('cuda'))"],
                        cwd=ROOT, env=check.env, capture_output=True, text=True, timeout=60)
                    text, ok = probe.stdout + probe.stderr, probe.returncode == 0
                except subprocess.TimeoutExpired:
                    text, ok = "the load probe timed out after 60 s\n", False
                with open(check.out / "build.log", "a") as f:
                    f.write(text)
                if not ok:
                    status = "built, but cos_kernels._C does not load"
            self.status = status
            check.record("build", "cuda", status, time.monotonic() - self.t0)
            tail(check.out / "build.log", 8 if status == "ok" else 30)
        return self.status == "ok" or self.check.dry  # dry: the CUDA groups run and skip, as on any CPU


def run(check: Check, steps: tuple[Step, ...], workers: int) -> None:
    build = None
    for n, step in enumerate(steps):
        try:
            build = run_step(check, steps, n, step, build, workers)
        except Exception as err:  # noqa: BLE001 - a driver bug costs its step, never the run
            traceback.print_exc()
            check.record(step.stage, step.group, f"driver error: {type(err).__name__}: {err}"[:300], 0.0)
    if build is not None and build.status is None:
        build.finish()  # a plan without CUDA groups still reports its build


def run_step(check: Check, steps: tuple[Step, ...], n: int, step: Step, build: Build | None, workers: int):
    """Step n of the plan -> the build (the preflight step starts it)."""
    if step.stage == "preflight":
        check.group(step)
        return Build(check)  # after the preflight's bandwidth and matmul measurements
    if step.stage == "tests":
        if step.group == "cuda" and not build.finish():
            check.record("tests", "cuda", "not run: the CUDA extension did not build (build.log)", 0.0)
            return build
        # the test stages share what is left in proportion to their expected times
        share = step.est_s / sum(s.est_s for s in steps[n:] if s.stage == "tests")
        selection = "cuda" if step.group == "cuda" else "not cuda"
        check.command("tests", step.group, pytest_cmd(check, selection, workers), (check.left() - 5) * share)
    elif step.after_build and not build.finish():
        check.lose(step.stage, step.work(check.dry), "not run",
                   f"the CUDA extension did not build ({build.status}; build.log)")
        check.record(step.stage, step.group, "not run: the CUDA extension did not build", 0.0)
    elif step.group == "flash_varlen" and importlib.util.find_spec("flash_attn") is None:
        check.lose(step.stage, step.work(check.dry), "skipped", "flash_attn is not installed")
        check.record(step.stage, step.group, "skipped: flash_attn is not installed", 0.0)
    elif step.stage == "e2e":
        kernel = results_file.rows(results_file.read(check.results), "kernel")
        # the dry run times whole steps on the torch backend: the interpreter would take minutes
        backend = "torch" if check.dry else gpu_summary.best_fused(kernel) or "torch"
        check.group(step, ["--backend", backend])
    else:
        check.group(step, note="while the extension built" if build.running() else None)
    return build


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or ROOT / "out"))
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="the kernel table of torch, triton and cuda (~3 min)")
    mode.add_argument("--dry", action="store_true", help="CPU plumbing check: tiny sizes, interpreter, no build")
    parser.add_argument("--budget", type=float, default=None,
                        help=f"seconds for the whole run (default {BUDGET_S['default']}, --quick "
                             f"{BUDGET_S['quick']}, --dry {BUDGET_S['dry']})")
    parser.add_argument("--workers", type=int, default=None,
                        help="pytest-xdist workers of the test stages (default: CPUs / 4, 2 to 4; dry: 2)")
    args = parser.parse_args(argv)
    mode_name = "dry" if args.dry else "quick" if args.quick else "default"
    if args.budget is not None and args.budget <= 0:
        parser.error(f"--budget: must be a positive number of seconds, got {args.budget}")
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    for name in OUTPUT_FILES:  # a fresh run: nothing of an earlier one mixes in
        (out / name).unlink(missing_ok=True)
    check = Check(out, args.budget or BUDGET_S[mode_name], mode_name)
    workers = args.workers or (2 if args.dry else min(4, max(2, (os.cpu_count() or 2) // 4)))
    steps = plan_for(mode_name)
    print(f"gpu_check: {mode_name} run, budget {check.left():.0f} s (expected {sum(s.est_s for s in steps):.0f} s), "
          f"results in {out}", flush=True)
    run(check, steps, workers)

    entries = results_file.read(check.results)
    statuses = results_file.stage_statuses(entries)
    print(f"gpu_check: done in {time.monotonic() - check.started:.0f} s", flush=True)
    print((out / "SUMMARY.md").read_text(), flush=True)
    fakes = set(headline.FAULTS)
    bad = [e for e in statuses if e["status"] != "ok" and not e["status"].startswith("skipped")
           and e.get("group") not in fakes]
    failed = [r for stage in ("kernel", "module", "e2e") for r in results_file.rows(entries, stage)
              if r["status"] == "failed" and r.get("impl") not in fakes]
    return 1 if bad or failed else 0


if __name__ == "__main__":
    if shutil.which("nvidia-smi") is None and "--dry" not in sys.argv:
        print("gpu_check: no nvidia-smi on this machine; on a CPU use --dry", file=sys.stderr)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, end_children)
    sys.exit(main())
