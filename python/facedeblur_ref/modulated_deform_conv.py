"""Reference modulated deformable convolution (DCNv2), torchvision's argument layout.

Written as an explicit bilinear gather followed by a grouped matrix product, so that autograd
gives every gradient (input, offset, mask, weight, bias).
"""

from __future__ import annotations

import torch
from torch import Tensor


def _pair(v) -> tuple[int, int]:
    if isinstance(v, (tuple, list)):
        return int(v[0]), int(v[1])
    return int(v), int(v)


def bilinear_sample_zero_padded(image: Tensor, y: Tensor, x: Tensor) -> Tensor:
    """Sample ``image`` at real coordinates with zeros outside, torchvision's convention.

    Args:
        image: [B, C, H, W].
        y, x: [B, P] sampling rows and columns in pixels.

    Returns:
        [B, C, P]. A point with ``y <= -1``, ``y >= H``, ``x <= -1`` or ``x >= W`` gives 0; inside
        that range each of the four neighbours outside the image counts as 0. A NaN coordinate
        gives NaN, as in torchvision: its four neighbours count as 0 and its NaN fraction makes
        the bilinear weights NaN (so is the gradient of the other coordinate; the image gets
        none); an infinite one is just outside.
    """
    B, C, H, W = image.shape
    # An infinite coordinate becomes -2, outside the image, so that its fraction y - floor(y) is
    # not inf - inf = NaN (a select: a NaN coordinate keeps its gradient, clamp would drop it).
    y = torch.where(y.isinf(), -2.0, y)
    x = torch.where(x.isinf(), -2.0, x)
    inside = (y > -1) & (y < H) & (x > -1) & (x < W)
    y0 = torch.floor(y)
    x0 = torch.floor(x)
    wy1 = y - y0
    wx1 = x - x0
    wy0 = 1 - wy1
    wx0 = 1 - wx1
    y0i = y0.long()
    x0i = x0.long()
    flat = image.reshape(B, C, H * W)
    out = image.new_zeros(B, C, y.shape[1])
    for dy, wy in ((0, wy0), (1, wy1)):
        for dx, wx in ((0, wx0), (1, wx1)):
            yi = y0i + dy
            xi = x0i + dx
            valid = inside & (yi >= 0) & (yi < H) & (xi >= 0) & (xi < W)
            index = (yi.clamp(0, H - 1) * W + xi.clamp(0, W - 1)).unsqueeze(1).expand(B, C, -1)
            # Neighbours outside read 0 (selected, not multiplied by 0, so that a NaN weight
            # still gives NaN and the image gets no gradient through it).
            vals = torch.where(valid.unsqueeze(1), torch.gather(flat, 2, index), 0)
            out = out + vals * (wy * wx).unsqueeze(1)
    return out


def modulated_deform_conv2d(
    input: Tensor,
    offset: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride=1,
    padding=0,
    dilation=1,
    mask: Tensor | None = None,
) -> Tensor:
    """Modulated deformable convolution, a drop-in for ``torchvision.ops.deform_conv2d``.

    Args:
        input: [N, C_in, H, W].
        offset: [N, 2 * G_off * kh * kw, H_out, W_out]; for offset group g and tap k (row-major
            over the kernel window) channel ``2 * (g * kh * kw + k)`` is dy and the next is dx.
        weight: [C_out, C_in / groups, kh, kw]; ``groups`` is inferred from C_in.
        bias: [C_out] or None.
        stride, padding, dilation: int or (h, w).
        mask: [N, G_off * kh * kw, H_out, W_out] modulation, or None for DCNv1 (all ones).

    Returns:
        [N, C_out, H_out, W_out].
    """
    sh, sw = _pair(stride)
    ph, pw = _pair(padding)
    dh, dw = _pair(dilation)
    N, C_in, H, W = input.shape
    C_out, C_in_per_group, kh, kw = weight.shape
    groups = C_in // C_in_per_group
    K = kh * kw
    H_out = (H + 2 * ph - (dh * (kh - 1) + 1)) // sh + 1
    W_out = (W + 2 * pw - (dw * (kw - 1) + 1)) // sw + 1
    offset_groups = offset.shape[1] // (2 * K)
    if mask is None:
        mask = input.new_ones(N, offset_groups * K, H_out, W_out)

    # Base sampling grid per tap: [K, H_out, W_out].
    ky, kx = torch.meshgrid(
        torch.arange(kh, device=input.device), torch.arange(kw, device=input.device), indexing="ij"
    )
    oy, ox = torch.meshgrid(
        torch.arange(H_out, device=input.device),
        torch.arange(W_out, device=input.device),
        indexing="ij",
    )
    base_y = (oy * sh - ph).unsqueeze(0) + (ky.reshape(K) * dh).view(K, 1, 1)
    base_x = (ox * sw - pw).unsqueeze(0) + (kx.reshape(K) * dw).view(K, 1, 1)

    off = offset.reshape(N, offset_groups, K, 2, H_out, W_out)
    y = base_y.to(input.dtype) + off[:, :, :, 0]  # [N, G_off, K, H_out, W_out]
    x = base_x.to(input.dtype) + off[:, :, :, 1]

    c_per_off = C_in // offset_groups
    image = input.reshape(N * offset_groups, c_per_off, H, W)
    cols = bilinear_sample_zero_padded(
        image, y.reshape(N * offset_groups, -1), x.reshape(N * offset_groups, -1)
    )  # [N * G_off, c_per_off, K * H_out * W_out]
    cols = cols.reshape(N, offset_groups, c_per_off, K, H_out * W_out)
    cols = cols * mask.reshape(N, offset_groups, 1, K, H_out * W_out)
    cols = cols.reshape(N, groups, C_in_per_group * K, H_out * W_out)
    w = weight.reshape(groups, C_out // groups, C_in_per_group * K)
    out = torch.einsum("gok,ngkp->ngop", w, cols).reshape(N, C_out, H_out, W_out)
    if bias is not None:
        out = out + bias.view(1, C_out, 1, 1)
    return out
