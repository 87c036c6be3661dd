"""Deblur every face of a whole photo at the photo's own resolution and paste it back.

For each face found by the data pipeline's :class:`~facedeblur_ext.data.FaceAnalyzer`
(MediaPipe face detection, short range and then full range), a similarity transform maps the
photo to a square crop:

* rotation: the eye line (from the detector's eye keypoints) becomes horizontal;
* scale: the crop side is ``margin`` times the larger side of the detection box (default
  1.6: the face then fills about as much of the crop as in the CelebA/FFHQ training crops,
  whose mean face oval spans ~0.62 of the width);
* position: the box centre lands at (0.50, 0.52) of the crop (the mean face centre of those
  crops).

**Native scale.** By default the crop keeps the photo's resolution (scale 1, rotation only)
and the model runs on it in tiles (:func:`facedeblur_ext.inference.restore_tiled`), so a
1024 px face is restored at 1024 px: shrinking it to the model's training size and scaling the
result back would throw away the detail the photo has (29-32 dB against a sharp input, measured
on CelebA-HQ). With ``size`` below the native side the model runs on a resampled crop and only
its change is scaled up: ``crop + up(model(down(crop)) - down(crop))``, so the input's detail
finer than ``size`` is carried over untouched.

**Never less detail than the input.** The model's crop and the input crop are then fused band
by band in a Laplacian pyramid (:func:`keep_detail`): in every band each pixel takes the
coefficients of the two whose local energy is larger (soft weights ``e_m^2 / (e_m^2 + e_i^2)``),
and the coarsest band is the model's. Where the model sharpened, its detail is kept; where it
smoothed a face that was already sharp, the input's detail comes back (on sharp CelebA-HQ
faces the face region returns at over 35 dB; README, "Full photos").

**Paste back.** Only the change (fused crop minus input crop) is warped back to the photo,
inside the face's bounding rectangle, and added with a mask that is 1 in the crop's interior
and falls to 0 at its border with a raised cosine over ``feather`` of the side. Pixels the mask
does not reach are the input's, bit for bit; memory stays in proportion to the face, not the
photo.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "DEFAULT_FACE_MARGIN",
    "DEFAULT_FEATHER",
    "PhotoFace",
    "crop_matrix",
    "detect_photo_faces",
    "feather_mask",
    "keep_detail",
    "restore_photo",
]

DEFAULT_FACE_MARGIN = 1.6
DEFAULT_FEATHER = 0.15
#: Laplacian levels of :func:`keep_detail` (bands of 1-2, 2-4, 4-8, 8-16 px; coarser: model's).
DETAIL_LEVELS = 4
#: Gaussian sigma (pixels of each band) of the local energy that decides between the two.
_ENERGY_SIGMA = 2.0
# Where the detection box centre sits in the crop (fractions of the side).
_FACE_CENTRE = (0.50, 0.52)


@dataclass(frozen=True)
class PhotoFace:
    """One detected face: ``box`` (x0, y0, x1, y1), ``eyes`` [[right x, y], [left x, y]] (the
    subject's eyes), detector ``score``, in photo pixels."""

    box: np.ndarray
    eyes: np.ndarray
    score: float


def detect_photo_faces(photo: np.ndarray, analyzer=None, *, min_score: float = 0.5
                       ) -> list[PhotoFace]:
    """All faces the MediaPipe detector finds in an RGB uint8 photo, best first.

    Args:
        photo: [H, W, 3] uint8 RGB.
        analyzer: a :class:`~facedeblur_ext.data.FaceAnalyzer` (default: a new one with the
            default disk cache).
        min_score: drop detections below this confidence.
    """
    from facedeblur_ext.data import FaceAnalyzer

    analyzer = analyzer or FaceAnalyzer(warn=False)
    _key, raw = analyzer.analyze_raw(photo)
    boxes, scores, keypoints = raw["det_boxes"], raw["det_scores"], raw["det_keypoints"]
    faces = []
    for i in np.argsort(-scores):
        if scores[i] < min_score:
            continue
        eyes = keypoints[i][[0, 1]].astype(np.float64)  # detector order: right eye, left eye
        faces.append(PhotoFace(boxes[i].astype(np.float64), eyes, float(scores[i])))
    return faces


def crop_matrix(face: PhotoFace, size: int, margin: float = DEFAULT_FACE_MARGIN) -> np.ndarray:
    """The 2 x 3 affine matrix mapping photo pixel coordinates to a ``size`` x ``size`` crop
    (module docstring), for ``cv2.warpAffine``.

    Raises:
        ValueError: ``margin`` is not above 0, or the face box is empty.
    """
    if not margin > 0:
        raise ValueError(f"the face margin must be above 0, got {margin}")
    x0, y0, x1, y1 = (float(v) for v in face.box)
    side = margin * max(x1 - x0, y1 - y0)
    if side <= 0:
        raise ValueError(f"empty face box {face.box}")
    dx, dy = face.eyes[1] - face.eyes[0]
    angle = math.atan2(dy, dx) if (dx or dy) else 0.0
    scale = size / side
    cos, sin = scale * math.cos(angle), scale * math.sin(angle)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    # Rotate by -angle about the face centre (eye line -> horizontal), scale, then move the
    # centre to its place in the crop.
    tx = _FACE_CENTRE[0] * size - (cos * cx + sin * cy)
    ty = _FACE_CENTRE[1] * size - (-sin * cx + cos * cy)
    return np.array([[cos, sin, tx], [-sin, cos, ty]], dtype=np.float64)


def feather_mask(size: int, feather: float = DEFAULT_FEATHER) -> np.ndarray:
    """[size, size] float32 blend mask: 1 inside, raised-cosine fall-off to 0 at the border
    over ``feather * size`` pixels."""
    ramp_len = max(1.0, feather * size)
    pos = np.arange(size, dtype=np.float64) + 0.5
    dist = np.minimum(pos, size - pos)  # distance to the nearer border
    t = np.clip(dist / ramp_len, 0.0, 1.0)
    ramp = 0.5 - 0.5 * np.cos(np.pi * t)
    return np.outer(ramp, ramp).astype(np.float32)


def _laplacian_pyramid(image: np.ndarray, levels: int) -> list[np.ndarray]:
    import cv2

    gaussians = [image]
    for _ in range(levels):
        gaussians.append(cv2.pyrDown(gaussians[-1]))
    bands = [fine - cv2.pyrUp(coarse, dstsize=fine.shape[1::-1])
             for fine, coarse in zip(gaussians, gaussians[1:])]
    return bands + [gaussians[-1]]


def keep_detail(restored: np.ndarray, original: np.ndarray, levels: int = DETAIL_LEVELS
                ) -> np.ndarray:
    """Fuse a restored image with its input so that no band loses detail (module docstring).

    Args:
        restored: [H, W, C] float32, the model's result.
        original: [H, W, C] float32, the input on the same grid.
        levels: detail bands; the residual below them is taken from ``restored``.

    Returns:
        [H, W, C] float32.
    """
    import cv2

    levels = max(0, min(levels, int(math.log2(max(1, min(original.shape[:2])))) - 1))
    fused = []
    for level, (mine, theirs) in enumerate(zip(_laplacian_pyramid(restored, levels),
                                               _laplacian_pyramid(original, levels))):
        if level == levels:
            fused.append(mine)
            continue
        # 1e-2: in flat areas (both near 0) the two mix evenly instead of amplifying noise.
        energy_mine = cv2.GaussianBlur(np.square(mine).sum(axis=2), (0, 0), _ENERGY_SIGMA) + 1e-2
        energy_theirs = cv2.GaussianBlur(np.square(theirs).sum(axis=2), (0, 0),
                                         _ENERGY_SIGMA) + 1e-2
        weight = (np.square(energy_mine) / (np.square(energy_mine) + np.square(energy_theirs))
                  )[..., None]
        fused.append(weight * mine + (1 - weight) * theirs)
    image = fused[-1]
    for band in fused[-2::-1]:
        image = cv2.pyrUp(image, dstsize=band.shape[1::-1]) + band
    return image


def _to_tensor(image: np.ndarray, device) -> Tensor:
    # Not in place: for a float32 input, `.to` returns a view of the caller's array.
    return (torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None]
            .to(device=device, dtype=torch.float32).div(255.0))


def _run_model(restore: Callable[[Tensor], Tensor], crop: np.ndarray, device, tile: int,
               overlap: int, global_pools, progress) -> np.ndarray:
    """``restore`` on a float [0, 255] crop, tiled; the result as float [0, 255]."""
    from facedeblur_ext.inference import restore_tiled

    with torch.no_grad():
        restored = restore_tiled(restore, _to_tensor(crop, device), tile=tile, overlap=overlap,
                                 global_pools=global_pools, progress=progress)
    return restored[0].clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255.0


def _face_rectangle(inverse: np.ndarray, side: int, height: int, width: int
                    ) -> tuple[int, int, int, int]:
    """The photo pixels (x0, y0, x1, y1) the crop square covers, clipped to the photo."""
    corners = np.array([[0, 0, 1], [side, 0, 1], [0, side, 1], [side, side, 1]], np.float64)
    points = corners @ inverse.T
    x0, y0 = np.floor(points.min(axis=0)).astype(int) - 1
    x1, y1 = np.ceil(points.max(axis=0)).astype(int) + 2
    return max(0, x0), max(0, y0), min(width, x1), min(height, y1)


def restore_photo(photo: np.ndarray, restore: Callable[[Tensor], Tensor], *,
                  size: int | None = None, margin: float = DEFAULT_FACE_MARGIN,
                  feather: float = DEFAULT_FEATHER, analyzer=None,
                  faces: list[PhotoFace] | None = None, min_score: float = 0.5,
                  device: torch.device | str = "cpu", tile: int | None = None,
                  overlap: int | None = None, detail: bool = True,
                  global_pools: Sequence[torch.nn.Module] = (),
                  progress: Callable[[int, int], None] | None = None
                  ) -> tuple[np.ndarray, list[PhotoFace]]:
    """Deblur every face of ``photo`` and paste it back (module docstring).

    Args:
        photo: [H, W, 3] uint8 RGB.
        restore: maps a [1, 3, h, w] float crop in [0, 1] (on ``device``) to the restored
            crop of the same shape.
        size: side of the crop the model sees; None (default): the face's own resolution.
            A ``size`` above the native side is used as the native side (no upscaling).
        margin: crop side over the larger side of the detection box.
        feather: width of the blend fall-off, as a fraction of the crop side.
        analyzer: face analyzer for the detection (default a new ``FaceAnalyzer``).
        faces: skip detection and use these faces.
        min_score: detection confidence threshold.
        device: where ``restore`` runs.
        tile, overlap: tiles of the model's input (defaults of
            :func:`~facedeblur_ext.inference.restore_tiled`).
        detail: fuse with the input so that no band loses detail (:func:`keep_detail`);
            False pastes the model's crop as it is.
        global_pools: the global average pools of ``restore``'s model, given their
            whole-image values when the crop is tiled
            (:func:`~facedeblur_ext.inference.restore_tiled`).
        progress: called as ``progress(done, total)`` with the model runs over the tiles of
            the current face.

    Returns:
        The restored photo (uint8; pixels outside every face's mask are the input's) and the
        faces used.

    Raises:
        ValueError: ``photo`` is not uint8 RGB, ``size`` is below 1 or ``margin`` not above 0.
    """
    import cv2

    from facedeblur_ext.inference import DEFAULT_TILE, DEFAULT_TILE_OVERLAP

    if photo.dtype != np.uint8 or photo.ndim != 3 or photo.shape[2] != 3:
        raise ValueError(f"photo must be [H, W, 3] uint8 RGB, got {photo.dtype} "
                         f"{list(photo.shape)}")
    if size is not None and size < 1:
        raise ValueError(f"the face crop size must be at least 1, got {size}")
    tile = DEFAULT_TILE if tile is None else tile
    overlap = DEFAULT_TILE_OVERLAP if overlap is None else overlap
    if faces is None:
        faces = detect_photo_faces(photo, analyzer, min_score=min_score)
    if not faces:
        warnings.warn("no face found in the photo; it is returned unchanged", UserWarning,
                      stacklevel=2)
        return photo.copy(), []
    height, width = photo.shape[:2]
    out = photo.copy()
    for face in faces:
        x0, y0, x1, y1 = (float(v) for v in face.box)
        native = max(1, math.ceil(margin * max(x1 - x0, y1 - y0)))
        matrix = crop_matrix(face, native, margin)
        inverse = cv2.invertAffineTransform(matrix)
        rx0, ry0, rx1, ry1 = _face_rectangle(inverse, native, height, width)
        if rx1 <= rx0 or ry1 <= ry0:
            continue
        # The crop frame relative to the face's rectangle: all work stays inside it.
        local = matrix.copy()
        local[:, 2] += matrix[:, 0] * rx0 + matrix[:, 1] * ry0
        region = out[ry0:ry1, rx0:rx1]
        crop = cv2.warpAffine(region, local, (native, native), flags=cv2.INTER_LINEAR,
                              borderMode=cv2.BORDER_REFLECT_101).astype(np.float32)
        working = native if size is None else min(size, native)
        if working == native:
            restored = _run_model(restore, crop, device, tile, overlap, global_pools, progress)
        else:
            small = cv2.resize(crop, (working, working), interpolation=cv2.INTER_AREA)
            change = _run_model(restore, small, device, tile, overlap, global_pools,
                                progress) - small
            restored = crop + cv2.resize(change, (native, native), interpolation=cv2.INTER_CUBIC)
        if detail:
            restored = keep_detail(restored, crop)
        change_back = cv2.warpAffine(restored - crop, cv2.invertAffineTransform(local),
                                     (rx1 - rx0, ry1 - ry0), flags=cv2.INTER_LINEAR,
                                     borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        alpha = cv2.warpAffine(feather_mask(native, feather), cv2.invertAffineTransform(local),
                               (rx1 - rx0, ry1 - ry0), flags=cv2.INTER_LINEAR,
                               borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        alpha = np.clip(alpha, 0.0, 1.0)[..., None]
        touched = alpha[..., 0] > 0
        blended = region.astype(np.float32) + alpha * change_back
        region[touched] = np.clip(np.rint(blended[touched]), 0, 255).astype(np.uint8)
    return out, faces
