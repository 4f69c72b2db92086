"""MultiScaleResampler: Chain-of-Sight's multi-scale visual resampler.

For each feature level l and scale s there is one block (no weights shared):
    x = q + Wo(Attn(LN(q) Wq, LN(f) Wk, LN(f) Wv))      each query attends only to its own window
    x = x + FC2(GELU(FC1(LN(x))))
Levels run in sequence (level l's outputs are level l+1's queries). The output is every scale's
queries, coarse to fine, through a final LayerNorm and a Linear to the LLM's width.
"""

from __future__ import annotations

import json
import numbers
import os
from collections.abc import Mapping
from dataclasses import replace
from operator import attrgetter
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .atomic_io import atomic_file
from .config import CoSConfig
from .grouped_linear import grouped_linear
from .layout import WindowLayout
from .ops import BACKENDS, multiscale_window_attention
from .validation import check_bool, one_of

__all__ = ["MultiScaleResampler", "ResamplerBlock", "check_device", "shape_implied_fields"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
_SHOWN = 5  # offending tensors named in an error message
_WEIGHT_FIELDS = ("vision_dim", "dim", "num_heads", "mlp_ratio", "llm_dim", "num_levels", "norm_eps")
"""The CoSConfig fields, besides the layout, that define the function of a resampler's weights: save_pretrained
records them (the whole config, in the weights' "config" metadata), and from_pretrained refuses a config.json
that disagrees. patch_size, drop_cls, concat_levels and init_std may change (input format, initialisation)."""


class ResamplerBlock(nn.Module):
    """One (level, scale) block. Its attention runs inside the resampler, all scales in one op."""

    def __init__(self, config: CoSConfig):
        super().__init__()
        dim, eps = config.dim, config.norm_eps
        self.norm_q = nn.LayerNorm(dim, eps=eps)
        self.norm_kv = nn.LayerNorm(config.vision_dim, eps=eps)
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(config.vision_dim, dim, bias=False)
        self.to_v = nn.Linear(config.vision_dim, dim, bias=False)
        self.to_out = nn.Linear(dim, dim)
        self.norm_ffn = nn.LayerNorm(dim, eps=eps)
        self.fc1 = nn.Linear(dim, config.hidden_dim)
        self.fc2 = nn.Linear(config.hidden_dim, dim)

    def ffn(self, x: torch.Tensor) -> torch.Tensor:
        """(B, n, dim) -> (B, n, dim), residual included."""
        return x + self.fc2(F.gelu(self.fc1(self.norm_ffn(x))))


class MultiScaleResampler(nn.Module):
    """Learnable queries per window of the ViT feature map, several window sizes:
    features (B, N, vision_dim) per level -> visual tokens (B, num_tokens, llm_dim).

    Args:
        config: the CoSConfig (layout, widths, levels, input format).
        backend: the attention backend, a str: "auto", "torch", or a fused one (see cos_kernels.ops).
        fused: a bool. True computes what scales share once (LayerNorm affines folded into the
            products after them, so one normalisation per LayerNorm stage and one K/V product for all
            scales; the query side's products grouped over scales, see grouped_linear; level-1 queries
            once per call rather than per image); False runs the plain block structure. Both give the
            same function of the same parameters.

    The parameters are randomly initialised (reset_parameters); from_pretrained and from_state_dict
    build one from saved weights instead.
    """

    def __init__(self, config: CoSConfig, backend: str = "auto", fused: bool = True):
        super().__init__()
        if not isinstance(config, CoSConfig):
            raise TypeError(f"config must be a CoSConfig, got {type(config).__name__}")
        self.config = config
        self.layout = config.layout
        self.backend = one_of(backend, BACKENDS, "backend")
        self.fused = check_bool(fused, "fused")
        self.queries = nn.ParameterList(
            nn.Parameter(torch.empty(n, config.dim)) for n in config.queries
        )
        self.levels = nn.ModuleList(
            nn.ModuleList(ResamplerBlock(config) for _ in range(self.layout.num_scales))
            for _ in range(config.num_levels)
        )
        self.norm_out = nn.LayerNorm(config.dim, eps=config.norm_eps)
        self.proj_out = nn.Linear(config.dim, config.llm_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal(0, init_std^2) queries and linear weights cut at +-2 absolute (timm's trunc_normal_),
        zero biases, LayerNorm (1, 0)."""
        for m in self.modules():
            self.reset_module(m)

    def reset_module(self, module: nn.Module) -> None:
        """reset_parameters for the parameters ``module`` (one of this resampler's modules) holds
        itself, not those of its children (for a library that initialises module by module)."""
        std = self.config.init_std
        if module is self.queries:
            for p in module:
                nn.init.trunc_normal_(p, std=std, a=-2.0, b=2.0)
        elif isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=std, a=-2.0, b=2.0)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    @property
    def num_tokens(self) -> int:
        """The number of visual tokens per image: every scale's queries, layout.total_queries."""
        return self.layout.total_queries

    # ---- forward ----------------------------------------------------------------------------
    def forward(self, features) -> torch.Tensor:
        """The visual tokens of a batch of images.

        Args:
            features: one tensor per feature level: a list of config.num_levels tensors, or a single
                tensor when num_levels == 1. Each is (B, N, vision_dim) with N = GH * GW patches in
                raster order, (B, N + 1, vision_dim) with a leading CLS token when config.drop_cls,
                or (B, vision_dim, GH, GW). With config.concat_levels, also one tensor holding every
                level side by side on the channel axis, (B, N or N + 1, num_levels * vision_dim)
                (LLaVA's get_image_features with a list vision_feature_layer), level l in channels
                l*C..(l+1)*C. Floating point, on the parameters' device, and in the parameters' dtype
                unless autocast is on for their device type (torch.autocast casts them where they
                meet the weights).
        Returns:
            (B, num_tokens, llm_dim): every scale's queries, coarse to fine, after the final
            LayerNorm and projection. An empty batch (B = 0) gives an empty output.
        """
        levels = self._feature_levels(features)
        B = levels[0].shape[0]
        if self.fused:
            # One (Q, dim) tensor, scales side by side. Level 1's queries are the same for every
            # image: broadcast over the batch only where they meet the image.
            x = torch.cat(list(self.queries))
            for blocks, f in zip(self.levels, levels):
                x = self._fused_level(blocks, x, f)
        else:
            x = [q.expand(B, -1, -1) for q in self.queries]
            for blocks, f in zip(self.levels, levels):
                x = self._reference_level(blocks, x, f)
            x = torch.cat(x, dim=1)
        return self.proj_out(self.norm_out(x))

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q (B or 1, Q, dim); k, v (B, S, N, dim), any strides -> (B, Q, dim).
        A q without the batch reaches the op as a batch-broadcast (stride-0) view."""
        cfg, layout = self.config, self.layout
        B, S, N, _ = k.shape
        H, D, Q = cfg.num_heads, cfg.head_dim, layout.total_queries
        q = q.view(q.shape[0], Q, H, D).expand(B, -1, -1, -1)
        o = multiscale_window_attention(
            q, k.view(B, S, N, H, D), v.view(B, S, N, H, D), layout, backend=self.backend
        )
        return o.reshape(B, Q, cfg.dim)

    def _reference_level(self, blocks, x: list[torch.Tensor], f: torch.Tensor) -> list[torch.Tensor]:
        """The plain block structure, scale by scale. x[s]: (B, n_s, dim); f: (B, N, vision_dim)."""
        q = torch.cat([blk.to_q(blk.norm_q(xs)) for blk, xs in zip(blocks, x)], dim=1)
        k = torch.stack([blk.to_k(blk.norm_kv(f)) for blk in blocks], dim=1)
        v = torch.stack([blk.to_v(blk.norm_kv(f)) for blk in blocks], dim=1)
        o = self._attend(q, k, v).split(list(self.layout.queries), dim=1)
        return [blk.ffn(xs + blk.to_out(os)) for blk, xs, os in zip(blocks, x, o)]

    def _fused_level(self, blocks, x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        """The same function with shared work done once. x: every scale's queries side by side,
        (Q, dim) at level 1, else (B, Q, dim); f: (B, N, vision_dim) -> (B, Q, dim).

        Each LayerNorm's affine folds into the linear after it: LN_s(x) W_s^T + b_s =
        norm(x) (W_s diag(gamma_s))^T + (W_s beta_s + b_s), so every norm stage is one plain
        normalisation of all rows and one product per stage with the scales' folded, stacked weights:
        K/V one product of norm(f) for all scales (read by the op through strides), the query side
        grouped_linear over the scales' segments. Residual adds and GELU run once over all rows.
        At level 1 the queries are image-independent, so Q is computed once, without the batch.
        """
        B, N, _ = f.shape
        S, dim, eps, sizes = len(blocks), self.config.dim, self.config.norm_eps, self.layout.queries

        def stacked(*names):  # each named parameter of every block, stacked: (S, ...)
            return torch.stack([attrgetter(n)(blk) for blk in blocks for n in names])

        def folded(norm, weight, bias=None):  # norm's affine folded into weight (S, out, in), bias
            gamma, beta = stacked(f"{norm}.weight", f"{norm}.bias").view(S, 2, -1).unbind(1)
            return _fold(weight, gamma, beta, bias)

        w_kv, b_kv = folded("norm_kv", stacked("to_k.weight", "to_v.weight").view(S, 2 * dim, -1))
        kv = F.linear(F.layer_norm(f, f.shape[-1:], eps=eps), w_kv.flatten(0, 1), b_kv.flatten())
        kv = kv.view(B, N, S, 2, dim)
        k, v = kv[:, :, :, 0].transpose(1, 2), kv[:, :, :, 1].transpose(1, 2)  # (B, S, N, dim)
        w_q, b_q = folded("norm_q", stacked("to_q.weight"))
        q = grouped_linear(F.layer_norm(x, (dim,), eps=eps), w_q, b_q, sizes)
        o = self._attend(q if q.dim() == 3 else q.unsqueeze(0), k, v)
        x = x + grouped_linear(o, stacked("to_out.weight"), stacked("to_out.bias"), sizes)
        w_1, b_1 = folded("norm_ffn", stacked("fc1.weight"), stacked("fc1.bias"))
        h = F.gelu(grouped_linear(F.layer_norm(x, (dim,), eps=eps), w_1, b_1, sizes))
        return x + grouped_linear(h, stacked("fc2.weight"), stacked("fc2.bias"), sizes)

    def _feature_levels(self, features) -> list[torch.Tensor]:
        """Check and normalise the input: a list of (B, N, vision_dim) tensors, one per level."""
        cfg = self.config
        if isinstance(features, torch.Tensor):
            concatenated = cfg.concat_levels and features.dim() == 3 and features.shape[-1] == cfg.num_levels * cfg.vision_dim
            if concatenated:
                features = list(features.split(cfg.vision_dim, dim=-1))
            elif cfg.num_levels == 1:
                features = [features]
            else:
                width = cfg.num_levels * cfg.vision_dim
                alternative = (f"or one (B, N, {width}) tensor of them side by side on the channel axis"
                               if cfg.concat_levels else
                               f"(CoSConfig.concat_levels=True also accepts one (B, N, {width}) tensor of "
                               f"them side by side on the channel axis)")
                raise ValueError(
                    f"this resampler has num_levels={cfg.num_levels}: pass a list of {cfg.num_levels} "
                    f"feature tensors {alternative}; got a single tensor of shape {tuple(features.shape)}"
                )
        if not isinstance(features, (list, tuple)) or not all(
            isinstance(f, torch.Tensor) for f in features
        ):
            raise TypeError(f"features must be a tensor or a list of tensors, got {type(features).__name__}")
        if len(features) != cfg.num_levels:
            raise ValueError(
                f"expected {cfg.num_levels} feature levels, got a list of {len(features)} tensors"
            )
        (gh, gw), C, N = cfg.grid, cfg.vision_dim, self.layout.num_patches
        accepted = [f"(B, {N}, {C})", f"(B, {C}, {gh}, {gw})"]
        if cfg.drop_cls:
            accepted.insert(1, f"(B, {N + 1}, {C}) with a leading CLS token")
        param = self.queries[0]
        out = []
        for i, f in enumerate(features):
            _check_feature_tensor(f, f"features[{i}]", param)
            shape = tuple(f.shape)
            if f.dim() == 4 and shape[1:] == (C, gh, gw):
                f = f.flatten(2).transpose(1, 2)
            elif f.dim() == 3 and shape[2] == C and (shape[1] == N or (cfg.drop_cls and shape[1] == N + 1)):
                f = f[:, -N:]
            else:
                raise ValueError(
                    f"features[{i}] has shape {shape}; accepted shapes: {', '.join(accepted)}"
                )
            if out and f.shape[0] != out[0].shape[0]:
                raise ValueError(
                    f"features[{i}] has batch {f.shape[0]} but features[0] has {out[0].shape[0]}"
                )
            out.append(f)
        return out

    # ---- compound token scaling -------------------------------------------------------------
    def scale_up(self, *, grid=None, windows, queries, source) -> "MultiScaleResampler":
        """A new resampler with the layout (grid, windows, queries), inflated from this one
        (Chain-of-Sight's compound token scaling).

        New scale i copies every weight of this resampler's scale ``source[i]`` (every level's block).
        Each new window takes the queries of the source window covering the same image area; when a
        window holds g times as many queries as its source window, each source query is repeated g
        times. Each new scale's window grid must refine its source's (the window counts per side are
        integer multiples), so every new window lies inside one source window.

        Args:
            grid: the new patch grid (GH, GW) or its side (default: this one's).
            windows: the new window size of each scale, as in CoSConfig.
            queries: the new number of queries of each scale.
            source: for each new scale, the index of this resampler's scale it inflates from.
        Returns:
            a MultiScaleResampler of the new layout, on this one's device and dtype, with the same
            backend and fused setting: (B, N', vision_dim) per level -> (B, sum(queries), llm_dim).
        """
        cfg = replace(self.config, grid=self.config.grid if grid is None else grid,
                      windows=list(windows), queries=list(queries))
        new_layout, old = cfg.layout, self.layout
        source = list(source)
        if len(source) != new_layout.num_scales:
            raise ValueError(
                f"source must name one old scale per new scale: {new_layout.num_scales} new scales, "
                f"got source={source}"
            )
        for i, j in enumerate(source):
            if isinstance(j, bool) or not isinstance(j, numbers.Integral) or not 0 <= j < old.num_scales:
                raise ValueError(
                    f"source[{i}] = {j!r} is not a scale of this resampler (0..{old.num_scales - 1})"
                )
            j = source[i] = int(j)  # numpy integers included
            (nr, nc), (orr, oc) = new_layout.window_grids[i], old.window_grids[j]
            if nr % orr or nc % oc:
                raise ValueError(
                    f"new scale {i} (window {new_layout.windows[i]} on grid {new_layout.grid}, a "
                    f"{nr}x{nc} window grid) cannot be mapped onto source scale {j} (window "
                    f"{old.windows[j]} on grid {old.grid}, a {orr}x{oc} window grid): the new window "
                    f"grid must be an integer refinement of the source's"
                )
            if new_layout.queries_per_window[i] % old.queries_per_window[j]:
                raise ValueError(
                    f"new scale {i} has {new_layout.queries_per_window[i]} queries per window, not a "
                    f"multiple of source scale {j}'s {old.queries_per_window[j]}"
                )
        new = type(self)(cfg, backend=self.backend, fused=self.fused).to(self.queries[0].device, self.queries[0].dtype)
        with torch.no_grad():
            for i, j in enumerate(source):
                (nr, nc), (orr, oc) = new_layout.window_grids[i], old.window_grids[j]
                g = new_layout.queries_per_window[i] // old.queries_per_window[j]
                q = self.queries[j].view(orr, oc, old.queries_per_window[j], cfg.dim)
                q = q.repeat_interleave(nr // orr, 0).repeat_interleave(nc // oc, 1)
                new.queries[i].copy_(q.repeat_interleave(g, 2).reshape(-1, cfg.dim))
                for new_blocks, old_blocks in zip(new.levels, self.levels):
                    new_blocks[i].load_state_dict(old_blocks[j].state_dict())
            new.norm_out.load_state_dict(self.norm_out.state_dict())
            new.proj_out.load_state_dict(self.proj_out.state_dict())
        return new

    # ---- checkpoints ------------------------------------------------------------------------
    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write config.json and model.safetensors into ``directory`` (created where missing), each
        atomically. The weights' metadata records the layout and the whole config, which
        from_pretrained checks config.json against.

        Args:
            directory: the folder to write; files of an earlier save there are replaced.
        """
        check_materialised(self, "save")
        directory = Path(os.fsdecode(directory))
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        metadata = {"format": "pt", "layout": json.dumps(list(self.layout.to_spec())),
                    "config": json.dumps(self.config.to_dict())}
        atomic_file(directory / WEIGHTS_NAME, lambda p: save_file(state, p, metadata=metadata))
        atomic_file(directory / CONFIG_NAME, lambda p: Path(p).write_text(self.config.to_json()))

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, backend: str = "auto", fused: bool = True, *,
        dtype: torch.dtype | None = None, device: str | torch.device | None = None,
        allow_nonfinite: bool = False,
    ) -> "MultiScaleResampler":
        """Load a resampler from a directory save_pretrained wrote (a cos-train checkpoint's bridge/
        folder is one; cos_kernels.train.load_bridge loads a run's or a checkpoint's bridge after
        verifying the checkpoint). A config.json that disagrees with the weights (their recorded
        layout and config, their shapes) is refused, and so are weights holding NaN or Inf unless
        ``allow_nonfinite``.

        Args:
            path: the directory (a str, bytes or os.PathLike).
            backend, fused: as for MultiScaleResampler.
            dtype: the parameters' floating-point dtype (default: the one they were saved in).
            device: where they go (default: the CPU).
            allow_nonfinite: load weights holding NaN or Inf.
        Returns:
            the MultiScaleResampler: (B, N, vision_dim) features per level -> (B, num_tokens, llm_dim).
        """
        _check_dtype_device(dtype, device)
        path = Path(os.fsdecode(path))
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist: expected a directory save_pretrained wrote "
                                    f"({CONFIG_NAME} and {WEIGHTS_NAME})")
        if not _is_saved_resampler(path):
            raise ValueError(
                f"{path} is neither a directory save_pretrained wrote (a resampler's {CONFIG_NAME} and "
                f"{WEIGHTS_NAME}; a cos-train checkpoint holds one as bridge/) nor anything else from_pretrained "
                f"reads: load the bridge of a cos-train run, its checkpoints/ directory or one checkpoint with "
                f"cos_kernels.train.load_bridge({str(path)!r}), which verifies the checkpoint first")
        config, state, where = _read_saved(path)
        return cls.from_state_dict(config, state, backend, fused, dtype=dtype, device=device, where=where,
                                   allow_nonfinite=allow_nonfinite)

    @classmethod
    def from_state_dict(
        cls, config: CoSConfig, state: dict[str, torch.Tensor], backend: str = "auto", fused: bool = True, *,
        dtype: torch.dtype | None = None, device: str | torch.device | None = None, where: str = "the state dict",
        allow_nonfinite: bool = False,
    ) -> "MultiScaleResampler":
        """A resampler of ``config`` holding ``state``, without a random initialisation. Tensors
        holding NaN or Inf are refused (ValueError naming them) unless ``allow_nonfinite``.

        Args:
            config: the CoSConfig the state was trained with.
            state: {name: floating-point tensor} with exactly the names and shapes of
                MultiScaleResampler(config).state_dict() (e.g. "queries.0": (n_0, dim)).
            backend, fused: as for MultiScaleResampler.
            dtype: the parameters' floating-point dtype (default: the state's).
            device: where they go (default: the CPU).
            where: names the source in errors.
            allow_nonfinite: load tensors holding NaN or Inf.
        Returns:
            the MultiScaleResampler, holding the tensors themselves where dtype and device already
            match, else cast copies.
        """
        device = _check_dtype_device(dtype, device)
        check_bool(allow_nonfinite, "allow_nonfinite")
        with torch.device("meta"):
            model = cls(config, backend=backend, fused=fused)
        expected = model.state_dict()
        _check_state(expected, state, config, where)
        if not allow_nonfinite:
            check_finite({k: state[k] for k in expected}, where)  # in the model's order
        model.load_state_dict(state, assign=True)
        return model.to(device=device, dtype=dtype or state["queries.0"].dtype)


def check_device(device, name: str = "device", fix: str | None = None) -> torch.device:
    """``device`` (a torch.device, a str such as "cuda:0", or None for the CPU) as a torch.device.

    TypeError unless it names a device; ValueError for a CUDA device where CUDA is not available
    (torch built without CUDA, or no GPU visible) or whose index is beyond the visible devices, so
    that no caller meets torch's "Torch not compiled with CUDA enabled" deep inside a traceback.
    ``name`` is the argument's name in the messages, ``fix`` the advice that ends the CUDA one
    (default: use the CPU or None)."""
    try:
        resolved = torch.device("cpu" if device is None else device)
    except (TypeError, RuntimeError) as err:
        raise TypeError(f"{name} must be a torch.device, a str such as 'cuda:0', or None, got {device!r}") from err
    if resolved.type != "cuda":
        return resolved
    if not torch.cuda.is_available():
        why = (f"torch {torch.__version__} is built without CUDA" if torch.version.cuda is None else
               f"no GPU is visible to torch {torch.__version__} (CUDA {torch.version.cuda})")
        fix = fix or f"use {name}='cpu' or None"
        raise ValueError(f"{name}={str(resolved)!r} but CUDA is not available here ({why}): {fix}")
    count = torch.cuda.device_count()
    if resolved.index is not None and resolved.index >= count:
        raise ValueError(f"{name}={str(resolved)!r} but only {count} CUDA device(s) are visible "
                         f"(cuda:0..cuda:{count - 1})")
    return resolved


def _check_dtype_device(dtype, device) -> torch.device:
    """The device (check_device); TypeError unless dtype is a floating-point torch.dtype or None."""
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating-point torch.dtype or None, got {dtype!r}")
    return check_device(device)


def check_materialised(resampler: nn.Module, action: str) -> None:
    """ValueError unless ``resampler``'s weights hold data (none on the meta device); ``action``
    names what needs them ("save")."""
    state = resampler.state_dict()
    meta = [k for k, v in state.items() if v.is_meta]
    if meta:
        raise ValueError(
            f"cannot {action} this {type(resampler).__name__}: its weights are on the meta device, not "
            f"materialised ({len(meta)} of {len(state)} tensors, e.g. {meta[0]!r}); load them "
            f"(MultiScaleResampler.from_pretrained, or load_state_dict(state, assign=True)) or initialise "
            f"them (resampler.to_empty(device='cpu') then resampler.reset_parameters()) first"
        )


def check_finite(state: dict[str, torch.Tensor], where) -> None:
    """ValueError naming ``where`` and the first few tensors of ``state`` holding NaN or Inf (how
    many of their values), and the allow_nonfinite opt-out."""
    bad = [f"{k!r} ({n} of its {v.numel()} values)" for k, v in state.items()
           if (n := int(torch.isfinite(v).logical_not().sum()))]
    if bad:
        raise ValueError(f"{where} holds NaN or Inf in {len(bad)} tensor{'s' * (len(bad) > 1)}: {first_few(bad)}; "
                         f"expected finite weights (pass allow_nonfinite=True to load them anyway)")


def first_few(items: list[str]) -> str:
    """The first few of ``items`` (offending names in an error message), comma-separated, with ", ..."
    after them when there are more."""
    return ", ".join(items[:_SHOWN]) + (", ..." if len(items) > _SHOWN else "")


def read_safetensors(path: Path, expected: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of the safetensors file ``path``; one safetensors cannot read (empty,
    truncated, another format) raises ValueError naming the file, its size, safetensors' complaint and
    ``expected`` (what the file should be)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
    except SafetensorError as err:
        raise ValueError(f"{path} ({path.stat().st_size} bytes) is not a readable safetensors file "
                         f"({err}): expected {expected}") from None


def _is_saved_resampler(path: Path) -> bool:
    """Whether ``path`` holds what save_pretrained writes: config.json and model.safetensors, where
    config.json is not a cos-train checkpoint's (a JSON object with a "train" entry; the checkpoint's
    bridge/ folder is the resampler's). A broken config.json counts as save_pretrained's, so that
    reading it reports what is wrong with it."""
    if not ((path / WEIGHTS_NAME).is_file() and (path / CONFIG_NAME).is_file()):
        return False
    try:
        saved = json.loads((path / CONFIG_NAME).read_bytes())
    except (OSError, ValueError):
        return True
    return not (isinstance(saved, dict) and "train" in saved)


def _read_saved(directory: Path) -> tuple[CoSConfig, dict[str, torch.Tensor], Path]:
    """(config, state dict, weights file) of a save_pretrained directory; a config.json that
    disagrees with the weights (their recorded layout and config, their shapes) is refused."""
    config_path, weights = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    config = CoSConfig.from_json(config_path)
    state, metadata = read_safetensors(weights, "the weights MultiScaleResampler.save_pretrained writes")
    saved_layout = _metadata_entry(metadata, "layout", weights, _layout_from_metadata)
    if saved_layout is not None and saved_layout != config.layout:
        raise ValueError(f"{weights} holds weights for {saved_layout} but {config_path} describes {config.layout}")
    recorded = _metadata_entry(metadata, "config", weights,
                               lambda text: CoSConfig.from_json_text(text, "the entry"))
    implied = shape_implied_fields(state)
    if recorded is not None:
        implied.update({f: (getattr(recorded, f), "as recorded in their 'config' metadata")
                        for f in _WEIGHT_FIELDS if f not in implied})
    for field, (value, evidence) in implied.items():
        if getattr(config, field) != value:
            given = (f"mlp_ratio = {config.mlp_ratio!r} gives hidden_dim = int(dim * mlp_ratio) = {config.hidden_dim}"
                     if field == "hidden_dim" else f"{field} = {getattr(config, field)!r}")
            raise ValueError(f"{config_path}: {given} but the weights in {weights} imply {field} = {value!r} "
                             f"({evidence})")
    return config, state, weights


def _metadata_entry(metadata: dict[str, str], key: str, weights: Path, parse):
    """``parse`` of the weights' metadata entry ``key`` (None where absent); one that does not parse
    raises ValueError naming the file, the key, the entry and what it should be."""
    if key not in metadata:
        return None
    try:
        return parse(metadata[key])
    except (TypeError, ValueError) as err:
        raise ValueError(f"{weights}: metadata {key!r} = {metadata[key][:200]!r} is not what save_pretrained "
                         f"records ({err})") from None


def _layout_from_metadata(text: str) -> WindowLayout:
    """The layout of the "layout" metadata entry: a JSON list (GH, GW, wh_0, ww_0, n_0, ...)."""
    spec = json.loads(text)
    if not isinstance(spec, list):
        raise ValueError(f"expected a JSON list of a layout's integers (GH, GW, wh, ww, n, ...), got "
                         f"{type(spec).__name__}")
    return WindowLayout.from_spec(spec)


def shape_implied_fields(state: dict[str, torch.Tensor]) -> dict[str, tuple[object, str]]:
    """What a resampler state dict's names and shapes imply of its config: field name (hidden_dim
    standing for mlp_ratio) -> (value, where it is read). Entries whose tensors are missing or of too
    few dimensions are left out (_check_state reports those)."""
    def size(name, axis):  # (the size, its evidence) or None
        t = state.get(name)
        if isinstance(t, torch.Tensor) and t.dim() > axis:
            return t.shape[axis], f"{name!r} has shape {tuple(t.shape)}"
        return None

    scales = [size(f"queries.{s}", 0) for s in range(sum(k.startswith("queries.") for k in state))]
    levels = sorted({k.split(".")[1] for k in state if k.startswith("levels.")})
    implied = {"dim": size("queries.0", 1), "vision_dim": size("levels.0.0.to_k.weight", 1),
               "hidden_dim": size("levels.0.0.fc1.weight", 0), "llm_dim": size("proj_out.weight", 0),
               "num_levels": (len(levels), f"its tensors name levels {', '.join(levels)}") if levels else None,
               "queries": ([n for n, _ in scales], ", ".join(e for _, e in scales))
               if scales and None not in scales else None}
    return {k: v for k, v in implied.items() if v is not None}


def _check_state(expected: dict, state: dict, config: CoSConfig, where) -> None:
    """ValueError naming the tensors unless ``state`` has exactly ``expected``'s names and shapes,
    each a floating-point tensor (TypeError for a value that is no tensor)."""
    if not isinstance(state, Mapping):
        raise TypeError(f"{where}: the state must be a dict of tensors, got {type(state).__name__}")
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{where} does not match {config.layout} (num_levels={config.num_levels}): missing "
            f"{missing}, unexpected {unexpected}"
        )
    for k, want in expected.items():
        t = state[k]
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{where}: {k!r} must be a tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise ValueError(f"{where}: tensor {k!r} has dtype {t.dtype}; expected a floating-point dtype "
                             f"(float32, bfloat16, ...) for a resampler's weights")
        if t.shape != want.shape:
            raise ValueError(
                f"{where}: tensor {k!r} has shape {tuple(t.shape)} but the config ({config.layout}, "
                f"dim={config.dim}, vision_dim={config.vision_dim}) expects {tuple(want.shape)}"
            )


def _check_feature_tensor(f: torch.Tensor, name: str, param: torch.Tensor) -> None:
    """Refuse a feature tensor that is not floating point, not on ``param``'s device, or (with no
    autocast on for its device type) not in ``param``'s dtype."""
    if not f.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {f.dtype}")
    if f.device != param.device:
        raise ValueError(
            f"{name} is on {f.device} but the resampler's parameters are on {param.device}: move "
            f"one to the other (features.to(device) or resampler.to(device))"
        )
    if f.dtype != param.dtype and not _autocast_enabled(f.device.type):
        raise TypeError(
            f"{name} has dtype {f.dtype} but the resampler's parameters are {param.dtype}: cast the "
            f"features (features.to({param.dtype})) or run under torch.autocast"
        )


def _autocast_enabled(device_type: str) -> bool:
    """Whether autocast is on for ``device_type`` (False for types without autocast, e.g. meta)."""
    return torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)


def _fold(weight, gamma, beta, bias=None) -> tuple[torch.Tensor, torch.Tensor]:
    """LN with affine (gamma, beta) then x W^T + bias, per scale, as norm(x) (W diag(gamma))^T +
    (W beta + bias). weight (S, out, in); gamma, beta (S, in); bias (S, out) or None ->
    the folded weight (S, out, in) and bias (S, out)."""
    folded_bias = (weight @ beta.unsqueeze(-1)).squeeze(-1)
    if bias is not None:
        folded_bias = folded_bias + bias
    return weight * gamma.unsqueeze(1), folded_bias
