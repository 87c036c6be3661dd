"""CFMD-GAN: continuous facial motion deblurring [paper 003, Sec. 4.2].

``CFMDGenerator`` maps a blurry face ``b`` and a moment control factor ``u`` in [0, 1] to the
sharp moment ``s(u)``: a mapping network turns ``u`` into a 64-channel feature control map
``u_f`` and a MIMO-UNet (Cho et al., ICCV 2021) whose residual blocks are ContAda blocks
restores the image at 1/4, 1/2 and full scale, each output a residual on the input at that
scale. ``UNetDiscriminator`` (Schonfeld et al., CVPR 2020) judges (blurry, sharp) pairs
globally and per pixel and carries the auxiliary regressor Q that predicts the ``u`` map.

Every deformable convolution runs through a ``backend`` (``None``: the fused
``facedeblur_ext.ops``); ``facedeblur_ext.nn.set_backend(model, other)`` switches a built model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrizations

from ..nn.backend import resolve_backend
from ..nn.control_adaptive import ControlAdaptiveBlock

__all__ = [
    "AsymmetricFeatureFusion",
    "CFMDGenerator",
    "DiscriminatorOutput",
    "FeatureAttention",
    "MappingNetwork",
    "ShallowConvModule",
    "UNetDiscriminator",
    "image_pyramid",
    "load_generator",
]


def image_pyramid(image: Tensor, levels: int = 3) -> list[Tensor]:
    """[1/2**(levels-1), ..., 1/2, 1] scale copies of ``image`` (2x2 area averaging).

    The generator's multi-scale inputs and the multi-scale loss targets both come from here.
    """
    out = [image]
    for _ in range(levels - 1):
        out.append(F.avg_pool2d(out[-1], 2))
    return out[::-1]


def _conv(in_ch: int, out_ch: int, kernel: int, stride: int = 1, relu: bool = True) -> nn.Module:
    conv = nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=kernel // 2)
    return nn.Sequential(conv, nn.ReLU(inplace=True)) if relu else conv


class MappingNetwork(nn.Module):
    """G_M: the control factor plane ``u_2D`` -> feature control factor ``u_f`` [003 Eq. 8].

    Eight layers, each a 1x1 convolution and a LeakyReLU (64 channels in the paper).

    Shape:
        [B, 1, h, w] -> [B, channels, h, w]. Every layer is pointwise, so a spatially constant
        ``u`` can be given as a 1 x 1 plane and broadcast later with the same result.
    """

    def __init__(self, channels: int = 64, num_layers: int = 8, negative_slope: float = 0.2):
        super().__init__()
        layers: list[nn.Module] = []
        in_ch = 1
        for _ in range(num_layers):
            layers += [nn.Conv2d(in_ch, channels, 1), nn.LeakyReLU(negative_slope)]
            in_ch = channels
        self.layers = nn.Sequential(*layers)
        self.channels = channels

    def forward(self, u_plane: Tensor) -> Tensor:
        return self.layers(u_plane)


class ShallowConvModule(nn.Module):
    """SCM of MIMO-UNet: features of the downsampled input image, concatenated with it."""

    def __init__(self, out_channels: int):
        super().__init__()
        if out_channels < 8:
            raise ValueError("SCM needs at least 8 output channels")
        quarter, half = out_channels // 4, out_channels // 2
        self.body = nn.Sequential(
            _conv(3, quarter, 3),
            _conv(quarter, half, 1),
            _conv(half, half, 3),
            _conv(half, out_channels - 3, 1, relu=False),
        )
        self.merge = _conv(out_channels, out_channels, 1, relu=False)

    def forward(self, image: Tensor) -> Tensor:
        return self.merge(torch.cat([image, self.body(image)], dim=1))


class FeatureAttention(nn.Module):
    """FAM of MIMO-UNet: ``x + conv(x * scm_features)``."""

    def __init__(self, channels: int):
        super().__init__()
        self.merge = _conv(channels, channels, 3, relu=False)

    def forward(self, x: Tensor, scm_features: Tensor) -> Tensor:
        return x + self.merge(x * scm_features)


class AsymmetricFeatureFusion(nn.Module):
    """AFF of MIMO-UNet: fuse the encoder outputs of all scales for one decoder scale."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.body = nn.Sequential(_conv(in_channels, out_channels, 1),
                                  _conv(out_channels, out_channels, 3, relu=False))

    def forward(self, *features: Tensor) -> Tensor:
        return self.body(torch.cat(features, dim=1))


class ContAdaStage(nn.Module):
    """An encoder or decoder block: ``num_blocks`` ContAda blocks sharing one control map."""

    def __init__(self, channels: int, num_blocks: int, **block_args):
        super().__init__()
        self.blocks = nn.ModuleList(ControlAdaptiveBlock(channels, **block_args)
                                    for _ in range(num_blocks))

    def forward(self, x: Tensor, control: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x, control)
        return x


def _resize_control(control: Tensor, size: tuple[int, int]) -> Tensor:
    if control.shape[-2:] == (1, 1) or control.shape[-2:] == size:
        return control
    return F.interpolate(control, size=size, mode="bilinear", align_corners=False)


class CFMDGenerator(nn.Module):
    """G = G_R(b, G_M(u)): MIMO-UNet with ContAda blocks, conditioned on ``u`` [003 Fig. 5].

    Args:
        widths: channels of EB1/DB3 (full scale), EB2/DB2 (1/2) and EB3/DB1 (1/4).
        blocks_per_stage: ContAda blocks in each of the six encoder/decoder blocks (8).
        control_channels: channels of ``u_f`` (64).
        mapping_layers: layers of the mapping network (8).
        kernel_size: kernel of the ContAda convs and of the deformable conv.
        attention_reduction: CACA channel reduction.
        negative_slope: LeakyReLU slope in the mapping network and the ContAda blocks.
        backend: provider of ``modulated_deform_conv2d`` (``None``: ``facedeblur_ext.ops``;
            a string is imported).

    Shape:
        blurry: [B, 3, H, W] in [0, 1] with H and W multiples of 4 (``restore`` pads other
        sizes). u: a float, [B], [B, 1] or a per-pixel map [B, 1, H, W].
        Returns [out_1/4, out_1/2, out_full], each [B, 3, H/s, W/s], not clamped.
    """

    def __init__(self, widths: Sequence[int] = (32, 64, 128), blocks_per_stage: int = 8,
                 control_channels: int = 64, mapping_layers: int = 8, kernel_size: int = 3,
                 attention_reduction: int = 16, negative_slope: float = 0.2, backend=None):
        super().__init__()
        w1, w2, w3 = (int(w) for w in widths)
        self.widths = (w1, w2, w3)
        self.mapping = MappingNetwork(control_channels, mapping_layers, negative_slope)
        block_args = dict(control_channels=control_channels, kernel_size=kernel_size,
                          attention_reduction=attention_reduction,
                          negative_slope=negative_slope, backend=resolve_backend(backend))
        self.encoders = nn.ModuleList([ContAdaStage(w, blocks_per_stage, **block_args)
                                       for w in (w1, w2, w3)])
        self.decoders = nn.ModuleList([ContAdaStage(w, blocks_per_stage, **block_args)
                                       for w in (w3, w2, w1)])
        self.head = _conv(3, w1, 3)
        self.down1 = _conv(w1, w2, 3, stride=2)
        self.down2 = _conv(w2, w3, 3, stride=2)
        self.up1 = nn.Sequential(nn.ConvTranspose2d(w3, w2, 4, stride=2, padding=1),
                                 nn.ReLU(inplace=True))
        self.up2 = nn.Sequential(nn.ConvTranspose2d(w2, w1, 4, stride=2, padding=1),
                                 nn.ReLU(inplace=True))
        self.scm_half = ShallowConvModule(w2)
        self.scm_quarter = ShallowConvModule(w3)
        self.fam_half = FeatureAttention(w2)
        self.fam_quarter = FeatureAttention(w3)
        self.aff_full = AsymmetricFeatureFusion(w1 + w2 + w3, w1)
        self.aff_half = AsymmetricFeatureFusion(w1 + w2 + w3, w2)
        self.squeeze_half = _conv(2 * w2, w2, 1)
        self.squeeze_full = _conv(2 * w1, w1, 1)
        self.out_quarter = _conv(w3, 3, 3, relu=False)
        self.out_half = _conv(w2, 3, 3, relu=False)
        self.out_full = _conv(w1, 3, 3, relu=False)

    @staticmethod
    def control_plane(u, blurry: Tensor) -> Tensor:
        """``u`` as a [B, 1, h, w] plane: 1 x 1 for a per-sample scalar, else the given map."""
        b = blurry.shape[0]
        u = torch.as_tensor(u, dtype=blurry.dtype, device=blurry.device)
        if u.dim() == 0:
            return u.expand(b).reshape(b, 1, 1, 1)
        if u.dim() <= 2:
            if u.numel() not in (1, b):
                raise ValueError(f"u has {u.numel()} values for a batch of {b}")
            return u.reshape(-1, 1, 1, 1).expand(b, 1, 1, 1)
        if u.dim() == 4 and u.shape[1] == 1:
            return u
        raise ValueError(f"u must be a float, [B], [B, 1] or [B, 1, H, W]; got {tuple(u.shape)}")

    def forward(self, blurry: Tensor, u) -> list[Tensor]:
        if blurry.dim() != 4 or blurry.shape[1] != 3:
            raise ValueError(f"blurry must be [B, 3, H, W]; got {tuple(blurry.shape)}")
        h, w = blurry.shape[-2:]
        if h % 4 or w % 4:
            raise ValueError(f"height and width must be multiples of 4, got {h}x{w} "
                             "(CFMDGenerator.restore pads other sizes)")
        quarter, half, full = image_pyramid(blurry, 3)
        control = self.mapping(self.control_plane(u, blurry))
        c_full = _resize_control(control, (h, w))
        c_half = _resize_control(control, half.shape[-2:])
        c_quarter = _resize_control(control, quarter.shape[-2:])

        enc_full = self.encoders[0](self.head(full), c_full)
        x = self.fam_half(self.down1(enc_full), self.scm_half(half))
        enc_half = self.encoders[1](x, c_half)
        x = self.fam_quarter(self.down2(enc_half), self.scm_quarter(quarter))
        x = self.encoders[2](x, c_quarter)

        # AFF: every decoder scale sees the encoder outputs of all three scales.
        up = lambda t, size: F.interpolate(t, size=size, mode="bilinear", align_corners=False)
        fused_half = self.aff_half(F.avg_pool2d(enc_full, 2), enc_half,
                                   up(x, half.shape[-2:]))
        fused_full = self.aff_full(enc_full, up(enc_half, (h, w)), up(x, (h, w)))

        x = self.decoders[0](x, c_quarter)
        out_quarter = self.out_quarter(x) + quarter
        x = self.squeeze_half(torch.cat([self.up1(x), fused_half], dim=1))
        x = self.decoders[1](x, c_half)
        out_half = self.out_half(x) + half
        x = self.squeeze_full(torch.cat([self.up2(x), fused_full], dim=1))
        x = self.decoders[2](x, c_full)
        out_full = self.out_full(x) + full
        return [out_quarter, out_half, out_full]

    @torch.no_grad()
    def restore(self, blurry: Tensor, u) -> Tensor:
        """The full-scale restoration for any image size, clamped to [0, 1].

        Pads H and W to multiples of 4 by edge replication and crops the result back.
        """
        h, w = blurry.shape[-2:]
        pad_h, pad_w = (-h) % 4, (-w) % 4
        x = F.pad(blurry, (0, pad_w, 0, pad_h), mode="replicate") if pad_h or pad_w else blurry
        u_plane = u
        if isinstance(u, Tensor) and u.dim() == 4 and (pad_h or pad_w):
            u_plane = F.pad(u, (0, pad_w, 0, pad_h), mode="replicate")
        return self(x, u_plane)[-1][..., :h, :w].clamp(0, 1)


# ----------------------------------------------------------------------------- discriminator


def _sn(module: nn.Module, enabled: bool) -> nn.Module:
    return parametrizations.spectral_norm(module) if enabled else module


class _DownBlock(nn.Module):
    """BigGAN-style residual block with 2x average-pool downsampling (encoder of D)."""

    def __init__(self, in_ch: int, out_ch: int, preactivation: bool, sn: bool):
        super().__init__()
        self.preactivation = preactivation
        self.conv1 = _sn(nn.Conv2d(in_ch, out_ch, 3, padding=1), sn)
        self.conv2 = _sn(nn.Conv2d(out_ch, out_ch, 3, padding=1), sn)
        self.shortcut = _sn(nn.Conv2d(in_ch, out_ch, 1), sn)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(x) if self.preactivation else x
        h = F.avg_pool2d(self.conv2(F.relu(self.conv1(h))), 2)
        # Pool before the 1x1 conv on the raw input (cheaper, same as conv-then-pool).
        skip = self.shortcut(F.avg_pool2d(x, 2))
        return h + skip


class _UpBlock(nn.Module):
    """Residual block with 2x nearest upsampling (decoder of D)."""

    def __init__(self, in_ch: int, out_ch: int, sn: bool):
        super().__init__()
        self.conv1 = _sn(nn.Conv2d(in_ch, out_ch, 3, padding=1), sn)
        self.conv2 = _sn(nn.Conv2d(out_ch, out_ch, 3, padding=1), sn)
        self.shortcut = _sn(nn.Conv2d(in_ch, out_ch, 1), sn)

    def forward(self, x: Tensor) -> Tensor:
        h = F.interpolate(F.relu(x), scale_factor=2, mode="nearest")
        h = self.conv2(F.relu(self.conv1(h)))
        return h + self.shortcut(F.interpolate(x, scale_factor=2, mode="nearest"))


class DiscriminatorOutput(NamedTuple):
    """Outputs of ``UNetDiscriminator``: logits (before the sigmoid) and the Q regression."""

    global_logits: Tensor  # [B]: D_enc, real vs fake for the whole pair
    pixel_logits: Tensor  # [B, 1, H, W]: D_dec, real vs fake per pixel
    control_map: Tensor  # [B, 1, H, W]: Q, the estimated u_2D, in [0, 1]


class UNetDiscriminator(nn.Module):
    """U-Net discriminator with an auxiliary control regressor [003 Sec. 4.2.3].

    Encoder: residual down blocks (widths ``base_channels * channel_multipliers``), then ReLU,
    global sum pooling and a linear layer: ``D_enc``. Decoder: residual up blocks, each fed the
    previous decoder output concatenated with the encoder features of the same scale, back to
    full resolution, then a 1x1 conv per pixel: ``D_dec``. Q shares the decoder and regresses
    the per-pixel control factor map with a small conv head and a sigmoid. Spectral norm on
    every layer, as in Schonfeld et al. The defaults follow their 256 x 256 configuration.

    Args:
        in_channels: channels of the (blurry, image) pair (6).
        base_channels: width unit (64).
        channel_multipliers: one per down block; H and W must be multiples of
            ``2 ** len(channel_multipliers)``.
        spectral_norm: wrap every conv and linear layer in spectral normalisation.

    Shape:
        blurry, image: [B, 3, H, W] in [0, 1] -> ``DiscriminatorOutput``.
    """

    def __init__(self, in_channels: int = 6, base_channels: int = 64,
                 channel_multipliers: Sequence[int] = (1, 2, 4, 8, 8, 16),
                 spectral_norm: bool = True):
        super().__init__()
        widths = [base_channels * m for m in channel_multipliers]
        self.num_levels = len(widths)
        self.down = nn.ModuleList()
        prev = in_channels
        for i, w in enumerate(widths):
            self.down.append(_DownBlock(prev, w, preactivation=i > 0, sn=spectral_norm))
            prev = w
        self.global_head = _sn(nn.Linear(widths[-1], 1), spectral_norm)
        # Decoder: level i output has the width of encoder level i-1 (base at full scale).
        self.up = nn.ModuleList()
        out_widths = [base_channels] + widths[:-1]
        for i in reversed(range(self.num_levels)):
            in_ch = widths[i] if i == self.num_levels - 1 else 2 * widths[i]
            self.up.append(_UpBlock(in_ch, out_widths[i], sn=spectral_norm))
        self.pixel_head = _sn(nn.Conv2d(base_channels, 1, 1), spectral_norm)
        self.control_head = nn.Sequential(
            _sn(nn.Conv2d(base_channels, base_channels, 3, padding=1), spectral_norm),
            nn.ReLU(inplace=True),
            _sn(nn.Conv2d(base_channels, 1, 1), spectral_norm),
        )

    def forward(self, blurry: Tensor, image: Tensor) -> DiscriminatorOutput:
        h, w = image.shape[-2:]
        step = 2 ** self.num_levels
        if h % step or w % step:
            raise ValueError(f"the discriminator needs H and W multiples of {step}; got {h}x{w}")
        x = torch.cat([blurry, image], dim=1) * 2 - 1
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
        global_logits = self.global_head(F.relu(x).sum(dim=(2, 3))).squeeze(1)
        for j, block in enumerate(self.up):
            level = self.num_levels - 1 - j
            if level != self.num_levels - 1:
                x = torch.cat([x, skips[level]], dim=1)
            x = block(x)
        x = F.relu(x)
        return DiscriminatorOutput(global_logits, self.pixel_head(x),
                                   torch.sigmoid(self.control_head(x)))


# ----------------------------------------------------------------------------- loading


def load_generator(checkpoint_path, device="cpu", backend=None, prefer_ema: bool = True
                   ) -> CFMDGenerator:
    """Build the generator stored in a training checkpoint, in eval mode on ``device``.

    Args:
        checkpoint_path: a checkpoint written by ``facedeblur train cfmd``.
        device: where to put the model.
        backend: deformable-conv backend (``None``: the fused op).
        prefer_ema: use the EMA weights when the checkpoint has them.
    """
    ckpt = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    if ckpt.get("task") != "cfmd":
        raise ValueError(f"{checkpoint_path} is not a CFMD-GAN checkpoint "
                         f"(task={ckpt.get('task')!r})")
    gen_args = dict(ckpt["config"]["model"]["generator"])
    model = CFMDGenerator(**gen_args, backend=backend)
    ema = ckpt.get("ema") or {}
    state = ema.get("generator") if prefer_ema and ema.get("generator") else None
    model.load_state_dict(state if state is not None else ckpt["models"]["generator"])
    return model.to(device).eval()
