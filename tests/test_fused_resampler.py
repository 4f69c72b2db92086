"""The resampler's fused path (shared normalisation, one folded K/V product, level-1 queries once)
against the plain reference path: same outputs and gradients on every preset and random configs."""

import pytest
import torch

from cos_kernels import PRESETS, CoSConfig, MultiScaleResampler
from oracle import random_layout, seeded_rng


def assert_rel_close(got, want, name, rtol=1e-5):
    """max |got - want| <= rtol * max |want| (fp32: the two paths only round differently)."""
    err, size = (got - want).abs().max().item(), want.abs().max().item()
    assert err <= rtol * size, f"{name}: max error {err:.3e} > {rtol:.0e} x max {size:.3e}"


def fused_and_plain(config):
    fused = MultiScaleResampler(config, backend="torch", fused=True)
    with torch.no_grad():
        for p in fused.parameters():  # non-trivial norms and biases too; matrices keep the init's scale
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.2)
            elif config.dim <= 64:
                p.copy_(torch.randn_like(p) * 0.2)
    plain = MultiScaleResampler(config, backend="torch", fused=False)
    plain.load_state_dict(fused.state_dict())
    return fused, plain


def check_same_function(config, batch):
    fused, plain = fused_and_plain(config)
    gh, gw = config.grid
    feats = [torch.randn(batch, gh * gw + 1, config.vision_dim) for _ in range(config.num_levels)]
    feats_f = [f.clone().requires_grad_(True) for f in feats]
    feats_p = [f.clone().requires_grad_(True) for f in feats]
    out_f, out_p = fused(feats_f), plain(feats_p)
    assert_rel_close(out_f, out_p, "output")
    grad = torch.randn_like(out_p)
    out_f.backward(grad)
    out_p.backward(grad)
    for (name, pf), pp in zip(fused.named_parameters(), plain.parameters()):
        assert_rel_close(pf.grad, pp.grad, f"grad of {name}")
    for i, (a, b) in enumerate(zip(feats_f, feats_p)):
        assert_rel_close(a.grad[:, 1:], b.grad[:, 1:], f"grad of features[{i}]")


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets(preset):
    seeded_rng()
    # The preset's layout and depth, narrow widths (vision width unlike the resampler's) to stay fast.
    config = CoSConfig.from_preset(preset, vision_dim=40, dim=32, num_heads=2, llm_dim=24)
    check_same_function(config, batch=2)


@pytest.mark.parametrize("case", range(4))
def test_random_configs(case):
    rng = seeded_rng()
    layout = random_layout(rng, max_scales=3, max_qpw=6, max_grid=8)
    heads = rng.choice([1, 2, 4])
    config = CoSConfig(
        grid=layout.grid, windows=[list(w) for w in layout.windows], queries=list(layout.queries),
        vision_dim=rng.choice([12, 20, 48]), dim=heads * rng.choice([4, 8]), num_heads=heads,
        llm_dim=rng.choice([8, 16]), num_levels=rng.randint(1, 2), mlp_ratio=rng.choice([1.0, 2.0]),
    )
    check_same_function(config, batch=rng.randint(1, 3))


def test_full_width_cos80():
    seeded_rng()
    check_same_function(CoSConfig.from_preset("cos-80"), batch=2)


def test_level1_queries_reach_the_op_batch_broadcast(monkeypatch):
    """The fused path hands the op a stride-0 q at level 1 (projected once, not once per image)."""
    import cos_kernels.resampler as module

    seen = []
    real = module.multiscale_window_attention

    def spy(q, k, v, layout, **kw):
        seen.append((q.stride(0), k.is_contiguous()))
        return real(q, k, v, layout, **kw)

    monkeypatch.setattr(module, "multiscale_window_attention", spy)
    config = CoSConfig.from_preset("cos-80", vision_dim=16, dim=16, num_heads=2, llm_dim=8)
    MultiScaleResampler(config, backend="torch")([torch.randn(3, 256, 16)] * 2)
    assert seen[0] == (0, False)  # level 1: broadcast q, K read from the fused K/V output by strides
    assert seen[1][0] != 0  # level 2: per-image queries
