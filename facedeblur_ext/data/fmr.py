"""Frame averaging with a camera response function and facial motion-based reordering (FMR).

**Blur from frames** (paper 003 Eq. 5, GoPro/REDS practice): a blurry image is the average of
``N`` consecutive sharp frames in linear intensity, ``b = g(mean_i g^-1(s_i))``, with ``g`` the
camera response function; the usual stand-in is a gamma curve ``g(x) = x^(1/2.2)``.

**FMR** (paper 003 Sec. 4.1): the sharp frames of one blurry sample are put in the order of the
position ``(x, y)`` of the subject's left eye: (c1) ascending x; (c2) ties by ascending y;
(c3) ties by ascending time. After sorting, the frame at 1-based rank ``i`` of ``N`` gets the
control factor ``u = (i - 1) / N``, so ``u`` runs over ``0, 1/N, ..., (N-1)/N`` (it never
reaches 1; for odd ``N`` the middle frame has ``u = (N-1)/(2N)``, slightly below 0.5).

Positions are compared on a grid of ``grid`` pixels (1 px by default): sub-pixel landmark
jitter should not decide the order, and only on a grid can ties (c2, c3) occur as the paper
describes. The eye is the subject's left eye *as seen in the frames that the network receives*:
after a horizontal flip that is the source's right eye, mirrored (see
:func:`left_eye_after_transform`), so the rule "u = 0 is the leftmost eye position" holds for
flipped samples too and the order is recomputed instead of mirrored.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .face import FaceAnalysis
from .geometry import CropTransform

DEFAULT_CRF_GAMMA = 2.2


def crf_average(frames, gamma: float | None = DEFAULT_CRF_GAMMA):
    """``g(mean(g^-1(frames)))`` over the first axis with ``g(x) = x^(1/gamma)``.

    Args:
        frames: ``[N, ...]`` float array or tensor in [0, 1].
        gamma: CRF gamma; None or 1 averages the values directly.

    Returns:
        ``[...]`` in [0, 1], same type as ``frames``.
    """
    if gamma is None or gamma == 1:
        return frames.mean(0)
    linear = frames.clip(0, 1) ** gamma
    return linear.mean(0) ** (1.0 / gamma)


def control_factors(n: int) -> np.ndarray:
    """``u = (i - 1) / N`` for the 1-based ranks ``i = 1..N`` (float64 ``[N]``)."""
    if n < 1:
        raise ValueError(f"need at least one frame, got {n}")
    return np.arange(n, dtype=np.float64) / n


def fmr_order(eye_xy: np.ndarray, grid: float | None = 1.0) -> np.ndarray:
    """FMR permutation of time-ordered frames.

    Args:
        eye_xy: ``[N, 2]`` left-eye positions (x, y) in time order.
        grid: comparison grid in pixels (positions are floored to it); None compares raw
            floating-point positions.

    Returns:
        ``[N]`` int64 time indices in FMR order: ``frames[order[i - 1]]`` is the frame of rank
        ``i`` and control factor ``(i - 1) / N``.
    """
    pos = np.asarray(eye_xy, dtype=np.float64)
    if pos.ndim != 2 or pos.shape[1] != 2:
        raise ValueError(f"eye_xy must be [N, 2], got {list(pos.shape)}")
    if not np.isfinite(pos).all():
        raise ValueError("eye positions must be finite (fill gaps with fill_missing first)")
    if grid is not None:
        if grid <= 0:
            raise ValueError(f"grid must be positive, got {grid}")
        pos = np.floor(pos / grid)
    time = np.arange(len(pos))
    # np.lexsort sorts by the last key first: x, then y, then time.
    return np.lexsort((time, pos[:, 1], pos[:, 0])).astype(np.int64)


def fill_missing(eye_xy: np.ndarray, valid: Sequence[bool]) -> np.ndarray:
    """Fill the positions of frames where no face was found by linear interpolation in time
    (nearest valid value at the ends). Raises ValueError when no frame is valid."""
    pos = np.asarray(eye_xy, dtype=np.float64).copy()
    ok = np.asarray(valid, dtype=bool)
    if not ok.any():
        raise ValueError("no frame has a face")
    if ok.all():
        return pos
    t = np.arange(len(pos))
    for axis in range(2):
        pos[~ok, axis] = np.interp(t[~ok], t[ok], pos[ok, axis])
    return pos


def left_eye_after_transform(analysis: FaceAnalysis, transform: CropTransform) -> np.ndarray:
    """The subject's left eye (x, y) in the output of ``transform``.

    A horizontal flip mirrors the person: the left eye of the person in the flipped picture is
    the source's *right* eye, mirrored. Scale and crop keep the order of x and y, so only the
    flip changes which eye is used.
    """
    eye = analysis.right_eye if transform.flip else analysis.left_eye
    return transform.apply_points(eye)


def _inverse_crf_table(gamma: float | None) -> np.ndarray:
    levels = np.arange(256, dtype=np.float64) / 255.0
    return (levels if gamma is None or gamma == 1 else levels ** gamma).astype(np.float32)


def crf_average_uint8(frames: Sequence[np.ndarray],
                      gamma: float | None = DEFAULT_CRF_GAMMA) -> np.ndarray:
    """:func:`crf_average` for ``uint8`` frames: ``g^-1`` through a 256-entry table (exact for
    8-bit input and much cheaper than a power per pixel), ``g`` once on the mean.

    Returns:
        float32 image in [0, 1] with the frames' shape.
    """
    import cv2

    if len(frames) == 0:
        raise ValueError("need at least one frame")
    table = _inverse_crf_table(gamma)
    shape = frames[0].shape
    acc = None
    for frame in frames:
        if frame.dtype != np.uint8 or frame.shape != shape:
            raise ValueError("frames must be uint8 arrays of one shape")
        # cv2.LUT maps uint8 through a float32 table in one (vectorized) pass
        linear = cv2.LUT(frame, table)
        acc = linear if acc is None else cv2.add(acc, linear, dst=acc)
    acc = np.asarray(acc, np.float32).reshape(shape)
    acc *= np.float32(1.0 / len(frames))
    if gamma is not None and gamma != 1:
        acc = cv2.pow(acc, 1.0 / gamma).reshape(shape)
    return acc
