"""Losses of the models (pixel, adversarial, perceptual) and their combinations."""

from .adversarial import discriminator_loss, generator_adversarial_loss
from .cfmd import CFMDObjective, build_perceptual_loss
from .perceptual import LPIPSLoss
from .pixel import charbonnier_loss, multiscale_charbonnier_loss

__all__ = [
    "CFMDObjective",
    "LPIPSLoss",
    "build_perceptual_loss",
    "charbonnier_loss",
    "discriminator_loss",
    "generator_adversarial_loss",
    "multiscale_charbonnier_loss",
]
