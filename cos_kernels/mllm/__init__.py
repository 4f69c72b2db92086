"""The reference multimodal LLM: vision tower, bridges, LLM, tokenizer and caption data."""

from .bridges import PatchProjector, build_bridge, default_scale_sources
from .collate import CaptionCollator
from .config import BRIDGES, MODEL_PRESETS, PORT_CHOICES, MLLMConfig
from .llava import LlavaPretrainDataset, load_image
from .model import IGNORE_INDEX, CoSMLLM, build_llm
from .synthetic import SyntheticCaptions, make_scene, render_scene
from .tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer
from .vision import VisionTower

__all__ = [
    "MLLMConfig", "MODEL_PRESETS", "PORT_CHOICES", "BRIDGES", "CoSMLLM", "VisionTower", "PatchProjector", "build_bridge",
    "build_llm", "default_scale_sources", "IGNORE_INDEX", "ByteTokenizer", "HFTokenizer", "load_tokenizer",
    "CaptionCollator", "SyntheticCaptions", "make_scene", "render_scene", "LlavaPretrainDataset", "load_image",
]
