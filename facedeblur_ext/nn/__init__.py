"""Layers built on the fused ops, for embedding in other PyTorch models."""

from .backend import resolve_backend, set_backend
from .blur import KERNEL_TYPES, BlurConfig, BlurSynthesizer
from .control_adaptive import ControlAdaptiveBlock
from .deform_conv import ConditionedDeformConv2d, ModulatedDeformConv2d
from .separable_norm import SeparableNorm2d, SNADLayer

__all__: list[str] = [
    "ControlAdaptiveBlock",
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
