"""Bad inputs through the public API and the CLI: each is refused with a TypeError or ValueError (or
FileNotFoundError / PermissionError for paths) whose message names the argument and the value
given, before any expensive work (the model build, the LLM warm-up); the CLI reports it as one line
`cos-train: error: ...` with exit code 2. The module side's bad inputs (CoSConfig, WindowLayout,
MultiScaleResampler, the op) are tested beside their other tests: test_resampler.py, test_layout.py,
test_ops_torch.py; checkpoints' in test_load_errors.py; the op's zero-sized dimensions here."""

import math
import re

import pytest
import torch

import cos_kernels.train.trainer as trainer_module
from cos_kernels import WindowLayout, multiscale_window_attention
from cos_kernels.train import TrainConfig
from cos_kernels.train.cli import main

# ---- TrainConfig ---------------------------------------------------------------------------------
TRAIN_CASES = [
    (dict(max_grad_norm=-1), ValueError, r"TrainConfig\.max_grad_norm must be a finite number >= 0 .*got -1"),
    (dict(max_grad_norm=math.inf), ValueError, r"TrainConfig\.max_grad_norm .*got inf"),
    (dict(lr=0.0), ValueError, r"TrainConfig\.lr must be a finite number > 0, got 0\.0"),
    (dict(lr=-1e-3), ValueError, r"TrainConfig\.lr .*got -0\.001"),
    (dict(lr=math.nan), ValueError, r"TrainConfig\.lr .*got nan"),
    (dict(lr="1e-3"), TypeError, r"TrainConfig\.lr must be a number or None, got '1e-3' \(str\)"),
    (dict(weight_decay=-0.1), ValueError, r"TrainConfig\.weight_decay must be a finite number >= 0, got -0\.1"),
    (dict(peak_tflops=0.0), ValueError, r"TrainConfig\.peak_tflops must be a finite number > 0, got 0\.0"),
    (dict(warmup_ratio=1.0), ValueError, r"TrainConfig\.warmup_ratio must be a finite number in \[0, 1\), got 1\.0"),
    (dict(warmup_ratio=-0.1), ValueError, r"TrainConfig\.warmup_ratio .*got -0\.1"),
    (dict(micro_batch=0), ValueError, r"TrainConfig\.micro_batch must be a positive integer or None, got 0"),
    (dict(image_size=0), ValueError, r"TrainConfig\.image_size must be a positive integer or None, got 0"),
    (dict(seed=-1), ValueError, r"TrainConfig\.seed must be a non-negative integer, got -1"),
    (dict(seed=2**64), ValueError, r"TrainConfig\.seed must be below 2\*\*63, got 18446744073709551616"),
    (dict(steps=0), ValueError, r"TrainConfig\.steps must be a positive integer, got 0"),
    (dict(steps="10"), TypeError, r"TrainConfig\.steps must be an integer, got '10' \(str\)"),
    (dict(global_batch=2.5), TypeError, r"TrainConfig\.global_batch must be an integer, got 2\.5 \(float\)"),
    (dict(train_samples=True), TypeError, r"TrainConfig\.train_samples must be an integer, got True \(bool\)"),
    (dict(keep_checkpoints=0), ValueError, r"TrainConfig\.keep_checkpoints must be a positive integer, got 0"),
    (dict(log_every=0), ValueError, r"TrainConfig\.log_every must be a positive integer, got 0"),
    (dict(eval_samples=-1), ValueError, r"TrainConfig\.eval_samples must be a non-negative integer, got -1"),
    (dict(num_workers=-2), ValueError, r"TrainConfig\.num_workers must be a non-negative integer, got -2"),
    (dict(compile="yes"), TypeError, r"TrainConfig\.compile must be True or False, got 'yes' \(str\)"),
    (dict(precision="fp16"), ValueError, r"TrainConfig\.precision must be one of \['auto', 'fp32', 'bf16'\], got 'fp16'"),
    (dict(bridge="cos-81"), ValueError, r"TrainConfig\.bridge must be one of .*got 'cos-81'"),
    (dict(model="huge"), ValueError, r"TrainConfig\.model must be one of .*got 'huge'"),
    (dict(distributed="mpi"), ValueError, r"TrainConfig\.distributed must be one of .*got 'mpi'"),
    (dict(feature_layers=[0, 3]), ValueError, r"TrainConfig\.feature_layers are 1-based ViT layers, got \[0, 3\]"),
    (dict(feature_layers=[]), TypeError, r"TrainConfig\.feature_layers must be a non-empty list of ints or None, got \[\]"),
    (dict(scale_source=[0]), ValueError, r"--scale-source is for stage 'finetune' only"),
    (dict(init_from="runs/pretrain"), ValueError, r"--init-from is for stage 'finetune' only"),
    (dict(stage="finetune"), ValueError, r"stage 'finetune' needs init_from"),
    (dict(stage="finetune", init_from="x", model="tiny"), ValueError, r"--model is for stage 'pretrain' only"),
    (dict(stage="finetune", init_from="x", llm_warmup_steps=2, llm_path="p"), ValueError,
     r"--llm-path, --llm-warmup-steps are for stage 'pretrain' only"),
    (dict(stage="finetune", init_from="x", scale_source=[-1, 0]), ValueError,
     r"TrainConfig\.scale_source must name pretrain scales \(>= 0\), got \[-1, 0\]"),
    (dict(stage="test"), ValueError, r"TrainConfig\.stage must be one of \['pretrain', 'finetune'\], got 'test'"),
]


@pytest.mark.parametrize("kwargs, error, match", TRAIN_CASES, ids=[str(c[0]) for c in TRAIN_CASES])
def test_train_config_refuses(kwargs, error, match):
    with pytest.raises(error, match=match):
        TrainConfig(**kwargs)


# ---- cos-train: one-line errors, exit code 2, raised before the model is built ----------------------
@pytest.fixture
def no_model_build(monkeypatch):
    """Building the model or warming up the LLM fails the test: every case must be refused first."""
    def built(*args, **kwargs):
        raise AssertionError("the model was built before the bad input was refused")

    monkeypatch.setattr(trainer_module, "CoSMLLM", built)
    monkeypatch.setattr(trainer_module, "warm_up_llm", built)


def _cli_cases(tmp):
    not_a_dir = tmp / "file.txt"
    not_a_dir.write_text("x")
    (tmp / "empty").mkdir()
    llava = tmp / "data.json"  # image_folder is read with a LLaVA JSON file only
    llava.write_text('[{"id": "1", "image": "a.jpg", "conversations": [{"from": "gpt", "value": "a cat"}]}]')
    return [
        (["--max-grad-norm", "-1"], r"TrainConfig\.max_grad_norm must be a finite number >= 0 \(0: off\), got -1\.0"),
        (["--micro-batch", "0"], r"TrainConfig\.micro_batch must be a positive integer or None, got 0"),
        (["--lr", "0"], r"TrainConfig\.lr must be a finite number > 0, got 0\.0"),
        (["--seed", "-3"], r"TrainConfig\.seed must be a non-negative integer, got -3"),
        (["--scale-source", "0", "1"], r"--scale-source is for stage 'finetune' only"),
        (["--data", str(tmp / "missing.json")], f"data must be 'synthetic' or an existing LLaVA JSON file, got "
                                                f"'{re.escape(str(tmp / 'missing.json'))}'"),
        (["--out-dir", str(not_a_dir / "run")], f"out_dir '{re.escape(str(not_a_dir / 'run'))}' cannot be written"),
        (["--resume", str(tmp / "nothing")], f"resume '{re.escape(str(tmp / 'nothing'))}' does not exist"),
        (["--resume", str(tmp / "empty")], f"{re.escape(str(tmp / 'empty'))} is not a complete checkpoint: it lacks"),
        (["--tokenizer-path", str(tmp / "tok")], f"tokenizer_path '{re.escape(str(tmp / 'tok'))}' does not exist"),
        (["--device", "gpu"], r"device must be cpu, cuda, cuda:N or auto, got 'gpu'"),
        (["--global-batch", "5", "--micro-batch", "2"], r"global_batch=5 must be a multiple of micro_batch \(2\)"),
        (["--backend", "cuda"], r"backend='cuda' cannot run on cpu"),  # the CUDA kernels need a CUDA device
        (["--data", str(llava), "--image-folder", str(tmp / "images")], f"image_folder '{re.escape(str(tmp / 'images'))}' does not exist"),
    ]


def test_cli_reports_bad_input_in_one_line_before_building_anything(tmp_path, capsys, no_model_build):
    cases = _cli_cases(tmp_path)
    for extra, match in cases:
        argv = ["pretrain", "--out-dir", str(tmp_path / "run"), "--device", "cpu", *extra]
        assert main(argv) == 2, extra
        err = capsys.readouterr().err
        assert re.fullmatch(r"cos-train: error: .*\n", err) and re.search(match, err), (extra, err)
    ft = ["finetune", "--init-from", str(tmp_path / "pre"), "--out-dir", str(tmp_path / "ft"), "--device", "cpu"]
    assert main(ft) == 2
    assert f"init_from '{tmp_path / 'pre'}' does not exist" in capsys.readouterr().err
    assert main([*ft[:2], str(tmp_path / "empty"), *ft[3:]]) == 2
    assert "is not a complete checkpoint" in capsys.readouterr().err


def test_cli_refuses_cuda_without_a_gpu(tmp_path, capsys, no_model_build):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device exists: --device cuda is valid here")
    assert main(["pretrain", "--device", "cuda", "--out-dir", str(tmp_path)]) == 2
    assert "device='cuda' but CUDA is not available" in capsys.readouterr().err


@pytest.mark.parametrize("argv, match", [(["pretrain", "--precision", "fp16"], "invalid choice: 'fp16'"),
                                         (["pretrain", "--steps", "ten"], "invalid int value: 'ten'"),
                                         (["train"], "invalid choice: 'train'")])
def test_cli_parse_errors_exit_2(argv, match, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2 and match in capsys.readouterr().err


def test_cli_debug_shows_the_traceback(tmp_path):
    with pytest.raises(ValueError, match="TrainConfig.lr"):
        main(["pretrain", "--lr", "0", "--debug", "--out-dir", str(tmp_path)])


def test_cli_refuses_an_unrescalable_bridge_and_a_tiny_dataset_before_the_warm_up(tmp_path, capsys, no_model_build):
    base = ["pretrain", "--out-dir", str(tmp_path / "run"), "--device", "cpu"]
    assert main([*base, "--image-size", "72"]) == 2  # grid 18: cos-80's 4-patch windows would be 4.5
    assert "preset 'cos-80' (windows [16, 4] on grid 16) cannot be rescaled to grid 18" in capsys.readouterr().err
    assert main([*base, "--train-samples", "3", "--global-batch", "4"]) == 2
    assert "train_samples=3 is less than one micro-batch of 4" in capsys.readouterr().err


# ---- the op: zero-sized dimensions ----------------------------------------------------------------
@pytest.mark.parametrize("B, H, D, match", [
    (1, 2, 0, r"^q has head dim D = 0 \(shape \(B, Q, H, D\) = \(1, 5, 2, 0\)\): expected D >= 1$"),
    (2, 0, 4, r"^q has heads H = 0 \(shape \(B, Q, H, D\) = \(2, 5, 0, 4\)\): expected H >= 1$"),
])
def test_op_refuses_zero_heads_or_head_dim(B, H, D, match):
    layout = WindowLayout(4, [4, 2], [1, 4])
    q, kv = torch.randn(B, 5, H, D), torch.randn(B, 2, 16, H, D)
    with pytest.raises(ValueError, match=match):
        multiscale_window_attention(q, kv, kv, layout, backend="torch")


def test_op_on_an_empty_batch_is_empty():
    layout = WindowLayout(4, [4, 2], [1, 4])
    out = multiscale_window_attention(torch.randn(0, 5, 2, 4), torch.randn(0, 2, 16, 2, 4), torch.randn(0, 2, 16, 2, 4),
                                      layout, backend="torch")
    assert out.shape == (0, 5, 2, 4)
