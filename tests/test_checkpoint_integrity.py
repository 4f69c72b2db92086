"""Issue #27: what is verified when a checkpoint is loaded, and inputs checked before the expensive work.

Same-size damage to the weights or the trainer state (content hashes in the manifest), the bridge
folder (MultiScaleResampler's save_pretrained form) and checkpoints written before it, a trainer.pt
of the wrong schema, a config whose sections are not objects, a checkpoint file given where its
directory is meant, an empty path, a resume already past the requested steps, an image folder
without the listed images, the LLM warm-up stopped by a signal and resumed, and its save on a full
disk."""

import errno
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

import cos_kernels.train.trainer as trainer_module
from cos_kernels import MultiScaleResampler, atomic_io
from cos_kernels.mllm import MLLMConfig, SyntheticCaptions
from cos_kernels.train import Trainer, load_bridge
from cos_kernels.train.checkpoint import CHECKPOINT_FORMS, TRAINER_STATE, read_configs, resolve_checkpoint
from cos_kernels.train.stopping import TrainingStopped
from cos_kernels.train.cli import main
from cos_kernels.train.data import check_data
from cos_kernels.train.distributed import DistEnv
from cos_kernels.train.warmup import warm_up_llm

from test_data import write_llava_folder
from test_faults import _copy_run, _env, as_written_before_bridge, saved_run, tiny  # noqa: F401  (saved_run: a fixture)

CPU = DistEnv("none", 0, 1, torch.device("cpu"))


def _resume(run: Path, tmp_path: Path, resume: str, log=None, **overrides) -> Trainer:
    return Trainer(tiny(tmp_path, out_dir=str(run), save_every=1, keep_checkpoints=4, resume=resume, **overrides),
                   log=log)


def _tensor_bytes_at(path: Path) -> int:
    """An offset inside tensor data (not in a header): the file stays loadable when it is flipped."""
    if path.suffix == ".safetensors":
        header = struct.unpack("<Q", path.read_bytes()[:8])[0]
        return (8 + header + path.stat().st_size) // 2
    with zipfile.ZipFile(path) as archive:  # torch.save: an uncompressed zip, one record per storage
        entry = max(archive.infolist(), key=lambda e: e.file_size)
    with open(path, "rb") as f:
        f.seek(entry.header_offset + 26)
        name_len, extra_len = struct.unpack("<HH", f.read(4))
    return entry.header_offset + 30 + name_len + extra_len + entry.file_size // 2


def _damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncated":
        del data[-100:]
    else:  # same size, other bytes, in the middle of a tensor
        at = _tensor_bytes_at(path)
        data[at:at + 8] = bytes(b ^ 0xFF for b in data[at:at + 8])
    path.write_bytes(bytes(data))


# ---- content hashes ---------------------------------------------------------------------------------
# a pretrain run's model.safetensors holds no tensor (the bridge is in bridge/): no tensor bytes to flip
@pytest.mark.parametrize("name, how", [(name, how) for name in ("bridge/model.safetensors", "model.safetensors",
                                                                 "trainer.pt") for how in ("flipped", "truncated")
                                       if (name, how) != ("model.safetensors", "flipped")])
def test_damaged_latest_is_skipped_under_auto_and_refused_when_named(saved_run, tmp_path, name, how):
    run = _copy_run(saved_run, tmp_path)
    checkpoint = run / "checkpoints" / "step-0000004"
    target = checkpoint / name
    _damage(target, how)
    if how == "flipped":  # still a loadable file: only the content hash tells
        assert load_file(target) if name.endswith(".safetensors") else torch.load(target, weights_only=True)
    said = (r"its content hash \(sha256\) differs from the one .*manifest\.json records \(same size, other bytes\)"
            if how == "flipped"
            else r"\d+ bytes, the manifest says \d+")
    warnings = []
    assert resolve_checkpoint(run, fallback=True, warn=warnings.append).name == "step-0000003"  # --resume auto
    assert len(warnings) == 1 and re.fullmatch(
        f"warning: skipping a broken checkpoint: {re.escape(str(target))} is corrupt: {said}", warnings[0]), warnings
    with pytest.raises(ValueError, match=f"{re.escape(str(target))} is corrupt: {said}"):
        _resume(run, tmp_path, str(checkpoint))


def test_load_bridge_of_a_damaged_checkpoint_names_the_file(saved_run, tmp_path):
    run = _copy_run(saved_run, tmp_path)
    last = run / "checkpoints" / "step-0000004"
    weights = last / "bridge" / "model.safetensors"
    _damage(weights, "flipped")
    for path in (run, run / "checkpoints", last):
        with pytest.raises(ValueError, match=f"^{re.escape(str(weights))} is corrupt: its content hash"):
            load_bridge(path)
    (last / "bridge" / "model.safetensors").unlink()  # the manifest lists it: a missing bridge is never skipped
    with pytest.raises(ValueError, match=re.escape(f"{last} is not a complete checkpoint: it lacks "
                                                   f"['bridge/model.safetensors']")):
        load_bridge(last)
    shutil.rmtree(last / "bridge")
    with pytest.raises(ValueError, match=re.escape(f"{last} is not a complete checkpoint: it lacks "
                                                   f"['bridge/model.safetensors']")):
        _resume(run, tmp_path, str(last))


def test_the_bridge_folder_is_the_resamplers_save_pretrained(saved_run, tmp_path):
    """from_pretrained reads a checkpoint's bridge/ and no other cos-train file; given a run or a
    checkpoint, it names the reader that verifies them."""
    run = _copy_run(saved_run, tmp_path)
    last = run / "checkpoints" / "step-0000004"
    trained = Trainer(tiny(tmp_path, out_dir=str(run), save_every=1, keep_checkpoints=4, resume="auto")).model.bridge
    loaded = MultiScaleResampler.from_pretrained(last / "bridge")
    assert loaded.config == trained.config and loaded.state_dict().keys() == trained.state_dict().keys()
    assert all(torch.equal(v, trained.state_dict()[k]) for k, v in loaded.state_dict().items())
    from_run = load_bridge(run, dtype=torch.float64)
    assert all(torch.equal(v, trained.state_dict()[k].double()) for k, v in from_run.state_dict().items())
    for path in (run, run / "checkpoints", last):
        with pytest.raises(ValueError, match=re.escape(f"{path} is neither a directory save_pretrained wrote") +
                           ".*" + re.escape(f"cos_kernels.train.load_bridge('{path}'), which verifies the checkpoint")):
            MultiScaleResampler.from_pretrained(path)


def test_checkpoints_from_before_the_bridge_folder_still_load(saved_run, tmp_path):
    """Written before bridge/ (the bridge in model.safetensors as bridge.*): load_bridge reads the
    bridge, a resume takes its weights, and the checkpoint it writes has bridge/."""
    new, old = _copy_run(saved_run, tmp_path, "new"), _copy_run(saved_run, tmp_path, "old")
    as_written_before_bridge(old / "checkpoints" / "step-0000004")
    want, got = load_bridge(new).state_dict(), load_bridge(old).state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    resumed = _resume(old, tmp_path, "auto", steps=5, allow_config_change=True)
    assert resumed.step == 4 and all(torch.equal(want[k], v) for k, v in resumed.model.bridge.state_dict().items())
    resumed.fit()
    assert (old / "checkpoints" / "step-0000005" / "bridge" / "config.json").is_file()
    weights = old / "checkpoints" / "step-0000004" / "model.safetensors"
    _damage(weights, "flipped")
    with pytest.raises(ValueError, match=f"^{re.escape(str(weights))} is corrupt: its content hash"):
        load_bridge(weights.parent)


@pytest.mark.parametrize("old_format", [False, True])
def test_load_bridge_refuses_non_finite_weights(saved_run, tmp_path, old_format):
    run = _copy_run(saved_run, tmp_path)
    last = run / "checkpoints" / "step-0000004"
    weights = last / "bridge" / "model.safetensors"
    state = load_file(weights)
    state["proj_out.bias"][:3] = float("nan")
    save_file(state, weights, metadata=safe_open(weights, "pt").metadata())
    (last / "manifest.json").unlink()  # as in a checkpoint from before manifests: the NaN check alone tells
    if old_format:
        as_written_before_bridge(last)
        weights = last / "model.safetensors"
    with pytest.raises(ValueError, match=re.escape(f"{weights} holds NaN or Inf in 1 tensor: 'proj_out.bias' "
                                                   f"(3 of its {state['proj_out.bias'].numel()} values)")):
        load_bridge(last)
    assert load_bridge(last, allow_nonfinite=True).proj_out.bias[:3].isnan().all()


def test_manifest_records_hashes_and_old_size_only_manifests_still_load(saved_run, tmp_path):
    run = _copy_run(saved_run, tmp_path)
    last = run / "checkpoints" / "step-0000004"
    manifest = json.loads((last / "manifest.json").read_text())
    assert set(manifest) == {"model.safetensors", "trainer.pt", "bridge/model.safetensors"}
    assert all(set(entry) == {"bytes", "sha256"} and len(entry["sha256"]) == 64 for entry in manifest.values())
    (last / "manifest.json").write_text(json.dumps({k: v["bytes"] for k, v in manifest.items()}))  # the old format
    assert resolve_checkpoint(run) == last
    (last / "manifest.json").write_text(json.dumps({**manifest, "trainer.pt": "big"}))
    with pytest.raises(ValueError, match=re.escape(f"{last / 'manifest.json'} is corrupt: its entry for trainer.pt "
                                                   f"is 'big'; expected {{\"bytes\": SIZE, \"sha256\": HEX}}")):
        _resume(run, tmp_path, str(last))


# ---- trainer.pt's schema, config.json's sections ----------------------------------------------------
EXPECTED_STATE = re.escape("expected a dict of step (int), data_position (int), losses (list), meter_totals "
                           "(dict), optimizer (dict), scheduler (dict), rng (list)")


def _full_state(last: Path) -> dict:
    return torch.load(last / "trainer.pt", weights_only=True)


@pytest.mark.parametrize("make, said", [
    (lambda full: {"step": 6},
     r"it lacks \['data_position', 'losses', 'meter_totals', 'optimizer', 'scheduler', 'rng'\]"),
    (lambda full: {**full, "step": "6", "rng": None}, r"its step is a str; its rng is a NoneType"),
    (lambda full: [1, 2], None),
], ids=["only-step", "wrong-types", "a-list"])
def test_trainer_state_of_another_schema_is_refused(saved_run, tmp_path, make, said):
    run = _copy_run(saved_run, tmp_path)
    last = run / "checkpoints" / "step-0000004"
    assert set(_full_state(last)) == set(TRAINER_STATE)  # what save_checkpoint writes
    torch.save(make(_full_state(last)), last / "trainer.pt")
    (last / "manifest.json").unlink()  # as in a checkpoint from before manifests: the schema alone tells
    trainer_pt = re.escape(str(last / "trainer.pt"))
    match = (f"{trainer_pt} is not a trainer state cos-train wrote: {said}; {EXPECTED_STATE}" if said else
             f"{trainer_pt} is not a trainer state: it holds a list; {EXPECTED_STATE}")
    with pytest.raises(ValueError, match=match):
        _resume(run, tmp_path, str(last))
    warnings = []
    assert resolve_checkpoint(run, fallback=True, warn=warnings.append).name == "step-0000003"  # --resume auto
    assert len(warnings) == 1 and re.fullmatch(f"warning: skipping a broken checkpoint: {match}", warnings[0])


@pytest.mark.parametrize("section", ["model", "train", "frozen_checksums", "relative_paths"])
def test_config_sections_that_are_not_objects_are_named(saved_run, tmp_path, section):
    run = _copy_run(saved_run, tmp_path)
    last = run / "checkpoints" / "step-0000004"
    configs = json.loads((last / "config.json").read_text())
    configs[section] = ["a", "list"]
    (last / "config.json").write_text(json.dumps(configs))
    with pytest.raises(ValueError, match=re.escape(
            f"{last / 'config.json'} is not a checkpoint config: model, train, frozen_checksums, relative_paths must "
            f"be JSON objects (dicts), but '{section}' is a list")):
        read_configs(last)


# ---- what resume / init_from name -------------------------------------------------------------------
@pytest.mark.parametrize("name", ["trainer.pt", "model.safetensors", "config.json", "manifest.json"])
def test_a_file_of_a_checkpoint_names_its_directory(saved_run, name):
    last = saved_run[1] / "checkpoints" / "step-0000004"
    with pytest.raises(ValueError, match=re.escape(
            f"resume '{last / name}' is a file of the checkpoint {last}; point resume at the checkpoint "
            f"directory {last} (or the run directory)")):
        resolve_checkpoint(str(last / name), what="resume")


def test_another_file_is_refused(tmp_path):
    other = tmp_path / "notes.txt"
    other.write_text("x")
    with pytest.raises(ValueError, match=re.escape(f"init_from '{other}' is a file; expected a checkpoint directory, "
                                                   f"a run directory or its checkpoints/ directory")):
        resolve_checkpoint(str(other), what="init_from")


def test_an_empty_path_is_refused_not_taken_for_the_current_directory(saved_run, tmp_path, monkeypatch):
    shutil.copytree(saved_run[1] / "checkpoints", tmp_path / "checkpoints")
    monkeypatch.chdir(tmp_path)  # '' would be the current directory, here a run directory
    with pytest.raises(ValueError, match=re.escape("init_from='' is empty: give a checkpoint directory, a run "
                                                   "directory or its checkpoints/ directory")):
        resolve_checkpoint("", what="init_from")
    with pytest.raises(ValueError, match=re.escape("resume=' ' is empty: give a checkpoint directory, a run directory "
                                                   "or its checkpoints/ directory, or 'auto'")):
        resolve_checkpoint(" ", what="resume", forms=f"{CHECKPOINT_FORMS}, or 'auto'")  # as the Trainer calls it


# ---- notices: nothing silently ignored ---------------------------------------------------------------
def test_a_resume_already_past_the_steps_says_nothing_is_trained(saved_run, tmp_path):
    run = _copy_run(saved_run, tmp_path)
    last = run / "checkpoints" / "step-0000004"
    files = lambda: {p.relative_to(last): p.read_bytes() for p in last.rglob("*") if p.is_file()}
    before = files()
    lines = []
    trainer = _resume(run, tmp_path, "auto", log=lines.append, steps=2, allow_config_change=True)
    trainer.fit()
    assert ("note: resumed at step 4, which is already >= steps=2: nothing to train; the checkpoint is left as it is"
            in lines), lines
    assert files() == before and Path("bridge/model.safetensors") in before
    assert [p.name for p in sorted((run / "checkpoints").glob("step-*"))][-1] == "step-0000004"


class ExpensiveStep(Exception):
    """Raised where the LLM warm-up or the model build would start."""


def _expensive(*args, **kwargs):
    raise ExpensiveStep


@pytest.fixture
def nothing_expensive(monkeypatch):
    monkeypatch.setattr(trainer_module, "CoSMLLM", _expensive)
    monkeypatch.setattr(trainer_module, "warm_up_llm", _expensive)


@pytest.mark.parametrize("allow, resume, said", [(True, None, "resume is not given"),
                                                 (True, "auto", "resume='auto' found no checkpoint in"),
                                                 (False, None, None)])
def test_allow_config_change_without_a_resumed_checkpoint_is_noted(tmp_path, nothing_expensive, allow, resume, said):
    lines = []
    with pytest.raises(ExpensiveStep):  # said before the model is built
        Trainer(tiny(tmp_path, allow_config_change=allow, resume=resume), log=lines.append)
    notes = [line for line in lines if "allow_config_change" in line]
    if said is None:
        assert not notes
    else:
        assert len(notes) == 1 and notes[0].startswith(
            "note: allow_config_change has no effect without a resumed checkpoint: " + said), notes
        assert notes[0].endswith("so nothing is resumed")


# ---- data: checked before the LLM warm-up and the model build ----------------------------------------

def test_images_all_missing_are_refused_before_the_warm_up(tmp_path, capsys, nothing_expensive):
    json_path, images = write_llava_folder(tmp_path / "llava", corrupt=0, missing=3, good=0)
    said = (f"none of the 3 images listed in {json_path} under image_folder '{images}' exists (the first: "
            f"{images / 'sub' / '000.png'})")
    with pytest.raises(FileNotFoundError, match=re.escape(said)):
        Trainer(tiny(tmp_path, data=str(json_path), image_folder=str(images), llm_warmup_steps=2))
    argv = ["pretrain", "--data", str(json_path), "--image-folder", str(images), "--llm-warmup-steps", "2",
            "--out-dir", str(tmp_path / "cli"), "--device", "cpu"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert re.fullmatch(r"cos-train: error: .*\n", err) and said in err, err


def test_some_missing_images_are_counted(tmp_path):
    json_path, images = write_llava_folder(tmp_path / "llava", corrupt=1, missing=2, good=3)
    lines = []
    check_data(tiny(tmp_path, data=str(json_path), image_folder=str(images)), log=lines.append)
    assert lines == [f"note: 2 of the 6 images listed in {json_path} under image_folder '{images}' do not exist "
                     f"(the first: {images / 'sub' / '004.png'}); training skips them and counts them in "
                     f"skipped_images"]


# ---- the LLM warm-up: a graceful stop, its resume, its save on a full disk -----------------------------
WARMUP_STEPS = 4


def _warm_up(run_dir: Path, log=None):
    config = MLLMConfig.from_preset("tiny", seed=0)
    return warm_up_llm(config, SyntheticCaptions(32, 64, seed=0), WARMUP_STEPS, run_dir, CPU,
                       log or (lambda line: None), resume_hint="cos-train pretrain --resume auto")


def _signal_at(step: int, signum: int, lines: list):
    """A log that sends ``signum`` to this process when the warm-up reports ``step``."""
    def log(line: str) -> None:
        lines.append(line)
        if line.startswith(f"llm warm-up step {step}/"):
            os.kill(os.getpid(), signum)
    return log


@pytest.fixture(scope="module")
def reference_warm_up(tmp_path_factory) -> MLLMConfig:
    return _warm_up(tmp_path_factory.mktemp("reference"))


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stopped_warm_up_resumes_to_the_uninterrupted_result(tmp_path, reference_warm_up, signum):
    reference = reference_warm_up
    handler = signal.getsignal(signum)
    run, lines = tmp_path / "stopped", []
    with pytest.raises(TrainingStopped) as info:
        _warm_up(run, _signal_at(2, signum, lines))
    partial = (run / "llm-warmup.partial").resolve()
    assert info.value.signum == signum
    assert str(info.value) == (f"stopped by {signal.Signals(signum).name} during the LLM warm-up after step 2 of "
                               f"{WARMUP_STEPS}; its state is saved in {partial}; resume with: cos-train pretrain "
                               f"--resume auto (the warm-up continues from step 2)")
    assert not (run / "llm-warmup").exists() and (partial / "warmup-state.pt").is_file()
    assert signal.getsignal(signum) == handler  # given back
    lines.clear()
    resumed = _warm_up(run, lines.append)
    assert f"resuming the LLM warm-up at step 2 from {partial}" in lines
    assert [line.split(":")[0] for line in lines[1:]] == ["llm warm-up step 3/4", "llm warm-up step 4/4"]
    assert not partial.exists()
    ours, theirs = (load_file(Path(c.llm_path) / "model.safetensors") for c in (resumed, reference))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)  # bit for bit


def test_a_warm_up_stopped_through_the_trainer_names_the_command(tmp_path, monkeypatch):
    monkeypatch.setattr(trainer_module, "CoSMLLM", _expensive)
    said = (r"stopped by SIGTERM during the LLM warm-up after step 1 of 2; its state is saved in "
            r".*llm-warmup\.partial; resume with: cos-train pretrain .*--resume auto \(the warm-up continues from step 1\)")
    with pytest.raises(TrainingStopped, match=said):
        Trainer(tiny(tmp_path, llm_warmup_steps=2), log=_signal_at(1, signal.SIGTERM, []))
    resumed = []
    with pytest.raises(ExpensiveStep):  # the warm-up is done when the model is built
        Trainer(tiny(tmp_path, llm_warmup_steps=2, resume="auto"), log=resumed.append)
    assert any(line.startswith("resuming the LLM warm-up at step 1") for line in resumed), resumed
    assert (tmp_path / "run" / "llm-warmup" / "warmup-recipe.json").is_file()


def test_sigterm_during_the_warm_up_of_cos_train_exits_143_with_one_line(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "cos_kernels.train", "pretrain", "--llm-warmup-steps", "40", "--steps", "1",
           "--global-batch", "2", "--train-samples", "24", "--eval-samples", "0", "--backend", "torch",
           "--device", "cpu", "--out-dir", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    for line in proc.stdout:
        if line.startswith("llm warm-up step 1/40"):
            proc.send_signal(signal.SIGTERM)
            break
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert re.fullmatch(r"cos-train: stopped by SIGTERM during the LLM warm-up after step (\d+) of 40; its state "
                        r"is saved in .*llm-warmup\.partial; resume with: cos-train pretrain .*--resume auto "
                        r"\(the warm-up continues from step \1\)", last), err[-3000:]
    assert "Traceback" not in err and (out / "llm-warmup.partial" / "warmup-state.pt").is_file()


# safetensors' own words on a full disk (a 2 MiB tmpfs), in a SafetensorError, which is no OSError
STORAGE_FULL = "Error while serializing: I/O error: No space left on device (os error 28)"


def test_a_full_disk_is_said_for_every_writer(tmp_path, monkeypatch):
    """A library's own error naming the full disk (safetensors' SafetensorError is no OSError), and a
    silent one (torch.save's) while the disk is full only until the partial write is removed."""
    target = tmp_path / "out"

    def safetensors_full(tmp):
        (Path(tmp) / "model.safetensors").write_bytes(b"x" * 4096)
        raise SafetensorError(STORAGE_FULL)

    with pytest.raises(OSError, match=re.escape(f"no space left on the device writing {target} (")) as info:
        atomic_io.atomic_dir(target, safetensors_full)
    assert info.value.errno == errno.ENOSPC and not list(tmp_path.iterdir())

    usage = shutil.disk_usage(tmp_path)

    def full_while_written(path):
        return usage._replace(free=0 if list(tmp_path.glob(".*.tmp")) else 10 << 30)

    monkeypatch.setattr(shutil, "disk_usage", full_while_written)

    def torch_full(tmp):
        Path(tmp).write_bytes(b"x" * 4096)
        raise RuntimeError("basic_ios::clear: iostream error")

    with pytest.raises(OSError, match=re.escape(f"no space left on the device writing {target} (0 bytes free): "
                                                f"basic_ios::clear")):
        atomic_io.atomic_file(target, torch_full)
    def interrupted(tmp):
        Path(tmp).write_bytes(b"x" * 4096)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # never re-worded, whatever the free space
        atomic_io.atomic_file(target, interrupted)


def test_the_warm_ups_save_on_a_full_disk_is_one_line(tmp_path, capsys, monkeypatch):
    import transformers.modeling_utils

    def full(state, filename, metadata=None):
        Path(filename).write_bytes(b"x" * 4096)
        raise SafetensorError(STORAGE_FULL)

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", full)
    out = tmp_path / "run"
    argv = ["pretrain", "--llm-warmup-steps", "1", "--steps", "1", "--global-batch", "2", "--train-samples", "24",
            "--eval-samples", "0", "--backend", "torch", "--device", "cpu", "--out-dir", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert re.fullmatch(re.escape(f"cos-train: error: [Errno 28] no space left on the device writing "
                                  f"{(out / 'llm-warmup').resolve()} (") + r"\d+ bytes free\): "
                        + re.escape(STORAGE_FULL) + "\n", err), err
    assert not (out / "llm-warmup").exists() and not list(out.glob(".*"))
