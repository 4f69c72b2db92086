"""CoSMLLM: image -> ViT patch features -> bridge -> visual tokens in front of the caption -> LLM.

    pixel_values (B, 3, H, W) --VisionTower--> [ (B, N, C) per feature layer ]
                              --bridge-------> visual tokens (B, V, D)
    [visual tokens | BOS caption EOS pad...] --LLM--> next-token loss on caption tokens and EOS only
"""

from __future__ import annotations

import inspect
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..resampler import MultiScaleResampler
from .bridges import PatchProjector, build_bridge, default_scale_sources
from .config import MLLMConfig
from .tokenizer import load_tokenizer
from .vision import VisionTower

__all__ = ["CoSMLLM", "IGNORE_INDEX", "build_llm"]

IGNORE_INDEX = -100  # label of positions without loss (BOS, padding)


def _cache_name(llm: nn.Module) -> str:
    """The name of the KV cache in ``llm``'s forward arguments and outputs: ``cache`` where transformers
    has renamed it (5.24 has; ``past_key_values`` warns there and goes in 5.40), else ``past_key_values``
    (5.17 and older)."""
    return "cache" if "cache" in inspect.signature(llm.forward).parameters else "past_key_values"


def build_llm(config: MLLMConfig, tokenizer) -> nn.Module:
    """A LLaMA-architecture causal LM from the config (random init), or loaded from llm_path."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    if config.llm_path is not None:
        llm = AutoModelForCausalLM.from_pretrained(config.llm_path, local_files_only=True)
    else:
        llm = AutoModelForCausalLM.from_config(LlamaConfig(
            vocab_size=config.vocab_size, hidden_size=config.llm_width, intermediate_size=config.llm_mlp,
            num_hidden_layers=config.llm_layers, num_attention_heads=config.llm_heads,
            num_key_value_heads=config.llm_kv_heads, max_position_embeddings=config.max_positions,
            bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id,
            tie_word_embeddings=False,
        ))
    vocab = llm.get_input_embeddings().num_embeddings
    if tokenizer.vocab_size > vocab:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but the LLM's vocabulary only {vocab}")
    return llm


class CoSMLLM(nn.Module):
    """The reference multimodal LLM. Random weights are seeded per component (vision: seed,
    bridge: seed + 1, LLM: seed + 2), so a frozen part is rebuilt identically from the config.

    forward(pixel_values (B, 3, H, W), input_ids (B, S), attention_mask (B, S), labels (B, S))
        -> (loss_sum, num_targets): summed cross-entropy over the labelled tokens and their count
        (per_token=True: per-token nll and argmax correctness instead, see token_scores).
    labels[t] is the token input_ids[t] where it is a caption token or EOS, IGNORE_INDEX elsewhere
    (BOS, padding); the visual tokens carry no loss.
    """

    def __init__(self, config: MLLMConfig, backend: str = "auto"):
        super().__init__()
        if not isinstance(config, MLLMConfig):
            raise TypeError(f"config must be an MLLMConfig, got {type(config).__name__}")
        config.check_paths()
        self.config = config
        self.tokenizer = load_tokenizer(config.tokenizer_path)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            self.vision = VisionTower(config)
            torch.manual_seed(config.seed + 2)
            self.llm = build_llm(config, self.tokenizer)
            torch.manual_seed(config.seed + 1)
            self.bridge = build_bridge(config, self.vision.width, self.llm_width,
                                       len(self.vision.feature_layers), backend)
        self.gradient_checkpointing = False

    @property
    def llm_width(self) -> int:
        return self.llm.get_input_embeddings().embedding_dim

    @property
    def num_visual_tokens(self) -> int:
        return self.bridge.num_tokens

    def enable_gradient_checkpointing(self) -> None:
        """Recompute the bridge's and the LLM layers' activations in the backward pass."""
        self.gradient_checkpointing = True
        kwargs = {"use_reentrant": False}
        if hasattr(self.llm, "activation_checkpointing_enable"):  # transformers >= 5.23
            self.llm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            self.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

    # ---- forward ----------------------------------------------------------------------------
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> visual tokens (B, V, llm_width)."""
        features = self.vision(pixel_values)
        if self.gradient_checkpointing and self.training:
            return checkpoint(self.bridge, features, use_reentrant=False)
        return self.bridge(features)

    def embed(self, visual: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """Visual tokens (B, V, D) in front of the token embeddings of input_ids (B, S): (B, V + S, D)."""
        text = self.llm.get_input_embeddings()(input_ids)
        return torch.cat([visual.to(text.dtype), text], dim=1)

    def caption_loss(self, visual: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The LLM part of forward, from visual tokens (B, V, D): (loss_sum, num_targets)."""
        predicting, keep = self._predicting(visual, input_ids, attention_mask, labels)
        logits = self.llm.get_output_embeddings()(predicting[keep])
        loss_sum = F.cross_entropy(logits.float(), labels[keep], reduction="sum")
        return loss_sum, keep.sum()

    def token_scores(self, visual: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced scores per token, from visual tokens (B, V, D): (nll (B, S) float32,
        correct (B, S) bool: the argmax is the label); both 0 / False where labels == IGNORE_INDEX."""
        predicting, keep = self._predicting(visual, input_ids, attention_mask, labels)
        logits = self.llm.get_output_embeddings()(predicting).float()
        targets = labels.masked_fill(~keep, 0)
        nll = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none").masked_fill(~keep, 0.0)
        return nll, (logits.argmax(-1) == targets) & keep

    def _predicting(self, visual, input_ids, attention_mask, labels) -> tuple[torch.Tensor, torch.Tensor]:
        """The LLM's last hidden states that predict each input token (B, S, width), and the labelled mask."""
        if not input_ids.shape == attention_mask.shape == labels.shape:
            raise ValueError(
                f"input_ids, attention_mask and labels must have one shape (B, S), got "
                f"{tuple(input_ids.shape)}, {tuple(attention_mask.shape)}, {tuple(labels.shape)}"
            )
        B, V = visual.shape[:2]
        mask = torch.cat([attention_mask.new_ones(B, V), attention_mask], dim=1)
        hidden = self.llm.base_model(inputs_embeds=self.embed(visual, input_ids), attention_mask=mask).last_hidden_state
        # position V - 1 + t predicts input token t
        return hidden[:, V - 1:-1], labels != IGNORE_INDEX

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                labels: torch.Tensor, per_token: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss_sum, num_targets), or with per_token=True token_scores' (nll (B, S), correct (B, S))."""
        score = self.token_scores if per_token else self.caption_loss
        return score(self.encode_images(pixel_values), input_ids, attention_mask, labels)

    @torch.no_grad()
    def generate(self, pixel_values: torch.Tensor, max_new_tokens: int, stop_at_eos: bool = True) -> torch.Tensor:
        """Greedy captions: (B, 3, H, W) -> ids (B, T), T <= max_new_tokens, padded after EOS.

        stop_at_eos=False always runs max_new_tokens steps (ranks of a sharded model stay in step).
        """
        tok = self.tokenizer
        B = pixel_values.shape[0]
        bos = torch.full((B, 1), tok.bos_id, dtype=torch.long, device=pixel_values.device)
        out = self.llm(inputs_embeds=self.embed(self.encode_images(pixel_values), bos), use_cache=True,
                       logits_to_keep=1)
        done = torch.zeros(B, dtype=torch.bool, device=bos.device)
        cache = _cache_name(self.llm)
        generated = []
        for _ in range(max_new_tokens):
            next_id = out.logits[:, -1].argmax(-1).masked_fill(done, tok.pad_id)
            generated.append(next_id)
            done |= next_id == tok.eos_id
            if stop_at_eos and bool(done.all()):
                break
            out = self.llm(input_ids=next_id[:, None], **{cache: out[cache]}, use_cache=True, logits_to_keep=1)
        return torch.stack(generated, dim=1)

    # ---- compound token scaling -------------------------------------------------------------
    def scale_up(self, image_size: int, bridge: str, source: list[int] | None = None) -> None:
        """Chain-of-Sight's compound token scaling, in place: the ViT runs at ``image_size`` (its
        position embeddings interpolated) and the resampler is inflated to the ``bridge`` preset
        (MultiScaleResampler.scale_up; ``source`` names the pre-trained scale of each new scale,
        default: default_scale_sources). A per-patch projector keeps its weights and kind."""
        new_config = replace(self.config, image_size=image_size, bridge=bridge)
        if isinstance(self.bridge, PatchProjector):
            if bridge != self.config.bridge:
                raise ValueError(f"a {self.config.bridge!r} bridge cannot be scaled up to {bridge!r}")
            self.bridge.num_tokens = new_config.grid ** 2  # one token per patch of the new grid
        elif new_config.is_projector:
            raise ValueError(f"a resampler bridge ({self.config.bridge!r}) cannot become {bridge!r}")
        else:
            old: MultiScaleResampler = self.bridge
            target = new_config.resampler_config(old.config.vision_dim, old.config.llm_dim, old.config.num_levels)
            if source is None:
                source = default_scale_sources(old.layout.num_scales, target.layout.num_scales)
            self.bridge = old.scale_up(grid=target.grid, windows=target.windows, queries=target.queries,
                                       source=source)
        self.config = new_config
