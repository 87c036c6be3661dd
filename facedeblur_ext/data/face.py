"""Face analysis with MediaPipe: detection, the 478-point face mesh, eye positions and the
person segmentation, cached on disk by image content.

MediaPipe 0.10.21 (the ``face`` extra) is used through its legacy ``mp.solutions`` API with
``static_image_mode=True`` and the models bundled in its wheel, so nothing is downloaded. It is
imported only when an image actually has to be analysed; results already in the cache are
served without it.

**Which eye is "left".** Throughout this package *left eye* means the **subject's** left eye,
which appears on the *right* side of a non-mirrored photograph of a frontal face. MediaPipe
uses the same convention (``FACEMESH_LEFT_EYE`` contains landmark 263, the outer corner of the
subject's left eye; face detection keypoint 1 is the subject's left eye). The eye *position* is
the midpoint of the eye's two corners (canthi: 263 and 362 for the left eye, 33 and 133 for the
right): unlike the iris or the eyelid contour it moves with the head, not with gaze or blinks,
which is what facial-motion reordering (FMR, :mod:`facedeblur_ext.data.fmr`) needs.

**When no face is found** (typically a heavily blurred input) the analysis falls back, with a
:class:`NoFaceWarning`, in two steps and never raises:

1. ``source == "detection"``: MediaPipe's face *detector* (short range, then full range) often
   still finds a blurred face when the mesh does not. The face is then an axis-aligned ellipse
   fitted to the detection box (centre shifted up by 4 % of the box height, semi-axes 0.465 x
   and 0.535 x the box width and height: the mean face-oval extent relative to the box on the
   CelebA/FFHQ crops in the shared data), and the eye positions are the detector's keypoints.
2. ``source == "prior"``: a centred ellipse prior for *aligned face crops* (:class:`FacePrior`;
   defaults measured as the mean MediaPipe face oval of the CelebA and FFHQ crops in the shared
   data). It is wrong for images that are not aligned crops; callers that cannot accept that
   check :attr:`FaceAnalysis.found` (the datasets can skip such images, ``facedeblur synth``
   reports and skips them).

Facial-part masks need the mesh; with the two fallbacks the whole ellipse counts as skin.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import threading
import warnings
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .io import atomic_write_bytes, content_hash

MEDIAPIPE_HINT = ("face analysis needs MediaPipe 0.10.21 (the 'face' extra): "
                  "pip install -e .[face]")

NUM_LANDMARKS = 478  # 468 mesh points + 10 iris points (refine_landmarks=True)

# Bump when the cached content or its meaning changes.
_CACHE_FORMAT = 1
# The person segmentation model works at 256x256: storing more resolution adds nothing.
_PERSON_MAX_SIDE = 256

# ---- MediaPipe face mesh topology (landmark indices), as closed, ordered contours ---------
# They are the cycles of MediaPipe's FACEMESH_* connection sets, written out in order so that
# masks can be drawn without importing MediaPipe (tests check them against those sets).
FACE_OVAL = (10, 338, 297, 332, 284, 251, 389, 356, 454, 323, 361, 288, 397, 365, 379, 378,
             400, 377, 152, 148, 176, 149, 150, 136, 172, 58, 132, 93, 234, 127, 162, 21, 54,
             103, 67, 109)
LIPS_OUTER = (61, 146, 91, 181, 84, 17, 314, 405, 321, 375, 291, 409, 270, 269, 267, 0, 37,
              39, 40, 185)
LIPS_INNER = (78, 95, 88, 178, 87, 14, 317, 402, 318, 324, 308, 415, 310, 311, 312, 13, 82,
              81, 80, 191)
LEFT_EYE = (263, 249, 390, 373, 374, 380, 381, 382, 362, 398, 384, 385, 386, 387, 388, 466)
RIGHT_EYE = (33, 7, 163, 144, 145, 153, 154, 155, 133, 173, 157, 158, 159, 160, 161, 246)
# Eyebrows: MediaPipe gives the upper and lower edges as two open chains; the polygon is the
# upper edge (outer -> inner end) followed by the lower edge back (inner -> outer end).
LEFT_EYEBROW = (300, 293, 334, 296, 336, 285, 295, 282, 283, 276)
RIGHT_EYEBROW = (70, 63, 105, 66, 107, 55, 65, 52, 53, 46)
# The nose set is a ridge line plus the alar contour, not a cycle: its convex hull is the mask.
NOSE_POINTS = (1, 2, 4, 5, 6, 19, 45, 48, 64, 94, 97, 98, 115, 168, 195, 197, 220, 275, 278,
               294, 326, 327, 344, 440)
# Eye corners (outer, inner) defining the eye positions.
LEFT_EYE_CORNERS = (263, 362)
RIGHT_EYE_CORNERS = (33, 133)
# MediaPipe face detection keypoint order.
_DET_RIGHT_EYE, _DET_LEFT_EYE = 0, 1

# Detection box -> face-oval ellipse (see the module docstring).
_BOX_CENTER_DY = -0.04
_BOX_AXES = (0.465, 0.535)


# MediaPipe graphs inherited from a parent process through fork (see _init_process_state).
_ORPHANED: list = []


class NoFaceWarning(UserWarning):
    """No face mesh was found; a documented fallback was used."""


@dataclass(frozen=True)
class FacePrior:
    """Assumed face placement for aligned face crops, in fractions of the image width/height.

    Defaults: the mean MediaPipe face oval (its bounding box) and eye-corner midpoints over
    CelebA (DIC test crops) and FFHQ samples in the shared data, rounded.
    """

    center: tuple[float, float] = (0.50, 0.52)
    axes: tuple[float, float] = (0.31, 0.37)
    left_eye: tuple[float, float] = (0.63, 0.42)   # subject's left eye: image right
    right_eye: tuple[float, float] = (0.37, 0.42)


@dataclass(frozen=True)
class FaceAnalysis:
    """What the analysis found in one image. All coordinates are continuous pixel coordinates
    of that image (origin at its top-left corner, see :mod:`facedeblur_ext.data.geometry`).

    Attributes:
        image_size: ``(H, W)``.
        source: ``"mesh"`` (face mesh found), ``"detection"`` (only the detector found the
            face) or ``"prior"`` (nothing found; centred prior).
        landmarks: ``[478, 3]`` float32 (x, y, z) when ``source == "mesh"``, else None. ``z``
            is MediaPipe's relative depth in the same pixel scale as x.
        box: ``[4]`` face box (x0, y0, x1, y1).
        score: detector confidence (NaN when the detector did not fire).
        eyes: ``[2, 2]``: row 0 the subject's right eye, row 1 the subject's left eye (x, y).
        ellipse: ``[4]`` (cx, cy, ax, ay) face ellipse for the fallbacks, else None.
        person: ``[h, w]`` uint8 person probability x 255 (MediaPipe selfie segmentation) at
            up to 256 pixels on the long side, or None when segmentation was off.
        key: the cache key (content hash of the image and analysis settings).
    """

    image_size: tuple[int, int]
    source: str
    landmarks: np.ndarray | None
    box: np.ndarray
    score: float
    eyes: np.ndarray
    ellipse: np.ndarray | None
    person: np.ndarray | None
    key: str = field(default="", compare=False)

    @property
    def found(self) -> bool:
        """True when a face was detected (mesh or detector), False for the prior."""
        return self.source != "prior"

    @property
    def left_eye(self) -> np.ndarray:
        """The subject's left eye (x, y): the image's right-hand eye for a frontal face."""
        return self.eyes[1]

    @property
    def right_eye(self) -> np.ndarray:
        return self.eyes[0]


def import_mediapipe():
    """Import MediaPipe's legacy solutions, or raise an ImportError saying how to install it."""
    os.environ.setdefault("GLOG_minloglevel", "2")  # MediaPipe's C++ logging is very chatty
    try:
        import mediapipe  # noqa: F401
        from mediapipe.python.solutions import face_detection, face_mesh, selfie_segmentation
    except ImportError as exc:
        raise ImportError(f"{MEDIAPIPE_HINT} ({exc})") from exc
    return face_mesh, face_detection, selfie_segmentation


def default_cache_dir() -> Path:
    """``$FACEDEBLUR_CACHE_DIR``, else ``$XDG_CACHE_HOME/facedeblur``, else ``~/.cache/facedeblur``
    (face analyses go to its ``face_analysis`` subfolder)."""
    env = os.environ.get("FACEDEBLUR_CACHE_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "facedeblur"


class FaceAnalyzer:
    """MediaPipe face detection + 478-point mesh + person segmentation with a disk cache.

    One instance can be shared with DataLoader workers: the MediaPipe graphs are created lazily
    in each process (and re-created after a fork); calls within a process are serialized by a
    lock because the graphs are not thread-safe.

    Args:
        cache_dir: folder for cached analyses (``face_analysis/`` is created inside); None for
            :func:`default_cache_dir`, False to disable the disk cache.
        min_detection_confidence: face detector / mesh detection threshold.
        person_segmentation: also run the selfie (person) segmentation, needed for the hair
            region.
        prior: placement assumed when no face is found.
        memory_cache: number of analyses kept in memory per process.
        warn: emit a :class:`NoFaceWarning` when a fallback is used.

    The cache key is the SHA-256 of the image's pixels, shape and dtype plus the settings that
    change the result (cache format, threshold, segmentation on/off); the MediaPipe version is
    recorded in each entry but not part of the key, so a cache built with the pinned release
    stays usable where MediaPipe is not installed. Entries are written atomically, so
    concurrent workers never see partial files.
    """

    def __init__(self, cache_dir: str | os.PathLike | None | bool = None, *,
                 min_detection_confidence: float = 0.5, person_segmentation: bool = True,
                 prior: FacePrior | None = None, memory_cache: int = 256, warn: bool = True):
        if cache_dir is False:
            self.cache_dir = None
        else:
            base = default_cache_dir() if cache_dir in (None, True) else Path(cache_dir)
            self.cache_dir = base / "face_analysis"
        self.min_detection_confidence = float(min_detection_confidence)
        self.person_segmentation = bool(person_segmentation)
        self.prior = prior or FacePrior()
        self.memory_cache_size = int(memory_cache)
        self.warn = bool(warn)
        self._settings = (f"v{_CACHE_FORMAT}|conf{self.min_detection_confidence:.4f}"
                          f"|seg{int(self.person_segmentation)}")
        self._init_process_state()
        self.stats = {"memory_hits": 0, "disk_hits": 0, "computed": 0}

    def _init_process_state(self):
        graphs = getattr(self, "_graphs", None)
        if graphs is not None and getattr(self, "_pid", None) != os.getpid():
            # Inherited through fork: the graphs' threads do not exist in this process, so
            # destroying them here could block. Keep them alive, unused.
            _ORPHANED.append(graphs)
        self._graphs = None
        self._pid = os.getpid()
        self._lock = threading.Lock()
        if not hasattr(self, "_memory"):  # (a forked child keeps its copy: still valid)
            self._memory: OrderedDict[str, dict] = OrderedDict()

    def __getstate__(self):
        state = self.__dict__.copy()
        for name in ("_graphs", "_lock", "_memory", "_pid"):
            state.pop(name, None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._init_process_state()

    # ---- MediaPipe ---------------------------------------------------------------------
    def _mediapipe(self):
        if self._pid != os.getpid():
            self._init_process_state()
        if self._graphs is None:
            face_mesh, face_detection, selfie = import_mediapipe()
            conf = self.min_detection_confidence
            self._graphs = {
                "mesh": face_mesh.FaceMesh(static_image_mode=True, max_num_faces=1,
                                           refine_landmarks=True,
                                           min_detection_confidence=conf),
                "det_short": face_detection.FaceDetection(model_selection=0,
                                                          min_detection_confidence=conf),
                "det_full": face_detection.FaceDetection(model_selection=1,
                                                         min_detection_confidence=conf),
                "person": (selfie.SelfieSegmentation(model_selection=0)
                           if self.person_segmentation else None),
            }
            self._pid = os.getpid()
        return self._graphs

    def close(self) -> None:
        """Release the MediaPipe graphs of this process (they are re-created on demand)."""
        graphs, self._graphs = self._graphs, None
        if graphs and self._pid == os.getpid():
            for graph in graphs.values():
                if graph is not None:
                    graph.close()

    def _compute(self, image: np.ndarray) -> dict:
        import cv2

        graphs = self._mediapipe()
        h, w = image.shape[:2]
        scale = np.array([w, h], dtype=np.float64)
        result = graphs["mesh"].process(image)
        if result.multi_face_landmarks:
            pts = result.multi_face_landmarks[0].landmark
            lm = np.array([[p.x * w, p.y * h, p.z * w] for p in pts], dtype=np.float32)
        else:
            lm = np.zeros((0, 3), np.float32)
        boxes, scores, keypoints = [], [], []
        for name in ("det_short", "det_full"):
            detections = graphs[name].process(image).detections
            for det in detections or ():
                rel = det.location_data.relative_bounding_box
                boxes.append([rel.xmin * w, rel.ymin * h, (rel.xmin + rel.width) * w,
                              (rel.ymin + rel.height) * h])
                scores.append(det.score[0])
                keypoints.append([[k.x, k.y] for k in det.location_data.relative_keypoints][:6])
            if detections:
                break  # the full-range model is only a second try
        boxes_arr = np.asarray(boxes, np.float32).reshape(-1, 4)
        kp_arr = (np.asarray(keypoints, np.float64).reshape(-1, 6, 2) * scale).astype(np.float32)
        person = np.zeros((0, 0), np.uint8)
        if graphs["person"] is not None:
            prob = graphs["person"].process(image).segmentation_mask
            prob = np.clip(np.asarray(prob, np.float32), 0.0, 1.0)
            factor = _PERSON_MAX_SIDE / max(h, w)
            if factor < 1.0:
                size = (max(1, round(w * factor)), max(1, round(h * factor)))
                prob = cv2.resize(prob, size, interpolation=cv2.INTER_AREA)
            person = np.rint(prob * 255.0).astype(np.uint8)
        return {"size": np.array([h, w], np.int64), "landmarks": lm, "det_boxes": boxes_arr,
                "det_scores": np.asarray(scores, np.float32), "det_keypoints": kp_arr,
                "person": person}

    # ---- caching -----------------------------------------------------------------------
    def cache_key(self, image: np.ndarray) -> str:
        return hashlib.sha256(f"{content_hash(image)}|{self._settings}".encode()).hexdigest()

    def _cache_path(self, key: str) -> Path | None:
        return None if self.cache_dir is None else self.cache_dir / key[:2] / f"{key}.fa"

    def _load(self, key: str) -> dict | None:
        path = self._cache_path(key)
        if path is None or not path.is_file():
            return None
        try:
            raw = unpack_arrays(path.read_bytes())
            if int(raw.get("format", -1)) != _CACHE_FORMAT:
                return None
            return raw
        except Exception:  # a damaged entry is recomputed and overwritten
            return None

    def _store(self, key: str, raw: dict) -> None:
        path = self._cache_path(key)
        if path is None:
            return
        try:
            from importlib.metadata import version

            mp_version = version("mediapipe")
        except Exception:
            mp_version = "unknown"
        # The MediaPipe version is kept for provenance, as its UTF-8 bytes.
        payload = dict(raw, format=np.array(_CACHE_FORMAT),
                       mediapipe_version=np.frombuffer(mp_version.encode(), np.uint8))
        try:
            atomic_write_bytes(path, pack_arrays(payload))
        except OSError as exc:  # a read-only or full cache must not stop the pipeline
            warnings.warn(f"face analysis cache not written ({exc})", RuntimeWarning,
                          stacklevel=3)

    def analyze_raw(self, image: np.ndarray) -> tuple[str, dict]:
        """The cached MediaPipe outputs for ``image`` (computing them on a miss)."""
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected a uint8 RGB image [H, W, 3], got {image.dtype} "
                             f"{list(image.shape)}")
        key = self.cache_key(image)
        if self._pid != os.getpid():
            self._init_process_state()
        with self._lock:
            raw = self._memory.get(key)
            if raw is not None:
                self._memory.move_to_end(key)
                self.stats["memory_hits"] += 1
                return key, raw
            raw = self._load(key)
            if raw is not None:
                self.stats["disk_hits"] += 1
            else:
                raw = self._compute(np.ascontiguousarray(image))
                self.stats["computed"] += 1
                self._store(key, raw)
            self._memory[key] = raw
            while len(self._memory) > self.memory_cache_size:
                self._memory.popitem(last=False)
        return key, raw

    # ---- interpretation ----------------------------------------------------------------
    def analyze(self, image: np.ndarray, *, name: str | None = None) -> FaceAnalysis:
        """Analyse a ``uint8`` RGB image ``[H, W, 3]``; never raises for a face-less image.

        Args:
            image: the picture.
            name: how to call it in warnings (a path, for example).
        """
        key, raw = self.analyze_raw(image)
        analysis = build_analysis(raw, self.prior, key=key)
        if analysis.source != "mesh" and self.warn:
            h, w = analysis.image_size
            what = name or f"image {key[:12]}"
            fallback = ("an ellipse fitted to the face detection box"
                        if analysis.source == "detection"
                        else "a centred ellipse prior for aligned face crops")
            warnings.warn(f"no face mesh found in {what} ({w}x{h}; blurry?): using {fallback}; "
                          f"its masks are approximate and have no facial parts",
                          NoFaceWarning, stacklevel=2)
        return analysis


def build_analysis(raw: dict, prior: FacePrior | None = None, key: str = "") -> FaceAnalysis:
    """Turn cached MediaPipe outputs into a :class:`FaceAnalysis`, applying the fallbacks."""
    prior = prior or FacePrior()
    h, w = (int(v) for v in raw["size"])
    person = raw["person"] if raw["person"].size else None
    lm = raw["landmarks"]
    boxes, scores, kps = raw["det_boxes"], raw["det_scores"], raw["det_keypoints"]
    if lm.shape[0] == NUM_LANDMARKS:
        lm = lm.astype(np.float32)
        lo, hi = lm[:, :2].min(0), lm[:, :2].max(0)
        mesh_box = np.array([lo[0], lo[1], hi[0], hi[1]], np.float32)
        box, score = mesh_box, float("nan")
        if len(boxes):
            ious = [_iou(mesh_box, b) for b in boxes]
            best = int(np.argmax(ious))
            if ious[best] > 0.3:
                box, score = boxes[best].astype(np.float32), float(scores[best])
        eyes = np.stack([lm[list(RIGHT_EYE_CORNERS), :2].mean(0),
                         lm[list(LEFT_EYE_CORNERS), :2].mean(0)]).astype(np.float32)
        return FaceAnalysis((h, w), "mesh", lm, box, score, eyes, None, person, key)
    if len(boxes):
        best = int(np.argmax(scores))
        x0, y0, x1, y1 = (float(v) for v in boxes[best])
        bw, bh = x1 - x0, y1 - y0
        ellipse = np.array([(x0 + x1) / 2, (y0 + y1) / 2 + _BOX_CENTER_DY * bh,
                            _BOX_AXES[0] * bw, _BOX_AXES[1] * bh], np.float32)
        eyes = kps[best][[_DET_RIGHT_EYE, _DET_LEFT_EYE]].astype(np.float32)
        return FaceAnalysis((h, w), "detection", None, boxes[best].astype(np.float32),
                            float(scores[best]), eyes, ellipse, person, key)
    ellipse = np.array([prior.center[0] * w, prior.center[1] * h, prior.axes[0] * w,
                        prior.axes[1] * h], np.float32)
    box = np.array([ellipse[0] - ellipse[2], ellipse[1] - ellipse[3], ellipse[0] + ellipse[2],
                    ellipse[1] + ellipse[3]], np.float32)
    eyes = np.array([[prior.right_eye[0] * w, prior.right_eye[1] * h],
                     [prior.left_eye[0] * w, prior.left_eye[1] * h]], np.float32)
    return FaceAnalysis((h, w), "prior", None, box, float("nan"), eyes, ellipse, person, key)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


# ---- cache entry format ---------------------------------------------------------------------
# A few small arrays per entry: a JSON header (name -> dtype, shape, offset) and one
# zlib-compressed payload. Loading one costs a fraction of np.load on an .npz (a zip archive
# with one member per array), which matters when a DataLoader reads thousands per epoch.
_MAGIC = b"FDFA"


def pack_arrays(arrays: dict) -> bytes:
    header, chunks, offset = {}, [], 0
    for name, value in arrays.items():
        arr = np.asarray(value)  # (not ascontiguousarray: it turns 0-d arrays into 1-d)
        if arr.dtype.kind not in "biuf":
            raise TypeError(f"{name}: only numeric arrays are stored, got {arr.dtype}")
        header[name] = [arr.dtype.str, list(arr.shape), offset, arr.nbytes]
        chunks.append(arr.tobytes(order="C"))
        offset += arr.nbytes
    head = json.dumps(header).encode()
    return _MAGIC + struct.pack("<I", len(head)) + head + zlib.compress(b"".join(chunks), 1)


def unpack_arrays(data: bytes) -> dict:
    if data[:4] != _MAGIC:
        raise ValueError("not a face analysis cache entry")
    (head_len,) = struct.unpack("<I", data[4:8])
    header = json.loads(data[8:8 + head_len])
    payload = zlib.decompress(data[8 + head_len:])
    out = {}
    for name, (dtype, shape, offset, _nbytes) in header.items():
        out[name] = np.frombuffer(payload, dtype=np.dtype(dtype), count=int(np.prod(shape)),
                                  offset=offset).reshape(shape)
    return out
