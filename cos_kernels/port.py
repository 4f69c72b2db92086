"""Convert checkpoints between the public LLaVA port of Chain-of-Sight and MultiScaleResampler.

The port (github.com/zwl666666/Skip-Vision, llava/model/multimodal_projector/cos.py) builds its
projector from a *port config*, a dict of the cos_* keys of its COS_CONFIGS table, chosen in the LLaVA
model config by ``cos_config_version`` beside ``mm_projector_type = "chain-of-sight"``:

    cos_tokens_per_side  int        the patch grid's side (square grid)
    cos_window_sizes     [int]      per scale, the window side (square windows)
    cos_n_query          [int]      per scale, the total queries
    cos_seq_feat_levels  [int]      the ViT hidden_states indices consumed in sequence, one per level
    cos_out_dim          int        the resampler's width; heads = cos_out_dim // 64
    cos_context_dim      int        the ViT's width
    llm_dim              int        the output width
    cos_feat_levels      [int]      unused by the module (read by nothing here)

Its parameters, per scale (window side ws, nq queries) and level (hidden_states index lvl), tag =
``0_w{ws}_l{lvl}_q{nq}``, map to ours (scale s, level position l) as:

    cls_token_w{ws}_q{nq}                (1, nq, dim)        queries.{s}  (nq, dim)
    attn_{tag}.query_norm.{weight,bias}  (dim,)              levels.{l}.{s}.norm_q
    attn_{tag}.cont_norm.{weight,bias}   (context_dim,)      levels.{l}.{s}.norm_kv
    attn_{tag}.to_q.weight               (dim, dim)          levels.{l}.{s}.to_q
    attn_{tag}.to_kv.weight              (2 dim, context)    levels.{l}.{s}.to_k (first half), to_v
    attn_{tag}.proj.{weight,bias}        (dim, dim), (dim,)  levels.{l}.{s}.to_out
    ln_{tag}.{weight,bias}               (dim,)              levels.{l}.{s}.norm_ffn
    mlp_{tag}.fc1.{weight,bias}          (4 dim, dim)        levels.{l}.{s}.fc1
    mlp_{tag}.fc2.{weight,bias}          (dim, 4 dim)        levels.{l}.{s}.fc2
    ln_out.{weight,bias}                 (dim,)              norm_out
    out_proj.{weight,bias}               (llm_dim, dim)      proj_out

Both modules compute the same function of these parameters: the same query order (windows in
raster order, each window's queries contiguous), softmax scale head_dim ** -0.5, exact GELU,
LayerNorm eps 1e-5 (the port's nn.LayerNorm default, set explicitly in the CoSConfig made here), CLS
token dropped. In a LLaVA checkpoint each key carries a prefix such as ``model.mm_projector.``.

    python -m cos_kernels.port to-cos mm_projector.bin port_config.json OUT_DIR
    python -m cos_kernels.port to-port RESAMPLER_DIR OUT_DIR --feature-levels 15 22
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path

import torch

from .atomic_io import atomic_file, atomic_text
from .config import CoSConfig
from .resampler import (
    MultiScaleResampler,
    check_bool,
    check_device,
    check_finite,
    check_materialised,
    first_few,
    read_safetensors,
)
from .validation import is_integer, positive_int

__all__ = [
    "config_from_port",
    "config_to_port",
    "state_dict_from_port",
    "state_dict_to_port",
    "load_port_checkpoint",
    "save_port_checkpoint",
    "PORT_EPS",
    "PORT_PREFIX",
    "PORT_CONFIG_NAME",
    "PORT_WEIGHTS_NAME",
]

PORT_EPS = 1e-5
"""The port's LayerNorm epsilon (nn.LayerNorm's default)."""
PORT_PREFIX = "model.mm_projector."
"""The projector's key prefix in a LLaVA checkpoint (and in its mm_projector.bin)."""
PORT_WEIGHTS_NAME = "mm_projector.bin"
"""The name LLaVA gives the projector's weights file."""
PORT_CONFIG_NAME = "port_config.json"
"""save_port_checkpoint writes the port config under this name beside the weights."""

_PROJECTOR = "mm_projector"
_HEAD_DIM = 64  # the port's heads: cos_out_dim // 64
_REQUIRED_KEYS = ("cos_tokens_per_side", "cos_window_sizes", "cos_n_query", "cos_seq_feat_levels",
                  "cos_out_dim", "cos_context_dim", "llm_dim")


# ---- configs ------------------------------------------------------------------------------------
def config_from_port(port_config: Mapping, *, patch_size: int = 14) -> tuple[CoSConfig, list[int]]:
    """The CoSConfig a port config describes.

    Args:
        port_config: the cos_* keys and llm_dim. Other keys are ignored, so a LLaVA model config
            holding the cos_* keys is accepted; where it also holds ``mm_projector_type``,
            ``mm_hidden_size`` or ``hidden_size``, they must agree ("chain-of-sight",
            cos_context_dim, llm_dim).
        patch_size: the ViT's patch side (a port config does not record it).

    Returns:
        (config, feature_levels): the CoSConfig, and the hidden_states indices it consumes, one per
        level, in order (cos_seq_feat_levels).

    Raises:
        ValueError for a missing key, TypeError for a wrongly typed one, each naming the key; also
        ValueError where scales repeat a (window side, queries) pair or levels repeat an index (the
        port names those parameters alike, so they would be one shared set).
    """
    if not isinstance(port_config, Mapping):
        raise TypeError(f"port_config must be a dict of the cos_* keys, got {type(port_config).__name__}")
    grid = _port_int(port_config, "cos_tokens_per_side")
    windows = _port_int_list(port_config, "cos_window_sizes")
    queries = _port_int_list(port_config, "cos_n_query")
    levels = _port_int_list(port_config, "cos_seq_feat_levels", positive=False)
    dim = _port_int(port_config, "cos_out_dim")
    vision_dim = _port_int(port_config, "cos_context_dim")
    llm_dim = _port_int(port_config, "llm_dim")
    _check_llava_keys(port_config, vision_dim, llm_dim)
    if len(windows) != len(queries):
        raise ValueError(
            f"port config: cos_window_sizes {windows} and cos_n_query {queries} must have one entry "
            f"per scale"
        )
    _check_unique("port config: cos_window_sizes and cos_n_query pairs", list(zip(windows, queries)))
    _check_unique("port config: cos_seq_feat_levels", levels)
    if dim < _HEAD_DIM:
        raise ValueError(f"port config: cos_out_dim must be at least {_HEAD_DIM} (heads = cos_out_dim // 64), "
                         f"got {dim}")
    try:
        config = CoSConfig(
            grid=grid, windows=windows, queries=queries, patch_size=patch_size, vision_dim=vision_dim,
            dim=dim, num_heads=dim // _HEAD_DIM, mlp_ratio=4.0, llm_dim=llm_dim, num_levels=len(levels),
            drop_cls=True, norm_eps=PORT_EPS,
        )
    except (TypeError, ValueError) as err:
        raise type(err)(f"port config (cos_tokens_per_side={grid}, cos_window_sizes={windows}, "
                        f"cos_n_query={queries}, cos_out_dim={dim}) is not a valid resampler: {err}") from None
    return config, levels


def config_to_port(config: CoSConfig, feature_levels) -> dict:
    """The port config of a CoSConfig (config_from_port's inverse).

    Args:
        config: the CoSConfig; patch_size and drop_cls are not part of a port config (the port
            drops a CLS token when present).
        feature_levels: hidden_states indices, one per level, in order (num_levels distinct ints).

    Returns:
        A dict of the cos_* keys and llm_dim. cos_feat_levels, unused by the port's module, is the
        last level once per scale, as the port's own configs have it.

    Raises:
        ValueError where the port cannot express the config: num_heads != dim // 64,
        mlp_ratio != 4, norm_eps != 1e-5 (use dataclasses.replace(config, norm_eps=1e-5) if that
        small change of function is acceptable), a non-square grid or window, scales repeating a
        (window side, queries) pair, or feature_levels not num_levels distinct ints.
    """
    if not isinstance(config, CoSConfig):
        raise TypeError(f"config must be a CoSConfig, got {type(config).__name__}")
    levels = _feature_levels(feature_levels, config.num_levels)
    problems = []
    if config.num_heads != config.dim // _HEAD_DIM:
        problems.append(f"num_heads = {config.num_heads} (the port has dim // 64 = {config.dim // _HEAD_DIM})")
    if config.mlp_ratio != 4.0:
        problems.append(f"mlp_ratio = {config.mlp_ratio} (the port has 4)")
    if config.norm_eps != PORT_EPS:
        problems.append(f"norm_eps = {config.norm_eps} (the port has {PORT_EPS})")
    sides = _square_sides(config)
    if sides is None:
        problems.append(f"grid {config.grid} / windows {config.windows} (the port has square ones only)")
    if problems:
        raise ValueError(f"the port cannot express this CoSConfig: {'; '.join(problems)}")
    grid, windows = sides
    _check_unique("CoSConfig windows and queries pairs", list(zip(windows, config.queries)))
    return {
        "cos_tokens_per_side": grid,
        "cos_window_sizes": windows,
        "cos_n_query": list(config.queries),
        "cos_feat_levels": [levels[-1]] * len(windows),
        "cos_seq_feat_levels": levels,
        "cos_out_dim": config.dim,
        "cos_context_dim": config.vision_dim,
        "llm_dim": config.llm_dim,
    }


def _port_int(port_config: Mapping, key: str) -> int:
    return positive_int(_port_value(port_config, key), f"port config: {key}")


def _port_int_list(port_config: Mapping, key: str, positive: bool = True) -> list[int]:
    value = _port_value(port_config, key)
    expected = f"a non-empty list of {'positive ' if positive else ''}integers"
    if (not isinstance(value, (list, tuple)) or not value
            or not all(map(is_integer, value))):
        raise TypeError(f"port config: {key} must be {expected}, got {value!r}")
    if positive and min(value) <= 0:
        raise ValueError(f"port config: {key} must be {expected}, got {list(value)}")
    return [int(v) for v in value]


def _port_value(port_config: Mapping, key: str):
    if key not in port_config:
        raise ValueError(f"port config: missing key {key!r}; a port config holds {sorted(_REQUIRED_KEYS)}")
    return port_config[key]


def _check_llava_keys(port_config: Mapping, vision_dim: int, llm_dim: int) -> None:
    """The LLaVA model config's own keys, where present, agree with the cos_* ones."""
    expected = {"mm_projector_type": "chain-of-sight", "mm_hidden_size": vision_dim, "hidden_size": llm_dim}
    for key, want in expected.items():
        if key in port_config and port_config[key] != want:
            raise ValueError(f"port config: {key} = {port_config[key]!r} but the cos_* keys give {want!r}")


def _check_unique(what: str, items: list) -> None:
    repeated = sorted({x for x in items if items.count(x) > 1})
    if repeated:
        raise ValueError(f"{what} must be distinct (the port would name their parameters alike), "
                         f"got {items} repeating {repeated}")


def _feature_levels(feature_levels, num_levels: int) -> list[int]:
    """feature_levels as a list of num_levels distinct ints."""
    if (not isinstance(feature_levels, (list, tuple))
            or not all(map(is_integer, feature_levels))):
        raise TypeError(f"feature_levels must be a list of ints (ViT hidden_states indices), got {feature_levels!r}")
    if len(feature_levels) != num_levels:
        raise ValueError(f"feature_levels must name one hidden_states index per level ({num_levels}), "
                         f"got {list(feature_levels)}")
    levels = [int(v) for v in feature_levels]
    _check_unique("feature_levels", levels)
    return levels


def _square_sides(config: CoSConfig) -> tuple[int, list[int]] | None:
    """(grid side, window sides) of a config whose grid and windows are square, else None."""
    pairs = [config.grid] + [tuple(w) if isinstance(w, list) else (w, w) for w in config.windows]
    if any(h != w for h, w in pairs):
        return None
    return pairs[0][0], [h for h, _ in pairs[1:]]


# ---- parameter names ----------------------------------------------------------------------------
_BLOCK_PARAMS = (  # (port name, tag to fill in; our name inside the block), one tensor each
    ("attn_{tag}.query_norm.weight", "norm_q.weight"), ("attn_{tag}.query_norm.bias", "norm_q.bias"),
    ("attn_{tag}.cont_norm.weight", "norm_kv.weight"), ("attn_{tag}.cont_norm.bias", "norm_kv.bias"),
    ("attn_{tag}.to_q.weight", "to_q.weight"),
    ("attn_{tag}.proj.weight", "to_out.weight"), ("attn_{tag}.proj.bias", "to_out.bias"),
    ("ln_{tag}.weight", "norm_ffn.weight"), ("ln_{tag}.bias", "norm_ffn.bias"),
    ("mlp_{tag}.fc1.weight", "fc1.weight"), ("mlp_{tag}.fc1.bias", "fc1.bias"),
    ("mlp_{tag}.fc2.weight", "fc2.weight"), ("mlp_{tag}.fc2.bias", "fc2.bias"),
)


def _name_map(config: CoSConfig, levels: list[int]) -> dict[str, tuple[str, ...]]:
    """Port name (no prefix) -> our names. One port tensor is our tensors concatenated on dim 0
    (to_kv = [to_k; to_v]), or, for a cls_token, our queries with a leading axis of 1."""
    sides = [w if isinstance(w, int) else w[0] for w in config.windows]
    names = {f"cls_token_w{ws}_q{nq}": (f"queries.{s}",) for s, (ws, nq) in enumerate(zip(sides, config.queries))}
    for level, lvl in enumerate(levels):
        for s, (ws, nq) in enumerate(zip(sides, config.queries)):
            tag, ours = f"0_w{ws}_l{lvl}_q{nq}", f"levels.{level}.{s}."
            for port, name in _BLOCK_PARAMS:
                names[port.format(tag=tag)] = (ours + name,)
            names[f"attn_{tag}.to_kv.weight"] = (ours + "to_k.weight", ours + "to_v.weight")
    for port, ours in (("ln_out", "norm_out"), ("out_proj", "proj_out")):
        for p in ("weight", "bias"):
            names[f"{port}.{p}"] = (f"{ours}.{p}",)
    return names


def _port_tensor(port_name: str, ours: list[torch.Tensor]) -> torch.Tensor:
    """Our tensors of one port name -> the port's tensor (a new contiguous tensor)."""
    if port_name.startswith("cls_token_"):
        return ours[0].detach().unsqueeze(0).contiguous()
    return torch.cat([t.detach() for t in ours])


def _our_tensors(port_name: str, tensor: torch.Tensor, count: int) -> tuple[torch.Tensor, ...]:
    """The port's tensor of one port name -> our ``count`` tensors (views of it)."""
    if port_name.startswith("cls_token_"):
        tensor = tensor[0]
    return tensor.chunk(count)


def _expected_port_shapes(config: CoSConfig, levels: list[int]) -> dict[str, tuple[int, ...]]:
    """Port name -> shape, from a MultiScaleResampler of ``config`` built on the meta device."""
    with torch.device("meta"):
        ours = MultiScaleResampler(config, backend="torch").state_dict()
    return {port: tuple(_port_tensor(port, [ours[n] for n in names]).shape)
            for port, names in _name_map(config, levels).items()}


# ---- state dicts --------------------------------------------------------------------------------
def state_dict_from_port(state: Mapping[str, torch.Tensor], port_config: Mapping) -> dict[str, torch.Tensor]:
    """A port state dict in MultiScaleResampler's names.

    Args:
        state: name -> tensor. Where no key contains "mm_projector", every key is a bare port name
            (the projector's own state dict). Otherwise it is taken for a LLaVA checkpoint, as
            LLaVA's loader takes it: keys without "mm_projector" (vision tower, LLM) are ignored,
            and each other key's port name is what follows its first "mm_projector.".
        port_config: the port config the weights were trained under (config_from_port).

    Returns:
        MultiScaleResampler state-dict names -> tensors: views of the given ones, their dtype and
        device kept (a port to_kv (2 dim, vision_dim) gives to_k and to_v, (dim, vision_dim) each).

    Raises:
        ValueError listing the first few offending keys for a projector key that does not map, a
        missing one, a name given twice (under two prefixes) or a shape other than the config's.
    """
    config, levels = config_from_port(port_config)
    if not isinstance(state, Mapping):
        raise TypeError(f"state must be a state dict (a mapping of names to tensors), got {type(state).__name__}")
    names = _name_map(config, levels)
    given = _port_names(state)
    described = f"the port config ({config.layout}, cos_seq_feat_levels={levels}, dim={config.dim})"
    unexpected = [key for name, key in given.items() if name not in names]
    missing = [name for name in names if name not in given]
    if unexpected or missing:
        raise ValueError(
            f"the port state dict does not match {described}: {len(unexpected)} unexpected keys "
            f"{_first(unexpected)}, {len(missing)} missing keys (port names) {_first(missing)}"
        )
    for key in given.values():
        if not isinstance(state[key], torch.Tensor):
            raise TypeError(f"the port state dict's {key!r} must be a tensor, got {type(state[key]).__name__}")
    expected = _expected_port_shapes(config, levels)
    wrong = [f"{key}: {tuple(state[key].shape)}, expected {expected[name]}"
             for name, key in given.items() if tuple(state[key].shape) != expected[name]]
    if wrong:
        raise ValueError(f"the port state dict has {len(wrong)} tensors of the wrong shape for {described}: "
                         f"{_first(wrong)}")
    ours = {}
    for name, key in given.items():
        ours.update(zip(names[name], _our_tensors(name, state[key], len(names[name]))))
    return ours


def state_dict_to_port(resampler: MultiScaleResampler, feature_levels,
                       prefix: str = PORT_PREFIX) -> dict[str, torch.Tensor]:
    """The resampler's parameters in the port's names (state_dict_from_port's inverse).

    Args:
        resampler: a MultiScaleResampler whose config the port can express (config_to_port).
        feature_levels: hidden_states indices, one per level, in order.
        prefix: put before every port name; "" gives the projector's own state dict.

    Returns:
        ``prefix`` + port name -> tensor: new, contiguous and detached, on the resampler's device
        and in its dtype; cls tokens (1, nq, dim), to_kv (2 dim, vision_dim) = [to_k; to_v].
    """
    if not isinstance(resampler, MultiScaleResampler):
        raise TypeError(f"resampler must be a MultiScaleResampler, got {type(resampler).__name__}")
    if not isinstance(prefix, str):
        raise TypeError(f"prefix must be a str, got {prefix!r} ({type(prefix).__name__})")
    port_config = config_to_port(resampler.config, feature_levels)
    ours = resampler.state_dict()
    return {prefix + port: _port_tensor(port, [ours[n] for n in names])
            for port, names in _name_map(resampler.config, port_config["cos_seq_feat_levels"]).items()}


def _port_names(state: Mapping) -> dict[str, str]:
    """Port name -> the key of ``state`` holding it (see state_dict_from_port)."""
    keys = [k for k in state if isinstance(k, str)]
    if len(keys) != len(state):
        raise TypeError("the port state dict's keys must be strings")
    if not any(_PROJECTOR in k for k in keys):
        return {k: k for k in keys}
    names: dict[str, str] = {}
    for key in keys:
        if _PROJECTOR not in key:
            continue
        _, dot, name = key.partition(_PROJECTOR + ".")
        name = name if dot else key  # "...mm_projector" with no "." after it: maps to nothing
        if name in names:
            raise ValueError(f"the port state dict holds {name!r} twice: as {names[name]!r} and {key!r}")
        names[name] = key
    return names


def _first(items: list[str]) -> str:
    """The first few of ``items`` as a list: ['a', 'b', ...]."""
    return f"[{first_few([repr(x) for x in items])}]"


# ---- files --------------------------------------------------------------------------------------
def load_port_checkpoint(path_or_state, port_config: Mapping, *, dtype: torch.dtype | None = None,
                         device=None, backend: str = "auto", fused: bool = True,
                         allow_nonfinite: bool = False) -> MultiScaleResampler:
    """A MultiScaleResampler holding a port checkpoint's weights (its own copies of them).

    Args:
        path_or_state: a state dict (see state_dict_from_port), or the path of one (str, bytes or
            os.PathLike): ``.safetensors``, or ``.bin`` / ``.pt`` / ``.pth`` (torch.load,
            weights_only=True, onto the CPU), such as LLaVA's mm_projector.bin or a whole LLaVA
            checkpoint shard holding every mm_projector key.
        port_config: the port config the weights were trained under (config_from_port).
        dtype: the parameters' floating-point dtype; None: the checkpoint's cls tokens' dtype.
        device: where the parameters go; None: the CPU.
        backend, fused: as MultiScaleResampler takes them.
        allow_nonfinite: accept projector tensors holding NaN or Inf (refused by default, with a
            ValueError naming them).

    Returns:
        The MultiScaleResampler; it consumes the levels config_from_port(port_config)[1].
    """
    check_bool(allow_nonfinite, "allow_nonfinite")
    check_device(device)  # before reading the file
    if isinstance(path_or_state, (str, bytes, os.PathLike)):
        where = f"port checkpoint {os.fsdecode(path_or_state)!r}"
        state = _read_state(os.fsdecode(path_or_state))
    elif isinstance(path_or_state, Mapping):
        where, state = "the port state dict", path_or_state
    else:
        raise TypeError(f"path_or_state must be a path (str, bytes or os.PathLike) or a port state dict, got "
                        f"{type(path_or_state).__name__}")
    ours = {k: v.clone() for k, v in state_dict_from_port(state, port_config).items()}  # not views of ``state``
    if not allow_nonfinite:  # checked under the port's names, which the file holds
        check_finite({key: state[key] for key in _port_names(state).values()}, where)
    config, _ = config_from_port(port_config)
    return MultiScaleResampler.from_state_dict(config, ours, backend, fused, dtype=dtype, device=device,
                                               where=where, allow_nonfinite=True)


def save_port_checkpoint(resampler: MultiScaleResampler, path: str | os.PathLike, feature_levels) -> None:
    """Write the port's form of a resampler, each file atomically.

    Args:
        resampler: a MultiScaleResampler the port can express (config_to_port), its weights
            materialised (the meta device is refused).
        path: the weights' file (e.g. mm_projector.bin): torch.save of state_dict_to_port, keys
            prefixed "model.mm_projector.", CPU tensors. Beside it goes PORT_CONFIG_NAME, the port
            config (config_to_port) as JSON, to add to the port's COS_CONFIGS.
        feature_levels: hidden_states indices, one per level, in order.
    """
    state = state_dict_to_port(resampler, feature_levels)
    check_materialised(resampler, "save")
    state = {k: v.cpu() for k, v in state.items()}
    port_config = config_to_port(resampler.config, feature_levels)
    path = Path(os.fsdecode(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_file(path, lambda tmp: torch.save(state, tmp))
    atomic_text(path.parent / PORT_CONFIG_NAME, json.dumps(port_config, indent=2) + "\n")


def _read_state(path: str) -> Mapping:
    """The state dict in the file ``path``; a file that is missing, a directory, of another suffix,
    unreadable or not a state dict raises an error naming it, what it holds and what it should."""
    path = Path(path)
    expected = "a state dict of tensors (.bin, .pt, .pth: torch.save; or .safetensors)"
    if path.is_dir():
        raise ValueError(f"port checkpoint {str(path)!r} is a directory: expected a file holding {expected}, "
                         f"e.g. {str(path / PORT_WEIGHTS_NAME)!r}")
    if not path.is_file():
        raise FileNotFoundError(f"port checkpoint {str(path)!r} not found")
    if path.suffix == ".safetensors":
        return read_safetensors(path, expected)[0]
    if path.suffix not in (".bin", ".pt", ".pth"):
        raise ValueError(f"port checkpoint {str(path)!r}: expected a .bin, .pt, .pth or .safetensors file")
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except OSError:
        raise
    except Exception as err:  # torch.load's unpickler raises many types (EOFError, KeyError, UnpicklingError...)
        raise ValueError(f"port checkpoint {str(path)!r} ({path.stat().st_size} bytes) cannot be read by "
                         f"torch.load(weights_only=True) ({_load_failure(err)}): expected {expected}") from None
    if not isinstance(state, Mapping):
        raise TypeError(f"port checkpoint {str(path)!r} holds a {type(state).__name__}, not a state dict")
    return state


def _load_failure(err: Exception) -> str:
    """torch.load's error in one line: its line naming a refused global or operand where it has one
    (a pickle of other objects than tensors, refused since loading it could run arbitrary code), else
    its first line."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    refused = next((line for line in lines if "GLOBAL" in line or line.startswith("Unsupported")), None)
    if refused is not None:
        return f"{type(err).__name__}: {refused} (a pickle of objects other than tensors is refused, as " \
               f"loading it could run arbitrary code)"
    return f"{type(err).__name__}: {lines[0] if lines else 'unexpected end of file'}"


# ---- command line -------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m cos_kernels.port",
        description="Convert between the LLaVA port's checkpoints and MultiScaleResampler's.")
    commands = parser.add_subparsers(dest="command", required=True)
    to_cos = commands.add_parser("to-cos", help="port checkpoint -> MultiScaleResampler.save_pretrained directory")
    to_cos.add_argument("checkpoint", help="mm_projector.bin (or .pt, .pth, .safetensors)")
    to_cos.add_argument("port_config", help="JSON file of the cos_* keys (the port's COS_CONFIGS entry)")
    to_cos.add_argument("out_dir")
    to_cos.add_argument("--allow-nonfinite", action="store_true",
                        help="convert weights holding NaN or Inf (refused by default)")
    to_port = commands.add_parser(
        "to-port", help=f"save_pretrained directory -> {PORT_WEIGHTS_NAME} + {PORT_CONFIG_NAME}")
    to_port.add_argument("resampler_dir")
    to_port.add_argument("out_dir")
    to_port.add_argument("--feature-levels", type=int, nargs="+", required=True,
                         help="the ViT hidden_states index of each level, in order (e.g. 15 22)")
    to_port.add_argument("--allow-nonfinite", action="store_true",
                         help="convert weights holding NaN or Inf (refused by default)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Exit 0 when written; 2 for bad input, reported in one line."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "to-cos":
            port_config = _read_json(args.port_config)
            resampler = load_port_checkpoint(args.checkpoint, port_config, backend="torch",
                                             allow_nonfinite=args.allow_nonfinite)
            resampler.save_pretrained(args.out_dir)
        else:
            resampler = MultiScaleResampler.from_pretrained(args.resampler_dir, backend="torch",
                                                            allow_nonfinite=args.allow_nonfinite)
            save_port_checkpoint(resampler, Path(args.out_dir) / PORT_WEIGHTS_NAME, args.feature_levels)
    except (ValueError, TypeError, OSError) as err:
        print(f"cos_kernels.port: error: {err}", file=sys.stderr)
        return 2
    print(f"written: {args.out_dir}")
    return 0


def _read_json(path: str) -> dict:
    """The JSON object in the file ``path`` (a port config); errors name the file."""
    try:
        value = json.loads(Path(path).read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: malformed JSON ({err}): expected a JSON object of the cos_* keys") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object of the cos_* keys, got {type(value).__name__}")
    return value


if __name__ == "__main__":
    sys.exit(main())
