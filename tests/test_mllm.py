"""The reference MLLM: vision tower, bridges, loss masking, generation, compound token scaling."""

import warnings

import pytest
import torch
import torch.nn.functional as F

from cos_kernels.mllm.config import PORT_CHOICES
from cos_kernels.mllm.vision import interpolate_positions, normalise
from cos_kernels.mllm import (IGNORE_INDEX, CaptionCollator, CoSMLLM, MLLMConfig, PatchProjector,
                              SyntheticCaptions, VisionTower)
from cos_kernels.resampler import MultiScaleResampler


@pytest.fixture(scope="module")
def tiny():
    return CoSMLLM(MLLMConfig.from_preset("tiny"), backend="torch").eval()


def batch_of(model, captions_or_n, size=64, seed=0):
    data = SyntheticCaptions(16, size, seed=seed)
    items = [data[i] for i in range(captions_or_n)]
    return CaptionCollator(model.tokenizer)(items)


def test_default_feature_layers_follow_the_spec():
    assert MLLMConfig().layers_for(24) == [16, 23]
    assert MLLMConfig(bridge="linear").layers_for(24) == [23]
    assert MLLMConfig.from_preset("tiny").layers_for(6) == [4, 5]
    with pytest.raises(ValueError, match="feature_layers"):
        MLLMConfig(feature_layers=[25])
    with pytest.raises(ValueError, match="one feature layer"):
        MLLMConfig(bridge="mlp2x_gelu", feature_layers=[16, 23])


def test_the_ports_layer_and_baseline_choices():
    """The public port reads transformers hidden_states[15] and [22] (one earlier each than the SPEC's
    16 and 23) and its resampler baseline one level; each is an option, the SPEC's the default."""
    assert MLLMConfig(layer_convention="port").layers_for(24) == [15, 22]
    assert MLLMConfig(bridge="resampler-336").layers_for(24) == [16, 23]
    assert MLLMConfig(bridge="resampler-336", baseline_levels=1).layers_for(24) == [23]
    assert MLLMConfig(bridge="resampler-80", **PORT_CHOICES).layers_for(24) == [22]
    assert MLLMConfig(bridge="linear", **PORT_CHOICES).layers_for(24) == [23]  # LLaVA's -2 under both
    assert MLLMConfig(bridge="cos-80", baseline_levels=1).layers_for(24) == [16, 23]  # only baselines
    tiny = CoSMLLM(MLLMConfig.from_preset("tiny", bridge="resampler-80", **PORT_CHOICES))
    assert tiny.vision.feature_layers == [4] and tiny.bridge.config.num_levels == 1  # [3, 4] of 6, the later
    for overrides, error, match in [
        (dict(layer_convention="timm"), ValueError, r"layer_convention must be one of \['paper', 'port'\]"),
        (dict(baseline_levels=3), ValueError, r"baseline_levels must be 1 or 2, got 3"),
        (dict(pos_align_corners=1), TypeError, r"pos_align_corners must be a bool"),
        (dict(bridge_norm_eps=0.0), ValueError, r"bridge_norm_eps must be a finite number > 0"),
    ]:
        with pytest.raises(error, match=match):
            MLLMConfig(**overrides)
    assert CoSMLLM(MLLMConfig.from_preset("tiny", bridge_norm_eps=1e-6)).bridge.norm_out.eps == 1e-6


@pytest.mark.parametrize("vision_type", ["clip", "siglip"])
def test_position_interpolation_with_aligned_corners(vision_type):
    """pos_align_corners=False is transformers' own interpolation; True keeps the table's corner
    positions exactly (align_corners=True's defining property) and changes the features."""
    torch.manual_seed(0)
    plain = VisionTower(MLLMConfig.from_preset("tiny", vision_type=vision_type, image_size=128))
    torch.manual_seed(0)  # the same weights
    aligned = VisionTower(MLLMConfig.from_preset("tiny", vision_type=vision_type, image_size=128,
                                                 pos_align_corners=True))
    embeddings, has_cls = plain.vit.embeddings, vision_type == "clip"
    table = embeddings.position_embedding.weight
    ours = interpolate_positions(table, (32, 32), has_cls, align_corners=False)
    theirs = embeddings.interpolate_pos_encoding(torch.randn(1, 1024 + has_cls, 64), 128, 128)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    corners_of = lambda t, side: t[has_cls:].reshape(side, side, -1)[[0, 0, -1, -1], [0, -1, 0, -1]]
    new = aligned.vit.embeddings.interpolate_pos_encoding(None, 128, 128)[0]
    torch.testing.assert_close(corners_of(new, 32), corners_of(table, 16), rtol=1e-6, atol=1e-6)
    assert not torch.allclose(corners_of(ours[0], 32), corners_of(table, 16), atol=1e-3)
    if has_cls:
        assert torch.equal(new[0], table[0])
    pixels = torch.rand(2, 3, 128, 128)
    assert not torch.allclose(aligned(pixels)[0], plain(pixels)[0], atol=1e-3)
    native = pixels[:1, :, :64, :64]
    torch.testing.assert_close(aligned(native)[0], plain(native)[0], rtol=0, atol=0)  # nothing to interpolate


def test_presets_and_bridge_rescaling():
    assert MLLMConfig.from_preset("vitl14-336-7b").resampler_config(1024, 4096, 2).windows == [24, 6]
    assert MLLMConfig.from_preset("vitl14-448-1b").resampler_config(1024, 2048, 2).windows == [32, 8]
    assert MLLMConfig.from_preset("tiny", image_size=128, bridge="cos-1296").resampler_config(64, 96, 2).windows == [32, 8, 2]
    assert MLLMConfig.from_preset("tiny", image_size=32).resampler_config(64, 96, 2).windows == [8, 2]
    with pytest.raises(ValueError, match="cannot be rescaled to grid 24"):
        MLLMConfig.from_preset("vitl14-336-7b", bridge="cos-1296").resampler_config(1024, 4096, 2)
    with pytest.raises(ValueError, match="multiple of patch_size"):
        MLLMConfig.from_preset("tiny", image_size=62)
    with pytest.raises(ValueError, match="bridge must be one of"):
        MLLMConfig(bridge="qformer")
    with pytest.raises(ValueError, match="unknown model preset"):
        MLLMConfig.from_preset("13b")


@pytest.mark.parametrize("vision_type", ["clip", "siglip"])
def test_vision_tower_drops_cls_and_interpolates_positions(vision_type):
    config = MLLMConfig.from_preset("tiny", vision_type=vision_type)
    torch.manual_seed(0)
    tower = VisionTower(config)
    pixels = torch.rand(2, 3, 64, 64)
    features = tower(pixels)
    assert [tuple(f.shape) for f in features] == [(2, 256, 64)] * 2
    # independent of the wrapper: the ViT's own hidden states, normalised input, CLS (if any) removed
    hidden = tower.vit(pixel_values=normalise(pixels, tower.kind), output_hidden_states=True).hidden_states
    for f, layer in zip(features, [4, 5]):
        torch.testing.assert_close(f, hidden[layer][:, -256:])
    assert len(hidden) == 1 + 5  # embeddings and layers 1..5: the tower was cut after its last feature layer
    assert [tuple(f.shape) for f in tower(torch.rand(1, 3, 128, 128))] == [(1, 1024, 64)] * 2
    with pytest.raises(ValueError, match="multiples of the patch size"):
        tower(torch.rand(1, 3, 62, 64))


@pytest.mark.parametrize("bridge, tokens, kind", [
    ("cos-80", 80, MultiScaleResampler), ("resampler-80", 80, MultiScaleResampler),
    ("linear", 256, PatchProjector), ("mlp2x_gelu", 256, PatchProjector),
])
def test_every_bridge_yields_llm_width_visual_tokens(bridge, tokens, kind):
    model = CoSMLLM(MLLMConfig.from_preset("tiny", bridge=bridge), backend="torch")
    assert isinstance(model.bridge, kind) and model.num_visual_tokens == tokens
    assert model.encode_images(torch.rand(3, 3, 64, 64)).shape == (3, tokens, model.llm_width)


def test_collator_labels_only_caption_tokens_and_eos(tiny):
    b = batch_of(tiny, 3)
    tok = tiny.tokenizer
    for i, caption in enumerate(b["captions"]):
        n = len(caption.encode())
        assert b["input_ids"][i, : n + 2].tolist() == [tok.bos_id, *caption.encode(), tok.eos_id]
        assert b["labels"][i, 1 : n + 2].tolist() == [*caption.encode(), tok.eos_id]
        assert (b["labels"][i, n + 2 :] == IGNORE_INDEX).all() and b["labels"][i, 0] == IGNORE_INDEX
        assert b["attention_mask"][i].sum() == n + 2


def test_loss_is_next_token_cross_entropy_on_caption_tokens_only(tiny):
    b = batch_of(tiny, 3)
    with torch.no_grad():
        loss_sum, count = tiny(b["pixel_values"], b["input_ids"], b["attention_mask"], b["labels"])
        # reference: full LLM logits over [visual | text], shifted, loss where labels are set
        visual = tiny.encode_images(b["pixel_values"])
        embeds = torch.cat([visual, tiny.llm.get_input_embeddings()(b["input_ids"])], 1)
        mask = torch.cat([torch.ones(3, visual.shape[1], dtype=torch.long), b["attention_mask"]], 1)
        logits = tiny.llm(inputs_embeds=embeds, attention_mask=mask).logits
        full_labels = torch.cat([torch.full((3, visual.shape[1]), IGNORE_INDEX), b["labels"]], 1)
        expected = F.cross_entropy(logits[:, :-1].flatten(0, 1), full_labels[:, 1:].flatten(), reduction="sum")
    assert count == sum(len(c.encode()) + 1 for c in b["captions"])
    torch.testing.assert_close(loss_sum, expected, rtol=1e-5, atol=1e-4)


def test_token_scores_are_per_token_cross_entropy_and_argmax(tiny):
    b = batch_of(tiny, 3)
    with torch.no_grad():
        nll, correct = tiny(b["pixel_values"], b["input_ids"], b["attention_mask"], b["labels"], per_token=True)
        loss_sum, _ = tiny(b["pixel_values"], b["input_ids"], b["attention_mask"], b["labels"])
        visual = tiny.encode_images(b["pixel_values"])
        V = visual.shape[1]
        for i in range(3):  # one sample at a time, no padding: logits at V - 1 + t predict input token t
            n = int(b["attention_mask"][i].sum())
            ids = b["input_ids"][i, :n]
            logits = tiny.llm(inputs_embeds=tiny.embed(visual[i:i + 1], ids[None])).logits[0, V:V + n - 1]
            want_nll = F.cross_entropy(logits, ids[1:], reduction="none")
            torch.testing.assert_close(nll[i, 1:n], want_nll, rtol=1e-5, atol=1e-4)
            assert torch.equal(correct[i, 1:n], logits.argmax(-1) == ids[1:])
            assert nll[i, 0] == 0 and not correct[i, 0] and (nll[i, n:] == 0).all() and not correct[i, n:].any()
    torch.testing.assert_close(nll.sum(), loss_sum, rtol=1e-5, atol=1e-4)


def test_padding_does_not_change_a_samples_loss(tiny):
    b = batch_of(tiny, 4)
    longest = int(b["attention_mask"].sum(1).argmax())
    shortest = int(b["attention_mask"].sum(1).argmin())
    with torch.no_grad():
        pair = [shortest, longest]
        loss_pair, _ = tiny(b["pixel_values"][pair], b["input_ids"][pair], b["attention_mask"][pair], b["labels"][pair])
        n = int(b["attention_mask"][shortest].sum())
        alone = [tiny(b["pixel_values"][[i]], b["input_ids"][[i], :n if i == shortest else None],
                      b["attention_mask"][[i], :n if i == shortest else None],
                      b["labels"][[i], :n if i == shortest else None])[0] for i in pair]
    torch.testing.assert_close(loss_pair, sum(alone), rtol=1e-5, atol=1e-4)


def test_greedy_generation_matches_a_recomputing_argmax_loop(tiny):
    """Also: generation (every evaluation runs it) uses the KV-cache argument this transformers
    takes, without a deprecation warning (transformers 5.24 warns that past_key_values goes in 5.40)."""
    pixels = batch_of(tiny, 2)["pixel_values"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        generated = tiny.generate(pixels, max_new_tokens=6, stop_at_eos=False)
    assert not [str(w.message) for w in caught if issubclass(w.category, (DeprecationWarning, FutureWarning))]
    with torch.no_grad():
        visual = tiny.encode_images(pixels)
        ids = torch.full((2, 1), tiny.tokenizer.bos_id)
        for _ in range(6):
            logits = tiny.llm(inputs_embeds=tiny.embed(visual, ids)).logits[:, -1]
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], 1)
    expected = ids[:, 1:].clone()
    for row in expected:  # generate pads whatever follows an EOS
        eos = (row == tiny.tokenizer.eos_id).nonzero()
        if len(eos):
            row[int(eos[0]) + 1:] = tiny.tokenizer.pad_id
    assert torch.equal(generated, expected)


def test_compound_scale_up_inflates_the_pretrained_resampler():
    model = CoSMLLM(MLLMConfig.from_preset("tiny"), backend="torch")
    old_bridge = {k: v.clone() for k, v in model.bridge.state_dict().items()}
    old_llm = {k: v.clone() for k, v in model.llm.state_dict().items()}
    model.scale_up(128, "cos-1296")
    assert model.config.image_size == 128 and model.bridge.config.windows == [32, 8, 2]
    assert model.num_visual_tokens == 1296
    for level in range(2):
        for new_scale, source in enumerate([0, 0, 1]):
            for name, value in model.bridge.levels[level][new_scale].state_dict().items():
                assert torch.equal(value, old_bridge[f"levels.{level}.{source}.{name}"]), name
    # the global query set is kept; each 4x4 window of the new middle scale holds the 16 global queries
    assert torch.equal(model.bridge.queries[0], old_bridge["queries.0"])
    assert torch.equal(model.bridge.queries[1][:16], old_bridge["queries.0"])
    assert all(torch.equal(v, old_llm[k]) for k, v in model.llm.state_dict().items())
    assert model.encode_images(torch.rand(1, 3, 128, 128)).shape == (1, 1296, model.llm_width)
    with pytest.raises(ValueError, match="cannot become"):
        model.scale_up(128, "linear")


def test_resolution_scale_up_of_a_projector_keeps_one_token_per_patch():
    model = CoSMLLM(MLLMConfig.from_preset("tiny", bridge="linear"), backend="torch")
    weight = model.bridge.proj.weight.clone()
    model.scale_up(128, "linear")
    assert model.num_visual_tokens == 32 * 32 and torch.equal(model.bridge.proj.weight, weight)
    assert model.encode_images(torch.rand(1, 3, 128, 128)).shape == (1, 1024, model.llm_width)


def test_seeded_components_are_rebuilt_identically():
    a, b = (CoSMLLM(MLLMConfig.from_preset("tiny", seed=3), backend="torch") for _ in range(2))
    c = CoSMLLM(MLLMConfig.from_preset("tiny", seed=3, bridge="cos-1296", image_size=128), backend="torch")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    # another bridge does not change the vision tower or the LLM
    for name in ("vision", "llm"):
        assert all(torch.equal(x, y) for x, y in zip(getattr(a, name).state_dict().values(),
                                                    getattr(c, name).state_dict().values()))


def test_vision_tower_and_llm_load_from_local_paths(tmp_path, tiny):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    vit = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                           num_attention_heads=2, image_size=64, patch_size=8))
    vit.save_pretrained(tmp_path / "vit")
    tiny.llm.save_pretrained(tmp_path / "llm")
    config = MLLMConfig.from_preset("tiny", vision_path=str(tmp_path / "vit"), llm_path=str(tmp_path / "llm"),
                                    vision_width=999, llm_width=999)  # ignored: the checkpoints decide
    loaded = CoSMLLM(config, backend="torch")
    assert loaded.vision.width == 32 and loaded.llm_width == tiny.llm_width
    assert loaded.vision.feature_layers == [2]  # round(2 * 3 / 3) and 3 - 1 coincide
    pixels = torch.rand(1, 3, 64, 64)
    expected = vit(pixel_values=normalise(pixels, loaded.vision.kind), output_hidden_states=True)
    torch.testing.assert_close(loaded.vision(pixels)[0], expected.hidden_states[2][:, 1:])
    assert all(torch.equal(a, b) for a, b in zip(loaded.llm.parameters(), tiny.llm.parameters()))
    with pytest.raises(ValueError, match="expected CLIP or SigLIP"):
        CoSMLLM(MLLMConfig.from_preset("tiny", vision_path=str(tmp_path / "llm")))


def test_missing_local_paths_are_named_before_any_load(tmp_path):
    for field in ("vision_path", "llm_path", "tokenizer_path"):
        config = MLLMConfig.from_preset("tiny", **{field: str(tmp_path / "nowhere")})
        with pytest.raises(FileNotFoundError, match=f"MLLMConfig.{field} '{tmp_path / 'nowhere'}' does not exist"):
            CoSMLLM(config)
