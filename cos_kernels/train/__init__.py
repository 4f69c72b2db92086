"""Training: the two Chain-of-Sight stages, checkpoints, distributed runs, reporting and the CLI;
load_bridge reads a run's trained resampler."""

from .config import TrainConfig
from .export import load_bridge
from .trainer import NonFiniteLossError, Trainer, cosine_with_warmup

__all__ = ["TrainConfig", "Trainer", "NonFiniteLossError", "cosine_with_warmup", "load_bridge"]
