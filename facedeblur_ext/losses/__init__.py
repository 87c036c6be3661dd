"""facedeblur_ext.losses."""

from .perceptual import LPIPSLoss

__all__ = ["LPIPSLoss"]
