"""CoSConfig: presets, JSON round-trip, validation."""

import dataclasses

import pytest

from cos_kernels import PRESETS, CoSConfig


def test_presets_layouts():
    expected = {
        "cos-80": ((16, 16), 80, 224),
        "cos-336": ((32, 32), 336, 448),
        "cos-528": ((32, 32), 528, 448),
        "cos-1296": ((32, 32), 1296, 448),
        "resampler-80": ((16, 16), 80, 224),
        "resampler-336": ((16, 16), 336, 224),
    }
    assert set(PRESETS) == set(expected)
    for name, (grid, tokens, px) in expected.items():
        cfg = CoSConfig.from_preset(name)
        assert cfg.grid == grid and cfg.num_tokens == tokens and cfg.image_size == (px, px), name
        assert (cfg.vision_dim, cfg.dim, cfg.num_heads, cfg.mlp_ratio, cfg.llm_dim, cfg.num_levels) == (
            1024, 1024, 16, 4.0, 4096, 2)
    assert CoSConfig.from_preset("cos-1296").layout.windows_per_scale == (1, 16, 256)
    assert CoSConfig.from_preset("resampler-336").layout.windows_per_scale == (1,)


def test_unknown_preset_lists_known():
    with pytest.raises(ValueError, match=r"unknown preset 'cos-99'.*cos-1296.*cos-80"):
        CoSConfig.from_preset("cos-99")


def test_json_round_trip(tmp_path):
    cfg = CoSConfig.from_preset("cos-80", dim=64, num_heads=4, windows=[16, (4, 8)], queries=[16, 32])
    assert CoSConfig.from_json(cfg.to_json()) == cfg
    path = tmp_path / "c.json"
    path.write_text(cfg.to_json())
    assert CoSConfig.from_json(path) == cfg
    assert dataclasses.asdict(CoSConfig.from_json(path)) == dataclasses.asdict(cfg)


def test_preset_overrides_and_bad_fields():
    assert CoSConfig.from_preset("cos-80", llm_dim=2048).llm_dim == 2048
    with pytest.raises(ValueError, match=r"unknown CoSConfig fields \['colour'\]"):
        CoSConfig.from_dict({"colour": 3})
    with pytest.raises(ValueError, match="malformed"):
        CoSConfig.from_json("{not json")
    with pytest.raises(ValueError, match=r"dim = 100 must be divisible by num_heads = 16"):
        CoSConfig(dim=100)
    with pytest.raises(ValueError, match="num_levels must be a positive integer"):
        CoSConfig(num_levels=0)
    with pytest.raises(ValueError, match="does not tile the grid"):
        CoSConfig(grid=16, windows=[16, 5], queries=[16, 9])
