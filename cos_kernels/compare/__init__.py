"""Chain-of-Sight's claim in one command (cos-compare): its recipe (cos-80 pre-training, compound token
scaling, fine-tuning) against a baseline with all tokens throughout, over seeds, time and quality."""

from .config import COMPARE_PRESETS, CompareConfig
from .run import recipes, run_all

__all__ = ["CompareConfig", "COMPARE_PRESETS", "recipes", "run_all"]
