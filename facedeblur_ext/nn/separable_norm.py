"""SNADNet's separable normalization (SN) and SN + adaptive denormalization (SNAD) layers.

Paper 004 Sec. II-C, Eq. 3-9; SPEC.md 4.2. Both layers run on the fused op
``separable_norm`` of ``backend`` (default ``facedeblur_ext.ops``; pass ``facedeblur_ref`` for
the pure-PyTorch composition).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .backend import BackendRef, resolve_backend

__all__ = ["SeparableNorm2d", "SNADLayer"]

_RESIZE_MODES = ("nearest", "bilinear", "area")


def _resize(t: Tensor, size: Sequence[int], mode: str) -> Tensor:
    if tuple(t.shape[-2:]) == tuple(size):
        return t
    if mode == "bilinear":
        return F.interpolate(t, size=tuple(size), mode="bilinear", align_corners=False)
    return F.interpolate(t, size=tuple(size), mode=mode)


def _check_resize_mode(mode: str) -> str:
    if mode not in _RESIZE_MODES:
        raise ValueError(f"resize_mode must be one of {_RESIZE_MODES}, got {mode!r}")
    return mode


class SeparableNorm2d(nn.Module):
    """Separable normalization (SNADNet Eq. 3-7): every region of every channel is normalized
    to zero mean and unit variance on its own; no affine parameters, as in the paper.

    Args:
        eps: added to each region's variance.
        resize_mode: how masks of another resolution are brought to the feature size:
            ``"nearest"`` (default; keeps binary masks binary), ``"bilinear"`` or ``"area"``
            (soft masks weighting boundary pixels by coverage).
        backend: object providing ``separable_norm`` (default ``facedeblur_ext.ops``).

    Shape:
        x: [N, C, H, W]; masks: [N, R, H', W'] non-negative, binary or soft; output like x.
    """

    def __init__(self, eps: float = 1e-5, resize_mode: str = "nearest", backend=None):
        super().__init__()
        if not eps >= 0.0:
            raise ValueError(f"SeparableNorm2d: eps must be >= 0, got {eps}")
        self.eps = float(eps)
        self.resize_mode = _check_resize_mode(resize_mode)
        self._backend = BackendRef(resolve_backend(backend))

    def forward(self, x: Tensor, masks: Tensor) -> Tensor:
        if masks.dim() != 4:
            raise ValueError(f"SeparableNorm2d: expected masks [N, R, H, W], got "
                             f"{tuple(masks.shape)}")
        masks = _resize(masks, x.shape[-2:], self.resize_mode)
        return self._backend.get("separable_norm")(x, masks, None, None, self.eps)

    @property
    def backend(self):
        """The backend object (None: ``facedeblur_ext.ops``); see ``nn.set_backend``."""
        return self._backend.target

    def extra_repr(self) -> str:
        return f"eps={self.eps}, resize_mode={self.resize_mode!r}, backend={self._backend!r}"


class SNADLayer(nn.Module):
    """SN followed by adaptive denormalization (SNADNet Eq. 3-9).

    From the parsing map ``P`` (resized to the feature size) the layer predicts per-pixel maps
    ``gamma = conv2(conv1(P))`` and ``beta = conv3(conv1(P))`` (Eq. 8; ``conv1`` is followed by a
    ReLU, as in SPADE from which the design comes) and returns ``SN(x) * gamma + beta`` (Eq. 9).
    The SN regions are derived from ``P`` as the paper does (Fig. 3b: foreground ``M_f`` and
    background ``M_b``) unless masks are passed explicitly.

    Args:
        num_features: C, channels of the normalized features.
        parsing_channels: K, channels of the parsing map (class probabilities or one-hot
            labels; integer label maps are one-hot encoded with K classes).
        hidden_channels: width of ``conv1`` (128 as in SPADE).
        kernel_size: of the three convolutions (odd).
        regions: which parsing channels make each SN region, e.g. ``[[1, 2, 3], [0]]``; a
            region's mask is the sum of its channels. Default: foreground = every channel but
            0, background = channel 0; for K = 1 the channel is the foreground probability and
            the background is its complement.
        resize_mode: how ``P`` (and explicit masks) reach the feature size: ``"nearest"``
            (default, as SPADE; one-hot maps stay one-hot so the SN regions are hard),
            ``"bilinear"`` (smooth soft maps) or ``"area"`` (soft masks by coverage).
        eps: added to each region's variance.
        backend: object providing ``separable_norm`` (default ``facedeblur_ext.ops``).

    Shape:
        x: [N, C, H, W]; parsing: [N, K, H', W'] float, or [N, H', W'] / [N, 1, H', W']
        integer labels; masks (optional): [N, R, H', W']; output: [N, C, H, W].
    """

    def __init__(self, num_features: int, parsing_channels: int, hidden_channels: int = 128,
                 kernel_size: int = 3, regions: Sequence[Sequence[int]] | None = None,
                 resize_mode: str = "nearest", eps: float = 1e-5, backend=None):
        super().__init__()
        if num_features < 1 or parsing_channels < 1 or hidden_channels < 1:
            raise ValueError("SNADLayer: num_features, parsing_channels and hidden_channels "
                             "must be positive")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"SNADLayer: kernel_size must be odd, got {kernel_size}")
        if not eps >= 0.0:
            raise ValueError(f"SNADLayer: eps must be >= 0, got {eps}")
        self.num_features = num_features
        self.parsing_channels = parsing_channels
        self.eps = float(eps)
        self.resize_mode = _check_resize_mode(resize_mode)
        self._backend = BackendRef(resolve_backend(backend))
        pad = kernel_size // 2
        self.conv1 = nn.Sequential(
            nn.Conv2d(parsing_channels, hidden_channels, kernel_size, padding=pad),
            nn.ReLU(inplace=True))
        self.conv2 = nn.Conv2d(hidden_channels, num_features, kernel_size, padding=pad)
        self.conv3 = nn.Conv2d(hidden_channels, num_features, kernel_size, padding=pad)

        # masks = region_weight @ P + region_bias, per pixel.
        k = parsing_channels
        if regions is None:
            if k == 1:
                weight, bias = [[1.0], [-1.0]], [0.0, 1.0]
            else:
                weight = [[0.0] + [1.0] * (k - 1), [1.0] + [0.0] * (k - 1)]
                bias = [0.0, 0.0]
        else:
            weight, bias = [], []
            for idx in regions:
                row = [0.0] * k
                for ch in idx:
                    if not 0 <= int(ch) < k:
                        raise ValueError(f"SNADLayer: region channel {ch} outside [0, {k})")
                    row[int(ch)] = 1.0
                weight.append(row)
                bias.append(0.0)
            if not weight:
                raise ValueError("SNADLayer: regions must name at least one region")
        self.register_buffer("region_weight", torch.tensor(weight), persistent=False)
        self.register_buffer("region_bias", torch.tensor(bias), persistent=False)

    @property
    def num_regions(self) -> int:
        return self.region_weight.shape[0]

    def parsing_to_masks(self, parsing: Tensor) -> Tensor:
        """SN region masks [N, R, H, W] from a (resized) parsing map [N, K, H, W]."""
        weight = self.region_weight.to(parsing.dtype)
        bias = self.region_bias.to(parsing.dtype)
        masks = torch.einsum("rk,nkhw->nrhw", weight, parsing) + bias.view(1, -1, 1, 1)
        return masks.clamp_min(0)

    def forward(self, x: Tensor, parsing: Tensor, masks: Tensor | None = None) -> Tensor:
        if not parsing.is_floating_point():
            from ..ops.separable_norm import labels_to_masks

            # one-hot in the dtype of the convolutions that read it (float64 after .double())
            parsing = labels_to_masks(parsing, self.parsing_channels,
                                      dtype=self.conv2.weight.dtype)
        if parsing.dim() != 4 or parsing.shape[1] != self.parsing_channels:
            raise ValueError(f"SNADLayer: expected a parsing map [N, {self.parsing_channels}, H, "
                             f"W], got {tuple(parsing.shape)}")
        if parsing.shape[0] != x.shape[0]:
            raise ValueError(f"SNADLayer: parsing batch {parsing.shape[0]} != x batch "
                             f"{x.shape[0]}")
        parsing = _resize(parsing, x.shape[-2:], self.resize_mode)
        if masks is None:
            masks = self.parsing_to_masks(parsing)
        else:
            masks = _resize(masks, x.shape[-2:], self.resize_mode)
        hidden = self.conv1(parsing)
        gamma = self.conv2(hidden)
        beta = self.conv3(hidden)
        return self._backend.get("separable_norm")(x, masks, gamma, beta, self.eps)

    @property
    def backend(self):
        """The backend object (None: ``facedeblur_ext.ops``); see ``nn.set_backend``."""
        return self._backend.target

    def extra_repr(self) -> str:
        return (f"num_features={self.num_features}, parsing_channels={self.parsing_channels}, "
                f"regions={self.num_regions}, resize_mode={self.resize_mode!r}, eps={self.eps}, "
                f"backend={self._backend!r}")
