"""Layers built on the fused ops, for embedding in other PyTorch models."""

from .blur import KERNEL_TYPES, BlurConfig, BlurSynthesizer
from .control_adaptive import (
    ControlAdaptiveBlock,
    ControlAdaptiveDeformConv2d,
    resolve_backend,
    set_backend,
)
from .deform_conv import ConditionedDeformConv2d, ModulatedDeformConv2d
from .separable_norm import SeparableNorm2d, SNADLayer

__all__: list[str] = [
    "ControlAdaptiveBlock",
    "ControlAdaptiveDeformConv2d",
    "ConditionedDeformConv2d",
    "ModulatedDeformConv2d",
    "SeparableNorm2d",
    "SNADLayer",
    "resolve_backend",
    "set_backend",
    "KERNEL_TYPES",
    "BlurConfig",
    "BlurSynthesizer",
]
