"""cos_kernels.hf: MultiScaleResampler as LlavaForConditionalGeneration's projector, on tiny configs
built in-process (CLIP vision + Llama, random init; no downloads)."""

import json

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (AutoConfig, AutoModelForImageTextToText, AutoProcessor, CLIPImageProcessor,
                          CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration,
                          PreTrainedTokenizerFast)

from cos_kernels import CoSConfig, MultiScaleResampler
from cos_kernels.hf import CoSLlavaConfig, CoSLlavaForConditionalGeneration, CoSLlavaProcessor, resampler_config

WORDS = ["<pad>", "<s>", "</s>", "<unk>", "USER:", "ASSISTANT:", "a", "red", "cat", "on", "the", "mat"]
IMAGE_TOKEN = len(WORDS)  # "<image>" is added after the words
LAYERS = [2, 3]  # transformers hidden_states indices: the outputs of layers 2 and 3


def sub_configs():
    vision = CLIPVisionConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64,
                              image_size=32, patch_size=4)  # grid 8
    text = LlamaConfig(vocab_size=IMAGE_TOKEN + 1, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, intermediate_size=96, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return vision, text


def tiny_resampler(**overrides) -> CoSConfig:
    return CoSConfig(**{**dict(grid=8, windows=[8, 2], queries=[4, 16], patch_size=4, vision_dim=32, dim=32,
                               num_heads=4, llm_dim=48, num_levels=2, mlp_ratio=2.0), **overrides})


def tiny_config(**overrides) -> CoSLlavaConfig:
    vision, text = sub_configs()
    return CoSLlavaConfig(**{**dict(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN,
                                    vision_feature_layer=LAYERS, resampler=tiny_resampler()), **overrides})


def prompt(batch: int, num_image_tokens: int) -> torch.Tensor:
    """(B, 1 + num_image_tokens + 6): BOS, the image's placeholders, random words."""
    words = torch.randint(4, len(WORDS), (batch, 6))
    return torch.cat([torch.ones(batch, 1, dtype=torch.long),
                      torch.full((batch, num_image_tokens), IMAGE_TOKEN), words], dim=1)


def composed_logits(model, pixel_values, input_ids, strategy="default"):
    """The LLaVA forward written out from the parts: vision hidden_states of LAYERS -> the resampler on
    a list of levels (not LLaVA's concatenation) -> the placeholders' embeddings replaced -> LLM -> head."""
    hidden = model.model.vision_tower(pixel_values, output_hidden_states=True).hidden_states
    levels = [hidden[layer][:, 1:] if strategy == "default" else hidden[layer] for layer in LAYERS]
    visual = model.model.multi_modal_projector(levels)
    embeds = model.get_input_embeddings()(input_ids).clone()
    positions = (input_ids == IMAGE_TOKEN).nonzero()
    embeds[positions[:, 0], positions[:, 1]] = visual.reshape(-1, visual.shape[-1])
    return model.lm_head(model.model.language_model(inputs_embeds=embeds).last_hidden_state)


def randomise(model):
    """Every parameter random (LayerNorm weights near 1), so a mis-wired part cannot go unseen."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if name.endswith("norm.weight") else 0.1 * torch.randn_like(p))
    return model


def test_the_resampler_is_built_in_the_place_of_llavas_projector(monkeypatch):
    """LLaVA's projector (two Linears, ~25M parameters at 7B widths) is never constructed; every other
    part is LLaVA's, under LLaVA's names; the resampler has its own initialisation (reset_parameters:
    LayerNorms at (1, 0), zero biases), not transformers' generic one (normal, std 0.02)."""
    import transformers.models.llava.modeling_llava as modeling_llava

    def never(*args, **kwargs):
        raise AssertionError("LlavaMultiModalProjector was constructed")

    vision, text = sub_configs()
    llava = LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text,
                                                      image_token_index=IMAGE_TOKEN, vision_feature_layer=LAYERS))
    monkeypatch.setattr(modeling_llava.LlavaMultiModalProjector, "__init__", never)
    model = CoSLlavaForConditionalGeneration(tiny_config(resampler=tiny_resampler(init_std=0.002)))
    outside = lambda m: {n: tuple(p.shape) for n, p in m.named_parameters() if ".multi_modal_projector." not in n}
    assert outside(model) == outside(llava)
    assert [n for n, _ in model.named_children()] == [n for n, _ in llava.named_children()]
    assert [n for n, _ in model.model.named_children()] == [n for n, _ in llava.model.named_children()]
    for name, p in model.resampler.named_parameters():
        if "norm" in name:
            assert torch.all(p == (1.0 if name.endswith("weight") else 0.0)), name
        elif name.endswith("bias"):
            assert not p.any(), name
        else:  # trunc_normal_(std=init_std = 0.002), not transformers' normal_(std=0.02)
            assert 0.001 < p.std().item() < 0.003, name


def test_forward_is_the_composition_of_its_parts():
    model = randomise(CoSLlavaForConditionalGeneration(tiny_config())).double().eval()
    assert isinstance(model.resampler, MultiScaleResampler) and model.config.image_seq_length == 20
    pixels, ids = torch.rand(3, 3, 32, 32, dtype=torch.float64), prompt(3, 20)
    with torch.no_grad():
        got = model(input_ids=ids, pixel_values=pixels).logits
        want = composed_logits(model, pixels, ids)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_full_strategy_keeps_the_cls_token_and_the_resampler_drops_it():
    model = randomise(CoSLlavaForConditionalGeneration(tiny_config(vision_feature_select_strategy="full")))
    model = model.double().eval()
    pixels, ids = torch.rand(2, 3, 32, 32, dtype=torch.float64), prompt(2, 20)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, pixel_values=pixels).logits,
                                   composed_logits(model, pixels, ids, "full"), rtol=1e-10, atol=1e-10)


def test_backward_reaches_every_resampler_parameter():
    model = CoSLlavaForConditionalGeneration(tiny_config())
    ids = prompt(2, 20)
    labels = ids.masked_fill(ids == IMAGE_TOKEN, -100)
    out = model(input_ids=ids, pixel_values=torch.rand(2, 3, 32, 32), labels=labels)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    for name, p in model.resampler.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_generate_continues_with_the_forward_argmax():
    model = randomise(CoSLlavaForConditionalGeneration(tiny_config())).eval()
    pixels, ids = torch.rand(2, 3, 32, 32), prompt(2, 20)
    generated = model.generate(input_ids=ids, pixel_values=pixels, attention_mask=torch.ones_like(ids),
                               max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert generated.shape[0] == 2 and 1 <= generated.shape[1] - ids.shape[1] <= 3
    assert torch.equal(generated[:, :ids.shape[1]], ids)
    with torch.no_grad():
        first = model(input_ids=ids, pixel_values=pixels).logits[:, -1].argmax(-1)
    assert torch.equal(generated[:, ids.shape[1]], first)


def test_save_and_load_keep_the_resampler(tmp_path):
    model = randomise(CoSLlavaForConditionalGeneration(tiny_config())).eval()
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "cos_llava" and saved["resampler"]["queries"] == [4, 16]
    assert isinstance(AutoConfig.from_pretrained(tmp_path), CoSLlavaConfig)
    for loader in (AutoModelForImageTextToText, CoSLlavaForConditionalGeneration):
        loaded = loader.from_pretrained(tmp_path).eval()
        assert type(loaded) is CoSLlavaForConditionalGeneration
        want, got = model.state_dict(), loaded.state_dict()
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    pixels, ids = torch.rand(2, 3, 32, 32), prompt(2, 20)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids, pixel_values=pixels).logits,
                                   model(input_ids=ids, pixel_values=pixels).logits, rtol=0, atol=0)
    half = CoSLlavaForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert half.resampler.queries[0].dtype == torch.bfloat16


def tiny_processor(num_image_tokens: int) -> CoSLlavaProcessor:
    vocab = {word: i for i, word in enumerate(WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>", unk_token="<unk>")
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    assert tokenizer.convert_tokens_to_ids("<image>") == IMAGE_TOKEN
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return CoSLlavaProcessor(images, tokenizer, num_image_tokens=num_image_tokens, patch_size=4)


def test_processor_expands_each_image_to_the_resampler_token_count(tmp_path):
    model = CoSLlavaForConditionalGeneration(tiny_config()).eval()
    processor = tiny_processor(model.config.image_seq_length)
    images = [(np.random.rand(40, 48, 3) * 255).astype(np.uint8) for _ in range(2)]
    batch = processor(images=images, text=["USER: <image> a red cat", "USER: <image> the mat"],
                      padding=True, return_tensors="pt")
    assert ((batch["input_ids"] == IMAGE_TOKEN).sum(1) == 20).all()
    with torch.no_grad():
        out = model(**batch)
    assert out.logits.shape[:2] == batch["input_ids"].shape
    processor.save_pretrained(tmp_path)
    loaded = AutoProcessor.from_pretrained(tmp_path)
    assert type(loaded) is CoSLlavaProcessor and loaded.num_image_tokens == 20


def test_from_llava_shares_the_parts_and_swaps_the_projector():
    vision, text = sub_configs()
    llava = randomise(LlavaForConditionalGeneration(LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN, vision_feature_layer=LAYERS))).eval()
    resampler = MultiScaleResampler(tiny_resampler())
    model = CoSLlavaForConditionalGeneration.from_llava(llava, resampler).eval()
    assert model.resampler is resampler and resampler.config.concat_levels
    assert model.lm_head.weight.data_ptr() == llava.lm_head.weight.data_ptr()
    assert model.model.vision_tower is llava.model.vision_tower
    pixels, ids = torch.rand(2, 3, 32, 32), prompt(2, 20)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, pixel_values=pixels).logits,
                                   composed_logits(model, pixels, ids), rtol=1e-5, atol=1e-5)
    fresh = CoSLlavaForConditionalGeneration.from_llava(llava, tiny_resampler(queries=[4, 64]))
    assert fresh.config.image_seq_length == 68 and fresh.resampler.num_tokens == 68


def test_a_preset_is_rescaled_to_the_vision_grid():
    config = tiny_config(resampler="cos-80")
    assert config.resampler["windows"] == [8, 2] and config.resampler["queries"] == [16, 64]
    assert config.resampler["vision_dim"] == 32 and config.resampler["llm_dim"] == 48
    assert config.resampler["num_levels"] == 2 and config.image_seq_length == 80
    assert resampler_config(tiny_config(resampler="resampler-80", vision_feature_layer=-2)).num_levels == 1


@pytest.mark.parametrize("overrides, error, match", [
    (dict(resampler=tiny_resampler(vision_dim=16)), ValueError,
     r"resampler vision_dim = 16 but vision_config.hidden_size gives 32"),
    (dict(resampler=tiny_resampler(llm_dim=40)), ValueError, r"resampler llm_dim = 40 but text_config.hidden_size gives 48"),
    (dict(resampler=tiny_resampler(), vision_feature_layer=-2), ValueError,
     r"resampler num_levels = 2 but the number of vision_feature_layer entries \(-2\) gives 1"),
    (dict(resampler=tiny_resampler(grid=4, windows=[4, 2])), ValueError, r"resampler grid = \(4, 4\) but"),
    (dict(resampler="cos-9"), ValueError, r"resampler 'cos-9' is not a preset"),
    (dict(resampler=3), TypeError, r"resampler must be a preset name, a CoSConfig or its dict, got int"),
    (dict(resampler_backend="fast"), ValueError, r"resampler_backend must be one of"),
    # vision_feature_layer: a non-empty list of indices into the tower's 4 + 1 hidden states
    (dict(vision_feature_layer=[]), ValueError,
     r"vision_feature_layer must be a layer index or a non-empty list of them \(one resampler level each\), got \[\]"),
    (dict(resampler="cos-80", vision_feature_layer=[]), ValueError, r"vision_feature_layer must be a layer index"),
    (dict(vision_feature_layer=[2, 99]), ValueError,
     r"vision_feature_layer \[2, 99\]: index 99 is out of range; the vision tower has 5 hidden states \(the "
     r"embeddings and vision_config.num_hidden_layers = 4 layers\): expected -5..4"),
    (dict(vision_feature_layer=[-6, 2]), ValueError, r"index -6 is out of range; .* expected -5..4"),
    (dict(resampler="resampler-80", vision_feature_layer=5), ValueError, r"vision_feature_layer 5: index 5 is out of range"),
])
def test_bad_configs_name_the_field(overrides, error, match):
    with pytest.raises(error, match=match):
        tiny_config(**overrides)


def test_feature_layers_at_both_ends_of_the_hidden_states_are_taken():
    assert resampler_config(tiny_config(vision_feature_layer=[-5, 4])).num_levels == 2


def rows(*counts: int) -> torch.Tensor:
    """One prompt per count, that many image placeholders after BOS, words up to a common length."""
    length = max(counts) + 7
    return torch.stack([torch.cat([torch.ones(1, dtype=torch.long), torch.full((n,), IMAGE_TOKEN),
                                   torch.randint(4, len(WORDS), (length - 1 - n,))]) for n in counts])


@pytest.mark.parametrize("counts, images, match", [
    ((20, 19), 2, r"input_ids\[1\] has 19 image tokens \(id 12\); each image takes 20 \(config.image_seq_length, "
                  r"the resampler's num_tokens\): expected a multiple of 20, 20 for 1 image"),
    ((64, 20), 4, r"input_ids\[0\] has 64 image tokens .* expected a multiple of 20, 60 for 3 images"),
    ((20, 20), 1, r"input_ids hold 40 image tokens, 20 \(config.image_seq_length\) for each of 2 images, but "
                  r"pixel_values gives 1 image"),
])
def test_a_wrong_image_token_count_names_the_sample(counts, images, match):
    model = CoSLlavaForConditionalGeneration(tiny_config()).eval()
    with torch.no_grad(), pytest.raises(ValueError, match=match):
        model(input_ids=rows(*counts), pixel_values=torch.rand(images, 3, 32, 32))


def test_prompts_with_several_images_or_none_are_taken():
    model = CoSLlavaForConditionalGeneration(tiny_config()).eval()
    ids = rows(40, 0)  # two images in the first prompt, none in the second
    with torch.no_grad():
        assert model(input_ids=ids, pixel_values=torch.rand(2, 3, 32, 32)).logits.shape[:2] == ids.shape


def test_a_plain_llava_config_is_refused():
    vision, text = sub_configs()
    with pytest.raises(ValueError, match="needs a CoSLlavaConfig with a resampler"):
        CoSLlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text))
    with pytest.raises(ValueError, match=r"num_image_tokens must be a positive int.* \(the resampler's num_tokens, "
                                         r"config.image_seq_length\)"):
        tiny_processor(0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none here)")
def test_bf16_on_the_gpu_with_the_triton_backend(tmp_path):
    """The whole model in bf16 on the GPU, the resampler on the fused Triton backend: its visual tokens
    within 2x the torch backend's bf16 error of the float64 composition; loss and gradients finite;
    a reload onto the GPU in bf16 keeps it."""
    from oracle import assert_within_eager_error

    heads16 = tiny_resampler(num_heads=2)  # head dim 16: the Triton kernels' smallest
    reference = randomise(CoSLlavaForConditionalGeneration(tiny_config(resampler=heads16))).eval()
    pixels, ids = torch.rand(4, 3, 32, 32), prompt(4, 20)
    levels = lambda model, px: [h[:, 1:] for h in (model.model.vision_tower(px, output_hidden_states=True)
                                                   .hidden_states[layer] for layer in LAYERS)]
    with torch.no_grad():
        want = reference.double().resampler(levels(reference, pixels.double()))
    outs = {}
    for backend in ("torch", "triton"):  # the Triton model is the one trained below
        model = CoSLlavaForConditionalGeneration(tiny_config(resampler=heads16, resampler_backend=backend))
        model.load_state_dict(reference.state_dict())
        model = model.to("cuda", torch.bfloat16)
        with torch.no_grad():
            outs[backend] = model.resampler(levels(model, pixels.to("cuda", torch.bfloat16))).double().cpu()
    assert_within_eager_error("visual tokens", outs["triton"], want, outs["torch"], atol=1e-2)
    labels = ids.masked_fill(ids == IMAGE_TOKEN, -100).cuda()
    out = model(input_ids=ids.cuda(), pixel_values=pixels.to("cuda", torch.bfloat16), labels=labels)
    out.loss.backward()
    assert torch.isfinite(out.loss) and all(torch.isfinite(p.grad).all() for p in model.resampler.parameters())
    model.save_pretrained(tmp_path)
    again = CoSLlavaForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.bfloat16).to("cuda")
    assert again.resampler.queries[0].dtype == torch.bfloat16 and again.resampler.queries[0].is_cuda
