"""Adversarial losses on discriminator logits.

``bce`` is the standard GAN loss of CFMD-GAN's Eq. 11 and 15 (discriminator:
``-log D(real) - log(1 - D(fake))``; generator, non-saturating: ``-log D(fake)``), written with
softplus on logits for numerical safety. ``hinge`` is the variant Schonfeld et al. used for the
U-Net discriminator. Both average over every element, so per-pixel decoder logits get the
``1 / WH`` mean of the equations.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

__all__ = ["GAN_LOSSES", "discriminator_loss", "generator_adversarial_loss"]

GAN_LOSSES = ("bce", "hinge")


def _check(kind: str) -> None:
    if kind not in GAN_LOSSES:
        raise ValueError(f"unknown GAN loss {kind!r}; choose one of {GAN_LOSSES}")


def discriminator_loss(real_logits: Tensor, fake_logits: Tensor, kind: str = "bce") -> Tensor:
    """Loss of the discriminator for logits on real and generated samples."""
    _check(kind)
    real_logits, fake_logits = real_logits.float(), fake_logits.float()
    if kind == "bce":
        return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()
    return F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean()


def generator_adversarial_loss(fake_logits: Tensor, kind: str = "bce") -> Tensor:
    """Loss of the generator for the discriminator's logits on its samples."""
    _check(kind)
    fake_logits = fake_logits.float()
    if kind == "bce":
        return F.softplus(-fake_logits).mean()
    return -fake_logits.mean()
