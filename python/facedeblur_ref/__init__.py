"""Pure-PyTorch references of every facedeblur_ext op.

Written for clarity, not speed: the oracle in tests and the baseline in benchmarks. Each
function has the signature and semantics of its fused counterpart in ``facedeblur_ext.ops``.
This package is never imported by ``facedeblur_ext``.
"""

from .modulated_deform_conv import modulated_deform_conv2d
from .separable_norm import labels_to_masks, separable_norm

__all__ = ["modulated_deform_conv2d", "separable_norm", "labels_to_masks"]
