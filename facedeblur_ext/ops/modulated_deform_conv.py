"""Modulated deformable convolution (DCNv2): the core of CFMD-GAN's CADC (paper 003, Eq. 10).

``F_dc(p) = sum_k w_k * F_u(p + p_k + dp_k) * m_k`` with bilinear sampling, zeros outside the
image. The functional API is a drop-in for ``torchvision.ops.deform_conv2d`` (same argument
order, offset and mask layouts). The native kernels are ``torch.ops.facedeblur_ext.
modulated_deform_conv2d`` (forward) and ``..._backward``; this module registers their fake
kernels and autograd formula, so the op works under ``torch.compile(fullgraph=True)`` and
``torch.export``.
"""

from __future__ import annotations

import operator

import torch
from torch import Tensor

from ._autograd import register_no_derivative
from ._selfcheck import register_self_check

__all__ = ["modulated_deform_conv2d"]

_NAME = "facedeblur_ext::modulated_deform_conv2d"
_BACKWARD_NAME = "facedeblur_ext::modulated_deform_conv2d_backward"

_CPU_DTYPES = (torch.float32, torch.float64)
_CUDA_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def int_pair(value, name: str) -> tuple[int, int]:
    """An (h, w) pair from an int or a pair of ints (also used by the ``nn`` layers).

    Raises:
        TypeError: a value that is not an integer (a float such as 1.5 is not truncated).
        ValueError: a sequence that is not a pair.
    """
    values = tuple(value) if isinstance(value, (tuple, list)) else (value, value)
    if len(values) != 2:
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    # an int or another integer with __index__ (numpy ints), but not a bool
    if any(isinstance(v, bool) or not hasattr(type(v), "__index__") for v in values):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    return operator.index(values[0]), operator.index(values[1])


def _prefers_channels_last(t: Tensor) -> bool:
    """The op's output layout rule (the same as the C++ kernels')."""
    return (t.dim() == 4 and not t.is_contiguous()
            and t.is_contiguous(memory_format=torch.channels_last))


def _output_size(size: int, kernel: int, stride: int, padding: int, dilation: int):
    return (size + 2 * padding - (dilation * (kernel - 1) + 1)) // stride + 1


def _check_args(input, offset, weight, bias, mask, stride, padding, dilation) -> None:
    """Raise a ValueError/TypeError naming the argument when the call cannot be valid."""
    op = "modulated_deform_conv2d"
    named = {"input": input, "offset": offset, "weight": weight, "bias": bias, "mask": mask}
    for name, t in named.items():
        if t is None and name in ("bias", "mask"):
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{op}: {name} must be a Tensor, got {type(t).__name__}")
    for name, dim in (("input", 4), ("offset", 4), ("weight", 4), ("mask", 4), ("bias", 1)):
        t = named[name]
        if t is not None and t.dim() != dim:
            raise ValueError(f"{op}: {name} must have {dim} dimensions, got shape "
                             f"{tuple(t.shape)}")
    for name, t in named.items():
        if t is not None and t.device != input.device:
            raise ValueError(f"{op}: {name} is on {t.device} but input is on {input.device}; "
                             "all tensors must be on the same device")
    allowed = _CUDA_DTYPES if input.device.type == "cuda" else _CPU_DTYPES
    autocast = torch.is_autocast_enabled(input.device.type)
    for name, t in named.items():
        if t is None:
            continue
        if not autocast and t.dtype not in allowed:
            raise TypeError(f"{op}: {name} has dtype {t.dtype}; supported on "
                            f"{input.device.type}: {', '.join(str(d) for d in allowed)}")
        if not autocast and t.dtype != input.dtype:
            raise TypeError(f"{op}: {name} has dtype {t.dtype} but input has {input.dtype}; "
                            "all tensors must share one dtype (or run under torch.autocast)")
    if min(stride) < 1 or min(dilation) < 1 or min(padding) < 0:
        raise ValueError(f"{op}: need stride >= 1, dilation >= 1 and padding >= 0, got "
                         f"stride={stride}, padding={padding}, dilation={dilation}")
    n, c_in, h, w = input.shape
    c_out, c_per_group, kh, kw = weight.shape
    if c_in < 1:
        raise ValueError(f"{op}: input must have at least one channel, got shape "
                         f"{tuple(input.shape)}")
    if c_out < 1:
        raise ValueError(f"{op}: weight must have at least one output channel (weight.shape[0]), "
                         f"got shape {tuple(weight.shape)}")
    if c_per_group < 1 or kh < 1 or kw < 1 or c_in % c_per_group != 0:
        raise ValueError(f"{op}: weight of shape {tuple(weight.shape)} does not fit an input "
                         f"with {c_in} channels (C_in must be a multiple of weight.shape[1])")
    groups = c_in // c_per_group
    if c_out % groups != 0:
        raise ValueError(f"{op}: {c_out} output channels are not divisible by "
                         f"groups={groups} (inferred as C_in / weight.shape[1])")
    taps = kh * kw
    if offset.shape[1] == 0 or offset.shape[1] % (2 * taps) != 0:
        raise ValueError(f"{op}: offset must have 2 * offset_groups * kh * kw channels "
                         f"(kh * kw = {taps}), got {offset.shape[1]}")
    offset_groups = offset.shape[1] // (2 * taps)
    if c_in % offset_groups != 0:
        raise ValueError(f"{op}: input channels {c_in} are not divisible by "
                         f"offset_groups={offset_groups}")
    h_out = _output_size(h, kh, stride[0], padding[0], dilation[0])
    w_out = _output_size(w, kw, stride[1], padding[1], dilation[1])
    if h_out <= 0 or w_out <= 0:
        raise ValueError(f"{op}: input of spatial size {h}x{w} is too small for a {kh}x{kw} "
                         f"kernel with padding={padding}, dilation={dilation}")
    if tuple(offset.shape) != (n, 2 * offset_groups * taps, h_out, w_out):
        raise ValueError(f"{op}: offset must have shape "
                         f"{(n, 2 * offset_groups * taps, h_out, w_out)}, got "
                         f"{tuple(offset.shape)}")
    if mask is not None and tuple(mask.shape) != (n, offset_groups * taps, h_out, w_out):
        raise ValueError(f"{op}: mask must have shape {(n, offset_groups * taps, h_out, w_out)} "
                         f"(offset_groups * kh * kw channels), got {tuple(mask.shape)}")
    if bias is not None and bias.shape[0] != c_out:
        raise ValueError(f"{op}: bias must have {c_out} entries, got {bias.shape[0]}")


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
    """Modulated deformable convolution (DCNv2; DCNv1 when ``mask`` is None).

    ``out[n, o, p] = bias[o] + sum_{c, k} weight[o, c, k] * mask[n, g(c), k, p] *
    bilinear(input[n, c], p * stride - padding + k * dilation + offset[n, g(c), k, p])``
    where ``g(c)`` is the offset group of input channel ``c``. Bilinear sampling treats the
    image as zero outside: a point with ``y <= -1``, ``y >= H``, ``x <= -1`` or ``x >= W`` gives
    0, and inside that range a neighbour outside the image counts as 0 (torchvision's rule).

    The argument order and layouts are those of ``torchvision.ops.deform_conv2d``: ``groups``
    is inferred from the weight, ``offset_groups`` from the offset.

    Known difference from torchvision (pytorch/vision#6885): at a sampling point exactly on
    ``y == -1`` or ``x == -1`` the value is 0 in both, but torchvision's offset gradient there
    is the one-sided derivative from inside the image (nonzero), while this op, like the
    original DCN code and the reference in ``facedeblur_ref``, treats the point as outside
    and gives a zero offset gradient (and zero mask and input gradients). Everywhere else the
    gradients agree.

    Supported dtypes: float32, float64 on CPU; float32, float16, bfloat16 (float32
    accumulation) and float64 on CUDA. Under ``torch.autocast("cuda")`` the op runs in the
    autocast dtype (torchvision's runs in float32); under CPU autocast it runs in float32.
    The backward pass is deterministic when ``torch.use_deterministic_algorithms(True)`` is
    set (on CUDA it then avoids floating-point atomics; the CPU kernels are always
    deterministic for a given number of threads). Double backward is not supported:
    differentiating the gradients (e.g. for a gradient penalty) raises a ``RuntimeError``.

    Memory: the sampled columns are built in tiles of output pixels and multiplied with the
    weight tile by tile, so no ``C_in * kh * kw * H_out * W_out`` im2col buffer is allocated
    (CPU: about 2**17 column elements per thread; CUDA: 2**23 elements per buffer). The
    environment variable ``FACEDEBLUR_DEFORM_TILE_ELEMENTS`` overrides the tile budget.

    Args:
        input: [N, C_in, H, W], contiguous, channels_last or any strides.
        offset: [N, 2 * G_off * kh * kw, H_out, W_out]; for offset group g and tap k
            (row-major over the kernel window), channel ``2 * (g * kh * kw + k)`` is dy and the
            next one dx, in pixels.
        weight: [C_out, C_in / groups, kh, kw].
        bias: [C_out] or None.
        stride, padding, dilation: int or (h, w) pair.
        mask: [N, G_off * kh * kw, H_out, W_out] modulation (the paper's m_k, usually a
            sigmoid), or None for DCNv1 (all ones).

    Returns:
        [N, C_out, H_out, W_out], channels_last when ``input`` is channels_last.
    """
    op = "modulated_deform_conv2d"
    stride, padding, dilation = (int_pair(stride, f"{op}: stride"),
                                 int_pair(padding, f"{op}: padding"),
                                 int_pair(dilation, f"{op}: dilation"))
    _check_args(input, offset, weight, bias, mask, stride, padding, dilation)
    return torch.ops.facedeblur_ext.modulated_deform_conv2d(
        input, offset, weight, bias, mask, stride, padding, dilation
    )


# ---------------------------------------------------------------------------------------------
# Fake kernels (shapes and strides only), for torch.compile / torch.export.
# ---------------------------------------------------------------------------------------------


@torch.library.register_fake(_NAME)
def _forward_fake(input, offset, weight, bias, mask, stride, padding, dilation):
    n, _, h, w = input.shape
    c_out, _, kh, kw = weight.shape
    h_out = _output_size(h, kh, stride[0], padding[0], dilation[0])
    w_out = _output_size(w, kw, stride[1], padding[1], dilation[1])
    torch._check(h_out > 0 and w_out > 0, lambda: "modulated_deform_conv2d: input too small")
    fmt = torch.channels_last if _prefers_channels_last(input) else torch.contiguous_format
    return torch.empty((n, c_out, h_out, w_out), dtype=input.dtype, device=input.device,
                       memory_format=fmt)


@torch.library.register_fake(_BACKWARD_NAME)
def _backward_fake(grad_output, input, offset, weight, mask, stride, padding, dilation,
                   output_mask, deterministic):
    fmt = torch.channels_last if _prefers_channels_last(input) else torch.contiguous_format
    grad_input = (torch.empty(input.shape, dtype=input.dtype, device=input.device,
                              memory_format=fmt) if output_mask[0] else input.new_empty(0))
    grad_offset = offset.new_empty(offset.shape) if output_mask[1] else input.new_empty(0)
    grad_mask = (mask.new_empty(mask.shape) if output_mask[2] and mask is not None
                 else input.new_empty(0))
    grad_weight = weight.new_empty(weight.shape) if output_mask[3] else input.new_empty(0)
    grad_bias = input.new_empty(weight.shape[0]) if output_mask[4] else input.new_empty(0)
    return grad_input, grad_offset, grad_mask, grad_weight, grad_bias


# ---------------------------------------------------------------------------------------------
# Autograd: the backward is its own op.
# ---------------------------------------------------------------------------------------------


def _setup_context(ctx, inputs, output):
    input, offset, weight, bias, mask, stride, padding, dilation = inputs
    ctx.save_for_backward(input, offset, weight, mask)
    ctx.conv_args = (stride, padding, dilation)


def _backward(ctx, grad_output):
    input, offset, weight, mask = ctx.saved_tensors
    need_input, need_offset, need_weight, need_bias, need_mask = ctx.needs_input_grad[:5]
    need_mask = need_mask and mask is not None
    output_mask = [need_input, need_offset, need_mask, need_weight, need_bias]
    if not any(output_mask):
        return None, None, None, None, None, None, None, None
    stride, padding, dilation = ctx.conv_args
    grads = torch.ops.facedeblur_ext.modulated_deform_conv2d_backward(
        grad_output, input, offset, weight, mask, stride, padding, dilation, output_mask,
        torch.are_deterministic_algorithms_enabled(),
    )
    grad_input, grad_offset, grad_mask, grad_weight, grad_bias = grads
    return (
        grad_input if need_input else None,
        grad_offset if need_offset else None,
        grad_weight if need_weight else None,
        grad_bias if need_bias else None,
        grad_mask if need_mask else None,
        None,
        None,
        None,
    )


torch.library.register_autograd(_NAME, _backward, setup_context=_setup_context)
register_no_derivative(_BACKWARD_NAME, "modulated_deform_conv2d: double backward is not supported")


@register_self_check("modulated_deform_conv2d")
def _self_check(device: torch.device) -> None:
    """Zero offsets and a unit mask must reproduce ``F.conv2d`` (forward and gradients)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 9, 8, generator=gen).to(device).requires_grad_()
    weight = torch.randn(4, 3, 3, 3, generator=gen).to(device).requires_grad_()
    bias = torch.randn(4, generator=gen).to(device)
    offset = torch.zeros(2, 2 * 9, 5, 4, device=device)
    mask = torch.ones(2, 9, 5, 4, device=device)
    ours = modulated_deform_conv2d(x, offset, weight, bias, stride=2, padding=1, mask=mask)
    expected = torch.nn.functional.conv2d(x, weight, bias, stride=2, padding=1, groups=2)
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)
    grad = torch.randn_like(ours)
    ours_grads = torch.autograd.grad(ours, (x, weight), grad)
    expected_grads = torch.autograd.grad(expected, (x, weight), grad)
    for a, b in zip(ours_grads, expected_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
