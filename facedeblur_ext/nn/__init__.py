"""Layers built on the fused ops, for embedding in other PyTorch models."""

from .deform_conv import ConditionedDeformConv2d, ModulatedDeformConv2d

__all__: list[str] = ["ModulatedDeformConv2d", "ConditionedDeformConv2d"]
