"""Layers built on the fused ops, for embedding in other PyTorch models."""

from .blur import KERNEL_TYPES, BlurConfig, BlurSynthesizer

__all__: list[str] = ["KERNEL_TYPES", "BlurConfig", "BlurSynthesizer"]
