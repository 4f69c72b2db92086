"""multiscale_window_attention: input validation and the one dispatch point for every backend.

Backends:
  "torch"  eager PyTorch (one SDPA per scale over window-folded K/V), differentiable, any device.
  fused backends registered in ``registry`` (Triton, CUDA), run through the custom ops of
  ``custom_op``.
  "auto"   the best backend available for the tensors' device.
"""

from __future__ import annotations

import importlib

import torch

from ..layout import WindowLayout
from ..validation import one_of, positive_real
from . import reference
from .registry import get_kernel, registered_kernels

__all__ = ["multiscale_window_attention", "available_backends", "resolve_backend", "BACKENDS", "AUTO_ORDER"]

# Fused backends: name -> module that registers it on import.
_FUSED_MODULES: dict[str, str] = {"cuda": ".cuda_backend", "triton": ".triton_backend"}
BACKENDS = ("auto", "torch", *_FUSED_MODULES)

# backend="auto": the fused backends per dtype, most preferred first (the first that can run wins,
# torch after them). It follows the last GPU run that timed both side by side (its kernel table's
# forward+backward medians at the presets: benchmarks.gpu_summary.fused_order, in that run's
# SUMMARY.md); benchmarks/NOTES.md says which run set it and why.
AUTO_ORDER: dict[torch.dtype, tuple[str, ...]] = {
    torch.float32: ("cuda", "triton"),
    torch.float16: ("cuda", "triton"),
    torch.bfloat16: ("cuda", "triton"),
}
_IMPORT_ERRORS: dict[str, str] = {}

# Largest softmax_scale accepted: the kernels scale the logits in float32, where a larger scale
# turns moderate logits into inf and the softmax into NaN.
MAX_SOFTMAX_SCALE = 1e6


def _load_fused(name: str):
    """The registered kernel ``name``, importing its module on first use; None if it cannot load."""
    if name not in registered_kernels() and name not in _IMPORT_ERRORS:
        try:
            importlib.import_module(_FUSED_MODULES[name], __name__)
        except ImportError as err:
            _IMPORT_ERRORS[name] = f"{type(err).__name__}: {err}"
    return registered_kernels().get(name)


@torch.compiler.assume_constant_result
def _unavailable_reason(name: str, device: torch.device) -> str | None:
    kernel = _load_fused(name)
    if kernel is None:
        return f"the {name} backend could not be loaded ({_IMPORT_ERRORS[name]})"
    return kernel.unavailable_reason(device)


def available_backends(device="cpu", dtype: torch.dtype | None = None) -> list[str]:
    """The backends that can run on a device, most preferred first.

    Args:
        device: a torch.device or its name ("cpu", "cuda", "cuda:1").
        dtype: the inputs' dtype, which picks the fused backends' order (AUTO_ORDER); None: bf16's.

    Returns:
        Backend names, e.g. ``["cuda", "triton", "torch"]`` on a GPU, ``["torch"]`` on a CPU:
        the fused backends that load and can run there in AUTO_ORDER, then "torch" (never "auto").
    """
    device = torch.device(device)
    order = AUTO_ORDER.get(dtype if dtype is not None else torch.bfloat16, tuple(_FUSED_MODULES))
    return [n for n in order if _unavailable_reason(n, device) is None] + ["torch"]


def resolve_backend(backend: str, device, dtype: torch.dtype | None = None) -> str:
    """The concrete backend ``backend`` stands for on ``device`` (for inputs of ``dtype``: "auto"
    follows AUTO_ORDER); raises if it cannot run there."""
    one_of(backend, BACKENDS, "backend")
    device = torch.device(device)
    if backend == "auto":
        if device.type != "cuda":
            return "torch"
        return available_backends(device, dtype)[0]
    if backend != "torch":
        reason = _unavailable_reason(backend, device)
        if reason is not None:
            raise RuntimeError(f"backend={backend!r} cannot run on {device}: {reason}")
    return backend


def check_qkv(q, k, v, layout) -> None:
    """The q, k, v contract of multiscale_window_attention against ``layout`` (its docstring), checked
    by the dispatch and by the fused custom ops (direct torch.ops callers); raises naming the input."""
    if not isinstance(layout, WindowLayout):
        raise TypeError(f"layout must be a cos_kernels.WindowLayout, got {type(layout).__name__}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if q.dim() != 4:
        raise ValueError(f"q must have shape (B, Q, H, D), got {tuple(q.shape)}")
    B, Q, H, D = q.shape
    for name, size in (("heads H", H), ("head dim D", D)):
        if size < 1:
            raise ValueError(f"q has {name} = {size} (shape (B, Q, H, D) = {tuple(q.shape)}): expected {name[-1]} >= 1")
    want_kv = (B, layout.num_scales, layout.num_patches, H, D)
    if Q != layout.total_queries:
        raise ValueError(
            f"q has {Q} queries (shape {tuple(q.shape)}) but {layout} has {layout.total_queries}"
        )
    for name, t in (("k", k), ("v", v)):
        if tuple(t.shape) != want_kv:
            raise ValueError(
                f"{name} must have shape (B, S, N, H, D) = {want_kv} for q of shape "
                f"{tuple(q.shape)} and {layout}, got {tuple(t.shape)}"
            )
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype} and {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k and v must be on one device, got {q.device}, {k.device} and {v.device}")


def _autocast_inputs(q, k, v):
    """Under autocast, q, k and v of different floating dtypes meet in the autocast dtype (as a
    matmul's operands would); inputs of one dtype run in that dtype, the one autocast gave them."""
    if not all(isinstance(t, torch.Tensor) and t.is_floating_point() for t in (q, k, v)):
        return q, k, v
    if q.dtype == k.dtype == v.dtype:
        return q, k, v
    device_type = q.device.type
    if not torch.is_autocast_enabled(device_type):
        return q, k, v
    dtype = torch.get_autocast_dtype(device_type)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def multiscale_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: WindowLayout,
    *,
    softmax_scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Windowed cross-attention of every scale of ``layout`` in one call.

    Each query attends, with softmax, over the keys and values of its own scale restricted to the
    patches of its own window.

    Args:
        q: (B, Q, H, D) queries, Q = layout.total_queries, ordered scale by scale, windows in
            raster order, each window's queries contiguous; H, D >= 1. B = 0 (an empty batch)
            gives an empty output.
        k, v: (B, S, N, H, D), S = layout.num_scales, N = GH * GW patches in raster order; any
            strides. q, k and v share one floating dtype and one device; under autocast, mixed
            dtypes are first cast to the autocast dtype.
        layout: the WindowLayout giving the grid, the windows and the queries of every scale.
        softmax_scale: a real number (Python or numpy scalar) in (0, 1e6] (the kernels scale the
            logits in float32); None: D ** -0.5.
        backend: "auto" (the first of AUTO_ORDER that can run on q's device, "torch" off CUDA),
            "torch", "triton" or "cuda".

    Returns:
        (B, Q, H, D) in q's dtype, differentiable with respect to q, k and v on every backend.

    Raises:
        TypeError / ValueError naming the argument for inputs outside this contract; RuntimeError
        where the chosen backend cannot run on the device.
    """
    q, k, v = _autocast_inputs(q, k, v)
    check_qkv(q, k, v, layout)
    if softmax_scale is None:
        scale = q.shape[-1] ** -0.5
    else:
        scale = positive_real(softmax_scale, "softmax_scale", at_most=MAX_SOFTMAX_SCALE,
                              note="(the kernels scale logits in float32)", type_expected="a real number (float) or None")
    name = resolve_backend(backend, q.device, q.dtype)
    if name == "torch":
        return reference.window_attention(q, k, v, layout, scale)
    kernel = get_kernel(name)
    if q.dtype not in kernel.dtypes:
        raise TypeError(f"backend={name!r} supports dtypes {list(kernel.dtypes)}, got {q.dtype}")
    if q.shape[-1] not in kernel.head_dims:
        raise ValueError(
            f"backend={name!r} supports head dims {kernel.head_dims.start}..{kernel.head_dims.stop - 1}, "
            f"got D={q.shape[-1]}"
        )
    from .custom_op import fused_window_attention

    return fused_window_attention(q, k, v, layout, scale, name)
