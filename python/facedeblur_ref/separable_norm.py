"""Reference separable normalization with adaptive denormalization (SNADNet Eq. 3-9)."""

from __future__ import annotations

import torch
from torch import Tensor


def labels_to_masks(labels: Tensor, num_regions: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """One-hot region masks from a label map.

    Args:
        labels: [N, H, W] or [N, 1, H, W] integer labels in ``[0, num_regions)``.
        num_regions: R.
        dtype: floating dtype of the result.

    Returns:
        [N, R, H, W] masks with exactly one 1 per pixel.
    """
    if labels.dim() == 4:
        labels = labels[:, 0]
    onehot = torch.nn.functional.one_hot(labels.long(), num_regions)
    return onehot.permute(0, 3, 1, 2).to(dtype)


def separable_norm(
    x: Tensor,
    masks: Tensor,
    gamma: Tensor | None = None,
    beta: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    """Normalize each region of each channel separately, then denormalize per pixel.

    For sample n, channel c and region r with mask ``M_r``:
    ``mu_r = sum(M_r x) / sum(M_r)``, ``var_r = sum(M_r (x - mu_r)^2) / sum(M_r)``,
    ``out = (sum_r M_r (x - mu_r) / sqrt(var_r + eps)) * gamma + beta``.
    A region with zero mass contributes nothing and receives no gradient. Masks are expected to
    be non-negative.

    Non-finite values propagate as the formula says with IEEE arithmetic, zero weights included
    (``0 * inf`` is NaN): a NaN or Inf anywhere in ``x[n, c]`` makes the statistics of every
    non-empty region of that plane NaN, one in ``masks[n, r]`` those of region r (its mass is
    NaN, which does not count as empty); either way the whole output plane ``(n, c)`` is NaN,
    and so are the gradients that depend on it. The fused CPU and CUDA kernels follow this rule.

    Args:
        x: [N, C, H, W].
        masks: [N, R, H, W], binary or soft.
        gamma, beta: broadcastable to x, or None (scale 1, shift 0).
        eps: added to the variance.

    Returns:
        [N, C, H, W].
    """
    xs = x.unsqueeze(2)  # [N, C, 1, H, W]
    m = masks.to(x.dtype).unsqueeze(1)  # [N, 1, R, H, W]
    mass = m.sum(dim=(-2, -1), keepdim=True)  # [N, 1, R, 1, 1]
    present = ~(mass <= 0)  # a NaN mass is present: its statistics come out NaN
    # An empty region is dropped, gradient included: the function has no derivative there
    # (the region's mean depends on the direction in which mass appears). It sees x as zeros,
    # so that a non-finite x does not reach it through 0 * inf.
    m = torch.where(present, m, torch.zeros_like(m))
    xr = torch.where(present, xs, torch.zeros_like(xs))  # [N, C, R, H, W]
    safe_mass = torch.where(present, mass, torch.ones_like(mass))
    mu = (m * xr).sum(dim=(-2, -1), keepdim=True) / safe_mass
    var = (m * (xr - mu) ** 2).sum(dim=(-2, -1), keepdim=True) / safe_mass
    normalized = (m * (xr - mu) / torch.sqrt(var + eps)).sum(dim=2)
    out = normalized
    if gamma is not None:
        out = out * gamma
    if beta is not None:
        out = out + beta
    return out
