"""Pixel reconstruction losses."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["charbonnier_loss", "multiscale_charbonnier_loss"]


def charbonnier_loss(pred: Tensor, target: Tensor, eps: float = 1e-3) -> Tensor:
    """Charbonnier loss ``mean(sqrt((pred - target)**2 + eps**2))`` over every element.

    Elementwise, as in MPRNet, which CFMD-GAN follows for this loss [003 Eq. 16, ref. 83].
    Computed in float32 so that ``eps**2 = 1e-6`` is not lost under half precision.
    """
    diff = pred.float() - target.float()
    return torch.sqrt(diff * diff + eps * eps).mean()


def multiscale_charbonnier_loss(preds: Sequence[Tensor], targets: Sequence[Tensor],
                                eps: float = 1e-3) -> Tensor:
    """Sum over scales of the per-scale mean Charbonnier loss [003 Eq. 16].

    Args:
        preds, targets: matching lists of [B, C, H_n, W_n] tensors, one per scale.
    """
    if len(preds) != len(targets):
        raise ValueError(f"{len(preds)} predictions for {len(targets)} targets")
    return sum(charbonnier_loss(p, t, eps) for p, t in zip(preds, targets))
