"""Minimal PSNR and SSIM for validation during training (private to the trainer).

Both follow scikit-image's definitions for images in [0, 1] (``peak_signal_noise_ratio`` with
``data_range=1``; ``structural_similarity`` with its defaults: 7x7 uniform window, K1 = 0.01,
K2 = 0.03, sample covariance, the border of 3 pixels left out, mean over channels). The
library's full metrics live in ``facedeblur_ext.metrics``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["psnr", "ssim"]


def psnr(pred: Tensor, target: Tensor) -> Tensor:
    """Per-image PSNR in dB, [B, C, H, W] in [0, 1] -> [B]."""
    mse = (pred.double() - target.double()).square().flatten(1).mean(dim=1)
    return (10 * torch.log10(1.0 / mse.clamp_min(1e-20))).float()


def ssim(pred: Tensor, target: Tensor, window: int = 7) -> Tensor:
    """Per-image SSIM, [B, C, H, W] in [0, 1] -> [B] (mean over channels and pixels)."""
    x, y = pred.double(), target.double()
    if min(x.shape[-2:]) < window:
        raise ValueError(f"SSIM needs images of at least {window}x{window}")
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    n = window * window
    cov_norm = n / (n - 1)
    mean = lambda t: F.avg_pool2d(t, window, stride=1)
    ux, uy = mean(x), mean(y)
    vx = cov_norm * (mean(x * x) - ux * ux)
    vy = cov_norm * (mean(y * y) - uy * uy)
    vxy = cov_norm * (mean(x * y) - ux * uy)
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return s.flatten(1).mean(dim=1).float()
