"""taste-kernels: TASTE / TASLM with fused kernels."""

from taste import ops
from taste.ops import HAS_EXTENSION, DelayLayout

__all__ = ["ops", "HAS_EXTENSION", "DelayLayout"]
__version__ = "0.1.0"
