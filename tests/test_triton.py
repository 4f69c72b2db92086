"""The "triton" backend against the float64 loop reference (tests/oracle.py), by the 2x-eager rule.

CPU tests run the kernels under the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1
where no CUDA device exists); they are sized small because the interpreter runs each program in
Python. The GPU tests shared with the "cuda" backend (full presets, random layouts, head dims, large
batches, over 2**31 elements, deterministic backward) are in tests/test_fused_backends_gpu.py; the
one GPU test here compiles the resampler with inductor under autocast. Every correctness test
pre-fills the kernels' outputs with NaN (the backend's POISON_OUTPUTS hook, through
kernel_cases.poisoned_outputs), so an element no program writes fails the finiteness check.
"""

from __future__ import annotations

import itertools
import textwrap

import pytest
import torch
from kernel_cases import (
    ATOL,
    HAS_CUDA,
    HEAD_DIMS,
    assert_same_values_and_grads,
    check_case,
    check_resampler_matches_torch_backend,
    make_inputs,
    poisoned_outputs,
    random_case,
    reference_lse,
    run_python,
    shrunk_preset,
)
from oracle import assert_within_eager_error, random_layout, random_qkv, reference_attention, seeded_rng

pytest.importorskip("triton")

import cos_kernels.ops.custom_op  # noqa: E402, F401  (registers torch.ops.cos_kernels.*)
from cos_kernels import PRESETS, CoSConfig, MultiScaleResampler, WindowLayout, multiscale_window_attention  # noqa: E402
from cos_kernels.ops import available_backends, reference, resolve_backend, triton_kernels, triton_launch  # noqa: E402
from cos_kernels.ops import triton_backend as tb  # noqa: E402
from cos_kernels.ops.triton_launch import launch_config  # noqa: E402
from cos_kernels.ops.triton_tiles import KeyTileField, QueryTileField, key_tiles, query_tiles  # noqa: E402

INTERPRETED = tb._interpreted()

interp = pytest.mark.skipif(
    not INTERPRETED,
    reason="CPU tests need TRITON_INTERPRET=1 before triton is imported (conftest sets it where no "
    "CUDA device exists)",
)


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """The cases are tiny: one intra-op thread avoids OpenMP wake-up costs on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def poison_outputs():
    """Every output buffer of the kernels starts as NaN in every test."""
    with poisoned_outputs("triton"):
        yield


# ---- helpers ------------------------------------------------------------------------------------
def num_programs(layout: WindowLayout, B: int, H: int, D: int, dtype: torch.dtype) -> int:
    """Programs of one forward + backward (three launches)."""
    cfg = launch_config(layout, D, dtype)
    nq = len(query_tiles(layout, cfg.block_m))
    nk = len(key_tiles(layout, cfg.block_n))
    return (2 * nq + nk) * B * H


def pick_batch_heads(rng, layout, D, dtype, budget=500):
    """Random B in 1..3 and H in 1..4, shrunk while the interpreter would run over ``budget`` programs."""
    B, H = rng.randint(1, 3), rng.randint(1, 4)
    while num_programs(layout, B, H, D, dtype) > budget and B * H > 1:
        if H >= B:
            H -= 1
        else:
            B -= 1
    return B, H


def interpreted_case(rng, layout, dtype, D=None, budget=500):
    """random_case on CPU tensors, B and H shrunk while the interpreter would run over ``budget`` programs."""
    D = rng.choice(HEAD_DIMS) if D is None else D
    B, H = pick_batch_heads(rng, layout, D, dtype, budget)
    random_case(rng, layout, dtype, "cpu", backend="triton", D=D, B=B, H=H)


PRESET_SHRINK = 2  # 224-px presets on an 8x8 grid, 448-px presets on a 16x16 grid


# ---- CPU (interpreter) --------------------------------------------------------------------------
@interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_shrunk(preset, dtype):
    rng = seeded_rng()
    layout = shrunk_preset(preset, PRESET_SHRINK)
    interpreted_case(rng, layout, dtype, budget=400)


@interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", range(5))
def test_random_layouts(case, dtype):
    rng = seeded_rng()
    layout = random_layout(rng, max_scales=3, max_qpw=16, max_grid=8)
    interpreted_case(rng, layout, dtype, budget=400)


@interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("D", HEAD_DIMS)
def test_head_dims(D, dtype):
    """Rectangular grid and windows, 1- to 6-query windows, windows of 2 to 24 patches."""
    rng = seeded_rng()
    layout = WindowLayout((4, 6), [(4, 6), (2, 3), (1, 2)], [rng.randint(1, 6), 4 * rng.randint(1, 4), 12 * rng.randint(1, 3)])
    interpreted_case(rng, layout, dtype, D=D, budget=300)


@interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_windows_split_over_tiles(dtype):
    """Windows with more queries than a tile has rows (BLOCK_M 64; 32 in fp32) next to 1-query windows."""
    rng = seeded_rng()
    layout = WindowLayout((4, 4), [4, (1, 2)], [rng.randint(65, 150), 8])
    assert launch_config(layout, 16, dtype).block_m < max(layout.queries_per_window)
    interpreted_case(rng, layout, dtype, budget=200)


@interp
def test_strided_inputs_and_softmax_scale():
    """Stride-0 batch-broadcast q with K/V of stride 2 on the head dim, and a softmax_scale."""
    rng = seeded_rng()
    layout = WindowLayout((3, 4), [(3, 4), (1, 2)], [3, 6 * rng.randint(1, 5)])
    q, k, v = make_inputs(layout, 2, 2, 40, torch.float32, "cpu", fused_kv=False, broadcast_q=True, strided_d=True)
    check_case(layout, q, k, v, backend="triton", softmax_scale=rng.uniform(0.05, 0.5))


@interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_forward_saves_logsumexp(dtype):
    rng = seeded_rng()
    layout = random_layout(rng, max_scales=2, max_qpw=8, max_grid=6)
    B, H, D = 2, 2, rng.choice(HEAD_DIMS)
    q, k, v = random_qkv(layout, B, H, D, dtype, fused_kv=True)
    scale = D**-0.5
    out, lse = tb.TRITON_KERNEL.forward(q, k, v, layout, scale)
    assert lse.shape == (B, H, layout.total_queries) and lse.dtype == torch.float32
    assert out.is_contiguous() and lse.is_contiguous()
    ref = reference_lse(q, k, layout, scale)
    tol = 1e-5 if dtype == torch.float32 else 1e-3
    assert torch.allclose(lse.double(), ref, atol=tol, rtol=tol), (lse.double() - ref).abs().max()


@interp
def test_backward_is_deterministic():
    rng = seeded_rng()
    layout = random_layout(rng, max_scales=3, max_qpw=16, max_grid=6)
    D = rng.choice(HEAD_DIMS)
    B, H = pick_batch_heads(rng, layout, D, torch.float16, budget=250)
    q, k, v = random_qkv(layout, B, H, D, torch.float16, fused_kv=True)
    scale = D**-0.5
    out, lse = tb.TRITON_KERNEL.forward(q, k, v, layout, scale)
    g = torch.randn_like(out)
    first = tb.TRITON_KERNEL.backward(g, q, k, v, out, lse, layout, scale)
    second = tb.TRITON_KERNEL.backward(g, q, k, v, out, lse, layout, scale)
    for name, a, b in zip(("dq", "dk", "dv"), first, second):
        assert a.is_contiguous(), name
        assert torch.isfinite(a).all(), name
        assert torch.equal(a, b), f"{name} differs between two identical backward calls"


@interp
def test_poison_shows_unwritten_outputs(monkeypatch):
    """The poison hook works: drop the last query tile from the table and the forward leaves NaN."""
    layout = WindowLayout(4, [4, 2], [4, 8])
    q, k, v = random_qkv(layout, 1, 1, 16, torch.float32)

    def truncated(lay, block_m):
        return query_tiles(lay, block_m)[:-1]

    monkeypatch.setattr(triton_launch, "_PLANS", {})
    monkeypatch.setattr(triton_launch, "query_tiles", truncated)
    out, lse = tb.TRITON_KERNEL.forward(q, k, v, layout, 0.25)
    assert torch.isnan(out).any() and torch.isnan(lse).any()


def test_kernels_read_the_named_tile_columns():
    """The kernels' column constexprs (QT_*, KT_*) are the tile tables' fields, name by name."""
    for prefix, fields in (("QT_", QueryTileField), ("KT_", KeyTileField)):
        for field in fields:
            assert getattr(triton_kernels, prefix + field.name).value == field, field


def test_tile_tables_cover_every_query_and_key_once():
    """Host-side tile tables: each query in exactly one query tile, each (scale, patch) in exactly
    one key tile, tiles of one scale only, longest first, and tile widths legal for tl.dot."""
    rng = seeded_rng()
    layouts = [shrunk_preset(p, 1) for p in PRESETS] + [random_layout(rng, max_grid=16) for _ in range(20)]
    for layout in layouts:
        for D, dtype in itertools.product((16, 128), (torch.float16, torch.float32)):
            cfg = launch_config(layout, D, dtype)
            for block in (cfg.block_m, cfg.block_n, cfg.block_d, cfg.block_m_kv):
                assert block >= 16 and block & (block - 1) == 0
            qt = query_tiles(layout, cfg.block_m)
            seen = torch.zeros(layout.total_queries, dtype=torch.int64)
            for t in qt:
                q_start, rows, s = t[QueryTileField.Q_START], t[QueryTileField.ROWS], t[QueryTileField.SCALE]
                assert 1 <= rows <= cfg.block_m and t[QueryTileField.QPW] == layout.queries_per_window[s]
                seen[q_start : q_start + rows] += 1
                assert layout.query_offsets[s] <= q_start and q_start + rows <= layout.query_offsets[s + 1]
            assert bool((seen == 1).all()), layout
            nkeys = [t[QueryTileField.NKEYS] for t in qt]
            assert nkeys == sorted(nkeys, reverse=True)
            kt = key_tiles(layout, cfg.block_n)
            keys = torch.zeros(layout.num_scales, layout.num_patches, dtype=torch.int64)
            gw = layout.grid[1]
            for t in kt:
                k_begin, k_count, s = t[KeyTileField.K_BEGIN], t[KeyTileField.K_COUNT], t[KeyTileField.SCALE]
                wh, ww, win_cols, win0 = (t[f] for f in (KeyTileField.WH, KeyTileField.WW, KeyTileField.WIN_COLS,
                                                         KeyTileField.WIN0))
                assert 1 <= k_count <= cfg.block_n
                for j in range(k_begin, k_begin + k_count):
                    lw, pp = divmod(j, wh * ww)
                    r, c = divmod(win0 + lw, win_cols)
                    keys[s, (r * wh + pp // ww) * gw + c * ww + pp % ww] += 1
            assert bool((keys == 1).all()), layout


@interp
@pytest.mark.parametrize("what", ["op", "resampler"])
def test_torch_compile_fullgraph(what):
    """The custom op traces without graph breaks (fullgraph=True) and matches eager, forward and
    backward. On CPU the aot_eager backend is used (inductor's C++ compile takes minutes); the GPU
    test below uses inductor."""
    torch._dynamo.reset()
    rng = seeded_rng()
    if what == "op":
        layout = WindowLayout((4, 4), [4, 2], [4, 4 * rng.randint(1, 3)])
        q, k, v = make_inputs(layout, 2, 2, 16, torch.float32, "cpu", fused_kv=True, broadcast_q=False)

        def fn(q, k, v):
            return multiscale_window_attention(q * 1.5, k, v, layout, backend="triton").square().sum(-1)

        compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
        got, want = compiled(q, k, v), fn(q, k, v)
        args = (q, k, v)
    else:
        cfg = CoSConfig(grid=4, windows=[4, 2], queries=[4, 8], vision_dim=16, dim=32, num_heads=2,
                        llm_dim=8, num_levels=2, drop_cls=False)
        model = MultiScaleResampler(cfg, backend="triton")
        feats = [torch.randn(2, 16, 16, requires_grad=True) for _ in range(2)]
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        got, want = compiled(feats), model(feats)
        args = feats
    assert_same_values_and_grads(got, want, args, 1e-5)


@interp
def test_custom_op_opcheck():
    """torch.library.opcheck: schema, fake tensors, autograd registration, aot dispatch."""
    layout = WindowLayout((2, 4), [(2, 4), (1, 2)], [2, 4])
    q, k, v = make_inputs(layout, 1, 1, 16, torch.float32, "cpu", fused_kv=True, broadcast_q=False)
    args = (q, k, v, list(layout.to_spec()), 0.25, "triton")
    torch.library.opcheck(torch.ops.cos_kernels.window_attention_forward.default, args)


@interp
def test_resampler_triton_matches_torch_backend():
    cfg = CoSConfig(grid=(2, 4), windows=[(2, 4), (1, 2)], queries=[3, 8], vision_dim=24, dim=32,
                    num_heads=2, llm_dim=8, num_levels=1, drop_cls=False)
    check_resampler_matches_torch_backend(cfg, "triton", "cpu", lambda: torch.randn(2, 8, 24),
                                          tol=(1e-5, 1e-4), grad_tol=(1e-5, 1e-4))


@interp
def test_autocast_mixed_dtypes_meet_in_autocast_dtype():
    layout = WindowLayout(4, [4, 2], [2, 8])
    q, k, v = random_qkv(layout, 2, 2, 16, torch.float16)
    with torch.autocast("cpu", dtype=torch.float16):
        out = multiscale_window_attention(q.float(), k, v, layout, backend="triton")
        same = multiscale_window_attention(q.float(), k.float(), v.float(), layout, backend="triton")
    assert out.dtype == torch.float16 and same.dtype == torch.float32
    eager = reference.window_attention(q, k, v, layout, 0.25)
    assert_within_eager_error("out", out, reference_attention(q, k, v, layout), eager, ATOL[torch.float16])
    with pytest.raises(TypeError, match="share one dtype"):
        multiscale_window_attention(q.float(), k, v, layout, backend="triton")


# ---- dispatch and errors ------------------------------------------------------------------------
def test_auto_prefers_torch_on_cpu_and_triton_is_listed():
    assert resolve_backend("auto", "cpu") == "torch"
    if INTERPRETED:
        assert "triton" in available_backends("cpu")
    if HAS_CUDA:
        assert resolve_backend("auto", "cuda") in ("cuda", "triton")


@interp
def test_bad_dtype_and_head_dims_raise():
    layout = WindowLayout(2, [2], [2])
    q, k, v = random_qkv(layout, 1, 1, 16, torch.float64)
    with pytest.raises(TypeError, match="float64"):
        multiscale_window_attention(q, k, v, layout, backend="triton")
    with pytest.raises(TypeError, match="float64"):
        tb.TRITON_KERNEL.forward(q, k, v, layout, 0.25)
    for D in (8, 256):
        q, k, v = random_qkv(layout, 1, 1, D, torch.float32)
        with pytest.raises(ValueError, match=f"D={D}"):
            multiscale_window_attention(q, k, v, layout, backend="triton")
        with pytest.raises(ValueError, match=f"D={D}"):
            tb.TRITON_KERNEL.forward(q, k, v, layout, 0.25)



def test_direct_custom_op_calls_check_the_layout_contract():
    """torch.ops.cos_kernels.* called directly (not through multiscale_window_attention) refuse q, k, v
    that do not fit the layout before any kernel runs: the Triton kernels have no guard of their own."""
    layout = WindowLayout(4, [4, 2], [2, 8])
    q, k, v = random_qkv(layout, 2, 2, 16, torch.float32)
    spec = list(layout.to_spec())
    with pytest.raises(ValueError, match=r"k must have shape \(B, S, N, H, D\) = \(2, 2, 16, 2, 16\)"):
        torch.ops.cos_kernels.window_attention_forward(q, k[:, :, :8], v, spec, 0.25, "triton")
    with pytest.raises(ValueError, match=r"q has 5 queries"):
        torch.ops.cos_kernels.window_attention_backward(q[:, :5], q[:, :5], k, v, q[:, :5], q.new_zeros(2, 2, 5),
                                                        spec, 0.25, "triton")

def test_cpu_without_interpreter_raises_clearly():
    """A fresh process without TRITON_INTERPRET (and without CUDA devices) refuses CPU tensors."""
    script = textwrap.dedent(
        """
        import torch, cos_kernels
        layout = cos_kernels.WindowLayout(2, [2], [2])
        q = torch.randn(1, 2, 1, 16); k = torch.randn(1, 1, 4, 1, 16)
        assert cos_kernels.ops.resolve_backend("auto", "cpu") == "torch"
        try:
            cos_kernels.multiscale_window_attention(q, k, k, layout, backend="triton")
        except RuntimeError as err:
            print("ERROR:", err)
        """
    )
    res = run_python(script, unset=("TRITON_INTERPRET",), env={"CUDA_VISIBLE_DEVICES": ""})
    assert res.returncode == 0, res.stderr
    assert "ERROR:" in res.stdout and "TRITON_INTERPRET=1" in res.stdout and "CUDA" in res.stdout, res.stdout


def test_unavailable_reasons():
    kernel = tb.TRITON_KERNEL
    assert "CUDA" in kernel.unavailable_reason(torch.device("meta"))
    if INTERPRETED:
        assert kernel.unavailable_reason(torch.device("cpu")) is None


# ---- GPU (the tests shared with the cuda backend are in test_fused_backends_gpu.py) -------------
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_gpu_resampler_compiled_inductor_bf16_autocast():
    """torch.compile (inductor, fullgraph) of the resampler on the triton backend under bf16
    autocast: its error against the fp32 torch-backend model is at most 3x the error of the eager
    torch backend under the same autocast."""
    torch._dynamo.reset()
    seeded_rng()
    cfg = CoSConfig.from_preset("cos-80", dim=256, num_heads=4, vision_dim=128, llm_dim=64, init_std=0.2)
    model = MultiScaleResampler(cfg, backend="triton").cuda()
    ref = MultiScaleResampler(cfg, backend="torch").cuda()
    ref.load_state_dict(model.state_dict())
    feats = [torch.randn(4, 256, 128, device="cuda") for _ in range(cfg.num_levels)]
    y32 = ref(feats).double()
    compiled = torch.compile(model, fullgraph=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = compiled(feats)
        y_ref = ref(feats)
    assert y.dtype == y_ref.dtype == torch.bfloat16
    err, err_ref = (y.double() - y32).abs().max().item(), (y_ref.double() - y32).abs().max().item()
    assert err <= 3 * err_ref + 1e-3 * y32.abs().max().item(), (err, err_ref)
    y.float().square().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
