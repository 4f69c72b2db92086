"""MultiScaleResampler: structure against a plain re-implementation, inputs, presets, compound token
scaling, checkpoints."""

import json
import re

import pytest
import torch
import torch.nn.functional as F

from cos_kernels import CoSConfig, MultiScaleResampler, available_backends
from oracle import reference_attention, seeded_rng


def small_config(**overrides):
    base = dict(grid=(4, 6), windows=[(4, 6), 2], queries=[3, 12], vision_dim=24, dim=32, num_heads=4,
                llm_dim=40, num_levels=2, mlp_ratio=2.0)
    return CoSConfig(**{**base, **overrides})


def randomize_(model):
    """Random non-trivial values everywhere (biases and norms too), so no parameter is a no-op."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return model


def plain_forward(model, levels):
    """The block structure of SPEC.md written out in float64, scale by scale, with the loop reference."""
    cfg, layout = model.config, model.layout
    H, D = cfg.num_heads, cfg.head_dim
    B = levels[0].shape[0]
    x = [q.double().expand(B, -1, -1) for q in model.queries]

    def ln(t, norm):
        return F.layer_norm(t, t.shape[-1:], norm.weight.double(), norm.bias.double(), cfg.norm_eps)

    def lin(t, layer):
        return F.linear(t, layer.weight.double(), None if layer.bias is None else layer.bias.double())

    for blocks, f in zip(model.levels, levels):
        f = f.double()
        q = torch.cat([lin(ln(xs, b.norm_q), b.to_q) for b, xs in zip(blocks, x)], 1)
        k = torch.stack([lin(ln(f, b.norm_kv), b.to_k) for b in blocks], 1)
        v = torch.stack([lin(ln(f, b.norm_kv), b.to_v) for b in blocks], 1)
        N = f.shape[1]
        o = reference_attention(q.view(B, -1, H, D), k.view(B, -1, N, H, D), v.view(B, -1, N, H, D), layout)
        o = o.reshape(B, -1, cfg.dim).split(list(layout.queries), 1)
        new_x = []
        for b, xs, os in zip(blocks, x, o):
            xs = xs + lin(os, b.to_out)
            new_x.append(xs + lin(F.gelu(lin(ln(xs, b.norm_ffn), b.fc1)), b.fc2))
        x = new_x
    return lin(ln(torch.cat(x, 1), model.norm_out), model.proj_out)


def test_matches_plain_implementation():
    seeded_rng()
    model = randomize_(MultiScaleResampler(small_config(), backend="torch"))
    levels = [torch.randn(2, 24, 24) for _ in range(2)]
    out = model(levels)
    assert out.shape == (2, 15, 40) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), plain_forward(model, levels), rtol=1e-4, atol=1e-5)


def test_input_formats_agree():
    seeded_rng()
    cfg = small_config()
    model = MultiScaleResampler(cfg, backend="torch")
    tokens = [torch.randn(3, 24, 24) for _ in range(2)]
    with_cls = [torch.cat([torch.randn(3, 1, 24), t], 1) for t in tokens]
    maps = [t.transpose(1, 2).reshape(3, 24, 4, 6) for t in tokens]
    ref = model(tokens)
    torch.testing.assert_close(model(with_cls), ref)
    torch.testing.assert_close(model(maps), ref)
    torch.testing.assert_close(model(tuple(tokens)), ref)
    one_level = MultiScaleResampler(small_config(num_levels=1), backend="torch")
    assert one_level(tokens[0]).shape == (3, 15, 40)


def test_gradients_reach_every_parameter():
    seeded_rng()
    model = randomize_(MultiScaleResampler(small_config(), backend="torch"))
    levels = [torch.randn(2, 24, 24, requires_grad=True) for _ in range(2)]
    model(levels).square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(f.grad.abs().sum() > 0 for f in levels)


@pytest.mark.parametrize(
    "features, match",
    [
        (lambda: torch.randn(2, 24, 24), r"num_levels=2: pass a list of 2 feature tensors \(CoSConfig.concat_levels=True also accepts one \(B, N, 48\) tensor .*; got a single tensor of shape \(2, 24, 24\)"),
        (lambda: [torch.randn(2, 24, 24)], "expected 2 feature levels, got a list of 1"),
        (lambda: [torch.randn(2, 23, 24)] * 2, r"features\[0\] has shape \(2, 23, 24\); accepted shapes: \(B, 24, 24\), \(B, 25, 24\) with a leading CLS token, \(B, 24, 4, 6\)"),
        (lambda: [torch.randn(2, 24, 24), torch.randn(2, 24, 6, 4)], r"features\[1\] has shape \(2, 24, 6, 4\)"),
        (lambda: [torch.randn(2, 24, 16)] * 2, r"features\[0\] has shape \(2, 24, 16\)"),
        (lambda: [torch.randn(2, 24, 24), torch.randn(3, 24, 24)], r"features\[1\] has batch 3 but features\[0\] has 2"),
        (lambda: [torch.randn(24, 24)] * 2, r"features\[0\] has shape \(24, 24\)"),
    ],
)
def test_bad_features(features, match):
    model = MultiScaleResampler(small_config(), backend="torch")
    with pytest.raises(ValueError, match=match):
        model(features())


def test_cls_rejected_when_config_keeps_it():
    model = MultiScaleResampler(small_config(drop_cls=False), backend="torch")
    with pytest.raises(ValueError, match=r"accepted shapes: \(B, 24, 24\), \(B, 24, 4, 6\)$"):
        model([torch.randn(1, 25, 24)] * 2)


def test_bad_constructor_arguments():
    with pytest.raises(TypeError, match="config must be a CoSConfig, got dict"):
        MultiScaleResampler({"grid": 16})
    with pytest.raises(ValueError, match="backend must be one of .* got 'fast'"):
        MultiScaleResampler(small_config(), backend="fast")


def test_cos80_parameter_count_and_presets():
    with torch.device("meta"):
        counts = {name: sum(p.numel() for p in MultiScaleResampler(CoSConfig.from_preset(name)).parameters())
                  for name in ("cos-80", "cos-1296", "resampler-336")}
    block = 3 * 1024 * 1024 + (1024 * 1024 + 1024) + 2 * (4096 * 1024) + 4096 + 1024 + 3 * 2048
    head = 2048 + 1024 * 4096 + 4096
    assert counts["cos-80"] == 4 * block + 80 * 1024 + head
    assert 54e6 < counts["cos-80"] < 56e6
    assert counts["cos-1296"] == 6 * block + 1296 * 1024 + head
    assert counts["resampler-336"] == 2 * block + 336 * 1024 + head
    model = MultiScaleResampler(CoSConfig.from_preset("cos-80", vision_dim=32, dim=32, num_heads=2, llm_dim=48))
    assert model([torch.randn(1, 257, 32)] * 2).shape == (1, 80, 48)


def _scale_pair():
    """A grid-4 resampler and its scale-up to grid 8 with scales [global, same-area x2 queries, finer]."""
    seeded_rng()
    cfg = small_config(grid=4, windows=[4, 2], queries=[3, 8])  # 4 windows of 2x2, 2 queries each
    old = randomize_(MultiScaleResampler(cfg, backend="torch"))
    new = old.scale_up(grid=8, windows=[8, 4, 2], queries=[3, 16, 32], source=[0, 1, 1])
    return old, new


def test_scale_up_reproduces_source_outputs():
    old, new = _scale_pair()
    levels = [torch.randn(2, 24, 4, 4) for _ in range(2)]
    up = [F.interpolate(f, scale_factor=2, mode="nearest") for f in levels]
    with torch.no_grad():
        a, b = old(levels), new(up)
    assert b.shape == (2, 3 + 16 + 32, 40)
    # New scale 0: one 8x8 window = old scale 0's 4x4 window: identical outputs.
    torch.testing.assert_close(b[:, :3], a[:, :3], rtol=1e-5, atol=1e-5)
    # New scale 1: 4x4 windows on grid 8 = old 2x2 windows on grid 4, 4 queries per window = each old
    # query twice, in order.
    torch.testing.assert_close(b[:, 3:19], a[:, 3:11].repeat_interleave(2, dim=1), rtol=1e-5, atol=1e-5)
    # New scale 2 covers smaller areas: it must differ from any copy of the source outputs.
    assert not torch.allclose(b[:, 19:], a[:, 3:11].repeat_interleave(4, dim=1), atol=1e-3)


def test_scale_up_copies_weights_and_maps_queries():
    old, new = _scale_pair()
    for lvl_new, lvl_old in zip(new.levels, old.levels):
        for i, j in enumerate([0, 1, 1]):
            for (n1, p1), (n2, p2) in zip(lvl_new[i].named_parameters(), lvl_old[j].named_parameters()):
                assert n1 == n2 and torch.equal(p1, p2)
    oq = old.queries[1].view(2, 2, 2, -1)  # (window row, window col, query, dim)
    nq = new.queries[2].view(4, 4, 2, -1)  # 2x2 windows on grid 8: each inside old window (r//2, c//2)
    for r in range(4):
        for c in range(4):
            assert torch.equal(nq[r, c], oq[r // 2, c // 2])
    assert torch.equal(new.proj_out.weight, old.proj_out.weight)


def test_scale_up_80_to_1296():
    with torch.device("meta"):
        old = MultiScaleResampler(CoSConfig.from_preset("cos-80"))
        new = old.scale_up(grid=32, windows=[32, 8, 2], queries=[16, 256, 1024], source=[0, 0, 1])
    assert new.config.layout == CoSConfig.from_preset("cos-1296").layout


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(grid=8, windows=[8, 4], queries=[3, 8], source=[0]), "one old scale per new scale"),
        (dict(grid=8, windows=[8, 4], queries=[3, 8], source=[0, 2]), r"source\[1\] = 2 is not a scale"),
        (dict(grid=6, windows=[6, 2], queries=[3, 18], source=[0, 1]), r"new scale 1 \(window \(2, 2\) on grid \(6, 6\), a 3x3 window grid\) cannot be mapped onto source scale 1 .* a 2x2 window grid"),
        (dict(grid=8, windows=[8, 4], queries=[3, 12], source=[0, 1]), r"new scale 1 has 3 queries per window, not a multiple of source scale 1's 2"),
        (dict(grid=8, windows=[8, 3], queries=[3, 8], source=[0, 1]), "does not tile the grid"),
        (dict(grid=8, windows=[8, 4], queries=[3, 8], source=[0, "1"]), r"source\[1\] = '1' is not a scale"),
    ],
)
def test_scale_up_errors(kwargs, match):
    old = MultiScaleResampler(small_config(grid=4, windows=[4, 2], queries=[3, 8]), backend="torch")
    with pytest.raises(ValueError, match=match):
        old.scale_up(**kwargs)


def test_scale_up_accepts_numpy_integers():
    np = pytest.importorskip("numpy")
    old, new = _scale_pair()
    same = old.scale_up(grid=np.int64(8), windows=np.array([8, 4, 2]), queries=[np.int32(3), np.int64(16), 32],
                        source=[np.int64(0), np.int32(1), np.int64(1)])
    assert same.config == new.config and type(same.config.windows[0]) is int
    assert all(torch.equal(a, b) for a, b in zip(same.state_dict().values(), new.state_dict().values()))
    with pytest.raises(ValueError, match=r"source\[0\] = np.True_ is not a scale"):
        old.scale_up(grid=8, windows=[8, 4], queries=[3, 8], source=[np.bool_(True), 1])


def test_save_load_round_trip(tmp_path):
    seeded_rng()
    model = randomize_(MultiScaleResampler(small_config(), backend="torch"))
    model.save_pretrained(tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.json", "model.safetensors"]
    loaded = MultiScaleResampler.from_pretrained(tmp_path / "ckpt", backend="torch")
    assert loaded.config == model.config
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)
    levels = [torch.randn(2, 24, 24) for _ in range(2)]
    torch.testing.assert_close(loaded(levels), model(levels), rtol=0, atol=0)
    model.save_pretrained(tmp_path / "ckpt")  # overwriting in place works and leaves no temp files
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.json", "model.safetensors"]


def test_load_rejects_layout_mismatch(tmp_path):
    MultiScaleResampler(small_config(), backend="torch").save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["queries"] = [3, 24]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"holds weights for WindowLayout\(grid=\[4, 6\], windows=\[\[4, 6\], 2\], queries=\[3, 12\]\) but .*config.json describes .*queries=\[3, 24\]"):
        MultiScaleResampler.from_pretrained(tmp_path)
    # from_pretrained names config.json's field (test_load_errors.py); from_state_dict the tensors
    state = MultiScaleResampler(small_config(), backend="torch").state_dict()
    with pytest.raises(ValueError, match=r"tensor 'queries.0' has shape \(3, 32\) but the config .* expects \(3, 48\)"):
        MultiScaleResampler.from_state_dict(small_config(dim=48), state)
    with pytest.raises(ValueError, match=r"unexpected \['levels.1.0.fc1.bias'"):
        MultiScaleResampler.from_state_dict(small_config(num_levels=1), state)
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        MultiScaleResampler.from_pretrained(tmp_path / "nothing")


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("fused", [True, False])
def test_empty_batch(fused, backend):
    if backend not in available_backends("cpu"):
        pytest.skip(f"the {backend} backend does not run on the CPU here")
    model = randomize_(MultiScaleResampler(small_config(num_heads=2), backend=backend, fused=fused))  # D = 16
    levels = [torch.randn(0, 24, 24, requires_grad=True), torch.randn(0, 24, 4, 6, requires_grad=True)]
    out = model(levels)
    assert out.shape == (0, 15, 40) and out.dtype == torch.float32
    out.sum().backward()
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())
    assert levels[0].grad.shape == (0, 24, 24) and levels[1].grad.shape == (0, 24, 4, 6)


@pytest.mark.parametrize(
    "dtype, match",
    [
        (torch.int64, r"features\[1\] must be a floating-point tensor, got dtype torch.int64"),
        (torch.bool, r"features\[1\] must be a floating-point tensor, got dtype torch.bool"),
        (torch.complex64, r"features\[1\] must be a floating-point tensor, got dtype torch.complex64"),
        (torch.float64, r"features\[1\] has dtype torch.float64 but the resampler's parameters are "
                        r"torch.float32: cast the features \(features.to\(torch.float32\)\) or run under torch.autocast"),
        (torch.bfloat16, r"features\[1\] has dtype torch.bfloat16 but the resampler's parameters are torch.float32"),
    ],
)
def test_feature_dtypes_refused(dtype, match):
    model = MultiScaleResampler(small_config(), backend="torch")
    levels = [torch.randn(2, 24, 24), torch.randn(2, 24, 24).to(dtype)]
    with pytest.raises(TypeError, match=match):
        model(levels)


@pytest.mark.parametrize("fused", [True, False])
def test_feature_dtype_under_autocast(fused):
    seeded_rng()
    model = MultiScaleResampler(small_config(), backend="torch", fused=fused)
    levels = [torch.randn(2, 24, 24) for _ in range(2)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model([f.bfloat16() for f in levels])
    assert out.shape == (2, 15, 40) and out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), model(levels), rtol=0.1, atol=0.1)


def test_features_on_another_device():
    with torch.device("meta"):
        model = MultiScaleResampler(small_config(), backend="torch")
    with pytest.raises(ValueError, match=r"features\[0\] is on cpu but the resampler's parameters are on meta"):
        model([torch.randn(2, 24, 24)] * 2)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(fused="no"), TypeError, r"fused must be a bool \(True or False\), got 'no' \(str\)"),
        (dict(fused=1), TypeError, r"fused must be a bool \(True or False\), got 1 \(int\)"),
        (dict(backend=None), TypeError, r"backend must be a str, one of \['auto', 'torch'.*got None \(NoneType\)"),
        (dict(backend=["torch"]), TypeError, r"backend must be a str.*got \['torch'\] \(list\)"),
    ],
)
def test_fused_and_backend_types(kwargs, error, match):
    with pytest.raises(error, match=match):
        MultiScaleResampler(small_config(), **kwargs)


@pytest.mark.parametrize(
    "overrides, error, match",
    [
        (dict(mlp_ratio="4"), TypeError, r"CoSConfig.mlp_ratio must be a finite number > 0, got '4' \(str\)"),
        (dict(mlp_ratio=True), TypeError, r"CoSConfig.mlp_ratio must be a finite number > 0, got True \(bool\)"),
        (dict(mlp_ratio=0), ValueError, r"CoSConfig.mlp_ratio must be a finite number > 0, got 0$"),
        (dict(mlp_ratio=0.001), ValueError, r"CoSConfig.mlp_ratio = 0.001 gives hidden_dim = int\(dim \* mlp_ratio\) = 0"),
        (dict(norm_eps=-1), ValueError, r"CoSConfig.norm_eps must be a finite number > 0, got -1$"),
        (dict(norm_eps=float("nan")), ValueError, r"CoSConfig.norm_eps must be a finite number > 0, got nan"),
        (dict(norm_eps="1e-6"), TypeError, r"CoSConfig.norm_eps must be a finite number > 0, got '1e-6' \(str\)"),
        (dict(init_std=-0.02), ValueError, r"CoSConfig.init_std must be a finite number > 0, got -0.02"),
        (dict(init_std=float("inf")), ValueError, r"CoSConfig.init_std must be a finite number > 0, got inf"),
        (dict(drop_cls="no"), TypeError, r"CoSConfig.drop_cls must be a bool \(True or False\), got 'no' \(str\)"),
        (dict(drop_cls=1), TypeError, r"CoSConfig.drop_cls must be a bool \(True or False\), got 1 \(int\)"),
        (dict(windows=16), TypeError, r"CoSConfig.windows must be a list or tuple with one entry per scale, got 16 \(int\)"),
        (dict(windows="4"), TypeError, r"CoSConfig.windows must be a list or tuple .* got '4' \(str\)"),
        (dict(queries=15), TypeError, r"CoSConfig.queries must be a list or tuple with one entry per scale, got 15 \(int\)"),
        (dict(windows=[(4, 6), 2.0]), TypeError, r"CoSConfig.windows\[1\] must be a positive integer, got 2.0 \(float\)"),
        (dict(windows=[(4, 6.0), 2]), TypeError, r"CoSConfig.windows\[0\]\[1\] must be a positive integer, got 6.0"),
        (dict(queries=[3, "12"]), TypeError, r"CoSConfig.queries\[1\] must be a positive integer, got '12' \(str\)"),
        (dict(queries=[3, 0]), ValueError, r"CoSConfig.queries\[1\] must be a positive integer, got 0"),
        (dict(grid=4.0), TypeError, r"CoSConfig.grid must be a positive integer, got 4.0 \(float\)"),
        (dict(grid=(4, -6)), ValueError, r"CoSConfig.grid\[1\] must be a positive integer, got -6"),
        (dict(patch_size=14.0), TypeError, r"CoSConfig.patch_size must be a positive integer, got 14.0 \(float\)"),
        (dict(vision_dim="24"), TypeError, r"CoSConfig.vision_dim must be a positive integer, got '24' \(str\)"),
        (dict(dim=True), TypeError, r"CoSConfig.dim must be a positive integer, got True \(bool\)"),
        (dict(num_heads=0), ValueError, r"CoSConfig.num_heads must be a positive integer, got 0"),
        (dict(llm_dim=-40), ValueError, r"CoSConfig.llm_dim must be a positive integer, got -40"),
        (dict(num_levels=2.5), TypeError, r"CoSConfig.num_levels must be a positive integer, got 2.5 \(float\)"),
    ],
)
def test_config_field_errors(overrides, error, match):
    with pytest.raises(error, match=match):
        small_config(**overrides)


def test_config_accepts_numpy_scalars():
    np = pytest.importorskip("numpy")
    cfg = small_config(grid=(np.int64(4), np.int32(6)), windows=[(4, 6), np.int64(2)], queries=(3, np.int64(12)),
                       dim=np.int64(32), mlp_ratio=np.float32(2.0), norm_eps=np.float64(1e-5), init_std=1)
    assert cfg == small_config(norm_eps=1e-5, init_std=1.0)
    assert [type(x) for x in (cfg.dim, cfg.windows[1], cfg.queries[1], cfg.mlp_ratio, cfg.init_std)] == [
        int, int, int, float, float]
    assert CoSConfig.from_json(cfg.to_json()) == cfg


def test_from_json_text_or_path(tmp_path):
    cfg = small_config()
    assert CoSConfig.from_json("  \n" + cfg.to_json()) == cfg
    with pytest.raises(ValueError, match="CoSConfig JSON must be a JSON object .* got list"):
        CoSConfig.from_json("[1,2]")
    with pytest.raises(ValueError, match="malformed"):
        CoSConfig.from_json(" [1, 2")
    (tmp_path / "c.json").write_text(cfg.to_json())
    assert CoSConfig.from_json(tmp_path / "c.json") == cfg
    assert CoSConfig.from_json(str(tmp_path / "c.json")) == cfg
    missing = str(tmp_path / "missing.json")
    with pytest.raises(FileNotFoundError, match=re.escape(f"'{missing}' is neither JSON text") + ".* nor an existing file"):
        CoSConfig.from_json(missing)
    with pytest.raises(TypeError, match="JSON text or a file path .* got dict"):
        CoSConfig.from_json(cfg.to_dict())


def test_reference_defaults_eps_and_init():
    """SPEC (the public port's): LayerNorm eps 1e-5; N(0, 0.02^2) cut at +-2 absolute, so in practice
    uncut (a cut at +-2 sigma gave std 0.0176 and nothing beyond 0.04)."""
    config = CoSConfig(grid=16, windows=[16, 4], queries=[16, 64], vision_dim=256, dim=256, num_heads=4, llm_dim=256)
    model = MultiScaleResampler(config)
    assert config.norm_eps == 1e-5
    assert {m.eps for m in model.modules() if isinstance(m, torch.nn.LayerNorm)} == {1e-5}
    weights = torch.cat([m.weight.flatten() for m in model.modules() if isinstance(m, torch.nn.Linear)])
    queries = torch.cat([q.flatten() for q in model.queries])
    for values in (weights, queries):
        assert abs(values.std().item() - 0.02) < 0.02 * 0.03 and abs(values.mean().item()) < 1e-3
    assert (weights.abs() > 0.045).float().mean() > 0.01  # a 2-sigma cut would leave none
    assert all(m.bias.abs().max() == 0 for m in model.modules() if isinstance(m, torch.nn.Linear) and m.bias is not None)


def test_a_saved_model_keeps_its_epsilon(tmp_path):
    old = randomize_(MultiScaleResampler(small_config(norm_eps=1e-6), backend="torch"))
    old.save_pretrained(tmp_path)
    loaded = MultiScaleResampler.from_pretrained(tmp_path, backend="torch")
    assert loaded.config.norm_eps == 1e-6 and loaded.norm_out.eps == 1e-6
    f = [torch.randn(2, 24, 24) for _ in range(2)]
    torch.testing.assert_close(loaded(f), old(f), rtol=0, atol=0)


@pytest.mark.parametrize("fused", [True, False])
def test_concatenated_levels_equal_the_list(fused):
    """LLaVA's form: every level side by side on the channel axis, with or without the CLS token."""
    model = randomize_(MultiScaleResampler(small_config(concat_levels=True), backend="torch", fused=fused))
    levels = [torch.randn(2, 25, 24) for _ in range(2)]
    want = model(levels)
    torch.testing.assert_close(model(torch.cat(levels, dim=-1)), want, rtol=0, atol=0)
    torch.testing.assert_close(model(torch.cat(levels, dim=-1)[:, 1:]), want, rtol=0, atol=0)
    assert not torch.equal(model(levels[::-1]), want)  # level order matters: the split is checked
    with pytest.raises(ValueError, match=r"pass a list of 2 feature tensors or one \(B, N, 48\) tensor"):
        model(torch.randn(2, 24, 40))
    with pytest.raises(TypeError, match="CoSConfig.concat_levels must be a bool"):
        small_config(concat_levels="yes")


def test_from_pretrained_dtype_and_device(tmp_path):
    model = randomize_(MultiScaleResampler(small_config(), backend="torch")).to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    kept = MultiScaleResampler.from_pretrained(tmp_path)
    assert {p.dtype for p in kept.parameters()} == {torch.bfloat16}  # the saved dtype, not fp32
    wide = MultiScaleResampler.from_pretrained(tmp_path, dtype=torch.float64, device=torch.device("cpu"))
    assert {p.dtype for p in wide.parameters()} == {torch.float64} and wide.queries[0].device.type == "cpu"
    for a, b in zip(model.parameters(), wide.parameters()):
        assert torch.equal(a.double(), b)
    with pytest.raises(TypeError, match="dtype must be a floating-point torch.dtype or None, got torch.int64"):
        MultiScaleResampler.from_pretrained(tmp_path, dtype=torch.int64)
    with pytest.raises(TypeError, match="device must be a torch.device, a str such as 'cuda:0', or None, got 'gpu0'"):
        MultiScaleResampler.from_pretrained(tmp_path, device="gpu0")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="neither a directory save_pretrained wrote"):
        MultiScaleResampler.from_pretrained(tmp_path / "empty")
