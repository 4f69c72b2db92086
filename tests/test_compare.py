"""cos-compare: both recipes end to end at a minimal size, the scale-up identity on the recipe's own
models, the time ratio from the measured stage times, seeds, the tower pre-training and the probe."""

import copy
import json
import shutil

import pytest
import torch

from cos_kernels.compare.cli import build_parser, config_from_args, main
from cos_kernels.compare.config import CompareConfig
from cos_kernels.compare.probe import cell_features
from cos_kernels.compare.report import aggregate
from cos_kernels.compare.run import COS, recipes, stage_configs
from cos_kernels.compare.tower import TowerRecipe, patch_targets, pretrain_tower
from cos_kernels.mllm import CaptionCollator, CoSMLLM, MLLMConfig, VisionTower
from cos_kernels.mllm.synthetic import COLOURS, SHAPES, label_maps, make_scene, render_scene
from cos_kernels.train.checkpoint import list_checkpoints, load_weights, read_configs
from cos_kernels.train.data import build_train_dataset
from cos_kernels.train.trainer import Trainer

MINIMAL = ["--seeds", "0", "1", "--pretrain-steps", "3", "--finetune-steps", "2", "--global-batch", "2",
           "--eval-samples", "2", "--tower-steps", "2", "--tower-batch", "2", "--probe-scenes", "6",
           "--llm-warmup-steps", "2", "--train-samples", "16", "--log-every", "1", "--backend", "torch"]


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    """One minimal comparison: (args, output folder, compare.json, printed output)."""
    root = tmp_path_factory.mktemp("compare")
    args = [*MINIMAL, "--out-dir", str(root / "out"), "--cache-dir", str(root / "cache")]
    assert main(args) == 0
    return args, root / "out", json.loads((root / "out" / "compare.json").read_text())


def test_end_to_end_writes_the_table_json_and_plot(compared, capsys):
    _, out, report = compared
    assert {r["recipe"] for r in report["runs"]} == {COS, "resampler-336"}
    assert sorted(r["seed"] for r in report["runs"]) == [0, 0, 1, 1]
    table = (out / "compare.md").read_text()
    assert "| chain-of-sight (cos-80 @ 64 px -> cos-336 @ 128 px) | 80 |" in table
    assert "| resampler-336 (resampler-336 @ 64 px -> resampler-336 @ 128 px) | 336 |" in table
    assert "Stage-1 time ratio Chain-of-Sight / resampler-336" in table
    assert "| stage-1 time / resampler-336's |" in table
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for run in report["runs"]:  # the CoS run trains and scores 80 tokens in stage 1, 336 in stage 2
        fine = run["finetune"]
        assert run["pretrain"]["tokens_per_sample"]["visual"] == (80 if run["recipe"] == COS else 336)
        assert fine["tokens_per_sample"]["visual"] == 336 and fine["image_size"] == 128
        assert set(fine["eval"]["fields"]) == {"count", "background", "colour", "kind", "position"}
        assert [s for s, _ in run["pretrain"]["curve"]] == [1, 2, 3]
    assert set(report["components"]["probe"]) == {"64", "128"}


def test_the_papers_1296_tokens_and_a_projector_baseline(tmp_path):
    args = [*MINIMAL, "--seeds", "3", "--pretrain-steps", "1", "--finetune-steps", "1", "--eval-samples", "1",
            "--scaling", "1296", "--baselines", "linear", "--out-dir", str(tmp_path / "out"),
            "--cache-dir", str(tmp_path / "cache")]
    assert main(args) == 0
    runs = {r["recipe"]: r for r in json.loads((tmp_path / "out" / "compare.json").read_text())["runs"]}
    tokens = {name: (r["pretrain"]["tokens_per_sample"]["visual"], r["finetune"]["tokens_per_sample"]["visual"])
              for name, r in runs.items()}
    assert tokens == {COS: (80, 1296), "linear": (16 * 16, 32 * 32)}  # one token per patch at 64 and 128 px
    assert "Stage-1 time ratio Chain-of-Sight / linear" in (tmp_path / "out" / "compare.md").read_text()


def test_time_ratio_is_the_measured_stage_times(compared):
    _, out, report = compared
    times = {}
    for recipe in (COS, "resampler-336"):  # read back from each run's own summary.json
        times[recipe] = [json.loads((out / recipe / f"seed-{s}" / "pretrain" / "summary.json").read_text())["train_time_s"]
                         for s in (0, 1)]
    baseline = report["summary"]["baselines"]["resampler-336"]
    expected = (sum(times[COS]) / 2) / (sum(times["resampler-336"]) / 2)
    assert baseline["stage1_time_ratio"] == pytest.approx(expected, rel=1e-12)
    assert baseline["per_seed_ratio"]["values"] == pytest.approx([c / b for c, b in zip(times[COS], times["resampler-336"])])
    assert f"{expected:.2f}** (per seed" in (out / "compare.md").read_text()


def _run(recipe, seed, stage="pretrain", time_s=1.0, loss=1.0, colour=0.5):
    fields = {f: {"accuracy": colour, "nll": 0.1} for f in ("count", "background", "colour", "kind", "position")}
    stage_result = {"train_time_s": time_s, "samples_per_s": 8 / time_s, "tokens_per_sample": {"visual": 80, "llm": 170.0},
                    "eval": {"caption_loss": loss, "exact_match": 0.1, "fields": fields}}
    return {"recipe": recipe, "seed": seed, "pretrain": stage_result, "finetune": copy.deepcopy(stage_result)}


def test_aggregate_ratio_spread_and_verdicts():
    runs = [_run(COS, 0, time_s=2.0, loss=0.50), _run("resampler-336", 0, time_s=5.0, loss=0.52),
            _run(COS, 1, time_s=3.0, loss=0.54), _run("resampler-336", 1, time_s=5.0, loss=0.48)]
    summary = aggregate(runs)
    base = summary["baselines"]["resampler-336"]
    assert base["stage1_time_ratio"] == pytest.approx(2.5 / 5.0)
    assert base["per_seed_ratio"]["values"] == pytest.approx([0.4, 0.6])
    assert summary["recipes"][COS]["caption_loss"]["std"] == pytest.approx(0.04 / 2**0.5)
    assert base["verdicts"]["caption_loss"].startswith("within the baseline's seed spread")
    worse = aggregate([_run(COS, 0, loss=0.9), _run("resampler-336", 0, loss=0.5), _run(COS, 1, loss=0.9),
                       _run("resampler-336", 1, loss=0.52)])
    assert worse["baselines"]["resampler-336"]["verdicts"]["caption_loss"].startswith("worse")
    assert "chance" not in base["verdicts"]["colour"]  # 50% against chance 20%
    at_chance = aggregate([_run(COS, 0, colour=0.21), _run("resampler-336", 0, colour=0.19)])
    assert at_chance["baselines"]["resampler-336"]["verdicts"]["colour"].endswith(
        "both at chance (20%): neither recipe learnt this field here")


def test_seeds_change_the_runs_and_a_rerun_reuses_them(compared, capsys):
    args, out, report = compared
    by = {(r["recipe"], r["seed"]): r for r in report["runs"]}
    for recipe in (COS, "resampler-336"):
        assert by[(recipe, 0)]["pretrain"]["curve"] != by[(recipe, 1)]["pretrain"]["curve"]
        assert by[(recipe, 0)]["finetune"]["eval"] != by[(recipe, 1)]["finetune"]["eval"]
    capsys.readouterr()
    assert main(args) == 0  # every run is finished: reused, not retrained
    assert capsys.readouterr().out.count("reusing the finished run") == 4
    assert json.loads((out / "compare.json").read_text())["runs"] == report["runs"]


def test_a_stopped_comparison_continues_where_it_stopped(compared, capsys):
    """A run whose stage 2 never finished (its record and stage-2 folder gone): stage 1 resumes from its
    final checkpoint (nothing retrained, its measured time kept), stage 2 runs again."""
    args, out, report = compared
    run_dir = out / "resampler-336" / "seed-1"
    (run_dir / "run.json").unlink()
    shutil.rmtree(run_dir / "finetune")
    capsys.readouterr()
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert printed.count("reusing the finished run") == 3
    assert f"resumed from {run_dir / 'pretrain' / 'checkpoints' / 'step-0000003'} at step 3" in printed
    again = {(r["recipe"], r["seed"]): r for r in json.loads((out / "compare.json").read_text())["runs"]}
    before = {(r["recipe"], r["seed"]): r for r in report["runs"]}
    assert again[("resampler-336", 1)]["pretrain"]["train_time_s"] == before[("resampler-336", 1)]["pretrain"]["train_time_s"]
    assert again[("resampler-336", 1)]["finetune"]["curve"] == before[("resampler-336", 1)]["finetune"]["curve"]


def _nearest_up(features: list[torch.Tensor], grid: int) -> list[torch.Tensor]:
    """Each level (B, grid**2, C) nearest-upsampled to (B, (2 grid)**2, C)."""
    out = []
    for f in features:
        B, _, C = f.shape
        f = f.view(B, grid, grid, C).repeat_interleave(2, 1).repeat_interleave(2, 2)
        out.append(f.reshape(B, 4 * grid * grid, C))
    return out


@pytest.mark.parametrize("recipe_name, identical", [(COS, 16), ("resampler-336", 336)])
def test_scaled_up_model_reproduces_the_pretrained_one_where_windows_coincide(compared, recipe_name, identical):
    """The recipe's stage-2 model as the Trainer builds it from the stage-1 checkpoint: on features
    nearest-upsampled to the doubled grid, every scale whose windows cover the same image areas gives
    the pre-trained tokens (cos-80 -> cos-336: the 16 global ones; resampler-336: all 336, and so the
    same first loss); the finer scales differ."""
    args, out, report = compared
    config = _config(args)
    recipe = next(r for r in recipes(config) if r.name == recipe_name)
    pre_config, fine_config = stage_configs(config, recipe, 0, report["components"])
    checkpoint = list_checkpoints(out / recipe_name / "seed-0" / "pretrain" / "checkpoints")[-1]
    pretrained = CoSMLLM(MLLMConfig.from_dict(read_configs(checkpoint)["model"]), backend="torch").eval()
    load_weights(checkpoint, pretrained)
    fine_config.out_dir = str(out / "identity-check" / recipe_name)
    scaled = Trainer(fine_config).model.eval()
    data = build_train_dataset(fine_config, 64)
    batch = CaptionCollator(pretrained.tokenizer)([data[i] for i in range(2)])
    with torch.no_grad():
        features = pretrained.vision(batch["pixel_values"])
        old = pretrained.bridge(features)
        new = scaled.bridge(_nearest_up(features, 16))
    assert new.shape[1] == 336
    torch.testing.assert_close(new[:, :identical], old[:, :identical], rtol=1e-5, atol=1e-5)
    if identical < new.shape[1]:
        assert not torch.allclose(new[:, identical:identical + 64], old[:, identical:], atol=1e-3)
    else:
        with torch.no_grad():
            ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
            torch.testing.assert_close(scaled.caption_loss(new, ids, mask, labels)[0],
                                       pretrained.caption_loss(old, ids, mask, labels)[0], rtol=1e-5, atol=1e-5)


def _config(args: list[str]) -> CompareConfig:
    """The CompareConfig of a cos-compare argument list."""
    parsed = vars(build_parser().parse_args(args))
    parsed.pop("debug"), parsed.pop("threads")
    return config_from_args(parsed)


def test_patch_targets_are_the_pixel_fractions():
    scene = make_scene(5, 11)
    targets = patch_targets([scene], 32, 4)
    kind, colour = label_maps(scene, 32)
    for name, maps, classes in (("kind", kind, len(SHAPES) + 1), ("colour", colour, len(COLOURS) + 1)):
        for p in range(64):  # explicit loop over the 8x8 patches
            r, c = divmod(p, 8)
            block = maps[4 * r:4 * r + 4, 4 * c:4 * c + 4].flatten().tolist()
            expected = [block.count(k) / 16 for k in range(classes)]
            assert targets[name][0, p].tolist() == pytest.approx(expected)
    image = render_scene(scene, 32)
    for s in scene.shapes:  # the label maps mark exactly the pixels drawn in each shape's colour
        drawn = (image == torch.tensor(COLOURS[s.colour]).view(3, 1, 1)).all(0)
        assert torch.equal(drawn, colour == list(COLOURS).index(s.colour) + 1)


def test_tower_pretraining_learns_and_is_cached(tmp_path):
    config = MLLMConfig.from_preset("tiny", vision_layers=2, feature_layers=[1, 2])
    logs = []
    recipe = TowerRecipe(steps=6, batch=4, lr=3e-3, resolutions=(32,))
    path = pretrain_tower(config, tmp_path, recipe, log=logs.append)
    random_tower = VisionTower(MLLMConfig.from_preset("tiny", vision_layers=2, feature_layers=[2], image_size=32))
    trained = VisionTower(MLLMConfig.from_preset("tiny", vision_path=path, feature_layers=[2], image_size=32))
    assert not torch.equal(trained.vit.embeddings.patch_embedding.weight, random_tower.vit.embeddings.patch_embedding.weight)
    first, last = (float(line.split("loss ")[1].split(",")[0]) for line in (logs[1], logs[-2]))
    assert last < first
    again = []
    assert pretrain_tower(config, tmp_path, recipe, log=again.append) == path
    assert again == [f"vision tower: reusing {path}"]
    other = pretrain_tower(config, tmp_path, TowerRecipe(steps=1, batch=4, resolutions=(32,)), log=again.append)
    assert other != path  # another recipe: another cache entry
    with pytest.raises(ValueError, match="not a multiple of the patch size 4"):
        pretrain_tower(config, tmp_path, TowerRecipe(steps=1, batch=4, resolutions=(30,)))


def test_cell_features_average_the_patches_of_each_cell():
    tower = VisionTower(MLLMConfig.from_preset("tiny", vision_layers=2, feature_layers=[2], image_size=48))
    scenes = [make_scene(1, i) for i in range(3)]
    got = cell_features(tower, scenes, 48)
    with torch.no_grad():
        features = tower(torch.stack([render_scene(s, 48) for s in scenes]))[-1]
    grid = 12  # patch centres (j + 0.5) / 12: columns 0-3 in band 0, 4-7 in band 1, 8-11 in band 2
    for cell in range(9):
        r, c = divmod(cell, 3)
        patches = [4 * r * grid + i * grid + 4 * c + j for i in range(4) for j in range(4)]
        torch.testing.assert_close(got[:, cell], features[:, patches].mean(1))


@pytest.mark.parametrize("options, error, match", [
    ({"baselines": ["cos-80"]}, ValueError, "baselines must be among"),
    ({"seeds": [0, 0]}, ValueError, "must not repeat"),
    ({"pretrain_steps": 0}, ValueError, "pretrain_steps must be a positive integer"),
    ({"finetune_lr": float("nan")}, ValueError, "finetune_lr must be a finite number"),
    ({"scaling": "528"}, ValueError, r"scaling must be one of \['336', '1296'\]"),
    ({"seeds": "0"}, TypeError, "seeds must be a non-empty list of ints"),
    ({"tower_batch": 2.5}, TypeError, "tower_batch must be an integer"),
])
def test_bad_options_are_refused(options, error, match):
    with pytest.raises(error, match=match):
        CompareConfig(**options)


def test_cli_reports_errors_in_one_line(tmp_path, capsys):
    assert main(["--preset", "cpu", "--seeds", "1", "1", "--out-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cos-compare: error: CompareConfig: baselines") and err.count("\n") == 1
    with pytest.raises(SystemExit):
        main(["--preset", "tpu"])
