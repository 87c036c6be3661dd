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

import importlib
import math
import types

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "BackendRef",
    "ControlAdaptiveBlock",
    "ControlAdaptiveDeformConv2d",
    "resolve_backend",
    "set_backend",
]


class BackendRef:
    """Holds the object that provides the fused op functions (``None``: ``facedeblur_ext.ops``).

    Layers keep their backend behind this small holder so that ``copy.deepcopy`` (used for EMA
    copies of a model) shares it instead of trying to copy a Python module, and so that a
    pickled layer refers to a module backend by its import name.
    """

    __slots__ = ("target",)

    def __init__(self, target=None):
        self.target = target.target if isinstance(target, BackendRef) else target

    def get(self, op_name: str):
        """Return the function ``op_name`` of the backend, resolving ``None`` lazily."""
        target = self.target
        if target is None:
            from facedeblur_ext import ops as target
        fn = getattr(target, op_name, None)
        if fn is None:
            where = getattr(target, "__name__", type(target).__name__)
            raise RuntimeError(
                f"backend {where!r} provides no {op_name}(); the fused op is missing from this "
                "build of facedeblur_ext (rebuild the extension), or pass a backend object that "
                "has it (for example the reference package facedeblur_ref)."
            )
        return fn

    def __deepcopy__(self, memo):
        return self

    def __reduce__(self):
        if self.target is None or isinstance(self.target, types.ModuleType):
            name = None if self.target is None else self.target.__name__
            return (_backend_ref_from_name, (name,))
        return (BackendRef, (self.target,))

    def __repr__(self) -> str:
        if self.target is None:
            return "facedeblur_ext.ops"
        return getattr(self.target, "__name__", repr(self.target))


def _backend_ref_from_name(name: str | None) -> BackendRef:
    return BackendRef(None if name is None else importlib.import_module(name))


def resolve_backend(spec):
    """Turn a backend given by name or object into what layers accept.

    Args:
        spec: ``None``, ``"facedeblur_ext.ops"`` or ``"ext"`` (the fused ops), another import
            path (a module providing the same functions, e.g. a reference implementation), or
            an object with the op functions as attributes.

    Returns:
        ``None`` for the fused ops, else the backend object.
    """
    if spec is None or spec in ("ext", "facedeblur_ext.ops", "fused"):
        return None
    if isinstance(spec, str):
        return importlib.import_module(spec)
    return spec


def set_backend(module: nn.Module, backend) -> nn.Module:
    """Switch every layer under ``module`` that runs a fused op to ``backend`` (see above)."""
    backend = resolve_backend(backend)
    for sub in module.modules():
        if isinstance(getattr(sub, "_backend", None), BackendRef):
            sub._backend = BackendRef(backend)
    return module


class ControlAdaptiveDeformConv2d(nn.Module):
    """CADC: a modulated deformable convolution whose offsets and masks come from its input.

    Two separate convolutions predict the offsets (``2 K`` channels, torchvision's layout: dy
    then dx per tap) and the modulation masks (``K`` channels, sigmoid) from the input ``F_u``.
    Both start with zero weights and biases, so training starts from offsets 0 and masks 0.5
    [003 after Eq. 10, following DCNv2].

    Args:
        in_channels, out_channels: feature channels.
        kernel_size: deformable kernel size (``K = kernel_size**2`` taps), stride 1, "same"
            padding.
        predictor_kernel_size: kernel size of the offset and mask convolutions.
        backend: provider of ``modulated_deform_conv2d`` (``None``: ``facedeblur_ext.ops``).

    Shape:
        input [B, in_channels, H, W] -> [B, out_channels, H, W].
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3,
                 predictor_kernel_size: int = 3, backend=None):
        super().__init__()
        if kernel_size % 2 != 1 or predictor_kernel_size % 2 != 1:
            raise ValueError("kernel sizes must be odd (the block keeps the spatial size)")
        self.kernel_size = kernel_size
        taps = kernel_size * kernel_size
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.empty(out_channels))
        pad = predictor_kernel_size // 2
        self.offset_conv = nn.Conv2d(in_channels, 2 * taps, predictor_kernel_size, padding=pad)
        self.mask_conv = nn.Conv2d(in_channels, taps, predictor_kernel_size, padding=pad)
        self._backend = BackendRef(resolve_backend(backend))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # The deformable kernel starts like an ordinary conv; the predictors start at zero.
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        fan_in = self.weight[0].numel()
        nn.init.uniform_(self.bias, -1.0 / math.sqrt(fan_in), 1.0 / math.sqrt(fan_in))
        for conv in (self.offset_conv, self.mask_conv):
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)

    @property
    def backend(self):
        return self._backend.target

    def offsets_and_masks(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Offsets [B, 2K, H, W] and sigmoid masks [B, K, H, W] predicted from ``x``."""
        return self.offset_conv(x), torch.sigmoid(self.mask_conv(x))

    def forward(self, x: Tensor) -> Tensor:
        offset, mask = self.offsets_and_masks(x)
        # Under autocast the predictor convs and the parameters differ in dtype; the op takes
        # one dtype, that of the features it samples.
        dtype = x.dtype
        deform = self._backend.get("modulated_deform_conv2d")
        return deform(x, offset.to(dtype), self.weight.to(dtype), self.bias.to(dtype),
                      stride=1, padding=self.kernel_size // 2, dilation=1, mask=mask.to(dtype))

    def extra_repr(self) -> str:
        return (f"{self.weight.shape[1]}, {self.weight.shape[0]}, "
                f"kernel_size={self.kernel_size}, backend={self._backend!r}")


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
        self.deform = ControlAdaptiveDeformConv2d(channels, channels, kernel_size, backend=backend)
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
