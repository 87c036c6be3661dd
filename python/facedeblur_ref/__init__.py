"""Pure-PyTorch references of every facedeblur_ext op.

Written for clarity, not speed: the oracle in tests and the baseline in benchmarks. Each
function has the signature and semantics of its fused counterpart in ``facedeblur_ext.ops``.
This package is never imported by ``facedeblur_ext``.
"""

from .blur import (
    average_frames,
    blur_synthesize,
    defocus_kernels,
    gaussian_kernels,
    motion_kernels,
    pad_kernels,
    trajectory_kernels,
)
from .modulated_deform_conv import modulated_deform_conv2d
from .separable_norm import labels_to_masks, separable_norm

__all__ = [
    "modulated_deform_conv2d",
    "separable_norm",
    "labels_to_masks",
    "average_frames",
    "blur_synthesize",
    "defocus_kernels",
    "gaussian_kernels",
    "motion_kernels",
    "pad_kernels",
    "trajectory_kernels",
]
