"""multiscale_window_attention with the eager torch backend, and the op's input validation."""

from fractions import Fraction

import numpy as np
import pytest
import torch
from oracle import random_layout, random_qkv, reference_attention, seeded_rng

from cos_kernels import WindowLayout, multiscale_window_attention
from cos_kernels.ops import resolve_backend


@pytest.mark.parametrize("case", range(6))
def test_values_and_gradients_match_reference(case):
    rng = seeded_rng()
    layout = random_layout(rng, max_scales=3, max_qpw=16)
    B, H, D = rng.randint(1, 3), rng.randint(1, 3), rng.choice([4, 8, 16])
    q, k, v = random_qkv(layout, B, H, D, torch.float64, fused_kv=case % 2 == 1)
    q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))
    scale = None if case < 3 else rng.uniform(0.05, 1.0)
    out = multiscale_window_attention(q, k, v, layout, softmax_scale=scale, backend="torch")
    ref = reference_attention(q, k, v, layout, softmax_scale=scale)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    grad = torch.randn_like(ref)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(ref, (q, k, v), grad)
    for name, g, w in zip("qkv", got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-10, msg=f"d{name} for {layout}")


def test_float32_and_auto_on_cpu():
    layout = WindowLayout((4, 6), [(4, 6), (2, 3)], [3, 8])
    q, k, v = random_qkv(layout, 2, 2, 8, torch.float32)
    out = multiscale_window_attention(q, k, v, layout)  # auto -> torch on the CPU
    assert out.dtype == torch.float32 and out.shape == q.shape
    torch.testing.assert_close(out.double(), reference_attention(q, k, v, layout), rtol=1e-5, atol=1e-5)
    assert resolve_backend("auto", "cpu") == "torch"


def test_window_isolation():
    """Changing the keys of one window changes only that window's queries."""
    layout = WindowLayout(4, [2], [8])  # four 2x2 windows, 2 queries each
    q, k, v = random_qkv(layout, 1, 1, 4, torch.float64)
    base = multiscale_window_attention(q, k, v, layout, backend="torch")
    k2, v2 = k.clone(), v.clone()
    k2[:, 0, 15] += 3.0  # patch (3, 3): the last window
    v2[:, 0, 15] -= 2.0
    moved = (multiscale_window_attention(q, k2, v2, layout, backend="torch") - base).abs().amax(dim=(0, 2, 3))
    assert (moved[:6] == 0).all() and (moved[6:] > 0).all()


def _inputs():
    layout = WindowLayout(4, [4, 2], [2, 4])
    q, k, v = random_qkv(layout, 2, 2, 8, torch.float32)
    return q, k, v, layout


@pytest.mark.parametrize(
    "mutate, error, match",
    [
        (lambda q, k, v, lay: (q[0], k, v, lay), ValueError, r"q must have shape \(B, Q, H, D\), got \(6, 2, 8\)"),
        (lambda q, k, v, lay: (q[:, :5], k, v, lay), ValueError, r"q has 5 queries .* has 6"),
        (lambda q, k, v, lay: (q, k[:, :1], v, lay), ValueError, r"k must have shape \(B, S, N, H, D\) = \(2, 2, 16, 2, 8\)"),
        (lambda q, k, v, lay: (q, k, v[..., :4], lay), ValueError, r"v must have shape .* got \(2, 2, 16, 2, 4\)"),
        (lambda q, k, v, lay: (q, k[:1], v[:1], lay), ValueError, r"k must have shape"),
        (lambda q, k, v, lay: (q, k.half(), v, lay), TypeError, "share one dtype"),
        (lambda q, k, v, lay: (q.long(), k, v, lay), TypeError, "q must be a floating-point tensor"),
        (lambda q, k, v, lay: (q, k, v.numpy(), lay), TypeError, "v must be a torch.Tensor"),
        (lambda q, k, v, lay: (q, k, v, (4, [4, 2], [2, 4])), TypeError, "layout must be a cos_kernels.WindowLayout"),
        (lambda q, k, v, lay: (q, k, v, WindowLayout(4, [4, 4, 4], [2, 2, 2])), ValueError, r"k must have shape \(B, S, N, H, D\) = \(2, 3, 16"),
    ],
)
def test_bad_inputs(mutate, error, match):
    q, k, v, layout = mutate(*_inputs())
    with pytest.raises(error, match=match):
        multiscale_window_attention(q, k, v, layout, backend="torch")


def test_bad_scale_and_backend():
    q, k, v, layout = _inputs()
    with pytest.raises(ValueError, match=r"softmax_scale must be a positive finite number <= 1e\+06 .* got -1.0"):
        multiscale_window_attention(q, k, v, layout, softmax_scale=-1.0)
    with pytest.raises(TypeError, match=r"softmax_scale must be a real number \(float\) or None, got '0.1' \(str\)"):
        multiscale_window_attention(q, k, v, layout, softmax_scale="0.1")
    with pytest.raises(ValueError, match=r"backend must be one of \['auto', 'torch'.*got 'flash'"):
        multiscale_window_attention(q, k, v, layout, backend="flash")


@pytest.mark.parametrize(
    "scale, error, match",
    [
        (1e300, ValueError, r"softmax_scale must be a positive finite number <= 1e\+06 \(the kernels scale logits in float32\), got 1e\+300"),
        (1e6 * (1 + 1e-9), ValueError, r"<= 1e\+06 .*got 1000000.001"),
        (float("inf"), ValueError, "positive finite number.*got inf"),
        (float("nan"), ValueError, "positive finite number.*got nan"),
        (np.float32("inf"), ValueError, r"positive finite number.*got (np.float32\()?inf"),
        (0, ValueError, "positive finite number.*got 0$"),
        (True, TypeError, r"softmax_scale must be a real number \(float\) or None, got True \(bool\)"),
        (torch.tensor(0.1), TypeError, r"got tensor\(0.1000\) \(Tensor\)"),
    ],
)
def test_bad_softmax_scale(scale, error, match):
    q, k, v, layout = _inputs()
    with pytest.raises(error, match=match):
        multiscale_window_attention(q, k, v, layout, softmax_scale=scale, backend="torch")


@pytest.mark.parametrize("scale", [np.float32(0.125), np.float64(0.125), 0.125, 1e6, Fraction(1, 8)])
def test_real_softmax_scales_accepted(scale):
    q, k, v, layout = _inputs()
    out = multiscale_window_attention(q, k, v, layout, softmax_scale=scale, backend="torch")
    torch.testing.assert_close(out.double(), reference_attention(q, k, v, layout, softmax_scale=float(scale)),
                               rtol=1e-5, atol=1e-5)
