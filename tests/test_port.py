"""cos_kernels.port against a plain float64 implementation of the public LLaVA port's forward.

The port's parameters are synthesised here from its naming (not from cos_kernels.port), with random
values away from the default initialisation; the converted MultiScaleResampler must compute what the
port computes from them.
"""

import json
import math
import random
import re

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from cos_kernels import CoSConfig, MultiScaleResampler
from cos_kernels.port import (
    PORT_CONFIG_NAME,
    PORT_WEIGHTS_NAME,
    config_from_port,
    config_to_port,
    load_port_checkpoint,
    main,
    save_port_checkpoint,
    state_dict_from_port,
    state_dict_to_port,
)

PREFIX = "model.mm_projector."


def port_config_80():
    """The port's "v1" layout (one 8x8 window + sixteen 2x2 windows here, on an 8x8 grid), tiny widths."""
    return dict(cos_tokens_per_side=8, cos_window_sizes=[8, 2], cos_n_query=[4, 16], cos_feat_levels=[22, 22],
                cos_seq_feat_levels=[15, 22], cos_out_dim=64, cos_context_dim=32, llm_dim=24)


def port_config_1296():
    """The port's "v1_448_q16+256+1024" layout exactly, tiny widths (dim 128: 2 heads)."""
    return dict(cos_tokens_per_side=32, cos_window_sizes=[32, 8, 2], cos_n_query=[16, 256, 1024],
                cos_feat_levels=[22, 22, 22], cos_seq_feat_levels=[15, 22], cos_out_dim=128,
                cos_context_dim=32, llm_dim=24)


@pytest.fixture(autouse=True)
def fresh_seed():
    seed = random.randrange(2**31)
    print(f"torch.manual_seed({seed})")
    torch.manual_seed(seed)


# ---- the port, written plainly ------------------------------------------------------------------
def tags(pc):
    """(window side, queries, tag) per level and scale, levels outer, as the port names its blocks."""
    return [[(ws, nq, f"0_w{ws}_l{lvl}_q{nq}") for ws, nq in zip(pc["cos_window_sizes"], pc["cos_n_query"])]
            for lvl in pc["cos_seq_feat_levels"]]


def random_port_state(pc, prefix=PREFIX):
    """A port state dict with random values: LayerNorm weights 1 + noise, random biases."""
    dim, ctx, llm = pc["cos_out_dim"], pc["cos_context_dim"], pc["llm_dim"]

    def norm(name, width):
        return {f"{name}.weight": 1 + 0.2 * torch.randn(width), f"{name}.bias": 0.2 * torch.randn(width)}

    def linear(name, out, inp, bias=True):
        p = {f"{name}.weight": torch.randn(out, inp) / math.sqrt(inp)}
        return {**p, f"{name}.bias": 0.2 * torch.randn(out)} if bias else p

    state = {f"cls_token_w{ws}_q{nq}": torch.randn(1, nq, dim)
             for ws, nq in zip(pc["cos_window_sizes"], pc["cos_n_query"])}
    for level in tags(pc):
        for _, _, tag in level:
            state.update(norm(f"attn_{tag}.query_norm", dim), **norm(f"attn_{tag}.cont_norm", ctx),
                         **linear(f"attn_{tag}.to_q", dim, dim, bias=False),
                         **linear(f"attn_{tag}.to_kv", 2 * dim, ctx, bias=False),
                         **linear(f"attn_{tag}.proj", dim, dim), **norm(f"ln_{tag}", dim),
                         **linear(f"mlp_{tag}.fc1", 4 * dim, dim), **linear(f"mlp_{tag}.fc2", dim, 4 * dim))
    state.update(norm("ln_out", dim), **linear("out_proj", llm, dim))
    return {prefix + k: v for k, v in state.items()}


def port_forward(state, pc, features):
    """The port's projector in float64. state: bare port names; features: per level, (B, 1 + N, C)
    with a CLS token -> (B, sum(cos_n_query), llm_dim)."""
    p = {k: v.double() for k, v in state.items()}
    side, dim = pc["cos_tokens_per_side"], pc["cos_out_dim"]
    heads = dim // 64
    hd = dim // heads
    B, C = features[0].shape[0], features[0].shape[-1]

    def ln(x, name):
        return F.layer_norm(x, x.shape[-1:], p[f"{name}.weight"], p[f"{name}.bias"], 1e-5)

    def linear(x, name):
        return x @ p[f"{name}.weight"].T + p.get(f"{name}.bias", 0)

    x = [p[f"cls_token_w{ws}_q{nq}"][0].expand(B, -1, -1) for ws, nq in zip(pc["cos_window_sizes"], pc["cos_n_query"])]
    for level, f in zip(tags(pc), features):
        grid = f.double()[:, 1:].reshape(B, side, side, C)  # CLS dropped
        for s, (ws, nq, tag) in enumerate(level):
            per_side = side // ws
            per_window = nq // per_side**2
            q = linear(ln(x[s], f"attn_{tag}.query_norm"), f"attn_{tag}.to_q")
            attended = torch.empty_like(q)
            for w in range(per_side**2):
                r, c = divmod(w, per_side)
                patches = grid[:, r * ws:(r + 1) * ws, c * ws:(c + 1) * ws].reshape(B, ws * ws, C)
                k, v = linear(ln(patches, f"attn_{tag}.cont_norm"), f"attn_{tag}.to_kv").chunk(2, dim=-1)
                rows = slice(w * per_window, (w + 1) * per_window)
                for h in range(heads):
                    cols = slice(h * hd, (h + 1) * hd)
                    scores = q[:, rows, cols] @ k[:, :, cols].transpose(1, 2) * hd**-0.5
                    attended[:, rows, cols] = scores.softmax(-1) @ v[:, :, cols]
            y = x[s] + linear(attended, f"attn_{tag}.proj")
            x[s] = y + linear(F.gelu(linear(ln(y, f"ln_{tag}"), f"mlp_{tag}.fc1")), f"mlp_{tag}.fc2")
    return linear(ln(torch.cat(x, dim=1), "ln_out"), "out_proj")


def random_features(pc, batch):
    """One (B, 1 + N, C) float64 tensor per level, a CLS token first."""
    n = pc["cos_tokens_per_side"] ** 2 + 1
    return [torch.randn(batch, n, pc["cos_context_dim"], dtype=torch.float64) for _ in pc["cos_seq_feat_levels"]]


def bare(state):
    return {k.removeprefix(PREFIX): v for k, v in state.items()}


# ---- behaviour ----------------------------------------------------------------------------------
@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("port_config, batch, prefix", [
    (port_config_80, 2, PREFIX), (port_config_1296, 1, ""),
], ids=["80-tokens-prefixed", "1296-tokens-bare"])
def test_converted_resampler_computes_the_ports_forward(port_config, batch, prefix, fused):
    pc = port_config()
    state = random_port_state(pc, prefix)
    features = random_features(pc, batch)
    resampler = load_port_checkpoint(state, pc, dtype=torch.float64, backend="torch", fused=fused)
    with torch.no_grad():
        out = resampler(features)
    expected = port_forward(bare(state), pc, features)
    assert out.shape == (batch, sum(pc["cos_n_query"]), pc["llm_dim"])
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-10)


def test_config_from_port_reads_every_key():
    config, levels = config_from_port(port_config_1296(), patch_size=16)
    assert levels == [15, 22]
    assert (config.grid, config.windows, config.queries) == ((32, 32), [32, 8, 2], [16, 256, 1024])
    assert (config.dim, config.num_heads, config.vision_dim, config.llm_dim) == (128, 2, 32, 24)
    assert (config.num_levels, config.mlp_ratio, config.norm_eps, config.drop_cls, config.patch_size) == (
        2, 4.0, 1e-5, True, 16)


@pytest.mark.parametrize("port_config", [port_config_80, port_config_1296])
def test_config_round_trip(port_config):
    pc = port_config()
    assert config_to_port(*config_from_port(pc)) == pc


def test_port_to_ours_to_port_is_exact():
    pc = port_config_1296()
    state = random_port_state(pc)
    back = state_dict_to_port(load_port_checkpoint(state, pc), pc["cos_seq_feat_levels"])
    assert set(back) == set(state)
    for key, tensor in state.items():
        assert back[key].is_contiguous() and torch.equal(back[key], tensor), key


def test_ours_to_port_to_ours_is_exact():
    config = CoSConfig(grid=8, windows=[8, 2], queries=[4, 16], dim=128, num_heads=2, vision_dim=32, llm_dim=24,
                       norm_eps=1e-5)
    resampler = MultiScaleResampler(config, backend="torch")
    with torch.no_grad():
        for p in resampler.parameters():
            p.normal_()
    pc = config_to_port(config, [7, 3])
    port = state_dict_to_port(resampler, [7, 3], prefix="")
    assert port["cls_token_w8_q4"].shape == (1, 4, 128)
    assert port["attn_0_w2_l3_q16.to_kv.weight"].shape == (256, 32)
    ours = state_dict_from_port(port, pc)
    expected = resampler.state_dict()
    assert set(ours) == set(expected)
    for key, tensor in expected.items():
        assert torch.equal(ours[key], tensor), key


def test_a_whole_llava_checkpoint_is_accepted():
    """Keys outside mm_projector (vision tower, LLM) are ignored once a key carries the prefix."""
    pc = port_config_80()
    state = {**random_port_state(pc), "model.layers.0.self_attn.q_proj.weight": torch.randn(3, 3),
             "model.vision_tower.vision_tower.embeddings.weight": torch.randn(2)}
    assert len(state_dict_from_port(state, pc)) == len(MultiScaleResampler(config_from_port(pc)[0]).state_dict())


# ---- refusals -----------------------------------------------------------------------------------
def test_an_unmapped_projector_key_is_refused():
    pc = port_config_80()
    state = {**random_port_state(pc), "model.mm_projector.foo.weight": torch.randn(3)}
    with pytest.raises(ValueError, match=r"1 unexpected keys \['model\.mm_projector\.foo\.weight'\]"):
        state_dict_from_port(state, pc)


def test_a_missing_key_is_refused():
    pc = port_config_80()
    state = random_port_state(pc)
    del state[PREFIX + "attn_0_w2_l22_q16.to_kv.weight"]
    with pytest.raises(ValueError, match=re.escape("1 missing keys (port names) ['attn_0_w2_l22_q16.to_kv.weight']")):
        state_dict_from_port(state, pc)


def test_a_key_given_twice_is_refused():
    pc = port_config_80()
    state = random_port_state(pc)
    state["mm_projector.ln_out.bias"] = state[PREFIX + "ln_out.bias"]
    with pytest.raises(ValueError, match="holds 'ln_out.bias' twice"):
        state_dict_from_port(state, pc)


def test_a_wrong_shape_is_refused():
    pc = port_config_80()
    state = random_port_state(pc)
    state[PREFIX + "out_proj.weight"] = torch.randn(24, 32)
    with pytest.raises(ValueError, match=re.escape("model.mm_projector.out_proj.weight: (24, 32), expected (24, 64)")):
        load_port_checkpoint(state, pc)


@pytest.mark.parametrize("edit, error, match", [
    (lambda pc: pc.pop("cos_n_query"), ValueError, "missing key 'cos_n_query'"),
    (lambda pc: pc.pop("llm_dim"), ValueError, "missing key 'llm_dim'"),
    (lambda pc: pc.update(cos_tokens_per_side="8"), TypeError, "cos_tokens_per_side must be a positive integer"),
    (lambda pc: pc.update(cos_window_sizes=8), TypeError, "cos_window_sizes must be a non-empty list"),
    (lambda pc: pc.update(cos_n_query=[4]), ValueError, "one entry per scale"),
    (lambda pc: pc.update(cos_seq_feat_levels=[22, 22]), ValueError, "cos_seq_feat_levels must be distinct"),
    (lambda pc: pc.update(cos_window_sizes=[8, 8], cos_n_query=[4, 4]), ValueError, "pairs must be distinct"),
    (lambda pc: pc.update(cos_out_dim=32), ValueError, "cos_out_dim must be at least 64"),
    (lambda pc: pc.update(cos_window_sizes=[8, 3]), ValueError, r"cos_window_sizes=\[8, 3\].*does not tile"),
    (lambda pc: pc.update(mm_hidden_size=1024), ValueError, "mm_hidden_size = 1024 but the cos_\\* keys give 32"),
])
def test_a_bad_port_config_is_refused(edit, error, match):
    pc = port_config_80()
    edit(pc)
    with pytest.raises(error, match=match):
        config_from_port(pc)
    with pytest.raises(error, match=match):
        state_dict_from_port(random_port_state(port_config_80()), pc)


@pytest.mark.parametrize("overrides, levels, match", [
    (dict(num_heads=4), [15, 22], r"num_heads = 4 \(the port has dim // 64 = 1\)"),
    (dict(mlp_ratio=2.0), [15, 22], r"mlp_ratio = 2.0"),
    (dict(norm_eps=1e-6), [15, 22], r"norm_eps = 1e-06"),
    (dict(grid=(8, 4), windows=[[8, 4], 2]), [15, 22], r"square ones only"),
    (dict(), [15], r"one hidden_states index per level \(2\), got \[15\]"),
    (dict(), [15, 15], r"feature_levels must be distinct"),
])
def test_a_config_the_port_cannot_express_is_refused(overrides, levels, match):
    config = CoSConfig(**{**dict(grid=8, windows=[8, 2], queries=[4, 16], dim=64, num_heads=1, vision_dim=32,
                                 llm_dim=24, norm_eps=1e-5), **overrides})
    with pytest.raises(ValueError, match=match):
        config_to_port(config, levels)
    with pytest.raises(ValueError, match=match):
        state_dict_to_port(MultiScaleResampler(config), levels)


# ---- files and the command line -----------------------------------------------------------------
def test_file_round_trip(tmp_path):
    pc = port_config_80()
    resampler = load_port_checkpoint(random_port_state(pc), pc)
    save_port_checkpoint(resampler, tmp_path / "out" / PORT_WEIGHTS_NAME, [15, 22])
    written = json.loads((tmp_path / "out" / PORT_CONFIG_NAME).read_text())
    assert written == pc
    loaded = load_port_checkpoint(tmp_path / "out" / PORT_WEIGHTS_NAME, written, dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    for (name, got), want in zip(loaded.state_dict().items(), resampler.state_dict().values()):
        assert torch.equal(got, want.bfloat16()), name


def test_safetensors_checkpoint(tmp_path):
    pc = port_config_80()
    state = random_port_state(pc)
    save_file(state, tmp_path / "mm_projector.safetensors")
    loaded = load_port_checkpoint(str(tmp_path / "mm_projector.safetensors"), pc)
    back = state_dict_to_port(loaded, [15, 22])
    assert set(back) == set(state) and all(torch.equal(back[k], v) for k, v in state.items())


def test_bad_checkpoint_paths_are_refused(tmp_path):
    pc = port_config_80()
    with pytest.raises(FileNotFoundError, match="missing.bin"):
        load_port_checkpoint(tmp_path / "missing.bin", pc)
    (tmp_path / "weights.npz").write_bytes(b"")
    with pytest.raises(ValueError, match=r"weights\.npz.*expected a \.bin"):
        load_port_checkpoint(tmp_path / "weights.npz", pc)


def test_command_line_round_trip(tmp_path):
    pc = port_config_80()
    state = random_port_state(pc)
    torch.save(state, tmp_path / PORT_WEIGHTS_NAME)
    (tmp_path / "port_config.json").write_text(json.dumps(pc))
    assert main(["to-cos", str(tmp_path / PORT_WEIGHTS_NAME), str(tmp_path / "port_config.json"),
                 str(tmp_path / "cos")]) == 0
    assert main(["to-port", str(tmp_path / "cos"), str(tmp_path / "port"), "--feature-levels", "15", "22"]) == 0
    back = torch.load(tmp_path / "port" / PORT_WEIGHTS_NAME, weights_only=True)
    assert set(back) == set(state) and all(torch.equal(back[k], v) for k, v in state.items())
    assert json.loads((tmp_path / "port" / PORT_CONFIG_NAME).read_text()) == pc


def test_command_line_bad_input_is_one_line_exit_2(tmp_path, capsys):
    (tmp_path / "port_config.json").write_text(json.dumps(port_config_80()))
    code = main(["to-cos", str(tmp_path / "nope.bin"), str(tmp_path / "port_config.json"), str(tmp_path / "cos")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("cos_kernels.port: error: ") and "nope.bin" in err
