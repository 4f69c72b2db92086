"""Faults: a short cos-train run SIGKILLed and SIGINTed / SIGTERMed at several moments, resumed with
--resume auto each time, ends bit for bit where the uninterrupted run ends; and the checkpoint
directory under broken, moved, crafted and pruned checkpoints, a full disk and leftovers of a kill."""

import errno
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from cos_kernels import atomic_io
from cos_kernels.train import NonFiniteLossError, TrainConfig, Trainer
from cos_kernels.train.checkpoint import list_checkpoints

STEPS = 10
ARGS = ["pretrain", "--steps", str(STEPS), "--global-batch", "4", "--train-samples", "24", "--eval-samples", "0",
        "--llm-warmup-steps", "0", "--log-every", "1", "--save-every", "2", "--backend", "torch", "--device", "cpu"]
STEP_LINE = re.compile(r"^step\s+(\d+) \|")


def _env() -> dict:
    # one thread: the same float reductions in every process; no interpreter (torch backend only)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return {**env, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def _launch(out: Path, *extra: str) -> tuple[subprocess.Popen, Path]:
    err = out.parent / f"{out.name}-{len(list(out.parent.glob(f'{out.name}-*.err')))}.err"
    proc = subprocess.Popen([sys.executable, "-m", "cos_kernels.train", *ARGS, "--out-dir", str(out), *extra],
                            stdout=subprocess.PIPE, stderr=err.open("w"), text=True, env=_env())
    return proc, err


def _interrupt_after(proc: subprocess.Popen, step: int, signum: int) -> list[str]:
    """Read the run's output until it reports ``step`` (or more), then send ``signum``; the lines read."""
    lines = []
    for line in proc.stdout:
        lines.append(line)
        match = STEP_LINE.match(line)
        if match and int(match.group(1)) >= step:
            proc.send_signal(signum)
            break
    lines += proc.stdout.readlines()
    proc.wait(timeout=120)
    return lines


def _final_state(out: Path) -> tuple[dict, list[float], list[tuple[int, float]]]:
    """(the last checkpoint's weight files, its loss history, metrics.jsonl's (step, loss) records)."""
    final = out / "checkpoints" / f"step-{STEPS:07d}"
    losses = torch.load(final / "trainer.pt", weights_only=True)["losses"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    weights = {name: _contents(final / name) for name in ("model.safetensors", "bridge/model.safetensors")}
    weights["bridge/config.json"] = (final / "bridge" / "config.json").read_bytes()
    return weights, losses, [(r["step"], r["loss"]) for r in records]


def _contents(weights: Path) -> tuple[dict, dict[str, bytes]]:
    """A safetensors file's metadata and each tensor's bytes (the header is not the same bytes each
    write: safetensors orders the metadata entries at random)."""
    with safe_open(str(weights), framework="pt") as f:
        return f.metadata(), {k: f.get_tensor(k).numpy().tobytes() for k in f.keys()}


def test_killed_and_interrupted_run_resumes_bit_for_bit(tmp_path):
    reference = tmp_path / "reference"
    done = subprocess.run([sys.executable, "-m", "cos_kernels.train", *ARGS, "--out-dir", str(reference)],
                          capture_output=True, text=True, env=_env(), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    out = tmp_path / "faulty"
    # (moment, signal, extra options): a kill before any checkpoint, kills between and around
    # checkpoints, a Ctrl-C with --save-every 0 (the stop writes the only checkpoint), a SIGTERM
    moments = [(1, signal.SIGKILL, ()), (3, signal.SIGKILL, ()), (4, signal.SIGKILL, ()),
               (5, signal.SIGINT, ("--save-every", "0")), (7, signal.SIGTERM, ())]
    for step, signum, extra in moments:
        proc, err = _launch(out, "--resume", "auto", *extra)
        _interrupt_after(proc, step, signum)
        message = err.read_text()
        if signum == signal.SIGKILL:
            assert proc.returncode == -signal.SIGKILL
            continue
        assert proc.returncode == 128 + signum, message[-3000:]
        stopped = re.search(r"stopped by (\w+) after step (\d+) of 10; checkpoint (\S+); resume with: (.*)", message)
        assert stopped, message[-3000:]
        assert stopped.group(1) == signal.Signals(signum).name and "Traceback" not in message
        assert Path(stopped.group(3)) == out / "checkpoints" / f"step-{int(stopped.group(2)):07d}"
        assert (out / "checkpoints" / "latest").read_text() == Path(stopped.group(3)).name
        hint = stopped.group(4)
        assert hint.startswith("cos-train pretrain") and hint.endswith("--resume auto")
        assert f"--out-dir {out}" in hint and "--steps 10" in hint
    proc, err = _launch(out, "--resume", "auto")
    proc.communicate(timeout=300)
    assert proc.returncode == 0, err.read_text()[-3000:]

    weights, losses, records = _final_state(out)
    ref_weights, ref_losses, ref_records = _final_state(reference)
    assert weights == ref_weights  # bit for bit
    assert losses == ref_losses and len(losses) == STEPS
    assert records == ref_records  # every step once, in order, the same losses
    assert [s for s, _ in records] == list(range(1, STEPS + 1))
    assert not list((out / "checkpoints").glob(".*"))  # no temporaries left behind
    assert len(list_checkpoints(out / "checkpoints")) == 2  # --keep-checkpoints 2


def test_cli_errors_are_one_line_without_traceback(tmp_path):
    for argv in (["--help"], ["pretrain", "--help"]):  # the help texts hold "3% warm-up"
        shown = subprocess.run([sys.executable, "-m", "cos_kernels.train", *argv], capture_output=True, text=True,
                               env=_env(), timeout=120)
        assert shown.returncode == 0 and "3% warm-up" in " ".join(shown.stdout.split()), shown.stderr
    bad = subprocess.run([sys.executable, "-m", "cos_kernels.train", "pretrain", "--max-grad-norm", "-1",
                          "--out-dir", str(tmp_path / "x")], capture_output=True, text=True, env=_env(), timeout=120)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines()[-1] == ("cos-train: error: TrainConfig.max_grad_norm must be a finite "
                                                   "number >= 0 (0: off), got -1.0")
    assert not (tmp_path / "x").exists()  # refused before anything was written


# ---- in-process checkpoint faults ----------------------------------------------------------------

def tiny(tmp_path, name="run", **overrides) -> TrainConfig:
    base = dict(out_dir=str(tmp_path / name), steps=4, global_batch=2, train_samples=24, eval_samples=0,
                log_every=1, backend="torch", device="cpu")
    if overrides.get("stage", "pretrain") == "pretrain":
        base["llm_warmup_steps"] = 0
    return TrainConfig(**{**base, **overrides})


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """A 4-step run checkpointed at every step, keeping all four: its config and directory."""
    config = tiny(tmp_path_factory.mktemp("saved"), save_every=1, keep_checkpoints=4)
    Trainer(config).fit()
    return config, Path(config.out_dir)


def _copy_run(saved_run, tmp_path, name="copy") -> Path:
    _, run = saved_run
    shutil.copytree(run, tmp_path / name)
    return tmp_path / name


def as_written_before_bridge(checkpoint: Path) -> None:
    """Rewrite ``checkpoint`` as cos-train wrote it before bridge/: the resampler's tensors in
    model.safetensors as "bridge.*", no bridge/ folder, the manifest listing the two files."""
    bridge = {f"bridge.{k}": v for k, v in load_file(checkpoint / "bridge" / "model.safetensors").items()}
    save_file({**load_file(checkpoint / "model.safetensors"), **bridge}, checkpoint / "model.safetensors")
    shutil.rmtree(checkpoint / "bridge")
    manifest = {name: {"bytes": (checkpoint / name).stat().st_size,
                       "sha256": hashlib.sha256((checkpoint / name).read_bytes()).hexdigest()}
                for name in ("model.safetensors", "trainer.pt")}
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))


def test_pruning_never_deletes_the_newest_checkpoint(saved_run, tmp_path):
    """Resuming step 1 of a directory holding steps 1-4 and running on: the checkpoint just written
    survives, the later ones of the other continuation too, and latest names an existing checkpoint."""
    run = _copy_run(saved_run, tmp_path)
    trainer = Trainer(tiny(tmp_path, "copy", save_every=1, keep_checkpoints=1, out_dir=str(run),
                           resume=str(run / "checkpoints" / "step-0000001")))  # keep 1: prune hard
    trainer.train_step()
    trainer.save()
    names = [p.name for p in list_checkpoints(run / "checkpoints")]
    assert names == ["step-0000002", "step-0000003", "step-0000004"]  # step 1 pruned, 2 just rewritten
    assert (run / "checkpoints" / "latest").read_text() == "step-0000002"
    resumed = Trainer(tiny(tmp_path, "copy", save_every=1, keep_checkpoints=4, out_dir=str(run), resume="auto"))
    assert resumed.step == 2


def test_resume_auto_skips_a_broken_latest_checkpoint(saved_run, tmp_path):
    run = _copy_run(saved_run, tmp_path)
    checkpoint = run / "checkpoints" / "step-0000004"
    weights = checkpoint / "bridge" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # a truncated write
    warnings = []
    config = tiny(tmp_path, out_dir=str(run), save_every=1, keep_checkpoints=4, resume="auto")
    trainer = Trainer(config, log=warnings.append)
    assert trainer.step == 3
    assert any(f"skipping a broken checkpoint: {weights} is corrupt" in w for w in warnings), warnings
    explicit = tiny(tmp_path, out_dir=str(run), save_every=1, keep_checkpoints=4, resume=str(checkpoint))
    with pytest.raises(ValueError, match=re.escape(f"{weights} is corrupt")):
        Trainer(explicit)


@pytest.mark.parametrize("damage", ["garbage", "missing", "bad-latest"])
def test_broken_checkpoints_are_named(saved_run, tmp_path, damage):
    run = _copy_run(saved_run, tmp_path)
    last = run / "checkpoints" / "step-0000004"
    if damage == "garbage":
        (last / "trainer.pt").write_bytes(os.urandom((last / "trainer.pt").stat().st_size))
        match = f"{last / 'trainer.pt'} is corrupt"
    elif damage == "missing":
        (last / "model.safetensors").unlink()
        match = f"{last} is not a complete checkpoint: it lacks \\['model.safetensors'\\]"
    else:
        (run / "checkpoints" / "latest").write_text("step-0000099")
        match = f"{run / 'checkpoints' / 'step-0000099'} is not a complete checkpoint"
    with pytest.raises(ValueError, match=re.escape(match) if damage == "garbage" else match):
        Trainer(tiny(tmp_path, out_dir=str(run), save_every=1, keep_checkpoints=4, resume=str(run)))


def test_crafted_trainer_state_is_refused_without_running_it(saved_run, tmp_path):
    run = _copy_run(saved_run, tmp_path)
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    target = run / "checkpoints" / "step-0000004" / "trainer.pt"
    size = target.stat().st_size
    torch.save({"step": 4, "payload": Exploit()}, target)
    manifest = target.parent / "manifest.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "trainer.pt": target.stat().st_size}))
    assert size > 0
    with pytest.raises(ValueError, match=re.escape(f"{target} holds something other than tensors")):
        Trainer(tiny(tmp_path, out_dir=str(run), save_every=1, keep_checkpoints=4, resume="auto"))
    assert not marker.exists()


def test_moved_run_resumes_and_finetunes(tmp_path):
    """The warmed-up LLM lies in the run directory; move the whole run and both resume and
    fine-tuning find it there (the checkpoint keeps the path relative to the run)."""
    first = tiny(tmp_path, "original", steps=2, llm_warmup_steps=2)
    Trainer(first).fit()
    moved = tmp_path / "moved"
    shutil.move(first.out_dir, moved)
    configs = json.loads((moved / "checkpoints" / "step-0000002" / "config.json").read_text())
    assert configs["relative_paths"] == {"llm_path": "llm-warmup"}
    resumed = Trainer(tiny(tmp_path, steps=2, llm_warmup_steps=2, out_dir=str(moved), resume="auto"))
    assert resumed.step == 2 and resumed.model_config.llm_path == str((moved / "llm-warmup").resolve())
    ft = Trainer(tiny(tmp_path, "ft", stage="finetune", init_from=str(moved), steps=1))
    assert ft.model_config.llm_path == str((moved / "llm-warmup").resolve())


def test_resume_refuses_other_training_options(saved_run, tmp_path):
    config, run = saved_run
    for change, text in ((dict(global_batch=4), "global_batch: 2 -> 4"), (dict(seed=1), "seed: 0 -> 1"),
                         (dict(train_samples=30), "train_samples: 24 -> 30")):
        with pytest.raises(ValueError, match=re.escape(text) + ".*--allow-config-change"):
            Trainer(tiny(tmp_path, "new", resume=str(run), save_every=1, keep_checkpoints=4, **change))
    with pytest.raises(ValueError, match=r"other model options \(bridge: None -> 'resampler-80'\)"):
        Trainer(tiny(tmp_path, "new", resume=str(run), bridge="resampler-80", allow_config_change=True))
    allowed = Trainer(tiny(tmp_path, "new", resume=str(run), save_every=1, keep_checkpoints=4, steps=6,
                           allow_config_change=True))
    assert allowed.step == 4


def test_stale_temporaries_are_removed_and_files_follow_the_umask(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints" / ".step-0000002.abc123.tmp").mkdir(parents=True)
    (run / "checkpoints" / ".latest.xyz.tmp").write_text("step-0000002")
    (run / ".llm-warmup.q1w2.tmp").mkdir()
    old = os.umask(0o022)
    try:
        trainer = Trainer(tiny(tmp_path, steps=1))
        trainer.fit()
        trainer.model.bridge.save_pretrained(tmp_path / "bridge")
    finally:
        os.umask(old)
    assert {p.stat().st_mode & 0o777 for p in (tmp_path / "bridge").iterdir()} == {0o644}
    assert not list(run.glob(".*")) and not list((run / "checkpoints").glob(".*"))
    checkpoint = run / "checkpoints" / "step-0000001"
    assert checkpoint.stat().st_mode & 0o777 == 0o755 and (checkpoint / "bridge").stat().st_mode & 0o777 == 0o755
    files = [p for p in checkpoint.rglob("*") if p.is_file()]
    assert {p.relative_to(checkpoint).as_posix() for p in files} == {
        "config.json", "model.safetensors", "trainer.pt", "manifest.json", "bridge/config.json",
        "bridge/model.safetensors"}
    for path in [*files, run / "checkpoints" / "latest", run / "metrics.jsonl"]:
        assert path.stat().st_mode & 0o777 == 0o644, path


def test_full_disk_is_reported_with_the_path(tmp_path, monkeypatch):
    trainer = Trainer(tiny(tmp_path, steps=1))
    trainer.train_step()
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=4096))
    with pytest.raises(OSError, match=f"no space left on the device for a checkpoint in {tmp_path / 'run' / 'checkpoints'}: "
                                      r"it needs about [\d.]+ MiB, 0.0 MiB are free") as info:
        trainer.save()
    assert info.value.errno == errno.ENOSPC
    assert not list((tmp_path / "run" / "checkpoints").iterdir())  # nothing half-written
    # a library's own message for a failed write ("basic_ios::clear: iostream error") is re-worded
    target = tmp_path / "file.bin"

    def failing(tmp):
        raise RuntimeError("basic_ios::clear: iostream error")

    with pytest.raises(OSError, match=f"no space left on the device writing {target} \\(4096 bytes free\\): basic_ios"):
        atomic_io.atomic_file(target, failing)
    assert not list(tmp_path.glob(".file.bin*"))


def test_nan_stop_saves_the_last_good_state(tmp_path):
    trainer = Trainer(tiny(tmp_path, steps=4))
    bridge = trainer.model.bridge

    def poison(module, args, output):
        return output * float("nan") if trainer.step == 2 else output

    bridge.register_forward_hook(poison)
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at step 3 .*the last good state: "
                                                 r".*step-0000002 \(step 2; .*resuming skips them\)"):
        trainer.fit()
    saved = load_file(str(tmp_path / "run" / "checkpoints" / "step-0000002" / "bridge" / "model.safetensors"))
    now = bridge.state_dict()
    assert saved.keys() == now.keys() and all(torch.equal(saved[k], now[k]) for k in saved)
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text() == "step-0000002"
