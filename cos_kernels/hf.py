"""transformers integration: Chain-of-Sight's resampler as the projector of LlavaForConditionalGeneration.

    import cos_kernels.hf  # registers "cos_llava" with transformers' Auto classes
    config = CoSLlavaConfig(vision_config=..., text_config=..., resampler="cos-80",
                            vision_feature_layer=[16, 23])
    model = CoSLlavaForConditionalGeneration(config)         # or .from_llava(llava_model, resampler)
    processor = CoSLlavaProcessor(image_processor, tokenizer, num_image_tokens=config.image_seq_length)

The model is LLaVA's, with ``model.multi_modal_projector`` a MultiScaleResampler: it takes LLaVA's
selected features (B, N or N + 1, num_levels * vision_width), the levels of a list
vision_feature_layer side by side on the channel axis (CoSConfig.concat_levels), and returns
(B, num_tokens, text hidden size). Each ``<image>`` of a prompt stands for num_tokens placeholders,
not one per patch: config.image_seq_length and CoSLlavaProcessor say how many. save_pretrained /
from_pretrained (also AutoConfig, AutoModelForImageTextToText and AutoProcessor once this module
is imported) keep the resampler: its CoSConfig is saved in config.json under "resampler".
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn
from transformers import (AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor, LlavaConfig,
                          LlavaForConditionalGeneration, LlavaModel, LlavaProcessor)
from transformers.models.llava.modeling_llava import LlavaPreTrainedModel
from transformers.processing_utils import MultiModalData

from .config import PRESETS, CoSConfig
from .ops import BACKENDS
from .resampler import MultiScaleResampler
from .validation import one_of, positive_int

__all__ = ["CoSLlavaConfig", "CoSLlavaForConditionalGeneration", "CoSLlavaModel", "CoSLlavaProcessor",
           "resampler_config", "check_feature_layers", "check_image_tokens"]


class CoSLlavaConfig(LlavaConfig):
    """LlavaConfig with a MultiScaleResampler for the projector.

    Args:
        resampler: the projector's CoSConfig: a preset name (its windows rescaled to the vision
            tower's grid; widths and levels taken from the sub-configs), a CoSConfig or its dict;
            stored as the dict (see resampler_config).
        resampler_backend: its attention backend, one of cos_kernels.ops.BACKENDS (default "auto").
        **kwargs: LlavaConfig's (vision_config, text_config, vision_feature_layer, ...).

    image_seq_length is set to the resampler's number of tokens. Where a given CoSConfig disagrees
    with the vision tower (width, patch size, grid), the text model (width) or vision_feature_layer
    (its number of levels), a ValueError names the field; so does a vision_feature_layer that is not
    a hidden-state index of the vision tower (check_feature_layers).
    """

    model_type = "cos_llava"

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if getattr(self, "resampler", None) is None:  # transformers builds bare configs for defaults
            self.resampler = None
            return
        resampler = resampler_config(self)
        self.resampler = resampler.to_dict()
        self.image_seq_length = resampler.num_tokens
        self.resampler_backend = one_of(getattr(self, "resampler_backend", "auto"), BACKENDS,
                                        "CoSLlavaConfig.resampler_backend")


def resampler_config(config: LlavaConfig) -> CoSConfig:
    """The projector's CoSConfig, checked against the rest of the LLaVA config.

    Args:
        config: a LlavaConfig with ``resampler`` (a preset name, a CoSConfig or its dict).
    Returns:
        the CoSConfig, concat_levels and drop_cls on (LLaVA's feature form: (B, N + 1,
        num_levels * vision hidden size) with the CLS token, or (B, N, ...) without), its vision_dim,
        patch_size, grid, llm_dim and num_levels those of the vision tower, the text model and
        vision_feature_layer (a preset takes them; a given CoSConfig that differs is a ValueError).
    """
    check_feature_layers(config)
    vision, text = config.vision_config, config.text_config
    layers = config.vision_feature_layer
    num_levels = 1 if isinstance(layers, int) else len(layers)
    grid, spec = vision.image_size // vision.patch_size, config.resampler
    if isinstance(spec, str):
        if spec not in PRESETS:
            raise ValueError(f"CoSLlavaConfig.resampler {spec!r} is not a preset; known presets: {sorted(PRESETS)}")
        return CoSConfig.for_grid(spec, grid, patch_size=vision.patch_size, vision_dim=vision.hidden_size,
                                  llm_dim=text.hidden_size, num_levels=num_levels, drop_cls=True, concat_levels=True)
    if isinstance(spec, dict):
        spec = CoSConfig.from_dict(spec)
    if not isinstance(spec, CoSConfig):
        raise TypeError(f"CoSLlavaConfig.resampler must be a preset name, a CoSConfig or its dict, got "
                        f"{type(spec).__name__}")
    expected = {"vision_dim": (vision.hidden_size, "vision_config.hidden_size"),
                "patch_size": (vision.patch_size, "vision_config.patch_size"),
                "grid": ((grid, grid), "vision_config.image_size // patch_size"),
                "llm_dim": (text.hidden_size, "text_config.hidden_size"),
                "num_levels": (num_levels, f"the number of vision_feature_layer entries ({layers})")}
    for name, (want, source) in expected.items():
        if getattr(spec, name) != want:
            raise ValueError(f"CoSLlavaConfig.resampler {name} = {getattr(spec, name)} but {source} gives {want}")
    return replace(spec, concat_levels=True, drop_cls=True)


def check_feature_layers(config: LlavaConfig) -> None:
    """ValueError naming vision_feature_layer unless it is an index into the vision tower's hidden
    states, or a non-empty list of them: num_hidden_layers + 1 entries (the embeddings, then each
    layer's output), negative indices counting from the end as in LLaVA. (Its type, int or list of
    ints, is checked by the config's dataclass.)

    Args:
        config: a LlavaConfig (vision_feature_layer, vision_config.num_hidden_layers).
    """
    layers, depth = config.vision_feature_layer, getattr(config.vision_config, "num_hidden_layers", None)
    entries = [layers] if isinstance(layers, int) else layers
    if not entries:
        raise ValueError(f"CoSLlavaConfig.vision_feature_layer must be a layer index or a non-empty list of them "
                         f"(one resampler level each), got {layers!r}")
    for layer in entries:
        if depth is not None and not -depth - 1 <= layer <= depth:
            raise ValueError(f"CoSLlavaConfig.vision_feature_layer {layers!r}: index {layer} is out of range; the "
                             f"vision tower has {depth + 1} hidden states (the embeddings and "
                             f"vision_config.num_hidden_layers = {depth} layers): expected {-depth - 1}..{depth}")


def check_image_tokens(input_ids: torch.Tensor, feature_tokens: int, config: LlavaConfig) -> None:
    """ValueError naming the sample unless each row of ``input_ids`` holds config.image_seq_length
    image tokens (config.image_token_id) per image, and all rows together as many as the images give.

    Args:
        input_ids: (B, S) token ids.
        feature_tokens: the projected features' token count, num_images * image_seq_length for
            image features (num_images, image_seq_length, D).
        config: the model's LlavaConfig (image_seq_length, image_token_id).
    """
    per_image, token = config.image_seq_length, config.image_token_id
    counts = (input_ids == token).sum(-1).tolist()
    for i, count in enumerate(counts):
        if count % per_image:
            images = max(1, round(count / per_image))
            raise ValueError(f"input_ids[{i}] has {count} image tokens (id {token}); each image takes {per_image} "
                             f"(config.image_seq_length, the resampler's num_tokens): expected a multiple of "
                             f"{per_image}, {images * per_image} for {_images(images)}")
    if feature_tokens % per_image == 0 and sum(counts) != feature_tokens:
        raise ValueError(f"input_ids hold {sum(counts)} image tokens, {per_image} (config.image_seq_length) for each "
                         f"of {_images(sum(counts) // per_image)}, but pixel_values gives "
                         f"{_images(feature_tokens // per_image)}")


def _images(n: int) -> str:
    return f"{n} image{'s' * (n != 1)}"


class CoSLlavaModel(LlavaModel):
    """LlavaModel whose multi_modal_projector is a MultiScaleResampler, built in the place of LLaVA's
    (which is never made), and whose placeholder check names the sample whose image-token count is
    wrong (check_image_tokens) before LLaVA's own check (one total for the batch).

    Args:
        config: a CoSLlavaConfig with a resampler.

    The projector maps LLaVA's selected features (B, N or N + 1, num_levels * vision hidden size) to
    (B, num_tokens, text hidden size).
    """

    def __init__(self, config: CoSLlavaConfig):
        LlavaPreTrainedModel.__init__(self, config)  # LlavaModel.__init__, the resampler for LLaVA's projector
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.multi_modal_projector = MultiScaleResampler(CoSConfig.from_dict(config.resampler),
                                                         backend=config.resampler_backend)
        self.language_model = AutoModel.from_config(config.text_config)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        """The resampler's own initialisation for its modules (MultiScaleResampler.reset_module),
        LLaVA's elsewhere; weights loaded by from_pretrained are kept (transformers' guard)."""
        resampler = self.multi_modal_projector
        if any(module is m for m in resampler.modules()):
            resampler.reset_module(module)
        else:
            super()._init_weights(module)

    def get_placeholder_mask(self, input_ids, inputs_embeds, image_features):
        if input_ids is not None and not torch.compiler.is_compiling():  # .tolist() would break a graph
            check_image_tokens(input_ids, image_features.numel() // inputs_embeds.shape[-1], self.config)
        return super().get_placeholder_mask(input_ids, inputs_embeds=inputs_embeds, image_features=image_features)


class CoSLlavaForConditionalGeneration(LlavaForConditionalGeneration):
    """LlavaForConditionalGeneration whose multi_modal_projector is a MultiScaleResampler (its
    ``model`` is a CoSLlavaModel); forward, backward, generate, save_pretrained and from_pretrained
    as LLaVA's. A prompt whose image-token count does not fit its images is refused naming it.

    Args:
        config: a CoSLlavaConfig with a resampler.

    forward(input_ids (B, S), pixel_values (num_images, 3, H, W), attention_mask (B, S), labels
    (B, S), ...) -> LLaVA's output, logits (B, S, vocab size): each image's resampler tokens
    (image_seq_length of them) take the places of its image tokens in input_ids.
    """

    config_class = CoSLlavaConfig

    def __init__(self, config: CoSLlavaConfig):
        if not isinstance(config, CoSLlavaConfig) or config.resampler is None:
            raise ValueError("CoSLlavaForConditionalGeneration needs a CoSLlavaConfig with a resampler (a preset "
                             "name, a CoSConfig or its dict)")
        LlavaPreTrainedModel.__init__(self, config)  # LlavaForConditionalGeneration.__init__ with a CoSLlavaModel
        self.model = CoSLlavaModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    @property
    def resampler(self) -> MultiScaleResampler:
        """The projector: (B, N or N + 1, num_levels * vision hidden size) -> (B, num_tokens, text hidden size)."""
        return self.model.multi_modal_projector

    @classmethod
    def from_llava(cls, llava: LlavaForConditionalGeneration,
                   resampler: str | CoSConfig | MultiScaleResampler) -> "CoSLlavaForConditionalGeneration":
        """A CoS model sharing ``llava``'s vision tower and language model (the same tensors, nothing
        copied) with ``resampler`` as its projector.

        Args:
            llava: the LlavaForConditionalGeneration to take the parts from.
            resampler: a preset name or CoSConfig (randomly initialised, on the vision tower's device
                and dtype) or a MultiScaleResampler (used as is, its config set to accept LLaVA's
                feature form).
        Returns:
            the CoSLlavaForConditionalGeneration.
        """
        if not isinstance(llava, LlavaForConditionalGeneration):
            raise TypeError(f"llava must be a LlavaForConditionalGeneration, got {type(llava).__name__}")
        module = resampler if isinstance(resampler, MultiScaleResampler) else None
        settings = {k: v for k, v in llava.config.to_dict().items() if k not in ("model_type", "architectures")}
        config = CoSLlavaConfig(**{**settings, "resampler": module.config if module else resampler})
        config.vision_config, config.text_config = llava.config.vision_config, llava.config.text_config
        with torch.device("meta"):  # every part but the projector is llava's own module
            model = cls(config)
        model.model.vision_tower, model.model.language_model = llava.model.vision_tower, llava.model.language_model
        model.lm_head, model.generation_config = llava.lm_head, llava.generation_config
        if module is None:
            reference = next(llava.model.vision_tower.parameters())
            module = MultiScaleResampler(resampler_config(config), backend=config.resampler_backend)
            module = module.to(reference.device, reference.dtype)
        else:
            module.config = CoSConfig.from_dict(config.resampler)
        model.model.multi_modal_projector = module
        left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
        if left:
            raise ValueError(f"{type(llava).__name__} holds parts this conversion does not know: {left[:5]}")
        return model


class CoSLlavaProcessor(LlavaProcessor):
    """LlavaProcessor that expands each ``<image>`` of a prompt into ``num_image_tokens`` image tokens
    instead of one per patch. Saved and loaded with the processor (processor_config.json).

    Args:
        image_processor, tokenizer, **kwargs: LlavaProcessor's.
        num_image_tokens: a positive int: the resampler's num_tokens, config.image_seq_length.

    __call__(images, text) -> LLaVA's BatchFeature: pixel_values (num_images, 3, H, W), input_ids
    (B, S) with num_image_tokens image tokens per image.
    """

    def __init__(self, image_processor=None, tokenizer=None, num_image_tokens: int | None = None, **kwargs):
        try:
            self.num_image_tokens = positive_int(num_image_tokens, "num_image_tokens")
        except (TypeError, ValueError) as err:
            raise type(err)(f"{err} (the resampler's num_tokens, config.image_seq_length)") from None
        super().__init__(image_processor, tokenizer, **kwargs)

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        return self.image_token * self.num_image_tokens

    def _get_num_multimodal_tokens(self, image_sizes=None, **kwargs) -> MultiModalData:
        if image_sizes is None:
            return MultiModalData()
        return MultiModalData(num_image_tokens=[self.num_image_tokens] * len(image_sizes),
                              num_image_patches=[1] * len(image_sizes))


AutoConfig.register(CoSLlavaConfig.model_type, CoSLlavaConfig)
AutoModelForImageTextToText.register(CoSLlavaConfig, CoSLlavaForConditionalGeneration)
AutoProcessor.register(CoSLlavaConfig, CoSLlavaProcessor)
