"""Deblur every face of a whole photo: detect, crop, restore, paste back with a feathered mask.

The face models work on aligned face crops at a fixed size. For each face found by the data
pipeline's :class:`~facedeblur_ext.data.FaceAnalyzer` (MediaPipe face detection, short range
and then full range), a similarity transform maps the photo to a square crop:

* rotation: the eye line (from the detector's eye keypoints) becomes horizontal;
* scale: the crop side is ``margin`` times the larger side of the detection box (default
  1.6: the face then fills about as much of the crop as in the CelebA/FFHQ training crops,
  whose mean face oval spans ~0.62 of the width), resampled to the model's working size;
* position: the box centre lands at (0.50, 0.52) of the crop (the mean face centre of those
  crops).

The restored crop is warped back with the inverse transform and blended in with a mask that
is 1 in the crop's interior and falls to 0 at its border with a raised cosine over ``feather``
of the side. Pixels the mask does not reach are copied from the input unchanged, bit for bit.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
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
    "restore_photo",
]

DEFAULT_FACE_MARGIN = 1.6
DEFAULT_FEATHER = 0.15
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


def _to_tensor(image: np.ndarray, device) -> Tensor:
    return (torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None]
            .to(device=device, dtype=torch.float32).div_(255.0))


def restore_photo(photo: np.ndarray, restore: Callable[[Tensor], Tensor], *, size: int = 256,
                  margin: float = DEFAULT_FACE_MARGIN, feather: float = DEFAULT_FEATHER,
                  analyzer=None, faces: list[PhotoFace] | None = None, min_score: float = 0.5,
                  device: torch.device | str = "cpu") -> tuple[np.ndarray, list[PhotoFace]]:
    """Deblur every face of ``photo`` and paste it back.

    Args:
        photo: [H, W, 3] uint8 RGB.
        restore: maps a [1, 3, size, size] float crop in [0, 1] (on ``device``) to the restored
            crop of the same shape.
        size: the model's working size (crops are resampled to it).
        margin: crop side over the larger side of the detection box.
        feather: width of the blend fall-off, as a fraction of the crop side.
        analyzer: face analyzer for the detection (default a new ``FaceAnalyzer``).
        faces: skip detection and use these faces.
        min_score: detection confidence threshold.
        device: where ``restore`` runs.

    Returns:
        The restored photo (uint8; pixels outside every face's mask are the input's) and the
        faces used.

    Raises:
        ValueError: ``photo`` is not uint8 RGB, ``size`` is below 1 or ``margin`` not above 0.
    """
    import cv2

    if photo.dtype != np.uint8 or photo.ndim != 3 or photo.shape[2] != 3:
        raise ValueError(f"photo must be [H, W, 3] uint8 RGB, got {photo.dtype} "
                         f"{list(photo.shape)}")
    if size < 1:
        raise ValueError(f"the face crop size must be at least 1, got {size}")
    if faces is None:
        faces = detect_photo_faces(photo, analyzer, min_score=min_score)
    if not faces:
        warnings.warn("no face found in the photo; it is returned unchanged", UserWarning,
                      stacklevel=2)
        return photo.copy(), []
    h, w = photo.shape[:2]
    result = photo.astype(np.float32)
    touched = np.zeros((h, w), dtype=bool)
    crop_mask = feather_mask(size, feather)
    for face in faces:
        matrix = crop_matrix(face, size, margin)
        crop = cv2.warpAffine(photo, matrix, (size, size), flags=cv2.INTER_AREA
                              if matrix[0, 0] ** 2 + matrix[0, 1] ** 2 < 1 else cv2.INTER_LINEAR,
                              borderMode=cv2.BORDER_REFLECT_101)
        with torch.no_grad():
            restored = restore(_to_tensor(crop, device))
        restored = restored[0].clamp(0, 1).permute(1, 2, 0).float().cpu().numpy() * 255.0
        inverse = cv2.invertAffineTransform(matrix)
        back = cv2.warpAffine(restored, inverse, (w, h), flags=cv2.INTER_LINEAR,
                              borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        alpha = cv2.warpAffine(crop_mask, inverse, (w, h), flags=cv2.INTER_LINEAR,
                               borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        alpha = np.clip(alpha, 0.0, 1.0)[..., None]
        result = alpha * back + (1.0 - alpha) * result
        touched |= alpha[..., 0] > 0
    out = photo.copy()
    out[touched] = np.clip(np.rint(result[touched]), 0, 255).astype(np.uint8)
    return out, faces
