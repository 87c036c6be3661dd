"""A degradation mix for training that generalizes past one blur protocol (issue 16).

:func:`sample_kernel` draws one blur kernel of a random family (camera-shake trajectory, linear
motion, Gaussian, defocus) with its size relative to the face; :func:`degrade` adds what a
camera and a web pipeline add after the blur: Gaussian or Poisson-Gaussian noise, 8-bit
quantization and JPEG, and optionally a second round of blur, resize, noise and JPEG (the
second-order degradation of BSRGAN / Real-ESRGAN). All draws come from a NumPy generator, so a
sample is reproducible from its seed. JPEG runs with OpenCV (the data workers' library).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .settings import settings_from_mapping

__all__ = ["DegradationConfig", "KERNEL_FAMILIES", "degrade", "jpeg", "sample_kernel"]

KERNEL_FAMILIES = ("trajectory", "motion", "gaussian", "defocus")

Range = tuple[float, float]


@dataclass
class DegradationConfig:
    """What :func:`sample_kernel` and :func:`degrade` draw (ranges uniform per sample).

    Attributes:
        family_probs: relative frequencies of :data:`KERNEL_FAMILIES`, in that order.
        kernel_size: kernel size as a fraction of the face size (made odd, at least 3).
        noise_sigma: Gaussian noise standard deviation on the [0, 1] scale.
        poisson_prob: probability that the noise is Poisson-Gaussian (signal-dependent).
        poisson_scale: photon-noise variance per unit intensity of the Poisson-Gaussian noise.
        jpeg_prob: probability of JPEG compression.
        jpeg_quality: JPEG quality range.
        face_only_prob: probability that a kernel blur covers only the face (thesis 002);
            needs a face mask.
        second_order_prob: probability of a second round: Gaussian blur, resize down and up,
            noise, JPEG.
        second_blur_sigma: Gaussian sigma (pixels) of the second round's blur.
        second_resize: down-scaling factor range of the second round.
    """

    family_probs: tuple[float, float, float, float] = (0.4, 0.3, 0.15, 0.15)
    kernel_size: Range = (0.08, 0.26)
    noise_sigma: Range = (0.0, 0.05)
    poisson_prob: float = 0.3
    poisson_scale: Range = (0.0005, 0.01)
    jpeg_prob: float = 0.4
    jpeg_quality: Range = (30.0, 95.0)
    face_only_prob: float = 0.0
    second_order_prob: float = 0.0
    second_blur_sigma: Range = (0.2, 1.2)
    second_resize: Range = (0.5, 1.0)

    def __post_init__(self) -> None:
        probs = np.asarray(self.family_probs, float)
        if probs.shape != (4,) or (probs < 0).any() or probs.sum() <= 0:
            raise ValueError(f"family_probs must be 4 non-negative weights, got "
                             f"{self.family_probs}")
        for name in ("poisson_prob", "jpeg_prob", "face_only_prob", "second_order_prob"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        for name in ("kernel_size", "noise_sigma", "poisson_scale", "jpeg_quality",
                     "second_blur_sigma", "second_resize"):
            low, high = getattr(self, name)
            if not 0 <= low <= high:
                raise ValueError(f"{name} must be (low, high) with 0 <= low <= high, got "
                                 f"{getattr(self, name)}")
        if not (1 <= self.jpeg_quality[0] and self.jpeg_quality[1] <= 100):
            raise ValueError(f"jpeg_quality must lie in [1, 100], got {self.jpeg_quality}")
        if not (0 < self.second_resize[0] and self.second_resize[1] <= 1):
            raise ValueError(f"second_resize must lie in (0, 1], got {self.second_resize}")

    @classmethod
    def from_dict(cls, values) -> DegradationConfig:
        return settings_from_mapping(cls, values, "degradation")


def _torch_generator(rng: np.random.Generator) -> torch.Generator:
    return torch.Generator().manual_seed(int(rng.integers(0, 2**63 - 1)))


def sample_kernel(rng: np.random.Generator, face_size: float,
                  config: DegradationConfig | None = None) -> tuple[Tensor, dict]:
    """One blur kernel sized relative to the face.

    Args:
        rng: NumPy generator.
        face_size: face size in pixels of the image to blur.
        config: what is drawn.

    Returns:
        (kernel ``[K, K]`` float32 summing to 1, info dict with ``family``, ``size`` and the
        family's parameters).
    """
    from .. import ops

    cfg = config or DegradationConfig()
    probs = np.asarray(cfg.family_probs, float)
    family = KERNEL_FAMILIES[int(rng.choice(4, p=probs / probs.sum()))]
    size = max(3, int(round(rng.uniform(*cfg.kernel_size) * face_size)) | 1)
    info: dict = {"family": family, "size": size}
    if family == "trajectory":
        kernel = ops.trajectory_kernels(1, size, generator=_torch_generator(rng))[0]
    elif family == "motion":
        info["length"] = rng.uniform(0.4, 1.0) * (size - 1)
        info["angle"] = rng.uniform(0.0, 180.0)
        kernel = ops.motion_kernels(info["length"], info["angle"], size)[0]
    elif family == "gaussian":
        info["sigma"] = rng.uniform(0.15, 0.3) * size
        kernel = ops.gaussian_kernels(info["sigma"], size)[0]
    else:
        info["radius"] = rng.uniform(0.4, 1.0) * (size - 1) / 2
        kernel = ops.defocus_kernels(info["radius"], size)[0]
    return kernel.float(), info


def jpeg(image: Tensor, quality: int) -> Tensor:
    """JPEG-compress ``[3, H, W]`` in [0, 1] at ``quality`` (OpenCV) and decode it."""
    import cv2

    array = (image.clamp(0, 1).permute(1, 2, 0).numpy() * 255.0).round().astype(np.uint8)
    ok, data = cv2.imencode(".jpg", np.ascontiguousarray(array[..., ::-1]),
                            [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise RuntimeError("OpenCV could not JPEG-encode the image")
    decoded = cv2.imdecode(data, cv2.IMREAD_COLOR)[..., ::-1]
    return torch.from_numpy(np.ascontiguousarray(decoded.transpose(2, 0, 1))).float() / 255.0


def _noise(image: Tensor, rng: np.random.Generator, cfg: DegradationConfig) -> Tensor:
    sigma = rng.uniform(*cfg.noise_sigma)
    variance = torch.full_like(image, sigma * sigma)
    if rng.random() < cfg.poisson_prob:
        variance = variance + rng.uniform(*cfg.poisson_scale) * image.clamp(min=0)
    noise = torch.randn(image.shape, generator=_torch_generator(rng)) * variance.sqrt()
    return (image + noise).clamp(0, 1)


def _quantize(image: Tensor) -> Tensor:
    return image.mul(255.0).round().div(255.0)


def _jpeg_maybe(image: Tensor, rng: np.random.Generator, cfg: DegradationConfig) -> Tensor:
    if rng.random() < cfg.jpeg_prob:
        return jpeg(image, int(round(rng.uniform(*cfg.jpeg_quality))))
    return _quantize(image)


def degrade(blurry: Tensor, rng: np.random.Generator,
            config: DegradationConfig | None = None) -> tuple[Tensor, dict]:
    """What comes after the blur: noise, 8-bit quantization or JPEG, and optionally a second
    round (Gaussian blur, resize down and back up, noise, JPEG).

    Args:
        blurry: ``[3, H, W]`` float in [0, 1] (already blurred).
        rng: NumPy generator.
        config: what is drawn.

    Returns:
        (degraded ``[3, H, W]`` float32 on 8-bit levels, info dict).
    """
    cfg = config or DegradationConfig()
    if blurry.dim() != 3 or blurry.shape[0] != 3:
        raise ValueError(f"blurry must be [3, H, W], got {list(blurry.shape)}")
    image = _jpeg_maybe(_noise(blurry.float(), rng, cfg), rng, cfg)
    second = rng.random() < cfg.second_order_prob
    if second:
        from .. import ops

        sigma = rng.uniform(*cfg.second_blur_sigma)
        size = max(3, 2 * math.ceil(3 * sigma) + 1)
        image = ops.blur_synthesize(image[None], ops.gaussian_kernels(sigma, size))[0]
        h, w = image.shape[1:]
        factor = rng.uniform(*cfg.second_resize)
        small = (max(1, round(h * factor)), max(1, round(w * factor)))
        image = F.interpolate(image[None], size=small, mode="bilinear", antialias=True,
                              align_corners=False)
        image = F.interpolate(image, size=(h, w), mode="bilinear", align_corners=False)[0]
        image = _jpeg_maybe(_noise(image.clamp(0, 1), rng, cfg), rng, cfg)
    return image, {"second_order": second}
