"""Training: the two Chain-of-Sight stages, checkpoints, distributed runs, reporting and the CLI."""

from .config import TrainConfig
from .trainer import NonFiniteLossError, Trainer, cosine_with_warmup

__all__ = ["TrainConfig", "Trainer", "NonFiniteLossError", "cosine_with_warmup"]
