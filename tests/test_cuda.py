"""The "cuda" backend (CUDA C++ kernels of csrc/, extension cos_kernels._C).

GPU tests (marked ``gpu``; skipped, with the reason, where there is no CUDA device or the extension is
not built) check values and dq/dk/dv against the float64 loop reference of tests/oracle.py by the
2x-eager rule. The ones shared with the Triton backend (full presets, random layouts, head dims with
strided inputs, large batches, over 2**31 elements, deterministic backward) are in
tests/test_fused_backends_gpu.py; here are shrunk presets, a head-major q, the saved logsumexp,
torch.compile(fullgraph=True), opcheck, input errors, the plan summary and agreement with the Triton
backend. Every GPU test fills the kernels' outputs with NaN before each launch (the extension's
poison hook, kernel_cases.poisoned_outputs), so an element no thread writes fails the finiteness
check.

CPU tests check the error where the extension is missing, the fallback of backend="auto", and run
the kernels' own code under the CPU emulation of csrc/tests (compiled with g++ here).
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from kernel_cases import (
    ALL_DTYPES,
    ATOL,
    DTYPE_IDS,
    HAS_CUDA,
    HEAD_DIMS,
    ROOT,
    assert_same_values_and_grads,
    check_case,
    check_resampler_matches_torch_backend,
    extension_error,
    extension_missing_reason,
    make_inputs,
    poisoned_outputs,
    random_case,
    reference_lse,
    run_python,
    shrunk_preset,
)
from oracle import assert_within_eager_error, random_layout, random_qkv, reference_attention, seeded_rng

from cos_kernels import PRESETS, CoSConfig, WindowLayout, multiscale_window_attention
from cos_kernels.ops import _FUSED_MODULES, AUTO_ORDER, available_backends, reference, resolve_backend
from cos_kernels.ops import cuda_backend as cb
from cos_kernels.ops.registry import registered_kernels

BUILT = extension_error() is None

gpu = pytest.mark.gpu
needs_gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
needs_extension = pytest.mark.skipif(not BUILT, reason=extension_missing_reason())


@pytest.fixture(autouse=True)
def poison_outputs():
    """Every output buffer of the CUDA kernels starts as NaN in every test (where the extension exists)."""
    with poisoned_outputs("cuda"):
        yield


# ---- CPU: dispatch, errors, fallback ------------------------------------------------------------
def test_cuda_is_the_preferred_fused_backend():
    """Until a GPU run has timed both fused backends, "auto" prefers cuda in every dtype (the reasons
    are beside cos_kernels.ops.AUTO_ORDER)."""
    assert set(AUTO_ORDER) == {torch.float32, torch.float16, torch.bfloat16}
    assert all(order == ("cuda", "triton") for order in AUTO_ORDER.values())
    assert set(_FUSED_MODULES) == {"cuda", "triton"}
    assert cb.CUDA_KERNEL.name == "cuda" and registered_kernels()["cuda"] is cb.CUDA_KERNEL
    assert set(cb.CUDA_KERNEL.dtypes) == {torch.float32, torch.float16, torch.bfloat16}
    assert cb.CUDA_KERNEL.head_dims == range(16, 129)


BLOCK_EXTENSION = """
import sys
sys.modules["cos_kernels._C"] = None  # `import cos_kernels._C` raises ImportError, as where it is not built
import torch, cos_kernels
from cos_kernels.ops import available_backends, resolve_backend
layout = cos_kernels.WindowLayout(2, [2], [2])
q = torch.randn(1, 2, 1, 16); k = torch.randn(1, 1, 4, 1, 16)
"""


def test_backend_cuda_without_extension_raises_how_to_build():
    """Where cos_kernels._C is missing, backend="cuda" raises a RuntimeError naming the build command
    (run in a fresh process with the extension blocked, so this holds on GPU machines too)."""
    res = run_python(
        BLOCK_EXTENSION
        + textwrap.dedent(
            """
        for device in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
            try:
                cos_kernels.multiscale_window_attention(q.to(device), k.to(device), k.to(device), layout,
                                                        backend="cuda")
            except RuntimeError as err:
                print("ERROR:", err)
            else:
                print("NO ERROR on", device)
        """
        )
    )
    assert res.returncode == 0, res.stderr
    assert "NO ERROR" not in res.stdout, res.stdout
    assert "ERROR:" in res.stdout, res.stdout
    for line in res.stdout.splitlines():
        assert "backend='cuda'" in line and "cos_kernels._C is not built" in line, line
        assert "COS_KERNELS_BUILD_CUDA=1 pip install --no-build-isolation ." in line, line


def test_auto_falls_back_without_extension():
    """backend="auto" never picks cuda where the extension is missing (triton or torch instead)."""
    res = run_python(
        BLOCK_EXTENSION
        + textwrap.dedent(
            """
        for device in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
            names = available_backends(device)
            chosen = resolve_backend("auto", device)
            assert "cuda" not in names and chosen != "cuda", (device, names, chosen)
            assert chosen == (names[0] if device == "cuda" else "torch"), (device, names, chosen)
            out = cos_kernels.multiscale_window_attention(q.to(device), k.to(device), k.to(device), layout)
            assert out.shape == q.shape
            print("OK", device, chosen)
        """
        )
    )
    assert res.returncode == 0, res.stderr + res.stdout
    assert "OK cpu torch" in res.stdout, res.stdout


def test_auto_follows_the_order_of_the_inputs_dtype(monkeypatch):
    """resolve_backend("auto", cuda, dtype) takes the first runnable backend of AUTO_ORDER[dtype]
    (every backend made runnable here, so the order alone decides)."""
    import cos_kernels.ops as ops

    monkeypatch.setattr(ops, "_unavailable_reason", lambda name, device: None)
    monkeypatch.setitem(ops.AUTO_ORDER, torch.float16, ("triton", "cuda"))
    assert available_backends("cuda", torch.float16) == ["triton", "cuda", "torch"]
    assert resolve_backend("auto", "cuda", torch.float16) == "triton"
    assert resolve_backend("auto", "cuda", torch.bfloat16) == "cuda"
    assert resolve_backend("auto", "cuda") == "cuda"  # no dtype: bf16's order
    assert resolve_backend("auto", "cpu", torch.float16) == "torch"


def test_unavailable_reason_names_the_problem():
    reason = cb.CUDA_KERNEL.unavailable_reason(torch.device("cpu"))
    assert reason is not None
    if BUILT:
        assert "CUDA tensors only" in reason and "cpu" in reason
    else:
        assert "COS_KERNELS_BUILD_CUDA=1" in reason and "cos_kernels._C" in reason
        with pytest.raises(RuntimeError, match="COS_KERNELS_BUILD_CUDA=1"):
            cb.extension()
    assert resolve_backend("auto", "cpu") == "torch"
    assert "cuda" not in available_backends("cpu")


def _cuda_include_dir() -> Path | None:
    """The toolkit's include folder, found as setup.py finds it (cuda_build.find_cuda_home)."""
    sys.path.insert(0, str(ROOT))
    try:
        from cuda_build import find_cuda_home
    finally:
        sys.path.remove(str(ROOT))
    home = find_cuda_home()
    return None if home is None else Path(home) / "include"


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ to build the CPU emulation test")
@pytest.mark.skipif(_cuda_include_dir() is None, reason="needs the CUDA toolkit headers (cuda_fp16.h)")
def test_kernels_under_cpu_emulation(tmp_path):
    """The CUDA kernels' own code (csrc/kernels/*.cuh: CUDA cores for fp32, tensor cores for fp16 and
    bf16), compiled with g++ against the fiber-based emulation of csrc/tests/emulation.h: first the
    emulated mma / ldmatrix / cp.async alone against plain products, then the kernels on fixed and
    random cases (forward and backward, every dtype, odd head dims, strided inputs) against the
    binary's float64 loop reference, and here every case's out, lse, dq, dk, dv against the float64
    oracle by the 2x-eager rule (eager PyTorch in the same dtype, on the same inputs)."""
    exe = tmp_path / "test_emulated"
    build = subprocess.run(
        ["g++", "-std=c++20", "-O1", f"-I{_cuda_include_dir()}", str(ROOT / "csrc/tests/test_emulated.cpp"),
         "-o", str(exe)],
        capture_output=True, text=True, timeout=600,
    )
    assert build.returncode == 0, build.stderr[-4000:]
    seed = seeded_rng().randrange(2**31)
    dump = tmp_path / "cases"
    dump.mkdir()
    res = subprocess.run([str(exe), "8", str(seed)], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "COS_EMULATION_DUMP": str(dump)})
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    assert "ok   primitives" in res.stdout and "cases passed" in res.stdout
    stems = sorted(dump.glob("case_*.txt"))
    # 8 fixed cases + 8 random ones, and the 2 full-size presets where COS_EMULATION_LARGE is set
    assert len(stems) == 16 + 2 * ("COS_EMULATION_LARGE" in os.environ), res.stdout
    for stem in stems:
        _check_emulated_case(stem.with_suffix(""))


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _check_emulated_case(stem: Path):
    """One case written by test_emulated (harness.h dump_case) by the 2x-eager rule."""
    spec_line, sizes_line = stem.with_suffix(".txt").read_text().splitlines()
    layout = WindowLayout.from_spec([int(x) for x in spec_line.split()[1:]])
    B, H, D, dtype_name, scale = sizes_line.split()
    B, H, D, dtype, scale = int(B), int(H), int(D), _DTYPES[dtype_name], float(scale)
    Q, S, N = layout.total_queries, layout.num_scales, layout.num_patches
    shapes = {"q": (B, Q, H, D), "k": (B, S, N, H, D), "v": (B, S, N, H, D), "grad_out": (B, Q, H, D),
              "out": (B, Q, H, D), "lse": (B, H, Q), "dq": (B, Q, H, D), "dk": (B, S, N, H, D),
              "dv": (B, S, N, H, D)}
    flat = torch.from_file(str(stem.with_suffix(".bin")), size=sum(math.prod(s) for s in shapes.values()),
                           dtype=torch.float32)
    arrays, at = {}, 0
    for name, shape in shapes.items():
        n = math.prod(shape)
        arrays[name] = flat[at:at + n].reshape(shape)
        at += n
    case = f"{stem.name}: {layout} B={B} H={H} D={D} {dtype_name}"
    atol = ATOL[dtype]
    inputs = [arrays[n].to(dtype) for n in ("q", "k", "v")]
    assert all(torch.equal(x.float(), arrays[n]) for x, n in zip(inputs, "qkv")), case  # values of the dtype
    leaves64 = [x.double().requires_grad_() for x in inputs]
    leaves_e = [x.clone().requires_grad_() for x in inputs]
    ref = reference_attention(*leaves64, layout, scale)
    eager = reference.window_attention(*leaves_e, layout, scale)
    g = arrays["grad_out"].to(dtype)
    grads64 = torch.autograd.grad(ref, leaves64, g.double())
    grads_e = torch.autograd.grad(eager, leaves_e, g)
    for name, want, e in zip(("out", "dq", "dk", "dv"), (ref, *grads64), (eager, *grads_e)):
        assert_within_eager_error(f"{case}: {name}", arrays[name], want.detach(), e.detach(), atol)
    lse_ref = reference_lse(*inputs[:2], layout, scale)
    lse_err = (arrays["lse"].double() - lse_ref).abs().max().item()
    assert lse_err <= 1e-5 * max(1.0, lse_ref.abs().max().item()), f"{case}: lse max error {lse_err:.3e}"


# ---- GPU ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("preset", sorted(PRESETS))
@gpu
@needs_gpu
@needs_extension
def test_gpu_presets_shrunk(preset, dtype):
    rng = seeded_rng()
    random_case(rng, shrunk_preset(preset, 2), dtype, "cuda", backend="cuda")


@gpu
@needs_gpu
@needs_extension
def test_gpu_softmax_scale_and_head_major_q():
    rng = seeded_rng()
    layout = random_layout(rng, max_scales=3, max_qpw=16, max_grid=12)
    B, H, D = 2, 3, 64
    q = torch.randn(B, H, layout.total_queries, D, device="cuda").transpose(1, 2).requires_grad_()
    _, k, v = random_qkv(layout, B, H, D, torch.float32, "cuda", requires_grad=True)
    check_case(layout, q, k, v, backend="cuda", softmax_scale=rng.uniform(0.05, 0.5))


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=DTYPE_IDS)
@gpu
@needs_gpu
@needs_extension
def test_gpu_forward_saves_logsumexp(dtype):
    rng = seeded_rng()
    layout = random_layout(rng, max_scales=3, max_qpw=16, max_grid=12)
    B, H, D = 2, 3, rng.choice(HEAD_DIMS)
    q, k, v = random_qkv(layout, B, H, D, dtype, "cuda", fused_kv=True)
    scale = D**-0.5
    out, lse = cb.CUDA_KERNEL.forward(q, k, v, layout, scale)
    assert lse.shape == (B, H, layout.total_queries) and lse.dtype == torch.float32
    assert out.is_contiguous() and lse.is_contiguous()
    ref = reference_lse(q, k, layout, scale)
    assert torch.allclose(lse.double(), ref, atol=1e-4, rtol=1e-5), (lse.double() - ref).abs().max()


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=DTYPE_IDS)
@gpu
@needs_gpu
@needs_extension
def test_gpu_torch_compile_fullgraph(dtype):
    """torch.compile(fullgraph=True, inductor) over the op: no graph break, same values and grads."""
    torch._dynamo.reset()
    rng = seeded_rng()
    layout = random_layout(rng, max_scales=3, max_qpw=16, max_grid=12)
    q, k, v = make_inputs(layout, 2, 4, 64, dtype, "cuda", fused_kv=True, broadcast_q=False)

    def fn(q, k, v):
        return multiscale_window_attention(q * 1.5, k, v, layout, backend="cuda").float().square().sum(-1)

    compiled = torch.compile(fn, fullgraph=True)
    got, want = compiled(q, k, v), fn(q, k, v)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    assert_same_values_and_grads(got, want, (q, k, v), tol)


@gpu
@needs_gpu
@needs_extension
def test_gpu_opcheck():
    """torch.library.opcheck on the extension's op (schema, Meta kernel) and on the shared custom op."""
    layout = WindowLayout((4, 6), [(4, 6), (2, 3)], [3, 8])
    q, k, v = make_inputs(layout, 2, 2, 32, torch.float32, "cuda", fused_kv=True, broadcast_q=False)
    q, k, v = (t.detach() for t in (q, k, v))
    spec = list(layout.to_spec())
    torch.library.opcheck(torch.ops.cos_kernels_cuda.window_attention_forward.default, (q, k, v, spec, 0.25))
    out, lse = torch.ops.cos_kernels_cuda.window_attention_forward(q, k, v, spec, 0.25)
    g = torch.randn_like(out)
    torch.library.opcheck(
        torch.ops.cos_kernels_cuda.window_attention_backward.default, (g, q, k, v, out, lse, spec, 0.25)
    )
    qg, kvg = q.clone().requires_grad_(), torch.randn(2, 24, 2, 2, 2, 32, device="cuda", requires_grad=True)
    kg, vg = kvg[:, :, :, 0].transpose(1, 2), kvg[:, :, :, 1].transpose(1, 2)
    torch.library.opcheck(torch.ops.cos_kernels.window_attention_forward.default, (qg, kg, vg, spec, 0.25, "cuda"))


@gpu
@needs_gpu
@needs_extension
def test_gpu_input_errors_are_clear():
    layout = WindowLayout(4, [4, 2], [2, 8])
    q, k, v = random_qkv(layout, 1, 2, 32, torch.float32, "cuda")
    spec = list(layout.to_spec())
    op = torch.ops.cos_kernels_cuda.window_attention_forward
    with pytest.raises(RuntimeError, match=r"k must have shape \(B, S, N, H, D\) = \(1, 2, 16, 2, 32\)"):
        op(q, k[:, :1], v, spec, 0.25)
    with pytest.raises(RuntimeError, match="must be a CUDA tensor, got device cpu"):
        op(q, k.cpu(), v, spec, 0.25)
    with pytest.raises(RuntimeError, match="must have q's dtype"):
        op(q, k.half(), v, spec, 0.25)
    with pytest.raises(RuntimeError, match="float32, float16 or bfloat16"):
        op(q.double(), k.double(), v.double(), spec, 0.25)
    with pytest.raises(RuntimeError, match="does not tile the grid"):
        op(q, k, v, [4, 4, 3, 3, 2], 0.25)
    with pytest.raises(RuntimeError, match=r"q has 5 queries \(shape \(1, 5, 2, 32\)\) but the layout has 10"):
        op(q[:, :5], k, v, spec, 0.25)
    with pytest.raises(RuntimeError, match="head dim D must be in 16..128, got D = 8"):
        op(q[..., :8], k[..., :8], v[..., :8], spec, 0.25)
    with pytest.raises(RuntimeError, match="softmax_scale must be a positive finite number"):
        op(q, k, v, spec, float("nan"))
    with pytest.raises(RuntimeError, match="cuda backend runs on CUDA tensors only"):
        multiscale_window_attention(q.cpu(), k.cpu(), v.cpu(), layout, backend="cuda")
    assert resolve_backend("auto", "cuda") == "cuda"


@gpu
@needs_gpu
@needs_extension
def test_gpu_plan_summary():
    spec = list(CoSConfig.from_preset("cos-80").layout.to_spec())
    s = cb.extension().plan_summary(spec, 64)  # fp32: CUDA cores
    assert not s["tensor_cores"] and s["threads_per_row"] == 4 and s["padded_head_dim"] == 64
    assert s["q_threads"] % 32 == 0 and s["k_threads"] % 32 == 0
    assert s["q_tiles"] >= 2 and s["k_tiles"] >= 2
    t = cb.extension().plan_summary(spec, 64, "bfloat16")  # one warp per 16-row tile
    assert t["tensor_cores"] and t["q_threads"] == t["k_threads"] == 32
    assert t["q_rows_per_block"] == t["k_rows_per_block"] == 16
    assert t["q_tiles"] == 1 + 4 and t["k_tiles"] == 16 + 16  # cos-80: 16 + 4x4-packed queries; 256 + 16x16 keys
    with pytest.raises(RuntimeError, match="dtype must be"):
        cb.extension().plan_summary(spec, 64, "float64")


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=DTYPE_IDS)
@gpu
@needs_gpu
@needs_extension
def test_gpu_agrees_with_triton(dtype):
    """cuda and triton backends both pass the oracle rule on the same inputs, and agree with each other
    within the sum of their allowed errors."""
    pytest.importorskip("triton")
    if "triton" not in available_backends("cuda"):
        pytest.skip("the triton backend is not available on this device")
    rng = seeded_rng()
    for layout in (CoSConfig.from_preset("cos-80").layout, random_layout(rng, max_scales=3, max_grid=16)):
        q, k, v = make_inputs(layout, 3, 4, rng.choice(HEAD_DIMS), dtype, "cuda", fused_kv=True, broadcast_q=False)
        out_c, grads_c, g = check_case(layout, q, k, v, backend="cuda")
        out_t = multiscale_window_attention(q, k, v, layout, backend="triton")
        grads_t = torch.autograd.grad(out_t, (q, k, v), g)
        leaves_e = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        leaves64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
        eager = reference.window_attention(*leaves_e, layout, q.shape[-1] ** -0.5)
        ref = reference_attention(*leaves64, layout)
        grads_e = torch.autograd.grad(eager, leaves_e, g)
        grads64 = torch.autograd.grad(ref, leaves64, g.double())
        atol = ATOL[dtype]
        pairs = [("out", out_c, out_t, eager, ref)] + [
            (n, a, b, e, r) for n, a, b, e, r in zip(("dq", "dk", "dv"), grads_c, grads_t, grads_e, grads64)
        ]
        for name, a, b, e, r in pairs:
            eager_err = (e.double() - r.double()).abs().max().item()
            diff = (a.double() - b.double()).abs().max().item()
            assert diff <= 4 * eager_err + 2 * atol, f"{name}: cuda vs triton differ by {diff:.3e}"


@gpu
@needs_gpu
@needs_extension
def test_gpu_resampler_cuda_matches_torch_backend():
    cfg = CoSConfig(grid=(4, 8), windows=[(4, 8), (2, 2)], queries=[3, 16], vision_dim=48, dim=64,
                    num_heads=2, llm_dim=16, num_levels=2, drop_cls=False)
    check_resampler_matches_torch_backend(
        cfg, "cuda", "cuda", lambda: [torch.randn(2, 32, 48, device="cuda") for _ in range(2)],
        tol=(1e-4, 1e-4), grad_tol=(1e-4, 1e-3),
    )


@gpu
@needs_gpu
@needs_extension
def test_gpu_empty_batch():
    layout = WindowLayout(4, [4, 2], [2, 8])
    q, k, v = random_qkv(layout, 0, 2, 32, torch.float16, "cuda")
    out = multiscale_window_attention(q, k, v, layout, backend="cuda")
    assert out.shape == q.shape
