"""Face masks and parsing labels drawn from a :class:`~facedeblur_ext.data.face.FaceAnalysis`.

Everything is rasterized directly in the *output* geometry (after a
:class:`~facedeblur_ext.data.geometry.CropTransform`): landmarks are transformed and the
polygons filled at the final resolution, which is both cheaper and sharper than warping masks
drawn at the source resolution.

**Parsing labels** (:data:`PARSING_CLASSES`, one ``uint8`` id per pixel) are painted in this
order, later classes overwriting earlier ones: background; *hair* where the person
segmentation says "person" (probability >= 0.5); *skin* inside the face (the convex hull of the
468 mesh points: the face-oval polygon for a frontal face, plus whatever of a turned head
projects outside that contour); then nose (convex
hull of MediaPipe's nose points), lips (outer lip contour), mouth (inner lip contour), brows and
eyes. Left and right eyes (and brows) share one class so that a horizontal flip does not change
the labels' meaning.

**The four regions** of SNADNet's multi-region loss (:data:`REGION_NAMES`, paper 004 Fig. 6)
group the classes: facial parts = brows, eyes, nose, lips and mouth; skin; hair; background.
Note that "hair" is *person segmentation minus face* (MediaPipe has no hair model bundled), so
it also holds the neck and clothing when they are in the picture. Hard regions are one-hot, so
they partition the image exactly; soft regions are the hard ones smoothed by the same Gaussian
and renormalized, so they still sum to one at every pixel.

**The face (foreground) mask** is the face region (skin and facial parts): the foreground of
separable normalization and the blend mask of face-only blur (thesis 002).
"""

from __future__ import annotations

import numpy as np

from .face import (
    LEFT_EYE,
    LEFT_EYEBROW,
    LIPS_INNER,
    LIPS_OUTER,
    NOSE_POINTS,
    RIGHT_EYE,
    RIGHT_EYEBROW,
    FaceAnalysis,
)
from .geometry import CropTransform, identity_transform

PARSING_CLASSES = ("background", "skin", "brows", "eyes", "nose", "lips", "mouth", "hair")
BACKGROUND, SKIN, BROWS, EYES, NOSE, LIPS, MOUTH, HAIR = range(len(PARSING_CLASSES))

REGION_NAMES = ("facial_parts", "skin", "hair", "background")
#: region index of each parsing class
CLASS_TO_REGION = np.array([3, 1, 0, 0, 0, 0, 0, 2], dtype=np.int64)
# class id -> one-hot of the first three regions (the fourth, background, is the rest)
_ONEHOT3 = np.eye(4, dtype=np.float32)[CLASS_TO_REGION][:, :3].copy()
#: parsing classes that make up the face (foreground) mask
FACE_CLASSES = (SKIN, BROWS, EYES, NOSE, LIPS, MOUTH)
_FACE_LUT = np.isin(np.arange(len(PARSING_CLASSES)), FACE_CLASSES).astype(np.float32)

# Default softness of soft masks: Gaussian sigma as a fraction of the face width in the output.
DEFAULT_FEATHER = 0.03
_SHIFT = 4  # fixed-point bits for sub-pixel polygon vertices in cv2.fillPoly
NUM_MESH_POINTS = 468  # the iris points (468..477) lie inside the eyes


def _to_fixed(points_xy: np.ndarray) -> np.ndarray:
    # Continuous coordinates -> OpenCV's pixel-centre coordinates, in fixed point.
    return np.rint((np.asarray(points_xy, np.float64) - 0.5) * (1 << _SHIFT)).astype(np.int32)


def _fill_polygon(canvas: np.ndarray, points_xy: np.ndarray, value: int) -> None:
    import cv2

    cv2.fillPoly(canvas, [_to_fixed(points_xy).reshape(-1, 1, 2)], int(value),
                 lineType=cv2.LINE_8, shift=_SHIFT)


def _fill_ellipse(canvas: np.ndarray, center_xy, axes_xy, value: int) -> None:
    import cv2

    center = tuple(int(v) for v in _to_fixed(np.asarray(center_xy)))
    axes = tuple(max(1, int(round(a * (1 << _SHIFT)))) for a in axes_xy)
    cv2.ellipse(canvas, center, axes, 0.0, 0.0, 360.0, int(value), thickness=-1,
                lineType=cv2.LINE_8, shift=_SHIFT)


def render_parsing(analysis: FaceAnalysis, transform: CropTransform | None = None) -> np.ndarray:
    """Parsing label map ``[h, w]`` (``uint8`` ids of :data:`PARSING_CLASSES`) in the geometry
    of ``transform`` (the analysed image itself when None)."""
    import cv2

    transform = transform or identity_transform(analysis.image_size)
    h, w = transform.out_size
    labels = np.zeros((h, w), np.uint8)
    if analysis.person is not None:
        person = transform.apply_image(analysis.person, interpolation="linear")
        labels[person >= 128] = HAIR
    if analysis.landmarks is not None:
        pts = transform.apply_points(analysis.landmarks[:, :2])
        # The face region is the convex hull of the mesh. It contains the face-oval polygon
        # (equal to it for frontal faces, whose oval is convex) and also the cheek or nose of a
        # turned head that projects outside the oval contour.
        _fill_polygon(labels, cv2.convexHull(pts[:NUM_MESH_POINTS].astype(np.float32))
                      .reshape(-1, 2), SKIN)
        nose = pts[list(NOSE_POINTS)].astype(np.float32)
        _fill_polygon(labels, cv2.convexHull(nose).reshape(-1, 2), NOSE)
        _fill_polygon(labels, pts[list(LIPS_OUTER)], LIPS)
        _fill_polygon(labels, pts[list(LIPS_INNER)], MOUTH)
        for brow in (LEFT_EYEBROW, RIGHT_EYEBROW):
            _fill_polygon(labels, pts[list(brow)], BROWS)
        for eye in (LEFT_EYE, RIGHT_EYE):
            _fill_polygon(labels, pts[list(eye)], EYES)
    elif analysis.ellipse is not None:
        cx, cy, ax, ay = analysis.ellipse
        center = transform.apply_points(np.array([cx, cy]))
        axes = transform.apply_lengths(np.array([ax, ay]))
        _fill_ellipse(labels, center, axes, SKIN)
    return labels


def regions_from_parsing(labels: np.ndarray) -> np.ndarray:
    """One-hot ``[4, h, w]`` float32 region masks (:data:`REGION_NAMES`) from parsing labels."""
    region = CLASS_TO_REGION[labels]
    return (region[None] == np.arange(len(REGION_NAMES))[:, None, None]).astype(np.float32)


def face_from_parsing(labels: np.ndarray) -> np.ndarray:
    """Hard face (foreground) mask ``[h, w]`` float32 from parsing labels."""
    return _FACE_LUT[labels]


def feather_sigma(analysis: FaceAnalysis, transform: CropTransform | None = None,
                  feather: float = DEFAULT_FEATHER) -> float:
    """Gaussian sigma in output pixels: ``feather`` times the face width in the output."""
    transform = transform or identity_transform(analysis.image_size)
    width = transform.apply_lengths(np.array([analysis.box[2] - analysis.box[0], 0.0]))[0]
    return max(0.5, float(feather) * float(width))


def soften(masks: np.ndarray, sigma: float, *, normalize: bool = False) -> np.ndarray:
    """Gaussian-smooth ``[h, w]`` or ``[R, h, w]`` masks (reflecting borders); with
    ``normalize`` the channels are rescaled to sum to one at every pixel."""
    import cv2

    if sigma <= 0:
        return masks.astype(np.float32, copy=True)
    ksize = 2 * int(np.ceil(3.0 * sigma)) + 1
    stack = masks[None] if masks.ndim == 2 else masks
    out = np.stack([cv2.GaussianBlur(m.astype(np.float32), (ksize, ksize), sigma,
                                     borderType=cv2.BORDER_REFLECT_101) for m in stack])
    if normalize:
        out /= np.maximum(out.sum(0, keepdims=True), 1e-12)
    np.clip(out, 0.0, 1.0, out=out)
    return out[0] if masks.ndim == 2 else out


def render_masks(analysis: FaceAnalysis, transform: CropTransform | None = None, *,
                 soft: bool = True, feather: float = DEFAULT_FEATHER) -> dict[str, np.ndarray]:
    """Parsing labels, face mask and region masks in one go.

    Returns:
        dict with ``parsing`` ``[h, w]`` uint8, ``face`` ``[h, w]`` float32 and ``regions``
        ``[4, h, w]`` float32 (soft or hard), and ``face_soft`` ``[h, w]`` (always feathered:
        the blend mask for face-only blur).
    """
    import cv2

    labels = render_parsing(analysis, transform)
    # Work channels-last (contiguous per pixel) for OpenCV and cheap per-pixel arithmetic.
    onehot3 = _ONEHOT3[labels]  # facial parts, skin, hair
    sigma = feather_sigma(analysis, transform, feather)
    # Smoothing is linear, so the smoothed one-hot regions still sum to one and the smoothed
    # face mask is the sum of the smoothed facial-parts and skin regions: one 3-channel blur
    # gives everything.
    ksize = 2 * int(np.ceil(3.0 * sigma)) + 1
    blurred = cv2.GaussianBlur(onehot3, (ksize, ksize), sigma,
                               borderType=cv2.BORDER_REFLECT_101)
    np.clip(blurred, 0.0, 1.0, out=blurred)
    face_soft = blurred[..., 0] + blurred[..., 1]
    np.minimum(face_soft, 1.0, out=face_soft)
    if not soft:
        regions = np.ascontiguousarray(
            np.concatenate([onehot3, (CLASS_TO_REGION[labels] == 3)[..., None]
                            .astype(np.float32)], axis=2)
            .transpose(2, 0, 1))
        face = regions[0] + regions[1]
        return {"parsing": labels, "face": face, "regions": regions, "face_soft": face_soft}
    # Each channel is clipped to [0, 1] and their sum exceeds 1 by float rounding at most, so
    # "background = 1 - the rest" (clipped) completes a partition of unity.
    h, w = labels.shape
    regions = np.empty((4, h, w), np.float32)
    regions[:3] = blurred.transpose(2, 0, 1)
    np.subtract(1.0, regions[0] + regions[1] + regions[2], out=regions[3])
    np.clip(regions[3], 0.0, 1.0, out=regions[3])
    return {"parsing": labels, "face": face_soft, "regions": regions, "face_soft": face_soft}


def face_mask(analysis: FaceAnalysis, transform: CropTransform | None = None, *,
              soft: bool = False, feather: float = DEFAULT_FEATHER) -> np.ndarray:
    """Face (foreground) mask ``[h, w]`` float32 in [0, 1]: skin and facial parts."""
    labels = render_parsing(analysis, transform)
    face = face_from_parsing(labels)
    return soften(face, feather_sigma(analysis, transform, feather)) if soft else face


def region_masks(analysis: FaceAnalysis, transform: CropTransform | None = None, *,
                 soft: bool = False, feather: float = DEFAULT_FEATHER) -> np.ndarray:
    """The four SNADNet region masks ``[4, h, w]`` float32 (:data:`REGION_NAMES` order)."""
    return render_masks(analysis, transform, soft=soft, feather=feather)["regions"]
