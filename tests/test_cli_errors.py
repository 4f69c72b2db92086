"""Bad command lines of cos-train and cos-compare: refused in one line (exit 2) that names the option,
before any expensive step (the model build, training, the vision tower's pre-training)."""

import json
import re

import pytest
import torch

import cos_kernels.compare.run as compare_run
import cos_kernels.train.trainer as trainer_module
from cos_kernels.compare.cli import main as compare_main
from cos_kernels.compare.config import CompareConfig
from cos_kernels.train.cli import main as train_main
from cos_kernels.train.config import TrainConfig


def _too_late(*args, **kwargs):
    raise AssertionError("too late: the expensive step started before the bad input was refused")


@pytest.fixture
def no_training(monkeypatch):
    monkeypatch.setattr(trainer_module, "Trainer", _too_late)


@pytest.fixture
def no_tower(monkeypatch):
    """The comparison's first expensive steps (the shared components, the tower's pre-training) fail the test."""
    monkeypatch.setattr(compare_run, "prepare_components", _too_late)
    monkeypatch.setattr(compare_run, "pretrain_tower", _too_late)


def _one_error_line(capsys, prog: str) -> str:
    err = capsys.readouterr().err
    assert re.fullmatch(f"{prog}: error: [^\n]*\n", err), err
    return err


@pytest.mark.parametrize("argv, match", [
    # negative numbers in every form float() reads reach the range check (not "expected one argument")
    (["--lr", "-1e-3"], r"TrainConfig\.lr must be a finite number > 0, got -0\.001"),
    (["--lr", "-inf"], r"TrainConfig\.lr must be a finite number > 0, got -inf"),
    (["--peak-tflops", "-1E3"], r"TrainConfig\.peak_tflops must be a finite number > 0, got -1000\.0"),
    (["--warmup-ratio", "-.1"], r"TrainConfig\.warmup_ratio must be a finite number in \[0, 1\), got -0\.1"),
    (["--weight-decay", "-1e-2"], r"TrainConfig\.weight_decay must be a finite number >= 0, got -0\.01"),
    (["--steps", "-5"], r"TrainConfig\.steps must be a positive integer, got -5"),
    (["--feature-layers", "2", "-1"], r"TrainConfig\.feature_layers are 1-based ViT layers, got \[2, -1\]"),
    # an empty path would silently mean the default or the current folder
    (["--out-dir", ""], r"TrainConfig\.out_dir is empty; expected a directory path"),
    (["--tokenizer-path", ""], r"TrainConfig\.tokenizer_path is empty; expected a tokenizer folder"),
    # synthetic data never reads an image folder
    (["--image-folder", "images"], r"TrainConfig\.image_folder='images' is only read with data=<a LLaVA JSON "
                                   r"file>; with data='synthetic' the images are generated"),
])
def test_cos_train_refuses_bad_values_by_name(argv, match, capsys, no_training):
    assert train_main(["pretrain", *argv]) == 2
    assert re.search(match, _one_error_line(capsys, "cos-train"))


def test_cos_train_refuses_an_unknown_backend_while_parsing(tmp_path, capsys, no_training):
    with pytest.raises(SystemExit) as info:
        train_main(["pretrain", "--backend", "fast", "--out-dir", str(tmp_path)])
    assert info.value.code == 2 and "argument --backend: invalid choice: 'fast'" in capsys.readouterr().err


@pytest.mark.parametrize("fields, match", [
    (dict(out_dir=""), r"TrainConfig\.out_dir is empty; expected a directory path"),
    (dict(data=""), r"TrainConfig\.data is empty; expected 'synthetic' or a LLaVA JSON file"),
    (dict(image_folder="images"), r"TrainConfig\.image_folder='images' is only read with data="),
    (dict(backend="fast"), r"TrainConfig\.backend must be one of \['auto', 'torch', 'cuda', 'triton'\], got 'fast'"),
])
def test_train_config_refuses_what_the_cli_refuses(fields, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**fields)


@pytest.mark.parametrize("fields, world, split", [
    (dict(global_batch=8), 1, (8, 1)), (dict(global_batch=8, micro_batch=2), 2, (2, 2)),
    (dict(global_batch=6, micro_batch=3), 1, (3, 2)),
])
def test_batch_split(fields, world, split):
    assert TrainConfig(**fields).batch_split(world) == split


@pytest.mark.parametrize("fields, world, match", [
    (dict(global_batch=8, micro_batch=3), 1, r"global_batch=8 must be a multiple of micro_batch \(3\) x processes \(1\)"),
    (dict(global_batch=8, micro_batch=2), 3, r"global_batch=8 must be a multiple of micro_batch \(2\) x processes \(3\)"),
    (dict(global_batch=8, train_samples=4), 1, r"train_samples=4 is less than one micro-batch of 8 per process"),
])
def test_batch_split_refuses_what_does_not_divide(fields, world, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**fields).batch_split(world)


def _llava_json(tmp_path, name: str, entries) -> str:
    path = tmp_path / name
    path.write_text(entries if isinstance(entries, str) else json.dumps(entries))
    return str(path)


def _compare_cases(tmp_path):
    missing_images = [{"id": "1", "image": "none.jpg", "conversations": [{"from": "gpt", "value": "a cat"}]}]
    return [
        (["--data", str(tmp_path / "missing.json")], "data must be 'synthetic' or an existing LLaVA JSON file"),
        (["--data", _llava_json(tmp_path, "bad.json", "{not json")], r"bad\.json is not valid JSON"),
        (["--data", _llava_json(tmp_path, "data.json", missing_images)],
         r"none of the 1 images listed in .*data\.json under image_folder '.*' exists"),
        (["--image-folder", str(tmp_path)], r"image_folder='.*' is only read with data=<a LLaVA JSON file>"),
        (["--backend", "cuda"], r"backend='cuda' cannot run on cpu"),  # the CUDA kernels need a CUDA device
        (["--global-batch", "5", "--micro-batch", "2"],
         r"global_batch=5 must be a multiple of micro_batch \(2\) x processes \(1\)"),
        (["--train-samples", "4"], r"train_samples=4 is less than one micro-batch of 8"),
        (["--vision-path", str(tmp_path / "clip")], r"MLLMConfig\.vision_path '.*clip' does not exist"),
        (["--out-dir", ""], r"CompareConfig\.out_dir is empty; expected a directory path"),
        (["--cache-dir", ""], r"CompareConfig\.cache_dir is empty; expected a directory path"),
        (["--pretrain-lr", "-1e-3"], r"CompareConfig\.pretrain_lr must be a finite number > 0, got -0\.001"),
    ]


def test_cos_compare_checks_every_input_before_the_tower(tmp_path, capsys, no_tower):
    for extra, match in _compare_cases(tmp_path):
        argv = ["--out-dir", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"), "--device", "cpu", *extra]
        assert compare_main(argv) == 2, extra
        assert re.search(match, _one_error_line(capsys, "cos-compare")), extra


def test_cos_compare_refuses_an_unknown_backend_while_parsing(tmp_path, capsys, no_tower):
    with pytest.raises(SystemExit) as info:
        compare_main(["--backend", "fast", "--out-dir", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache")])
    assert info.value.code == 2 and "argument --backend: invalid choice: 'fast'" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"CompareConfig\.backend must be one of"):
        CompareConfig(backend="fast")


@pytest.mark.parametrize("argv, source", [(["--preset", "gpu-1b"], "preset 'gpu-1b'"),
                                          (["--device", "cuda:0"], "--device cuda:0")])
def test_cos_compare_needs_cuda_where_its_device_is_cuda(argv, source, tmp_path, capsys, monkeypatch, no_tower):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert compare_main([*argv, "--out-dir", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache")]) == 2
    err = _one_error_line(capsys, "cos-compare")
    assert f"cos-compare: error: {source} needs a CUDA device" in err and "CUDA is not available here (torch" in err
    assert not (tmp_path / "out").exists()  # refused before anything is written
