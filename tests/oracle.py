"""Independent references and comparison rules shared by the tests.

The reference is written plainly: a float64 loop over scales and windows, gathering each window's
patches one by one, with no reshape tricks shared with the code under test.
"""

from __future__ import annotations

import random

import torch

from cos_kernels import WindowLayout


def reference_attention(q, k, v, layout: WindowLayout, softmax_scale=None) -> torch.Tensor:
    """float64 multi-scale windowed attention. q (B, Q, H, D), k/v (B, S, N, H, D) -> (B, Q, H, D).

    Differentiable through autograd (inputs are cast to float64 inside)."""
    q, k, v = q.double(), k.double(), v.double()
    B, Q, H, D = q.shape
    scale = D ** -0.5 if softmax_scale is None else softmax_scale
    gh, gw = layout.grid
    rows = []
    for s in range(layout.num_scales):
        wh, ww = layout.windows[s]
        n_rows, n_cols = gh // wh, gw // ww
        qpw = layout.queries[s] // (n_rows * n_cols)
        first_query = sum(layout.queries[:s])
        for r in range(n_rows):
            for c in range(n_cols):
                patches = [y * gw + x for y in range(r * wh, (r + 1) * wh) for x in range(c * ww, (c + 1) * ww)]
                start = first_query + (r * n_cols + c) * qpw
                qw = q[:, start : start + qpw]  # (B, qpw, H, D)
                kw = k[:, s, patches]  # (B, P, H, D)
                vw = v[:, s, patches]
                scores = torch.einsum("bqhd,bphd->bhqp", qw, kw) * scale
                weights = torch.softmax(scores, dim=-1)
                rows.append(torch.einsum("bhqp,bphd->bqhd", weights, vw))
    return torch.cat(rows, dim=1)


def random_layout(rng: random.Random, max_scales=3, max_qpw=16, max_grid=12) -> WindowLayout:
    """A random layout: rectangular grid and windows, 1-max_scales scales, 1-max_qpw queries per window."""
    def divisors(n):
        return [d for d in range(1, n + 1) if n % d == 0]

    gh, gw = rng.randint(2, max_grid), rng.randint(2, max_grid)
    windows, queries = [], []
    for _ in range(rng.randint(1, max_scales)):
        wh, ww = rng.choice(divisors(gh)), rng.choice(divisors(gw))
        windows.append((wh, ww))
        queries.append((gh // wh) * (gw // ww) * rng.randint(1, max_qpw))
    return WindowLayout((gh, gw), windows, queries)


def random_qkv(layout, B, H, D, dtype, device="cpu", fused_kv=False, requires_grad=False):
    """Random q (B, Q, H, D) and k, v (B, S, N, H, D); with fused_kv, k and v are strided views of one
    (B, N, S, 2, H, D) tensor, as a fused projection produces them (its gradient reaches that tensor).
    For gradient references, take float64 leaves: autograd rounds a leaf's gradient to its dtype."""
    S, N, Q = layout.num_scales, layout.num_patches, layout.total_queries
    q = torch.randn(B, Q, H, D, device=device, dtype=dtype, requires_grad=requires_grad)
    if fused_kv:
        kv = torch.randn(B, N, S, 2, H, D, device=device, dtype=dtype, requires_grad=requires_grad)
        return q, kv[:, :, :, 0].transpose(1, 2), kv[:, :, :, 1].transpose(1, 2)
    k = torch.randn(B, S, N, H, D, device=device, dtype=dtype, requires_grad=requires_grad)
    v = torch.randn(B, S, N, H, D, device=device, dtype=dtype, requires_grad=requires_grad)
    return q, k, v


def max_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    return (x.double() - ref.double()).abs().max().item()


def assert_within_eager_error(name, got, ref, eager, atol, floor=1.0):
    """The testing rule: the kernel's error is at most 2x the eager error in the same dtype + atol.

    atol is in units of the result's scale, max(floor, max |ref|): a float format's spacing grows
    with the magnitude (fp16 values in [4, 8) are 2**-8 apart), so a fixed absolute atol would demand
    less than one rounding step of large results. floor=0 scales small results down too."""
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    err, eager_err = max_error(got, ref), max_error(eager, ref)
    bound = 2 * eager_err + atol * max(floor, ref.abs().max().item())
    assert err <= bound, (
        f"{name}: max error {err:.3e} exceeds 2 x eager error {eager_err:.3e} + atol {atol:.0e} "
        f"x max({floor:g}, max|ref| = {ref.abs().max().item():.3g})"
    )
    return err, eager_err


def seeded_rng() -> random.Random:
    """A fresh seed per call (printed on failure through the test's repr) for fresh random cases."""
    seed = random.randrange(2**31)
    print(f"random seed {seed}")
    torch.manual_seed(seed)
    return random.Random(seed)


__all__ = [
    "reference_attention",
    "random_layout",
    "random_qkv",
    "max_error",
    "assert_within_eager_error",
    "seeded_rng",
]
