"""cos_kernels: Chain-of-Sight's multi-scale visual resampler and its fused windowed-attention kernels."""

from .config import PRESETS, CoSConfig
from .layout import WindowLayout
from .ops import available_backends, multiscale_window_attention
from .resampler import MultiScaleResampler

__version__ = "0.1.0"

__all__ = [
    "CoSConfig",
    "PRESETS",
    "WindowLayout",
    "MultiScaleResampler",
    "multiscale_window_attention",
    "available_backends",
]
