"""The thesis baselines [paper 002, Sec. 4.4], small reference models for evaluation tables.

* :class:`SkipAutoencoder`: four stride-2 conv + ReLU encoder stages, a transposed-conv
  decoder that upsamples from the deepest features, two skip connections at intermediate
  scales (Sec. 4.4: "Two skip connections help the network retain detailed information").
  Trained with MSE (+ 0.001 VGG19 conv4_2 perceptual loss when VGG weights are available),
  Adam lr 1e-3, batch 16 (Table 4.1).
* :class:`ResnetDeblurGenerator`: conv stem, two stride-2 downsampling convs, 9 residual blocks,
  two transposed-conv upsampling layers, 7x7 conv and tanh (Sec. 4.4).
* :class:`BNDiscriminator`: stride-2 convs with LeakyReLU, batch norm after every conv but the
  first, one real/fake logit per image (BCE). GAN trained with
  ``BCE adversarial + 100 MSE + SSIM loss``, Adam 2e-4, betas (0.5, 0.999) (Table 4.2).
* :class:`VGG19Perceptual`: VGG19 features up to conv4_2 for the perceptual term, built from a
  local weights file only (nothing is downloaded).

All models take and return images in [0, 1]; the tanh generator maps [0, 1] to [-1, 1] on the
way in and back on the way out. The restoring models have ``restore(blurry)`` for any image size
and :func:`load_baseline` rebuilds one from a checkpoint of ``facedeblur train baseline_ae`` or
``baseline_gan``.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .face_parsing import check_spatial_multiple


def _restore_padded(model: nn.Module, blurry: Tensor, multiple: int) -> Tensor:
    """``model(blurry)`` for any H and W: edge-replicated up to multiples of ``multiple``,
    cropped back and clamped to [0, 1]."""
    h, w = blurry.shape[-2:]
    pad_h, pad_w = (-h) % multiple, (-w) % multiple
    x = F.pad(blurry, (0, pad_w, 0, pad_h), mode="replicate") if pad_h or pad_w else blurry
    return model(x)[..., :h, :w].clamp(0.0, 1.0)


class SkipAutoencoder(nn.Module):
    """Autoencoder with skip connections (thesis Sec. 4.4, Table 4.1).

    Args:
        widths: channels of the four encoder stages (each halves the resolution).
        in_channels: image channels.

    Input [N, C, H, W] in [0, 1], H and W multiples of 16; output the same shape in [0, 1]
    (sigmoid). Skips add encoder features at 1/8 and 1/4 resolution to the decoder's.
    """

    def __init__(self, widths: tuple[int, int, int, int] = (64, 128, 256, 512),
                 in_channels: int = 3):
        super().__init__()
        if len(widths) != 4:
            raise ValueError("SkipAutoencoder needs four encoder widths")
        w1, w2, w3, w4 = widths
        self.enc1 = nn.Conv2d(in_channels, w1, 4, 2, 1)
        self.enc2 = nn.Conv2d(w1, w2, 4, 2, 1)
        self.enc3 = nn.Conv2d(w2, w3, 4, 2, 1)
        self.enc4 = nn.Conv2d(w3, w4, 4, 2, 1)
        self.dec4 = nn.ConvTranspose2d(w4, w3, 4, 2, 1)
        self.dec3 = nn.ConvTranspose2d(w3, w2, 4, 2, 1)
        self.dec2 = nn.ConvTranspose2d(w2, w1, 4, 2, 1)
        self.dec1 = nn.ConvTranspose2d(w1, in_channels, 4, 2, 1)

    def forward(self, x: Tensor) -> Tensor:
        check_spatial_multiple(x, 16, "SkipAutoencoder")
        e1 = F.relu(self.enc1(x))
        e2 = F.relu(self.enc2(e1))
        e3 = F.relu(self.enc3(e2))
        e4 = F.relu(self.enc4(e3))
        d3 = F.relu(self.dec4(e4)) + e3
        d2 = F.relu(self.dec3(d3)) + e2
        d1 = F.relu(self.dec2(d2))
        return torch.sigmoid(self.dec1(d1))

    @torch.no_grad()
    def restore(self, blurry: Tensor) -> Tensor:
        """The output for any image size (padded to multiples of 16 and cropped back)."""
        return _restore_padded(self, blurry, 16)


class _ResnetBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, 3, bias=False),
            nn.BatchNorm2d(channels), nn.ReLU(inplace=True),
            nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, 3, bias=False),
            nn.BatchNorm2d(channels),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class ResnetDeblurGenerator(nn.Module):
    """GAN generator of the thesis: 9 residual blocks, transposed-conv upsampling, tanh.

    Args:
        width: channels of the stem (the residual blocks have 4x as many).
        num_blocks: residual blocks (9).
        in_channels: image channels.

    Input [N, C, H, W] in [0, 1], H and W multiples of 4; output in [0, 1].
    """

    def __init__(self, width: int = 64, num_blocks: int = 9, in_channels: int = 3):
        super().__init__()
        layers: list[nn.Module] = [
            nn.ReflectionPad2d(3), nn.Conv2d(in_channels, width, 7, bias=False),
            nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.Conv2d(width, 2 * width, 3, 2, 1, bias=False), nn.BatchNorm2d(2 * width),
            nn.ReLU(inplace=True),
            nn.Conv2d(2 * width, 4 * width, 3, 2, 1, bias=False), nn.BatchNorm2d(4 * width),
            nn.ReLU(inplace=True),
        ]
        layers += [_ResnetBlock(4 * width) for _ in range(num_blocks)]
        layers += [
            nn.ConvTranspose2d(4 * width, 2 * width, 3, 2, 1, output_padding=1, bias=False),
            nn.BatchNorm2d(2 * width), nn.ReLU(inplace=True),
            nn.ConvTranspose2d(2 * width, width, 3, 2, 1, output_padding=1, bias=False),
            nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.ReflectionPad2d(3), nn.Conv2d(width, in_channels, 7), nn.Tanh(),
        ]
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        check_spatial_multiple(x, 4, "ResnetDeblurGenerator")
        return (self.net(x * 2.0 - 1.0) + 1.0) * 0.5

    @torch.no_grad()
    def restore(self, blurry: Tensor) -> Tensor:
        """The output for any image size (padded to multiples of 4 and cropped back)."""
        return _restore_padded(self, blurry, 4)


class BNDiscriminator(nn.Module):
    """GAN discriminator of the thesis: stride-2 convs, LeakyReLU(0.2), batch norm after every
    conv but the first; the final map is averaged into one logit per image (for BCE).

    Args:
        width: channels of the first conv; each next one doubles them.
        num_layers: stride-2 conv layers.
        in_channels: image channels.

    Input [N, C, H, W] in [0, 1] (any size >= 2 ** num_layers); output [N] logits.
    """

    def __init__(self, width: int = 64, num_layers: int = 4, in_channels: int = 3):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, width, 4, 2, 1),
                                   nn.LeakyReLU(0.2, inplace=True)]
        c = width
        for _ in range(num_layers - 1):
            layers += [nn.Conv2d(c, 2 * c, 4, 2, 1, bias=False), nn.BatchNorm2d(2 * c),
                       nn.LeakyReLU(0.2, inplace=True)]
            c *= 2
        layers.append(nn.Conv2d(c, 1, 3, 1, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x * 2.0 - 1.0).mean(dim=(1, 2, 3))


# torchvision's vgg19 "features" layout; the index of each layer matches its state-dict keys.
_VGG19_CONV_UP_TO_CONV4_2 = [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512]


class VGG19Perceptual(nn.Module):
    """MSE between VGG19 conv4_2 features (torchvision ``features[:22]``) of two images.

    Args:
        weights: path to a VGG19 state dict with torchvision's key names (``features.N.weight``
            / ``features.N.bias``, or the same without the ``features.`` prefix). Nothing is
            downloaded: the perceptual term of the thesis autoencoder is only available when
            such a file exists locally.

    Inputs are [N, 3, H, W] images in [0, 1], normalized with the ImageNet statistics inside.
    The weights are frozen.
    """

    def __init__(self, weights: str | Path):
        super().__init__()
        layers: list[nn.Module] = []
        c = 3
        for item in _VGG19_CONV_UP_TO_CONV4_2:
            if item == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c, item, 3, 1, 1), nn.ReLU(inplace=True)]
                c = item
        layers = layers[:-1]  # conv4_2 itself, before its ReLU (index 21)
        self.features = nn.Sequential(*layers)
        state = torch.load(Path(weights), map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        own = {}
        for key, value in state.items():
            key = key[len("features."):] if key.startswith("features.") else key
            index = key.split(".", 1)[0]
            if index.isdigit() and int(index) < len(self.features):
                own[key] = value
        self.features.load_state_dict(own, strict=True)
        self.requires_grad_(False)
        self.eval()
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))

    def train(self, mode: bool = True):
        return super().train(False)  # frozen feature extractor

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:
        fp = self.features((pred - self.mean) / self.std)
        ft = self.features((target - self.mean) / self.std)
        return F.mse_loss(fp, ft)


#: task name -> restoring model class (the ``generator`` of the task's checkpoints)
BASELINE_MODELS = {"baseline_ae": SkipAutoencoder, "baseline_gan": ResnetDeblurGenerator}


def build_baseline(task: str, generator_config: dict | None = None) -> nn.Module:
    """The restoring model of baseline ``task`` from its ``model.generator`` table."""
    if task not in BASELINE_MODELS:
        raise ValueError(f"unknown baseline {task!r}; known: {sorted(BASELINE_MODELS)}")
    args = dict(generator_config or {})
    if "widths" in args:
        args["widths"] = tuple(args["widths"])
    return BASELINE_MODELS[task](**args)


def load_baseline(checkpoint_path, device="cpu", prefer_ema: bool = True,
                  task: str | None = None) -> nn.Module:
    """The restoring model of a baseline training checkpoint, in eval mode on ``device``.

    Args:
        checkpoint_path: written by ``facedeblur train baseline_ae`` or ``baseline_gan``.
        device: where to put the model.
        prefer_ema: use the EMA weights when the checkpoint has them.
        task: the baseline expected (None: either).
    """
    ckpt = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    found = ckpt.get("task")
    if found not in BASELINE_MODELS or (task is not None and found != task):
        raise ValueError(f"{checkpoint_path} is not a {task or 'baseline'} checkpoint "
                         f"(task={found!r})")
    task = found
    model = build_baseline(task, ckpt["config"]["model"].get("generator"))
    ema = ckpt.get("ema") or {}
    state = ema.get("generator") if prefer_ema and ema.get("generator") else None
    model.load_state_dict(state if state is not None else ckpt["models"]["generator"])
    return model.to(device).eval()
