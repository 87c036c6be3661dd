"""Layers built on the fused ops, for embedding in other PyTorch models."""

from .separable_norm import SeparableNorm2d, SNADLayer

__all__: list[str] = ["SeparableNorm2d", "SNADLayer"]
