"""SNADNet losses [paper 004, Eq. 2 and 10-17].

Region order used throughout (the order of the data pipeline's ``regions`` masks):
``0 facial parts, 1 skin, 2 hair, 3 background``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

REGION_NAMES = ("facial_parts", "skin", "hair", "background")
BACKGROUND_INDEX = 3

# Eq. 11: skin 12, facial parts 10, hair 8, background 6, listed here in REGION_NAMES order.
REGION_WEIGHTS = (10.0, 12.0, 8.0, 6.0)

# Eq. 14 / 17, in the order the multi-patch discriminator returns its heads: the global dense
# head, then the patch heads from coarse (largest receptive field, 2x2 map at 256 px) to fine
# (8x8 map). The paper: "the larger the receptive field, the greater the weight".
ADV_HEAD_WEIGHTS = (1.0, 0.8, 0.4, 0.2)

# Eq. 15.
REC_WEIGHT = 120.0
ADV_WEIGHT = 0.1
TEXTURE_WEIGHT = 1.0


def focal_loss(
    logits: Tensor,
    labels: Tensor,
    gamma: float = 2.0,
    alpha: Sequence[float] | Tensor | None = None,
    ignore_index: int | None = None,
    reduction: str = "mean",
) -> Tensor:
    """Multi-class focal loss ``FL = -alpha_t (1 - p_t)^gamma log p_t`` (Eq. 2).

    Args:
        logits: [N, K, H, W] (or [N, K]) unnormalized class scores.
        labels: [N, H, W] (or [N]) integer labels in ``[0, K)``.
        gamma: focusing parameter (the paper uses 2); 0 gives (weighted) cross entropy.
        alpha: optional per-class weights ``alpha_t`` (length K); None weighs all classes 1.
        ignore_index: label value excluded from the loss.
        reduction: ``"mean"`` over the counted pixels, ``"sum"`` or ``"none"`` ([N, H, W]).

    Returns:
        Scalar loss (or the per-pixel map for ``reduction="none"``, zero at ignored pixels).
    """
    if logits.dim() < 2 or labels.shape != logits.shape[:1] + logits.shape[2:]:
        raise ValueError(
            f"focal_loss: logits [N, K, ...] and labels [N, ...] expected, got "
            f"{tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    labels = labels.long()
    valid = torch.ones_like(labels, dtype=torch.bool)
    if ignore_index is not None:
        valid = labels != ignore_index
        labels = torch.where(valid, labels, torch.zeros_like(labels))
    log_p = F.log_softmax(logits.float(), dim=1)
    log_pt = log_p.gather(1, labels.unsqueeze(1)).squeeze(1)
    pt = log_pt.exp()
    loss = -((1.0 - pt).clamp_min(0.0) ** gamma) * log_pt
    if alpha is not None:
        alpha_t = torch.as_tensor(alpha, dtype=loss.dtype, device=loss.device)
        if alpha_t.numel() != logits.shape[1]:
            raise ValueError(f"focal_loss: alpha needs {logits.shape[1]} entries, "
                             f"got {alpha_t.numel()}")
        loss = loss * alpha_t[labels]
    loss = loss * valid
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.sum() / valid.sum().clamp_min(1)
    raise ValueError(f"focal_loss: unknown reduction {reduction!r}")


def multi_region_reconstruction_loss(
    pred: Tensor,
    target: Tensor,
    region_masks: Tensor,
    weights: Sequence[float] = REGION_WEIGHTS,
    return_terms: bool = False,
):
    """Weighted sum of per-region L1 losses, each normalized by its mask area (Eq. 10-11).

    For region r and sample i: ``sum(|M_r * (pred - target)|) / (C * sum(M_r))``, i.e. the mean
    absolute error inside the region (over its pixels and the image channels), then averaged
    over the batch. A region that is empty in a sample contributes 0 for that sample (no NaN).

    Args:
        pred, target: [N, C, H, W] images.
        region_masks: [N, R, H, W] masks (binary or soft), R == len(weights); the default
            weights follow the order facial parts, skin, hair, background.
        weights: per-region weights lambda^rec.
        return_terms: also return a dict of the unweighted per-region losses.

    Returns:
        The scalar loss, or ``(loss, terms)`` with ``return_terms``.
    """
    if pred.shape != target.shape or pred.dim() != 4:
        raise ValueError(f"pred and target must both be [N, C, H, W], got "
                         f"{tuple(pred.shape)} and {tuple(target.shape)}")
    n, c, h, w = pred.shape
    if region_masks.shape[0] != n or region_masks.shape[2:] != (h, w):
        raise ValueError(f"region_masks {tuple(region_masks.shape)} do not match images "
                         f"{tuple(pred.shape)}")
    if region_masks.shape[1] != len(weights):
        raise ValueError(f"{region_masks.shape[1]} region masks but {len(weights)} weights")
    masks = region_masks.to(pred.dtype)
    abs_err = (pred - target).abs().sum(dim=1, keepdim=True)  # [N, 1, H, W], summed over C
    err_in_region = (abs_err * masks).sum(dim=(2, 3))  # [N, R]
    area = masks.sum(dim=(2, 3)) * c  # [N, R]
    per_sample = torch.where(area > 0, err_in_region / area.clamp_min(1e-12),
                             torch.zeros_like(err_in_region))
    per_region = per_sample.mean(dim=0)  # [R]
    weight_t = torch.as_tensor(weights, dtype=per_region.dtype, device=per_region.device)
    loss = (per_region * weight_t).sum()
    if not return_terms:
        return loss
    names = REGION_NAMES if len(weights) == len(REGION_NAMES) else [
        str(i) for i in range(len(weights))]
    return loss, {f"rec_{name}": per_region[i].detach() for i, name in enumerate(names)}


def laplacian_texture(image: Tensor) -> Tensor:
    """Texture map of an image: a fixed 3x3 Laplacian applied to each channel (depthwise).

    This is the texture extractor of Fig. 5 applied to the target image (``t_G``). Borders use
    replicate padding so that flat image borders give zero texture.

    Args:
        image: [N, C, H, W].

    Returns:
        [N, C, H, W].
    """
    c = image.shape[1]
    kernel = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]],
                          dtype=image.dtype, device=image.device)
    kernel = kernel.expand(c, 1, 3, 3)
    return F.conv2d(F.pad(image, (1, 1, 1, 1), mode="replicate"), kernel, groups=c)


def texture_targets(target: Tensor, sizes: Sequence[tuple[int, int]]) -> list[Tensor]:
    """Laplacian textures of the target at the resolutions of the texture predictions.

    Args:
        target: [N, C, H, W] sharp image.
        sizes: (h, w) of each predicted texture map; smaller sizes use an area-downsampled
            target.

    Returns:
        One [N, C, h, w] texture per size.
    """
    out = []
    for size in sizes:
        img = target if tuple(target.shape[2:]) == tuple(size) else F.interpolate(
            target, size=tuple(size), mode="area")
        out.append(laplacian_texture(img))
    return out


def texture_loss(pred_textures: Sequence[Tensor], target: Tensor) -> Tensor:
    """L1 between predicted textures and the target's Laplacian texture, summed over the
    texture extractors (Eq. 12).

    Args:
        pred_textures: [N, C, h_n, w_n] texture predictions ``t'_G`` of the generator.
        target: [N, C, H, W] sharp image ``I_t``.

    Returns:
        Scalar loss (0 when there are no predictions).
    """
    targets = texture_targets(target, [t.shape[2:] for t in pred_textures])
    loss = target.new_zeros(())
    for pred, ref in zip(pred_textures, targets):
        loss = loss + F.l1_loss(pred, ref)
    return loss


def relativistic_adversarial_loss(
    first: Sequence[Tensor], second: Sequence[Tensor], weights: Sequence[float] = ADV_HEAD_WEIGHTS
) -> Tensor:
    """``sum_k lambda_k * -E[log sigmoid(D_k(first) - D_k(second))]`` (Eq. 13-14, 16-17).

    The generator's loss is ``relativistic_adversarial_loss(D(fake), D(real))``, the
    discriminator's ``relativistic_adversarial_loss(D(real), D(fake))``. Pairs are formed
    element-wise (same batch index and, for patch heads, the same patch position).

    Args:
        first, second: the discriminator's head outputs (logits) for the two image sets, in the
            order of ``weights`` (global, then patch heads coarse to fine).
        weights: per-head weights.

    Returns:
        Scalar loss.
    """
    if not (len(first) == len(second) == len(weights)):
        raise ValueError(f"relativistic_adversarial_loss: {len(first)}, {len(second)} head "
                         f"outputs for {len(weights)} weights")
    loss = first[0].new_zeros((), dtype=torch.float32)
    for a, b, lam in zip(first, second, weights):
        # -log(sigmoid(z)) == softplus(-z), stable for large |z|.
        loss = loss + lam * F.softplus(-(a.float() - b.float())).mean()
    return loss


def snadnet_generator_loss(
    pred: Tensor,
    target: Tensor,
    region_masks: Tensor,
    pred_textures: Sequence[Tensor],
    d_fake: Sequence[Tensor] | None,
    d_real: Sequence[Tensor] | None,
    rec_weight: float = REC_WEIGHT,
    adv_weight: float = ADV_WEIGHT,
    texture_weight: float = TEXTURE_WEIGHT,
    region_weights: Sequence[float] = REGION_WEIGHTS,
    head_weights: Sequence[float] = ADV_HEAD_WEIGHTS,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Total generator loss ``120 rec + 0.1 adv + texture`` (Eq. 15).

    Args:
        pred: [N, 3, H, W] generated image ``I_g``.
        target: [N, 3, H, W] sharp image ``I_t``.
        region_masks: [N, 4, H, W] masks of the sharp image (facial parts, skin, hair, background).
        pred_textures: the generator's texture predictions.
        d_fake, d_real: discriminator heads on ``I_g`` and ``I_t`` (None skips the adversarial
            term, e.g. for a reconstruction-only warm-up).
        rec_weight, adv_weight, texture_weight: lambda_1, lambda_2 and the texture weight.
        region_weights, head_weights: see the module constants.

    Returns:
        ``(total, terms)`` where terms holds detached ``rec``, ``adv``, ``texture`` and the
        per-region reconstruction losses.
    """
    rec, terms = multi_region_reconstruction_loss(pred, target, region_masks, region_weights,
                                                  return_terms=True)
    tex = texture_loss(pred_textures, target)
    total = rec_weight * rec + texture_weight * tex
    adv = pred.new_zeros(())
    if d_fake is not None and d_real is not None:
        adv = relativistic_adversarial_loss(d_fake, d_real, head_weights)
        total = total + adv_weight * adv
    terms.update(rec=rec.detach(), adv=adv.detach(), texture=tex.detach())
    return total, terms
