"""Control-adaptive (ContAda) block of CFMD-GAN [paper 003, Sec. 4.2.2, Fig. 6, Eq. 10].

The block mixes image features with a feature map of the moment control factor ``u`` and lets
that mixture steer both *where* a deformable convolution samples (CADC) and *which channels*
pass (CACA)::

    F_o   = LeakyReLU(conv3x3(F_Im))
    u_n   = conv1x1(resize_bilinear(u_f, H_n x W_n))
    F_u   = conv1x1(concat(F_o, u_n))
    F_dc  = CADC(F_u)       offsets (2K channels) and masks (K channels, sigmoid) predicted
                            from F_u by separate convs; initialised to offsets 0, masks 0.5
    out   = F_Im + F_dc * sigmoid(conv1x1(relu(conv1x1(GAP(F_u)))))      (CACA)

The identity skip is that of the residual block (MIMO-UNet's) that the ContAda block replaces.

The deformable convolution runs through ``backend.modulated_deform_conv2d`` (torchvision's
argument layout). ``backend=None`` means ``facedeblur_ext.ops``, looked up at forward time, so
that a model can be built before the fused op is loaded; tests and benchmarks pass the
reference package instead to compare the two in one run.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .deform_conv import ConditionedDeformConv2d

__all__ = ["ControlAdaptiveBlock"]


class ControlAdaptiveBlock(nn.Module):
    """ContAda block: conv + control fusion + CADC + CACA, with an identity skip.

    Args:
        channels: feature channels ``C_n`` of the stage.
        control_channels: channels of the feature control factor ``u_f`` (64 in the paper).
        kernel_size: kernel of the first conv and of the deformable conv (3).
        attention_reduction: channel reduction inside CACA (squeeze-excitation style, as in
            the RCAN attention the paper follows); the hidden width is at least 4.
        negative_slope: slope of the LeakyReLU after the first conv.
        backend: provider of ``modulated_deform_conv2d`` (``None``: ``facedeblur_ext.ops``).

    Shape:
        x: [B, C_n, H_n, W_n]; control: [B, control_channels, h, w], resized (bilinear) to
        H_n x W_n when its size differs. A 1 x 1 control map (a spatially constant ``u``) is
        broadcast without being expanded in memory: every layer it passes is pointwise, so the
        result equals that of the expanded map. Output: like ``x``.
    """

    def __init__(self, channels: int, control_channels: int = 64, kernel_size: int = 3,
                 attention_reduction: int = 16, negative_slope: float = 0.2, backend=None):
        super().__init__()
        self.channels = channels
        self.feature_conv = nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2)
        self.activation = nn.LeakyReLU(negative_slope)
        self.control_proj = nn.Conv2d(control_channels, channels, 1)
        # Input channel order [F_o, u_n]: the 1x1 conv on their concatenation.
        self.fuse = nn.Conv2d(2 * channels, channels, 1)
        # CADC: offsets and masks predicted from F_u itself, starting at 0 and 0.5.
        self.deform = ConditionedDeformConv2d(channels, channels, kernel_size, backend=backend)
        hidden = max(channels // attention_reduction, 4)
        self.attention = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(channels, hidden, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, 1),
            nn.Sigmoid(),
        )

    @property
    def backend(self):
        return self.deform.backend

    def fused_features(self, x: Tensor, control: Tensor) -> Tensor:
        """``F_u``: image features fused with the control features, [B, C_n, H_n, W_n]."""
        feat = self.activation(self.feature_conv(x))
        if control.shape[-2:] != (1, 1) and control.shape[-2:] != x.shape[-2:]:
            control = F.interpolate(control, size=x.shape[-2:], mode="bilinear",
                                    align_corners=False)
        control = self.control_proj(control)
        # conv1x1(concat(a, b)) == conv1x1_a(a) + conv1x1_b(b); written this way so a constant
        # control map broadcasts instead of being materialised at full size.
        c = self.channels
        w = self.fuse.weight
        return (F.conv2d(feat, w[:, :c], self.fuse.bias)
                + F.conv2d(control.to(feat.dtype), w[:, c:].to(feat.dtype)))

    def forward(self, x: Tensor, control: Tensor) -> Tensor:
        fused = self.fused_features(x, control)
        return x + self.deform(fused) * self.attention(fused)
