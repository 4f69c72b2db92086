"""The resampler's fused path (LayerNorm affines folded into the next products, one K/V product,
the query side as grouped products over scales, level-1 queries once) against the plain reference
path: same outputs and gradients on every preset and random configs. Also grouped_linear (both of
its branches) against a float64 loop, and the aten ops one fused forward runs."""

import functools
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from oracle import assert_within_eager_error, random_layout, seeded_rng
from torch.utils._python_dispatch import TorchDispatchMode

import cos_kernels.grouped_linear as gl
from cos_kernels import PRESETS, CoSConfig, MultiScaleResampler
from cos_kernels.grouped_linear import grouped_linear


def assert_rel_close(got, want, name, rtol=1e-5):
    """max |got - want| <= rtol * max |want|, for one fp32 product against its float64 loop."""
    err, size = (got - want).abs().max().item(), want.abs().max().item()
    assert err <= rtol * size, f"{name}: max error {err:.3e} > {rtol:.0e} x max {size:.3e}"


def fused_plain_and_reference(config):
    """The fused and plain fp32 modules and a float64 copy of the plain one, all with one set of weights."""
    fused = MultiScaleResampler(config, backend="torch", fused=True)
    with torch.no_grad():
        for p in fused.parameters():  # non-trivial norms and biases too; matrices keep the init's scale
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.2)
            elif config.dim <= 64:
                p.copy_(torch.randn_like(p) * 0.2)
    plain = MultiScaleResampler(config, backend="torch", fused=False)
    plain.load_state_dict(fused.state_dict())
    reference = MultiScaleResampler(config, backend="torch", fused=False).double()
    reference.load_state_dict(fused.state_dict())
    return fused, plain, reference


def check_same_function(config, batch):
    """The fused fp32 path's error against float64 is within the rule's bound of the plain fp32
    path's, for the output and every gradient. Which fp32 path lands nearer float64 varies from case
    to case: a narrow width with LayerNorms amplifies the rounding of either."""
    fused, plain, reference = fused_plain_and_reference(config)
    gh, gw = config.grid
    feats = [torch.randn(batch, gh * gw + 1, config.vision_dim, dtype=torch.float64) for _ in range(config.num_levels)]
    inputs = [[f.to(dtype).requires_grad_(True) for f in feats] for dtype in (torch.float32, torch.float32, torch.float64)]
    outs = [m(x) for m, x in zip((fused, plain, reference), inputs)]
    check = functools.partial(assert_within_eager_error, atol=1e-5, floor=0.0)
    out_fused, out_plain, out_reference = outs
    check("output", out_fused, out_reference, out_plain)
    grad = torch.randn_like(out_reference)
    for out in outs:
        out.backward(grad.to(out.dtype))
    for (name, pf), pp, pr in zip(fused.named_parameters(), plain.parameters(), reference.parameters()):
        check(f"grad of {name}", pf.grad, pr.grad, pp.grad)
    for i, (f, p, r) in enumerate(zip(*inputs)):
        check(f"grad of features[{i}]", f.grad[:, 1:], r.grad[:, 1:], p.grad[:, 1:])


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


# ---- grouped_linear ---------------------------------------------------------------------------
def loop_gemm(a, weight, offsets):
    """Stand-in for F.grouped_mm(a, weight.transpose(-2, -1), offs=offsets), one product per group."""
    assert offsets.dtype == torch.int32 and a.is_contiguous() and offsets[-1] == a.shape[0]
    ends = offsets.tolist()
    return torch.cat([a[s:e] @ w.T for s, e, w in zip([0] + ends[:-1], ends, weight)])


def real_grouped_mm_runs_on_cpu() -> bool:
    try:
        a, w = torch.randn(3, 8), torch.randn(2, 8, 8)
        offs = torch.tensor([1, 3], dtype=torch.int32)
        return F.grouped_mm(a, w.transpose(-2, -1), offs=offs).shape == (3, 8)
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


@pytest.fixture(params=["loop", "packed: stand-in GEMM", "packed: F.grouped_mm"])
def branch(request, monkeypatch):
    """grouped_linear's branch under test; the packed one forced on CPU fp32 (normally CUDA bf16 on
    capability >= 9.0), its GEMM the loop stand-in or the real F.grouped_mm where it runs on CPU."""
    if request.param != "loop":
        monkeypatch.setattr(gl, "_grouped_mm_supported", lambda x, weight: True)
    if request.param == "packed: stand-in GEMM":
        monkeypatch.setattr(gl, "_grouped_mm_packed", loop_gemm)
    if request.param == "packed: F.grouped_mm" and not real_grouped_mm_runs_on_cpu():
        pytest.skip("F.grouped_mm missing or not runnable on CPU in this torch")
    return request.param


@pytest.mark.parametrize("case", range(6))
def test_grouped_linear_matches_float64_loop(case, branch):
    rng = seeded_rng()
    sizes = [[rng.randint(1, 9)], [1, 1, 1], [rng.choice([1, 2, 7]) for _ in range(rng.randint(2, 4))]]
    sizes = sizes[case % 3]  # one segment; size-1 segments; mixed
    lead = [(), (rng.randint(1, 3),), (2, rng.randint(1, 3))][case % 3]
    n_in, n_out, with_bias = rng.choice([8, 16]), rng.choice([8, 24]), case < 3
    x = torch.randn(*lead, sum(sizes), n_in, requires_grad=True)
    weight = torch.randn(len(sizes), n_out, n_in, requires_grad=True)
    bias = torch.randn(len(sizes), n_out, requires_grad=True) if with_bias else None
    leaves = [t for t in (x, weight, bias) if t is not None]
    got = grouped_linear(x, weight, bias, sizes)
    grad = torch.randn_like(got) if case != 5 else torch.randn(()).expand_as(got)  # as from .sum()
    got_grads = torch.autograd.grad(got, leaves, grad)

    ref_leaves = [t.detach().double().requires_grad_(True) for t in leaves]
    x64, w64, b64 = ref_leaves[0], ref_leaves[1], ref_leaves[2] if with_bias else None
    rows, start = [], 0
    for s, n in enumerate(sizes):
        y = x64[..., start : start + n, :] @ w64[s].T
        rows.append(y if b64 is None else y + b64[s])
        start += n
    want = torch.cat(rows, dim=-2)
    want_grads = torch.autograd.grad(want, ref_leaves, grad.double())
    assert got.shape == want.shape == (*lead, sum(sizes), n_out)
    assert_rel_close(got.double(), want, "output")
    for name, g, w in zip(["x", "weight", "bias"], got_grads, want_grads):
        assert_rel_close(g.double(), w, f"grad of {name}")


def test_fused_resampler_with_the_packed_branch(monkeypatch):
    """The whole fused resampler through the packed branch (stand-in GEMM): still the reference's
    function, and every query-side product is one grouped GEMM over all scales' rows."""
    calls = []

    def counting_gemm(a, weight, offsets):
        calls.append(len(offsets))
        return loop_gemm(a, weight, offsets)

    monkeypatch.setattr(gl, "_grouped_mm_supported", lambda x, weight: True)
    monkeypatch.setattr(gl, "_grouped_mm_packed", counting_gemm)
    seeded_rng()
    config = CoSConfig.from_preset("cos-1296", grid=8, windows=[8, 4, 2], queries=[1, 8, 32],
                                   vision_dim=24, dim=16, num_heads=2, llm_dim=8)
    check_same_function(config, batch=3)
    assert calls == [3] * (4 * config.num_levels)  # Q, out, fc1, fc2 per level, each over 3 scales


def test_packed_branch_multiplies_in_the_autocast_dtype(monkeypatch):
    """Under autocast the packed branch multiplies in the autocast dtype, as F.linear would."""
    seen = []

    def recording_gemm(a, weight, offsets):
        seen.append((a.dtype, weight.dtype))
        return loop_gemm(a, weight, offsets)

    monkeypatch.setattr(gl, "_grouped_mm_supported", lambda x, weight: True)
    monkeypatch.setattr(gl, "_grouped_mm_packed", recording_gemm)
    x, weight, bias = torch.randn(2, 5, 8), torch.randn(2, 8, 8), torch.randn(2, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = grouped_linear(x, weight, bias, [2, 3])
    assert seen == [(torch.bfloat16, torch.bfloat16)] and got.dtype == torch.bfloat16
    want = torch.cat([x[:, :2] @ weight[0].T + bias[0], x[:, 2:] @ weight[1].T + bias[1]], dim=1)
    assert_rel_close(got.float(), want, "output", rtol=2e-2)


@pytest.mark.parametrize(
    "args, error, match",
    [
        (((2, 5, 8), (2, 4, 8), (2, 4), [2, 2]), ValueError,
         r"sizes \[2, 2\] \(sum 4\).*x of shape \(2, 5, 8\)"),
        (((5, 8), (3, 4, 8), None, [2, 3]), ValueError,
         r"weight must have shape \(S, out, in\) = \(2, out, 8\).*got \(3, 4, 8\)"),
        (((5, 8), (2, 4, 6), None, [2, 3]), ValueError, r"weight must have shape.*got \(2, 4, 6\)"),
        (((5, 8), (2, 4, 8), (2, 5), [2, 3]), ValueError,
         r"bias must have shape \(S, out\) = \(2, 4\), got \(2, 5\)"),
        (((5, 8), (2, 4, 8), (4,), [2, 3]), ValueError, r"bias must have shape"),
        (((5, 8), (2, 4, 8), None, [2.0, 3]), TypeError,
         r"sizes must be a list or tuple of ints, got \[2.0, 3\]"),
        (((5, 8), (2, 4, 8), None, [True, 4]), TypeError, r"sizes must be a list or tuple of ints"),
        (((5, 8), (2, 4, 8), None, 5), TypeError, r"sizes must be a list or tuple of ints, got 5"),
        (((5, 8), (2, 4, 8), None, [6, -1]), ValueError, r"non-negative, got \[6, -1\]"),
        (((0, 8), (0, 4, 8), None, []), ValueError, r"non-empty"),
        (((8,), (1, 4, 8), None, [8]), ValueError, r"expected shape \(\.\.\., 8, in\)"),
    ],
)
def test_grouped_linear_bad_arguments(args, error, match):
    x, w, b, sizes = args
    with pytest.raises(error, match=match):
        grouped_linear(torch.randn(x), torch.randn(w), None if b is None else torch.randn(b), sizes)


def test_grouped_linear_non_tensor_arguments():
    with pytest.raises(TypeError, match="x must be a tensor, got list"):
        grouped_linear([[1.0]], torch.randn(1, 1, 1), None, [1])
    with pytest.raises(TypeError, match="bias must be a tensor or None, got float"):
        grouped_linear(torch.randn(1, 1), torch.randn(1, 1, 1), 0.0, [1])


# ---- launches --------------------------------------------------------------------------------
class AtenCounter(TorchDispatchMode):
    """Counts the aten ops run under it (by name), except while ``paused``."""

    def __init__(self):
        super().__init__()
        self.counts, self.paused = Counter(), False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.paused:
            self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def fused_forward_ops(config, monkeypatch, batch=2):
    """aten op counts of one fused forward (after a first one), the attention op itself not counted."""
    import cos_kernels.resampler as module
    from cos_kernels import multiscale_window_attention as real

    counter = AtenCounter()

    def uncounted(*args, **kw):
        counter.paused = True
        try:
            return real(*args, **kw)
        finally:
            counter.paused = False

    monkeypatch.setattr(module, "multiscale_window_attention", uncounted)
    model = MultiScaleResampler(config, backend="torch")
    feats = [torch.randn(batch, config.layout.num_patches, config.vision_dim)] * config.num_levels
    with torch.no_grad():
        model(feats)  # fills grouped_linear's cache of packing indices
        with counter:
            model(feats)
    return counter.counts


def test_query_side_runs_once_over_all_scales(monkeypatch):
    """Per level: LayerNorm 3 times (the image features for K/V, the queries before Q, the queries
    before the FFN), whatever the number of scales, plus norm_out once; GELU once per level. (The
    per-scale structure runs 2 S + 1 per level and S GELUs.)"""
    config = CoSConfig.from_preset("cos-1296", grid=8, windows=[8, 4, 2], queries=[1, 8, 32],
                                   vision_dim=24, dim=16, num_heads=2, llm_dim=8, num_levels=2)
    counts = fused_forward_ops(config, monkeypatch)
    assert counts["native_layer_norm"] == 3 * config.num_levels + 1
    assert counts["gelu"] == config.num_levels


def test_op_count_independent_of_scales_with_a_grouped_gemm(monkeypatch):
    """With a grouped GEMM whose op count does not depend on the number of groups (F.grouped_mm is
    one op), a fused forward runs the same aten ops, as many times, for 1 and for 3 scales (the
    attention op aside)."""

    def fixed_ops_gemm(a, weight, offsets):  # every row times its group's weight, one batched product
        group = torch.bucketize(torch.arange(a.shape[0]), offsets.long(), right=True)
        return (weight[group] @ a.unsqueeze(-1)).squeeze(-1)

    monkeypatch.setattr(gl, "_grouped_mm_supported", lambda x, weight: True)
    monkeypatch.setattr(gl, "_grouped_mm_packed", fixed_ops_gemm)
    common = dict(grid=8, vision_dim=24, dim=16, num_heads=2, llm_dim=8, num_levels=2)
    one = fused_forward_ops(CoSConfig(windows=[2], queries=[32], **common), monkeypatch)
    three = fused_forward_ops(CoSConfig(windows=[8, 4, 2], queries=[1, 8, 32], **common), monkeypatch)
    assert one == three
