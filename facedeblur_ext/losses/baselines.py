"""Losses of the thesis baselines [paper 002, Sec. 4.4, Eq. 4-5]."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

PERCEPTUAL_WEIGHT = 1e-3  # Eq. 4
CONTENT_WEIGHT = 100.0  # Eq. 5


def _gaussian_window(size: int, sigma: float, channels: int, like: Tensor) -> Tensor:
    coords = torch.arange(size, dtype=like.dtype, device=like.device) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(channels, 1, size, size).contiguous()


def ssim(pred: Tensor, target: Tensor, data_range: float = 1.0, window_size: int = 11,
         sigma: float = 1.5) -> Tensor:
    """Differentiable SSIM (Wang et al. 2004): 11x11 Gaussian window (sigma 1.5), K1 0.01,
    K2 0.03, per channel, averaged over the valid (unpadded) window positions and the batch.

    Args:
        pred, target: [N, C, H, W] with H, W >= window_size.
        data_range: value range of the images (1 for [0, 1]).

    Returns:
        Scalar mean SSIM.
    """
    if pred.shape != target.shape:
        raise ValueError(f"ssim: shapes differ, {tuple(pred.shape)} vs {tuple(target.shape)}")
    c = pred.shape[1]
    win = _gaussian_window(window_size, sigma, c, pred)
    c1 = (0.01 * data_range) ** 2
    c2 = (0.03 * data_range) ** 2
    mu_x = F.conv2d(pred, win, groups=c)
    mu_y = F.conv2d(target, win, groups=c)
    sxx = F.conv2d(pred * pred, win, groups=c) - mu_x**2
    syy = F.conv2d(target * target, win, groups=c) - mu_y**2
    sxy = F.conv2d(pred * target, win, groups=c) - mu_x * mu_y
    num = (2 * mu_x * mu_y + c1) * (2 * sxy + c2)
    den = (mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2)
    return (num / den).mean()


def ssim_loss(pred: Tensor, target: Tensor) -> Tensor:
    """``1 - SSIM`` (the thesis GAN's "custom SSIM loss")."""
    return 1.0 - ssim(pred, target)


def autoencoder_loss(
    pred: Tensor,
    target: Tensor,
    perceptual: Callable[[Tensor, Tensor], Tensor] | None = None,
    perceptual_weight: float = PERCEPTUAL_WEIGHT,
) -> tuple[Tensor, dict[str, Tensor]]:
    """``MSE + 0.001 * perceptual`` (Eq. 4).

    Args:
        pred, target: [N, 3, H, W] images in [0, 1].
        perceptual: callable ``(pred, target) -> scalar``, e.g.
            :class:`facedeblur_ext.models.baselines.VGG19Perceptual` built from local VGG19
            weights. None (the default, because pretrained weights cannot be downloaded here)
            leaves the term out: the loss is then MSE only, and results are not the thesis's
            exact setting.
        perceptual_weight: weight of the perceptual term.

    Returns:
        ``(total, terms)`` with detached ``mse`` and ``perceptual`` (0 when off).
    """
    mse = F.mse_loss(pred, target)
    total = mse
    perc = pred.new_zeros(())
    if perceptual is not None:
        perc = perceptual(pred, target)
        total = total + perceptual_weight * perc
    return total, {"mse": mse.detach(), "perceptual": perc.detach(), "total": total.detach()}


def gan_generator_loss(d_fake: Tensor, pred: Tensor, target: Tensor,
                       content_weight: float = CONTENT_WEIGHT) -> tuple[Tensor, dict[str, Tensor]]:
    """``BCE(D(G(x)), real) + 100 MSE + (1 - SSIM)`` (Eq. 5).

    Args:
        d_fake: discriminator logits for the generated images.
        pred, target: [N, 3, H, W] in [0, 1].
        content_weight: weight of the MSE term.

    Returns:
        ``(total, terms)`` with detached ``adv``, ``content``, ``ssim_loss``.
    """
    adv = F.binary_cross_entropy_with_logits(d_fake, torch.ones_like(d_fake))
    content = F.mse_loss(pred, target)
    s = ssim_loss(pred, target)
    total = adv + content_weight * content + s
    return total, {"adv": adv.detach(), "content": content.detach(), "ssim_loss": s.detach(),
                   "total": total.detach()}


def gan_discriminator_loss(d_real: Tensor, d_fake: Tensor) -> Tensor:
    """Binary cross entropy: real images labelled 1, generated ones 0 (averaged)."""
    real = F.binary_cross_entropy_with_logits(d_real, torch.ones_like(d_real))
    fake = F.binary_cross_entropy_with_logits(d_fake, torch.zeros_like(d_fake))
    return 0.5 * (real + fake)
