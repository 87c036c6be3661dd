"""Functional API of the fused ops (registered under ``torch.ops.facedeblur_ext``).

Each op has a pure-PyTorch reference with the same signature in the ``facedeblur_ref``
package (``python/`` in the repository), used as the test oracle and benchmark baseline.
"""

from ._selfcheck import SELF_CHECKS, register_self_check
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
    "SELF_CHECKS",
    "register_self_check",
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
