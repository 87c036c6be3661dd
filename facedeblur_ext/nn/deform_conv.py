"""Deformable convolution layers: DCNv2 and CFMD-GAN's control-adaptive variant (CADC)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..ops.modulated_deform_conv import int_pair
from .backend import BackendRef, resolve_backend

__all__ = ["ModulatedDeformConv2d", "ConditionedDeformConv2d"]


class ModulatedDeformConv2d(nn.Module):
    """Modulated deformable convolution (DCNv2) with its own weight and bias.

    Offsets and masks are inputs of ``forward`` (see ``ConditionedDeformConv2d`` for a layer
    that predicts them). Layouts follow ``torchvision.ops.deform_conv2d``.

    Args:
        in_channels, out_channels: channel counts.
        kernel_size, stride, padding, dilation: int or (h, w) pair.
        groups: convolution groups (``in_channels`` and ``out_channels`` divisible by it).
        bias: learn an additive bias.
        backend: object providing ``modulated_deform_conv2d`` (a module or namespace), e.g. the
            reference package ``facedeblur_ref``; None means ``facedeblur_ext.ops``.

    Shapes:
        input [N, in_channels, H, W]; offset [N, 2 * G_off * kh * kw, H_out, W_out];
        mask [N, G_off * kh * kw, H_out, W_out] or None; output [N, out_channels, H_out, W_out].
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size=3, stride=1, padding=0,
                 dilation=1, groups: int = 1, bias: bool = True, backend=None,
                 device=None, dtype=None):
        super().__init__()
        if in_channels % groups != 0 or out_channels % groups != 0:
            raise ValueError(f"in_channels ({in_channels}) and out_channels ({out_channels}) "
                             f"must be divisible by groups ({groups})")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = int_pair(kernel_size, "kernel_size")
        self.stride = int_pair(stride, "stride")
        self.padding = int_pair(padding, "padding")
        self.dilation = int_pair(dilation, "dilation")
        self.groups = groups
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(
            torch.empty(out_channels, in_channels // groups, *self.kernel_size, **factory))
        self.bias = nn.Parameter(torch.empty(out_channels, **factory)) if bias else None
        self._backend = BackendRef(resolve_backend(backend))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Conv2d's initialization (Kaiming uniform with a = sqrt(5))."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.weight.shape[1] * self.weight.shape[2] * self.weight.shape[3]
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, input: Tensor, offset: Tensor, mask: Tensor | None = None) -> Tensor:
        deform_conv = self._backend.get("modulated_deform_conv2d")
        return deform_conv(input, offset, self.weight, self.bias, self.stride, self.padding,
                           self.dilation, mask)

    @property
    def backend(self):
        """The backend object (None: ``facedeblur_ext.ops``); see ``nn.set_backend``."""
        return self._backend.target

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
                f"groups={self.groups}, bias={self.bias is not None}, backend={self._backend!r}")


class ConditionedDeformConv2d(nn.Module):
    """Deformable convolution whose offsets and masks are predicted from a condition map.

    CFMD-GAN's control-adaptive deformable convolution (CADC, paper 003 Eq. 10):
    ``F_dc(p) = sum_k w_k * F_u(p + p_k + dp_k) * m_k`` where the offsets ``dp`` (2K channels
    per offset group) and the masks ``m`` (K channels per offset group, through a sigmoid)
    come from two separate convolutions of the conditioning features (``F_u``, the fusion of
    image features and the control factor). Both predictors start at zero weights and bias,
    so that initially ``dp = 0`` and ``m = sigmoid(0) = 0.5``, the paper's (and DCNv2's)
    initialization.

    Args:
        in_channels, out_channels: channel counts of the deformable convolution.
        kernel_size, stride, dilation: int or (h, w) pair, shared by the deformable
            convolution and its offset and mask predictors (so their outputs match in size).
        padding: int or pair; None gives ``dilation * (kernel - 1) // 2`` ("same" at stride 1).
        groups: groups of the deformable convolution.
        offset_groups: channel groups with their own offsets and masks.
        bias: bias of the deformable convolution.
        condition_channels: channels of the condition map; None means ``in_channels``.
        modulated: predict masks (DCNv2); False gives DCNv1 (no mask).
        backend: object providing ``modulated_deform_conv2d``; None means facedeblur_ext.ops.

    Shapes:
        input [N, in_channels, H, W]; condition [N, condition_channels, H, W] (default: the
        input itself, as in CADC); output [N, out_channels, H_out, W_out].
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size=3, stride=1,
                 padding=None, dilation=1, groups: int = 1, offset_groups: int = 1,
                 bias: bool = True, condition_channels: int | None = None,
                 modulated: bool = True, backend=None, device=None, dtype=None):
        super().__init__()
        kernel = int_pair(kernel_size, "kernel_size")
        dil = int_pair(dilation, "dilation")
        if padding is None:
            padding = (dil[0] * (kernel[0] - 1) // 2, dil[1] * (kernel[1] - 1) // 2)
        if offset_groups < 1 or in_channels % offset_groups != 0:
            raise ValueError(f"in_channels ({in_channels}) must be divisible by offset_groups "
                             f"({offset_groups})")
        self.offset_groups = offset_groups
        self.modulated = modulated
        taps = kernel[0] * kernel[1]
        condition_channels = in_channels if condition_channels is None else condition_channels
        factory = {"device": device, "dtype": dtype}
        self.deform = ModulatedDeformConv2d(in_channels, out_channels, kernel, stride, padding,
                                            dil, groups, bias, backend, **factory)
        self.offset_conv = nn.Conv2d(condition_channels, 2 * offset_groups * taps, kernel,
                                     stride, padding, dil, **factory)
        self.mask_conv = (nn.Conv2d(condition_channels, offset_groups * taps, kernel, stride,
                                    padding, dil, **factory) if modulated else None)
        self.reset_predictors()

    def reset_predictors(self) -> None:
        """Zero the offset and mask predictors: offsets 0 and masks 0.5 (paper Sec. 4.2)."""
        for conv in (self.offset_conv, self.mask_conv):
            if conv is not None:
                nn.init.zeros_(conv.weight)
                nn.init.zeros_(conv.bias)

    def offsets_and_mask(self, condition: Tensor) -> tuple[Tensor, Tensor | None]:
        """The predicted offsets [N, 2*G*K, H_out, W_out] and masks [N, G*K, H_out, W_out]."""
        offset = self.offset_conv(condition)
        mask = torch.sigmoid(self.mask_conv(condition)) if self.mask_conv is not None else None
        return offset, mask

    @property
    def backend(self):
        return self.deform.backend

    def forward(self, input: Tensor, condition: Tensor | None = None) -> Tensor:
        offset, mask = self.offsets_and_mask(input if condition is None else condition)
        return self.deform(input, offset, mask)
