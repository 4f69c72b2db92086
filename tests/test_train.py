"""The training loop: stages, schedule, checkpoints and exact resume, NaN stop, CLI, two-process runs."""

import contextlib
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from cos_kernels import MultiScaleResampler
from cos_kernels.mllm import CaptionCollator, CoSMLLM, MLLMConfig, SyntheticCaptions
from cos_kernels.mllm.synthetic import FIELDS

from cos_kernels.train import NonFiniteLossError, TrainConfig, Trainer, cosine_with_warmup, load_bridge
from cos_kernels.train.cli import main
from cos_kernels.train.distributed import DistEnv
from cos_kernels.train.evaluate import evaluate

from test_data import write_llava_folder
from test_faults import as_written_before_bridge


def tiny_config(tmp_path, name="run", **overrides) -> TrainConfig:
    """A 4-step tiny run on the CPU in fp32 (also on a GPU machine: the exact-equality tests below need
    a deterministic device and dtype, and the device's defaults would be CUDA, bf16, 4 loader workers)."""
    base = dict(out_dir=str(tmp_path / name), steps=4, global_batch=4, train_samples=64, eval_samples=0,
                log_every=2, backend="torch", device="cpu")
    if overrides.get("stage", "pretrain") == "pretrain":
        base["llm_warmup_steps"] = 0  # finetune takes its LLM from the pretrain checkpoint
    return TrainConfig(**{**base, **overrides})


@pytest.fixture(scope="module")
def pretrain_run(tmp_path_factory):
    """A 4-step pretrain run checkpointed at steps 2 and 4: (config, per-step losses)."""
    config = tiny_config(tmp_path_factory.mktemp("pretrain"), save_every=2)
    trainer = Trainer(config)
    trainer.fit()
    return config, list(trainer.losses)


def state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_cosine_schedule_with_warmup():
    f = cosine_with_warmup(3, 103)
    assert [f(0), f(1), f(2)] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert f(53) == pytest.approx(0.5) and f(102) == pytest.approx(0.5 * (1 + math.cos(0.99 * math.pi)))
    assert f(103) == pytest.approx(0.0)


def test_pretrain_step_trains_the_bridge_only(tmp_path):
    trainer = Trainer(tiny_config(tmp_path, steps=1))
    model = trainer.model
    before = {name: state(getattr(model, name)) for name in ("vision", "bridge", "llm")}
    out = trainer.train_step()
    assert out["samples"] == 4 and out["lr"] == pytest.approx(1e-3)
    for name in ("vision", "llm"):
        assert all(torch.equal(v, before[name][k]) for k, v in getattr(model, name).state_dict().items()), name
    changed = [k for k, v in model.bridge.state_dict().items() if not torch.equal(v, before["bridge"][k])]
    assert len(changed) == len(before["bridge"])  # AdamW's first step moves every weight
    assert {id(p) for g in trainer.optimizer.param_groups for p in g["params"]} == {id(p) for p in model.bridge.parameters()}


def _grads_at_step(trainer) -> list[torch.Tensor]:
    """The gradients the optimizer's next step() sees (after clipping), captured by a step pre-hook."""
    seen = []
    trainer.optimizer.register_step_pre_hook(
        lambda opt, args, kwargs: seen.extend(p.grad.detach().clone() for g in opt.param_groups for p in g["params"]))
    return seen


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    """4 micro-batches of 1 == one batch of 4, up to fp32 rounding, which alone sets the tolerances.

    Gradients: the same per-sample terms summed in another order (and batch-1 vs batch-4 matmul
    blocking), so each differs by a few fp32 roundings of the largest term: at most 256 eps32 of
    the tensor's largest gradient (a wrong accumulation scale or a lost micro-batch is off by O(1)).
    Weights: AdamW's first step moves w by lr * g / (|g| + eps), whose slope in g is
    eps / (|g| + eps)^2, so a gradient difference dg moves w by at most lr * dg * eps / (lo + eps)^2
    (lo: the smallest |g| between the two gradients, 0 where their signs differ), plus the fp32
    rounding of the update."""
    big = Trainer(tiny_config(tmp_path, "big", steps=1))
    accumulated = Trainer(tiny_config(tmp_path, "acc", steps=1, micro_batch=1))
    assert accumulated.accum == 4
    grads_big, grads_acc = _grads_at_step(big), _grads_at_step(accumulated)
    assert big.train_step()["loss"] == pytest.approx(accumulated.train_step()["loss"], rel=1e-6)
    eps32 = torch.finfo(torch.float32).eps
    params = [p for g in big.optimizer.param_groups for p in g["params"]]
    assert len(grads_big) == len(grads_acc) == len(params) > 0
    for gb, ga in zip(grads_big, grads_acc):
        torch.testing.assert_close(ga, gb, rtol=0, atol=256 * eps32 * gb.abs().max().item())
    (group,) = big.optimizer.param_groups
    lr, eps = group["lr"], group["eps"]
    for wb, wa, gb, ga in zip(params, accumulated.optimizer.param_groups[0]["params"], grads_big, grads_acc):
        lo = torch.where(gb.sign() == ga.sign(), torch.minimum(gb.abs(), ga.abs()), torch.zeros_like(gb))
        bound = lr * (gb - ga).abs() * eps / (lo + eps) ** 2 + 4 * eps32 * (wb.detach().abs() + lr)
        assert ((wb - wa).abs() <= bound).all(), float(((wb - wa).abs() - bound).max())


def test_resumed_run_continues_the_same_loss_curve(pretrain_run, tmp_path):
    config, losses = pretrain_run
    assert sorted(os.listdir(f"{config.out_dir}/checkpoints")) == ["latest", "step-0000002", "step-0000004"]
    resumed = Trainer(tiny_config(tmp_path, resume=f"{config.out_dir}/checkpoints/step-0000002"))
    assert resumed.step == 2 and resumed.stream.position == 2
    resumed.fit()
    assert resumed.losses == losses  # bit-for-bit the same steps 3 and 4
    records = [json.loads(line) for line in open(f"{config.out_dir}/metrics.jsonl")]
    assert [r["step"] for r in records] == [2, 4]
    assert set(records[0]) >= {"loss", "lr", "samples_per_s", "visual_tokens_per_s", "llm_tokens_per_s",
                               "data_time_s", "compute_time_s", "peak_mem_gb", "mfu"}


def test_finetune_starts_from_the_pretrained_weights(pretrain_run, tmp_path):
    config, _ = pretrain_run
    pre = Trainer(tiny_config(tmp_path, "pre", resume=config.out_dir))  # the step-4 weights
    ft = Trainer(tiny_config(tmp_path, "ft", stage="finetune", init_from=config.out_dir, bridge="cos-336", steps=1))
    assert ft.model.config.image_size == 128 and ft.model.bridge.config.windows == [32, 16, 4]
    assert ft.config.peak_lr == 2e-5 and ft.model.num_visual_tokens == 336
    old = pre.model.bridge.state_dict()
    for level in range(2):
        for new_scale, source in enumerate([0, 0, 1]):
            for name, value in ft.model.bridge.levels[level][new_scale].state_dict().items():
                assert torch.equal(value, old[f"levels.{level}.{source}.{name}"])
    assert all(torch.equal(a, b) for a, b in zip(ft.model.llm.parameters(), pre.model.llm.parameters()))
    trained = {n.split(".")[0] for n, p in ft.model.named_parameters() if p.requires_grad}
    assert trained == {"bridge", "llm"}
    assert ft.train_step()["samples"] == 4


def test_checkpoint_with_other_frozen_weights_is_refused(pretrain_run, tmp_path):
    config, _ = pretrain_run
    copy = tmp_path / "step-0000004"
    shutil.copytree(f"{config.out_dir}/checkpoints/step-0000004", copy)
    configs = json.loads((copy / "config.json").read_text())
    assert set(configs["frozen_checksums"]) == {"vision", "llm"}
    configs["frozen_checksums"]["llm"] += 1.0
    (copy / "config.json").write_text(json.dumps(configs))
    with pytest.raises(ValueError, match="frozen llm weights rebuilt from the config"):
        Trainer(tiny_config(tmp_path, resume=str(copy)))


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(pretrain_run, tmp_path):
    config, _ = pretrain_run
    checkpoint = f"{config.out_dir}/checkpoints/step-0000004"
    files = ("model.safetensors", "bridge/model.safetensors")
    saved = [open(f"{checkpoint}/{name}", "rb").read() for name in files]
    trainer = Trainer(tiny_config(tmp_path, steps=6, resume=checkpoint, out_dir=config.out_dir, allow_config_change=True))
    before = state(trainer.model.bridge)
    with torch.no_grad():
        trainer.model.bridge.proj_out.bias[0] = float("nan")
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at step 5 .*the last good state: .*step-0000004 \(step 4\)"):
        trainer.fit()
    assert [open(f"{checkpoint}/{name}", "rb").read() for name in files] == saved
    unchanged = [k for k, v in trainer.model.bridge.state_dict().items() if k != "proj_out.bias"]
    assert all(torch.equal(trainer.model.bridge.state_dict()[k], before[k]) for k in unchanged)


def test_cli_pretrain_on_llava_data_reports_throughput(tmp_path, capsys):
    json_path, images = write_llava_folder(tmp_path / "llava")
    out = tmp_path / "cli"
    code = main(["pretrain", "--data", str(json_path), "--image-folder", str(images), "--steps", "2",
                 "--global-batch", "5", "--eval-samples", "2", "--llm-warmup-steps", "2", "--out-dir", str(out),
                 "--log-every", "1", "--bridge", "mlp2x_gelu", "--backend", "torch", "--device", "cpu"])
    assert code == 0
    printed = capsys.readouterr()
    assert "llm warm-up step 2/2" in printed.out + printed.err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped_images"] == 6  # per epoch: 003 and 004 when reading 003, 004 when reading 004
    assert summary["tokens_per_sample"]["visual"] == 256 and summary["eval"]["samples"] == 2
    assert set(summary["time_split"]) == {"vision", "bridge", "llm"}
    assert summary["steps"] == 2 and summary["samples"] == 10
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    assert main(["finetune", "--steps", "1"]) == 2  # no init_from: refused with a clear error
    assert "needs init_from" in capsys.readouterr().err


def test_field_accuracy_counts_words_right_under_teacher_forcing():
    """evaluate()'s per-field numbers against a plain loop: a word is right when the argmax of the
    full LLM logits is its byte at every one of its positions."""
    model = CoSMLLM(MLLMConfig.from_preset("tiny"), backend="torch")
    data = SyntheticCaptions(6, 64, seed=5)
    collator = CaptionCollator(model.tokenizer)
    result = evaluate(model, data, collator, 4, DistEnv("none", 0, 1, torch.device("cpu")), contextlib.nullcontext)
    words = {f: [] for f in FIELDS}
    with torch.no_grad():
        for i in range(len(data)):
            item = data[i]
            ids = torch.tensor([model.tokenizer.bos_id, *item["caption"].encode(), model.tokenizer.eos_id])
            visual = model.encode_images(item["pixel_values"][None])
            logits = model.llm(inputs_embeds=model.embed(visual, ids[None])).logits[0, visual.shape[1]:-1]
            nll = F.cross_entropy(logits, ids[1:], reduction="none")
            for field, start, end in data.fields(i):  # character c is input token c + 1, predicted at c
                words[field].append((bool((logits[start:end].argmax(-1) == ids[start + 1:end + 1]).all()),
                                     float(nll[start:end].sum())))
    assert set(result["fields"]) == set(FIELDS)
    for field, seen in words.items():
        assert result["fields"][field]["accuracy"] == pytest.approx(sum(r for r, _ in seen) / len(seen))
        assert result["fields"][field]["nll"] == pytest.approx(sum(n for _, n in seen) / len(seen), rel=1e-4)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_process_gloo_run_matches_one_process(pretrain_run, tmp_path, mode):
    """torchrun, two CPU processes on gloo, 2 x 2 samples per step == one process with 4 (on the CPU also
    on a GPU machine: one GPU cannot hold rank 1's cuda:1)."""
    single, losses = pretrain_run
    out = tmp_path / mode
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "cos_kernels.train",
           "pretrain", "--steps", "4", "--global-batch", "4", "--train-samples", "64", "--eval-samples", "2",
           "--llm-warmup-steps", "0", "--log-every", "1", "--distributed", mode, "--out-dir", str(out),
           "--backend", "torch", "--save-every", "2", "--device", "cpu"]
    # conftest's TRITON_INTERPRET=1 is for in-process kernel tests; with it, these processes sometimes
    # abort at exit ("terminate called without an active exception") after finishing their work
    env = {**{k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in records] == pytest.approx(losses, rel=1e-5)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["eval"]["samples"] == 2 and "fields" in summary["eval"]
    saved = torch.load(out / "checkpoints/step-0000004/trainer.pt", weights_only=False)
    assert len(saved["rng"]) == 2 and saved["data_position"] == 4


def _bridge_tensors(checkpoint) -> dict:
    from safetensors.torch import load_file

    return load_file(f"{checkpoint}/bridge/model.safetensors")


def test_the_bridge_of_a_run_or_checkpoint_loads_as_a_resampler(pretrain_run, tmp_path):
    config, _ = pretrain_run
    run = config.out_dir
    model = Trainer(tiny_config(tmp_path, "pre", resume=run)).model  # the step-4 model, as cos-train rebuilds it
    for path in (run, f"{run}/checkpoints", f"{run}/checkpoints/step-0000004"):
        loaded = load_bridge(path, backend="torch", dtype=torch.float64)
        assert loaded.config == model.bridge.config and loaded.queries[0].dtype == torch.float64
        saved = _bridge_tensors(f"{run}/checkpoints/step-0000004")
        assert all(torch.equal(v.double(), saved[k].double()) for k, v in loaded.state_dict().items())
        features = [torch.randn(2, 256, 64, dtype=torch.float64) for _ in range(2)]
        torch.testing.assert_close(loaded(features), model.bridge.double()(features), rtol=0, atol=0)
        model.bridge.float()
    step2 = MultiScaleResampler.from_pretrained(f"{run}/checkpoints/step-0000002/bridge")
    assert not torch.equal(step2.queries[0], loaded.queries[0].float())
    ft = Trainer(tiny_config(tmp_path, "ft", stage="finetune", init_from=run, bridge="cos-336", steps=1))
    ft.fit()
    scaled = load_bridge(tmp_path / "ft")
    assert scaled.config == ft.model.bridge.config and scaled.config.windows == [32, 16, 4]
    assert all(torch.equal(a, b) for a, b in zip(scaled.state_dict().values(), ft.model.bridge.state_dict().values()))


def test_checkpoints_from_before_the_epsilon_field_keep_theirs(pretrain_run, tmp_path):
    """Checkpoints written before MLLMConfig.bridge_norm_eps existed (and so before bridge/) trained with
    1e-6: they reload with it."""
    config, _ = pretrain_run
    copy = tmp_path / "step-0000004"
    shutil.copytree(f"{config.out_dir}/checkpoints/step-0000004", copy)
    as_written_before_bridge(copy)
    configs = json.loads((copy / "config.json").read_text())
    assert configs["model"].pop("bridge_norm_eps") == 1e-5
    (copy / "config.json").write_text(json.dumps(configs))
    assert load_bridge(copy).config.norm_eps == 1e-6
    assert Trainer(tiny_config(tmp_path, resume=str(copy))).model.bridge.norm_out.eps == 1e-6
    configs["model"]["bridge"] = "linear"
    (copy / "config.json").write_text(json.dumps(configs))
    with pytest.raises(ValueError, match="trained a 'linear' projector, not a resampler"):
        load_bridge(copy)


def test_reference_choices_port_builds_the_ports_model(tmp_path):
    trainer = Trainer(tiny_config(tmp_path, reference_choices="port", bridge="resampler-80"))
    config = trainer.model.config
    assert (config.layer_convention, config.baseline_levels, config.pos_align_corners) == ("port", 1, True)
    assert trainer.model.vision.feature_layers == [4] and trainer.model.bridge.config.num_levels == 1
    with pytest.raises(ValueError, match="--reference-choices is for stage 'pretrain' only"):
        tiny_config(tmp_path, stage="finetune", init_from=str(tmp_path), reference_choices="port")
