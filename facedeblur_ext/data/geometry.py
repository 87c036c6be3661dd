"""Geometric augmentation shared by images, masks and landmarks.

A :class:`CropTransform` is "resize the source, take a crop, optionally mirror it". Images, maps
(for example a person segmentation stored at a lower resolution) and point coordinates go
through the same transform, so that masks and landmarks stay aligned with the pixels.

Coordinates are continuous pixel coordinates with the origin at the top-left *corner* of the
image: pixel ``(i, j)`` covers ``[j, j+1) x [i, i+1)`` and its centre is ``(j + 0.5, i + 0.5)``.
MediaPipe's normalized landmarks times the image size are in this convention.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# CFMD-GAN's augmentation (paper 003 Sec. 5.1): random scale 1.0-1.5, random 256 crop; a
# horizontal flip is the usual companion and is applied identically to every output.
CFMD_SCALE_RANGE = (1.0, 1.5)
CFMD_CROP_SIZE = 256


@dataclass(frozen=True)
class CropTransform:
    """Resize ``src_size`` to ``resized_size``, crop ``out_size`` at ``offset``, mirror if ``flip``.

    Attributes:
        src_size: source ``(H, W)``.
        resized_size: ``(H', W')`` after resizing (integers, so that the scale is exact).
        offset: crop origin ``(y0, x0)`` in the resized image.
        out_size: ``(h, w)`` of the result.
        flip: mirror left-right after cropping.
    """

    src_size: tuple[int, int]
    resized_size: tuple[int, int]
    offset: tuple[int, int]
    out_size: tuple[int, int]
    flip: bool = False

    @property
    def scale_xy(self) -> tuple[float, float]:
        return (self.resized_size[1] / self.src_size[1], self.resized_size[0] / self.src_size[0])

    # ---- points --------------------------------------------------------------------------
    def apply_points(self, points: np.ndarray) -> np.ndarray:
        """Map ``[..., 2]`` (x, y) source coordinates to output coordinates."""
        pts = np.asarray(points, dtype=np.float64)
        sx, sy = self.scale_xy
        x = pts[..., 0] * sx - self.offset[1]
        y = pts[..., 1] * sy - self.offset[0]
        if self.flip:
            x = self.out_size[1] - x
        return np.stack([x, y], axis=-1)

    def apply_lengths(self, lengths_xy: np.ndarray) -> np.ndarray:
        """Scale ``[..., 2]`` (x, y) extents (ellipse axes, box sizes)."""
        sx, sy = self.scale_xy
        arr = np.asarray(lengths_xy, dtype=np.float64)
        return np.stack([arr[..., 0] * sx, arr[..., 1] * sy], axis=-1)

    # ---- rasters -------------------------------------------------------------------------
    def apply_image(self, image: np.ndarray, *, interpolation: str = "auto") -> np.ndarray:
        """Transform an ``[H, W]`` or ``[H, W, C]`` array given at the source resolution or at
        any other resolution covering the same field of view (it is resized to ``resized_size``
        directly, so a low-resolution map costs no extra pass).

        Args:
            image: the raster.
            interpolation: ``"auto"`` (area when shrinking, bilinear when enlarging),
                ``"linear"``, ``"area"``, ``"cubic"`` or ``"nearest"`` (for label maps).
        """
        import cv2

        rh, rw = self.resized_size
        h, w = image.shape[:2]
        if (h, w) != (rh, rw):
            if interpolation == "auto":
                flag = cv2.INTER_AREA if (rh < h and rw < w) else cv2.INTER_LINEAR
            else:
                flag = {"linear": cv2.INTER_LINEAR, "area": cv2.INTER_AREA,
                        "cubic": cv2.INTER_CUBIC, "nearest": cv2.INTER_NEAREST}[interpolation]
            image = cv2.resize(image, (rw, rh), interpolation=flag)
        y0, x0 = self.offset
        oh, ow = self.out_size
        out = image[y0:y0 + oh, x0:x0 + ow]
        if self.flip:
            out = out[:, ::-1]
        return np.ascontiguousarray(out)


def _resized_size(src_size: tuple[int, int], scale: float, out_size: tuple[int, int]):
    h, w = src_size
    oh, ow = out_size
    # Never smaller than the crop: enlarge just enough when the source is too small.
    scale = max(scale, oh / h, ow / w)
    return (max(oh, int(round(h * scale))), max(ow, int(round(w * scale))))


def _base_scale(src_size: tuple[int, int], base_size: int | None) -> float:
    return 1.0 if base_size is None else base_size / min(src_size)


def identity_transform(src_size: tuple[int, int]) -> CropTransform:
    return CropTransform(tuple(src_size), tuple(src_size), (0, 0), tuple(src_size), False)


def center_transform(src_size: tuple[int, int], crop_size: int | tuple[int, int] | None = None,
                     base_size: int | None = None) -> CropTransform:
    """Deterministic evaluation transform: resize so the short side is ``base_size`` (if given),
    then take the central ``crop_size`` crop (the whole resized image if None)."""
    scale = _base_scale(src_size, base_size)
    if crop_size is None:
        rs = (int(round(src_size[0] * scale)), int(round(src_size[1] * scale)))
        return CropTransform(tuple(src_size), rs, (0, 0), rs, False)
    out = (crop_size, crop_size) if isinstance(crop_size, int) else tuple(crop_size)
    rs = _resized_size(src_size, scale, out)
    offset = ((rs[0] - out[0]) // 2, (rs[1] - out[1]) // 2)
    return CropTransform(tuple(src_size), rs, offset, out, False)


def random_transform(rng: np.random.Generator, src_size: tuple[int, int],
                     crop_size: int | tuple[int, int] = CFMD_CROP_SIZE,
                     scale_range: tuple[float, float] = CFMD_SCALE_RANGE,
                     base_size: int | None = None, flip_prob: float = 0.5) -> CropTransform:
    """CFMD-style augmentation: scale by ``U(scale_range)`` (after bringing the short side to
    ``base_size`` when given), crop ``crop_size`` at a uniformly random position, mirror with
    probability ``flip_prob``. Every random number comes from ``rng``, in a fixed order."""
    out = (crop_size, crop_size) if isinstance(crop_size, int) else tuple(crop_size)
    lo, hi = scale_range
    if not 0 < lo <= hi:
        raise ValueError(f"scale_range must satisfy 0 < lo <= hi, got {scale_range}")
    scale = _base_scale(src_size, base_size) * float(rng.uniform(lo, hi))
    flip = bool(rng.random() < flip_prob)
    rs = _resized_size(src_size, scale, out)
    y0 = int(rng.integers(0, rs[0] - out[0] + 1))
    x0 = int(rng.integers(0, rs[1] - out[1] + 1))
    return CropTransform(tuple(src_size), rs, (y0, x0), out, flip)
