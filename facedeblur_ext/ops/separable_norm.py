"""Separable normalization with adaptive denormalization (SNADNet Eq. 3-9, SPEC.md 4.2).

Fused op: ``torch.ops.facedeblur_ext.separable_norm_forward`` / ``separable_norm_backward``
(CPU: float32, float64; CUDA: float32, float16, bfloat16, float64 with float32 statistics for
the half types). This module adds the functional API, fake kernels (``torch.compile``,
``torch.export``) and autograd.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._autograd import register_no_derivative
from ._selfcheck import register_self_check

__all__ = ["separable_norm", "labels_to_masks"]

_FORWARD = "facedeblur_ext::separable_norm_forward"
_BACKWARD = "facedeblur_ext::separable_norm_backward"

# The CUDA kernels keep per-region state in registers, sized at compile time.
CUDA_MAX_REGIONS = 16


def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _memory_format(x: Tensor) -> torch.memory_format:
    """Layout of ``out`` and ``grad_x``; the C++ side applies the same rule."""
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _check_args(x: Tensor, masks: Tensor, gamma: Tensor | None, beta: Tensor | None,
                eps: float) -> None:
    if not isinstance(x, Tensor) or not isinstance(masks, Tensor):
        raise TypeError("separable_norm: x and masks must be tensors")
    if x.dim() != 4:
        raise ValueError(f"separable_norm: expected x of shape [N, C, H, W], got {tuple(x.shape)}")
    if masks.dim() != 4:
        raise ValueError(
            f"separable_norm: expected masks of shape [N, R, H, W], got {tuple(masks.shape)}; "
            "for a label map use labels_to_masks(labels, num_regions)")
    n, _, h, w = x.shape
    if masks.shape[0] != n or masks.shape[2] != h or masks.shape[3] != w or masks.shape[1] < 1:
        raise ValueError(
            f"separable_norm: masks of shape {tuple(masks.shape)} do not match x of shape "
            f"{tuple(x.shape)} (expected [{n}, R >= 1, {h}, {w}])")
    if x.numel() == 0:
        raise ValueError(f"separable_norm: x must not be empty, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"separable_norm: x must be a floating-point tensor, got {x.dtype}")
    if not masks.is_floating_point():
        raise TypeError(
            f"separable_norm: masks must be floating point (soft or 0/1), got {masks.dtype}; "
            "for integer labels use labels_to_masks(labels, num_regions)")
    supported = ((torch.float32, torch.float64) if x.device.type == "cpu"
                 else (torch.float32, torch.float16, torch.bfloat16, torch.float64))
    if x.dtype not in supported:
        raise TypeError(f"separable_norm: x of dtype {x.dtype} is not supported on "
                        f"{x.device.type} (supported: {', '.join(map(str, supported))})")
    if x.device.type == "cuda" and masks.shape[1] > CUDA_MAX_REGIONS:
        raise ValueError(f"separable_norm: at most {CUDA_MAX_REGIONS} regions on CUDA, got "
                         f"{masks.shape[1]}")
    for name, t in (("gamma", gamma), ("beta", beta)):
        if t is not None and (not isinstance(t, Tensor) or not t.is_floating_point()):
            raise TypeError(f"separable_norm: {name} must be a floating-point tensor or None, "
                            f"got {t.dtype if isinstance(t, Tensor) else type(t).__name__}")
    for name, t in (("masks", masks), ("gamma", gamma), ("beta", beta)):
        if t is not None and t.device != x.device:
            raise ValueError(f"separable_norm: {name} is on {t.device} but x is on {x.device}")
    for name, t in (("gamma", gamma), ("beta", beta)):
        if t is None:
            continue
        try:
            shape = torch.broadcast_shapes(t.shape, x.shape)
        except RuntimeError:
            shape = None
        if shape != x.shape or t.dim() > 4:
            raise ValueError(f"separable_norm: {name} of shape {tuple(t.shape)} does not "
                             f"broadcast to x of shape {tuple(x.shape)}")
    if not eps >= 0.0:
        raise ValueError(f"separable_norm: eps must be >= 0, got {eps}")


def separable_norm(x: Tensor, masks: Tensor, gamma: Tensor | None = None,
                   beta: Tensor | None = None, eps: float = 1e-5) -> Tensor:
    """Normalize every region of every channel on its own, then denormalize per pixel.

    For sample n, channel c and region r with mask ``M_r``:
    ``mu_r = sum(M_r x) / sum(M_r)``, ``var_r = sum(M_r (x - mu_r)^2) / sum(M_r)`` and
    ``out = (sum_r M_r (x - mu_r) / sqrt(var_r + eps)) * gamma + beta``.
    With a foreground mask and its complement this is SNADNet's separable normalization (SN,
    Eq. 3-7) followed by its adaptive denormalization (AD, Eq. 9). A region with zero mass
    contributes nothing and gets no gradient; a pixel outside every region gives ``beta``.
    Double backward is not supported: differentiating the gradients (e.g. for a gradient
    penalty) raises a ``RuntimeError``.

    Args:
        x: [N, C, H, W] features (contiguous, channels_last or strided).
        masks: [N, R, H, W] non-negative region weights, binary or soft (cast to ``x.dtype``);
            R >= 1 (at most 16 on CUDA).
        gamma: scale broadcastable to x (per pixel [N, C, H, W] as in the paper, or e.g.
            [N, C, 1, 1], [1, C, H, W]), or None for 1. Cast to ``x.dtype``.
        beta: shift broadcastable to x, or None for 0. Cast to ``x.dtype``.
        eps: added to every variance; must be >= 0.

    Returns:
        [N, C, H, W] tensor of ``x.dtype``, channels_last when x is.

    Raises:
        ValueError: shapes that do not fit, empty x, too many regions on CUDA, negative eps,
            arguments on different devices.
        TypeError: non-floating or unsupported dtypes.
    """
    _check_args(x, masks, gamma, beta, eps)
    masks = masks.to(x.dtype)
    gamma = gamma.to(x.dtype) if gamma is not None else None
    beta = beta.to(x.dtype) if beta is not None else None
    out, _, _ = torch.ops.facedeblur_ext.separable_norm_forward(x, masks, gamma, beta, float(eps))
    return out


def labels_to_masks(labels: Tensor, num_regions: int,
                    dtype: torch.dtype = torch.float32) -> Tensor:
    """One-hot region masks from a label map.

    Args:
        labels: [N, H, W] or [N, 1, H, W] integer labels in ``[0, num_regions)``.
        num_regions: R >= 1.
        dtype: floating dtype of the masks.

    Returns:
        [N, R, H, W] masks with exactly one 1 per pixel, on the device of ``labels``.

    Raises:
        ValueError: wrong shape, R < 1, or (in eager mode) a label outside ``[0, R)``.
        TypeError: non-integer labels or a non-floating dtype.
    """
    if labels.dim() == 4:
        if labels.shape[1] != 1:
            raise ValueError(f"labels_to_masks: expected [N, H, W] or [N, 1, H, W] labels, "
                             f"got {tuple(labels.shape)}")
        labels = labels[:, 0]
    if labels.dim() != 3:
        raise ValueError(f"labels_to_masks: expected [N, H, W] or [N, 1, H, W] labels, "
                         f"got {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"labels_to_masks: labels must be integers, got {labels.dtype}")
    if not dtype.is_floating_point:
        raise TypeError(f"labels_to_masks: dtype must be floating point, got {dtype}")
    if num_regions < 1:
        raise ValueError(f"labels_to_masks: num_regions must be >= 1, got {num_regions}")
    if not torch.compiler.is_compiling() and labels.numel() > 0:
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or high >= num_regions:
            raise ValueError(f"labels_to_masks: labels span [{low}, {high}], outside "
                             f"[0, {num_regions}) for num_regions={num_regions}")
    regions = torch.arange(num_regions, device=labels.device).view(1, num_regions, 1, 1)
    return (labels.unsqueeze(1) == regions).to(dtype)


@torch.library.register_fake(_FORWARD)
def _forward_fake(x, masks, gamma, beta, eps):
    n, c = x.shape[0], x.shape[1]
    r = masks.shape[1]
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=_memory_format(x))
    stats = _stats_dtype(x.dtype)
    mean = x.new_empty((n, c, r), dtype=stats)
    rstd = x.new_empty((n, c, r), dtype=stats)
    return out, mean, rstd


@torch.library.register_fake(_BACKWARD)
def _backward_fake(grad_out, x, masks, gamma, beta, mean, rstd, eps, output_mask):
    fmt = _memory_format(x)

    def like_param(t):
        if t.shape == x.shape:  # written elementwise in x's layout
            return torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=fmt)
        return x.new_empty(t.shape)

    grad_x = (torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=fmt)
              if output_mask[0] else None)
    grad_masks = x.new_empty(masks.shape) if output_mask[1] else None
    grad_gamma = like_param(gamma) if output_mask[2] and gamma is not None else None
    grad_beta = like_param(beta) if output_mask[3] and beta is not None else None
    return grad_x, grad_masks, grad_gamma, grad_beta


def _setup_context(ctx, inputs, output):
    x, masks, gamma, beta, eps = inputs
    _, mean, rstd = output
    # Only beta's shape matters to the backward: keep a zero-stride stand-in, not beta itself.
    beta_shape = beta.new_empty(()).expand(beta.shape) if beta is not None else None
    ctx.save_for_backward(x, masks, gamma, beta_shape, mean, rstd)
    ctx.eps = eps
    ctx.mark_non_differentiable(mean, rstd)


def _backward(ctx, grad_out, _grad_mean, _grad_rstd):
    x, masks, gamma, beta_shape, mean, rstd = ctx.saved_tensors
    need = ctx.needs_input_grad
    output_mask = [bool(need[0]), bool(need[1]), bool(need[2]) and gamma is not None,
                   bool(need[3]) and beta_shape is not None]
    if not any(output_mask):
        return None, None, None, None, None
    grad_x, grad_masks, grad_gamma, grad_beta = torch.ops.facedeblur_ext.separable_norm_backward(
        grad_out.contiguous(memory_format=_memory_format(x)), x, masks, gamma, beta_shape, mean,
        rstd, ctx.eps, output_mask)
    return grad_x, grad_masks, grad_gamma, grad_beta, None


torch.library.register_autograd(_FORWARD, _backward, setup_context=_setup_context)
register_no_derivative(_BACKWARD, "separable_norm: double backward is not supported")


@register_self_check("separable_norm")
def _self_check(device: torch.device) -> None:
    """Against torch: one all-ones region is instance norm; two hard regions are two
    instance norms of the pixels they cover; gradients against autograd of that composition."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 9, 7, generator=gen).to(device)
    ones = torch.ones(2, 1, 9, 7, device=device)
    got = separable_norm(x, ones)
    want = torch.nn.functional.instance_norm(x, eps=1e-5)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)

    fg = (torch.rand(2, 1, 9, 7, generator=gen) > 0.5).float().to(device)
    masks = torch.cat([fg, 1 - fg], dim=1)
    gamma = torch.randn(2, 3, 9, 7, generator=gen).to(device)
    beta = torch.randn(1, 3, 1, 1, generator=gen).to(device)
    xs = [x.clone().requires_grad_(True) for _ in range(2)]
    gs = [gamma.clone().requires_grad_(True) for _ in range(2)]
    got = separable_norm(xs[0], masks, gs[0], beta)
    want = torch.zeros_like(x)
    for r in range(2):
        m = masks[:, r:r + 1]
        mass = m.sum(dim=(2, 3), keepdim=True)
        mu = (m * xs[1]).sum(dim=(2, 3), keepdim=True) / mass
        var = (m * (xs[1] - mu) ** 2).sum(dim=(2, 3), keepdim=True) / mass
        want = want + m * (xs[1] - mu) / torch.sqrt(var + 1e-5)
    want = want * gs[1] + beta
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    weights = torch.randn(x.shape, generator=gen).to(device)
    (got * weights).sum().backward()
    (want * weights).sum().backward()
    torch.testing.assert_close(xs[0].grad, xs[1].grad, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(gs[0].grad, gs[1].grad, atol=1e-3, rtol=1e-3)
