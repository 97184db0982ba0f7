"""PyTorch modules: ``Linear4bit``."""

from qlorakit.nn.linear4bit import Linear4bit

__all__ = ["Linear4bit"]
