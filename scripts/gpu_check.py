"""One GPU call that returns a complete picture in at most 8 minutes: stages in priority order, each
its own process with its own timeout and log, every result written the moment it exists.

    python scripts/gpu_check.py                  # on the GPU machine: results under $OUT (else ./out)
    python scripts/gpu_check.py --dry --out DIR  # on a CPU (CI): tiny sizes, the Triton interpreter, no build

Stages (priority order; the budget is shared, so a stage that overruns shortens the later ones):
  preflight     GPU name and clocks, Python and package versions, every import the later stages need,
                nvcc and CUDA_HOME, measured copy bandwidth and bf16 matmul TFLOP/s
  build         the CUDA extension for sm_90 only (TORCH_CUDA_ARCH_LIST=9.0), in the background
  tests_triton  meanwhile: the GPU tests of the Triton backend (-m gpu -k "not cuda"), a per-test
                timeout, several workers where pytest-xdist exists (they are Triton-compile bound)
  tests_cuda    once the build is done: the GPU tests of the CUDA backend (-m gpu -k cuda)
  kernel        the headline kernel table (benchmarks/headline.py): every backend and uncompiled peer,
                fwd / bwd / fwd+bwd, cos-80 B=256 and cos-1296 B=64 in bf16, each checked first
  module        fused vs unfused resampler forward+backward and peak memory
  e2e           stage-1 step of the 1b proxy with cos-80, resampler-336 and linear-256 bridges
  flex          the compiled FlexAttention peer's rows of the kernel table (last: each shape and grad
                mode is a torch.compile of tens of seconds)
Each stage prints its wall time. At most 8 files land in the output folder (the device tool brings
back no more): SUMMARY.md and kernel.png (rewritten after every stage), results.jsonl (one JSON line
per row and per stage status), and the logs preflight.log, build.log, tests_triton.log,
tests_cuda.log, bench.log (kernel, module, e2e and flex).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import headline  # noqa: E402  (import of the repo's benchmarks package)

OUTPUT_FILES = ("SUMMARY.md", "kernel.png", "results.jsonl", "preflight.log", "build.log", "tests_triton.log",
                "tests_cuda.log", "bench.log")
# seconds each stage may take on the H200 (the deadline may cut a later one shorter); the notes are
# the expected times, checked on the CPU by the dry run's stage times
LIMITS = {
    "preflight": 60,  # ~15 s: imports, CUDA init, 1 GiB copy, 8192^3 matmul
    "build": 300,  # ~60-90 s on 16 cores, sm_90 only, concurrent with tests_triton
    "tests_triton": 150,  # 53 tests, ~150 Triton compiles of 1-5 s spread over the workers
    "tests_cuda": 90,  # 99 tests, the build's wait included
    "kernel": 100,  # 2 cases x 4 implementations x 3 passes + float64 references
    "module": 60,  # 2 cases x 4 variants
    "e2e": 90,  # three 1b models built on the GPU, ~20 steps each
    "flex": 150,  # what is left: 2 cases x (inference + training graph) compiles
}
DRY_LIMITS = {stage: 600 for stage in LIMITS}
PER_TEST_TIMEOUT = {"gpu": 90, "dry": 300}  # pytest-timeout, seconds per test


class Check:
    """The run: output folder, deadline, results file; ``stage`` runs one and records it."""

    def __init__(self, out: Path, budget_s: float, dry: bool):
        self.out, self.dry = out, dry
        self.deadline = time.monotonic() + budget_s
        self.limits = DRY_LIMITS if dry else LIMITS
        self.results = out / "results.jsonl"
        self.python = sys.executable
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if dry:
            self.env["TRITON_INTERPRET"] = "1"
        else:
            self.env.pop("TRITON_INTERPRET", None)

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def timeout(self, stage: str) -> float:
        return max(0.0, min(self.limits[stage], self.left()))

    def record(self, stage: str, status: str, wall_s: float, log: str) -> None:
        headline.append(self.results, stage, status=status, wall_s=round(wall_s, 1), log=log)
        entries = headline.read(self.results)
        (self.out / "SUMMARY.md").write_text(headline.render(entries))
        headline.plot(entries, self.out / "kernel.png")
        print(f"== {stage}: {status} in {wall_s:.1f} s ({max(0, self.left()):.0f} s of the budget left)", flush=True)

    def run(self, stage: str, cmd: list[str], log: str, timeout: float | None = None) -> str:
        """Run ``cmd`` (its own process group), output appended to ``log``; -> its status."""
        timeout = self.timeout(stage) if timeout is None else timeout
        if self.left() < 5:
            self.record(stage, "not run: no time left in the budget", 0.0, log)
            return "not run"
        t0 = time.monotonic()
        with open(self.out / log, "a") as f:
            f.write(f"\n==== {stage}: {' '.join(cmd)} (timeout {timeout:.0f} s)\n")
            f.flush()
            proc = subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdout=f, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            status = wait(proc, timeout)
        self.record(stage, status, time.monotonic() - t0, log)
        tail(self.out / log, 12 if status == "ok" else 30)
        return status


def wait(proc: subprocess.Popen, timeout: float) -> str:
    """Status of ``proc`` after at most ``timeout`` seconds: ok, exit code N, or timed out (its whole
    process group killed)."""
    try:
        code = proc.wait(timeout=max(0.0, timeout))
    except subprocess.TimeoutExpired:
        kill(proc)
        return f"timed out after {timeout:.0f} s"
    return "ok" if code == 0 else f"exit code {code}"


def kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def tail(path: Path, lines: int) -> None:
    text = path.read_text(errors="replace").splitlines() if path.is_file() else []
    for line in text[-lines:]:
        print(f"   | {line}", flush=True)


def has_module(python: str, name: str) -> bool:
    return subprocess.run([python, "-c", f"import {name}"], capture_output=True).returncode == 0


def pytest_cmd(check: Check, selection: str, workers: int) -> list[str]:
    """The GPU tests of one backend: -m gpu -k SELECTION, a per-test timeout where pytest-timeout
    exists, ``workers`` processes where pytest-xdist exists."""
    cmd = [check.python, "-m", "pytest", "-q", "-ra", "-p", "no:cacheprovider", "tests", "-m", "gpu", "-k", selection]
    if has_module(check.python, "pytest_timeout"):
        cmd += ["--timeout", str(PER_TEST_TIMEOUT["dry" if check.dry else "gpu"])]
    if workers > 1 and has_module(check.python, "xdist"):
        cmd += ["-n", str(workers)]
    return cmd


def start_build(check: Check) -> tuple[subprocess.Popen | None, float]:
    """The extension, sm_90 only, in place (pip install -e), in the background -> (process, start)."""
    if check.dry:
        check.record("build", "skipped: dry run (no extension build)", 0.0, "build.log")
        return None, 0.0
    # setup.py finds CUDA_HOME itself (cuda_build.find_cuda_home) and logs it
    env = {**check.env, "COS_KERNELS_BUILD_CUDA": "1", "TORCH_CUDA_ARCH_LIST": "9.0",
           "MAX_JOBS": str(max(2, (os.cpu_count() or 4) // 2))}
    cmd = [check.python, "-m", "pip", "install", "-v", "--no-build-isolation", "--no-deps", "-e", "."]
    with open(check.out / "build.log", "a") as f:  # the child keeps its own copy of the file
        f.write(f"==== build: {' '.join(cmd)} (TORCH_CUDA_ARCH_LIST=9.0, MAX_JOBS={env['MAX_JOBS']})\n")
        f.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    print(f"== build: started in the background (pid {proc.pid}, {' '.join(cmd)})", flush=True)
    return proc, time.monotonic()


def finish_build(check: Check, proc: subprocess.Popen | None, started: float) -> bool:
    """Wait for the build (within the build's limit) and check that cos_kernels._C loads."""
    if proc is None:
        return False
    status = wait(proc, min(check.limits["build"] - (time.monotonic() - started), check.left()))
    if status == "ok":
        probe = subprocess.run([check.python, "-c", "import cos_kernels, cos_kernels._C; from cos_kernels.ops import "
                                "available_backends; print('backends on cuda:', available_backends('cuda'))"],
                               cwd=ROOT, env=check.env, capture_output=True, text=True)
        with open(check.out / "build.log", "a") as f:
            f.write(probe.stdout + probe.stderr)
        if probe.returncode != 0:
            status = "built, but cos_kernels._C does not load"
    check.record("build", status, time.monotonic() - started, "build.log")
    tail(check.out / "build.log", 8 if status == "ok" else 30)
    return status == "ok"


def measure(check: Check, stage: str, log: str = "bench.log") -> str:
    """A benchmarks/headline.py stage; "flex" is the kernel stage's FlexAttention rows alone, "kernel"
    the rest of them."""
    name = "kernel" if stage == "flex" else stage
    cmd = [check.python, "-m", "benchmarks.headline", name, "--results", str(check.results)]
    if stage in ("kernel", "flex"):
        cmd += ["--impls", "flex" if stage == "flex" else ",".join(i for i in headline.KERNEL_IMPLS if i != "flex")]
    return check.run(stage, cmd + (["--dry"] if check.dry else []), log)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or ROOT / "out"))
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds for the whole run (default 470 on a GPU, 1800 dry)")
    parser.add_argument("--dry", action="store_true", help="CPU plumbing check: tiny sizes, interpreter, no build")
    parser.add_argument("--workers", type=int, default=None,
                        help="pytest-xdist workers for the Triton tests (default: CPUs / 2, at most 8; dry: 2)")
    args = parser.parse_args(argv)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    for name in OUTPUT_FILES:  # a fresh run: nothing of an earlier one mixes in
        (out / name).unlink(missing_ok=True)
    check = Check(out, args.budget or (1800 if args.dry else 470), args.dry)
    # dry: two workers, so that the xdist path the GPU run takes is exercised too
    workers = args.workers or (2 if args.dry else min(8, max(1, (os.cpu_count() or 2) // 2)))
    t0 = time.monotonic()
    print(f"gpu_check: {'DRY (CPU) ' if args.dry else ''}run, budget {check.left():.0f} s, results in {out}",
          flush=True)

    measure(check, "preflight", "preflight.log")
    build, build_started = start_build(check)
    check.run("tests_triton", pytest_cmd(check, "not cuda", workers), "tests_triton.log")
    if args.dry or finish_build(check, build, build_started):  # dry: the CUDA tests skip, as on any CPU
        check.run("tests_cuda", pytest_cmd(check, "cuda", 1), "tests_cuda.log")
    else:
        check.record("tests_cuda", "not run: the extension did not build (build.log)", 0.0, "tests_cuda.log")
    for stage in ("kernel", "module", "e2e", "flex"):
        measure(check, stage)

    statuses = headline.stage_statuses(headline.read(check.results))
    print(f"gpu_check: done in {time.monotonic() - t0:.0f} s; stages: "
          + ", ".join(f"{e['stage']}={e['status']}" for e in statuses), flush=True)
    print((out / "SUMMARY.md").read_text(), flush=True)
    bad = [e for e in statuses if e["status"] != "ok" and not e["status"].startswith("skipped")]
    return 1 if bad else 0


if __name__ == "__main__":
    if shutil.which("nvidia-smi") is None and "--dry" not in sys.argv:
        print("gpu_check: no nvidia-smi on this machine; on a CPU use --dry", file=sys.stderr)
    sys.exit(main())
