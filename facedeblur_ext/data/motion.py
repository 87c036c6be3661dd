"""Continuous motion from one still face: sharp moments and their blur (issue 16, paper 003).

A still face is moved smoothly over the exposure: a translation along a camera-shake path
(a Boracchi-Foi style random walk read as a *time-ordered* path), plus a small in-plane rotation
and scale change that grow linearly over the exposure. ``subframes`` moments of that motion are
rendered by warping the source image (one bicubic resampling from the source, so the base
resize and the motion are not interpolated twice) into a crop that lies inside the source with
room for the motion: no border enters the crop. The blurry image is their average in linear
intensity (``ops.average_frames``, gamma CRF); with 32-64 sub-frames the blur is continuous.

``num_targets`` = N sharp targets are rendered at the centres of N equal slices of the
exposure, ``t_i = (i - 0.5) / N``, then put in FMR order (paper 003 Sec. 4.1): by the position
of the subject's left eye in the crop, which is transformed analytically from the still's one
analysis (no per-frame detection). The target of rank ``i`` gets ``u = (i - 1) / N``.

Everything is drawn from a NumPy generator, so a sample is reproducible from its seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .fmr import DEFAULT_CRF_GAMMA, control_factors, fmr_order
from .settings import settings_from_mapping

__all__ = ["MotionConfig", "MotionPath", "camera_shake_path", "render_motion_sample",
           "sample_motion"]

Range = tuple[float, float]


@dataclass
class MotionConfig:
    """What :func:`sample_motion` draws; ranges are (low, high), uniform per sample.

    Attributes:
        subframes: rendered moments averaged into the blurry image (32-64 make the blur
            continuous for paths up to ~20 px).
        path_length: length of the translation path as a fraction of the face size.
        anxiety: camera-shake randomness of the path (0: straight line).
        rotation_deg: in-plane rotation over the whole exposure, degrees (signed).
        scale_change: relative scale change over the whole exposure (signed).
        crf_gamma: camera-response gamma of the frame averaging; None averages directly.
        path_steps: random-walk samples of the path before it is resampled in time.
    """

    subframes: int = 48
    path_length: Range = (0.04, 0.18)
    anxiety: Range = (0.0, 0.6)
    rotation_deg: Range = (-4.0, 4.0)
    scale_change: Range = (-0.04, 0.04)
    crf_gamma: float | None = DEFAULT_CRF_GAMMA
    path_steps: int = 64

    def __post_init__(self) -> None:
        if self.subframes < 2:
            raise ValueError(f"subframes must be at least 2, got {self.subframes}")
        if self.path_steps < 2:
            raise ValueError(f"path_steps must be at least 2, got {self.path_steps}")
        for name in ("path_length", "anxiety", "rotation_deg", "scale_change"):
            low, high = getattr(self, name)
            if not low <= high:
                raise ValueError(f"{name} must be (low, high) with low <= high, got "
                                 f"{getattr(self, name)}")
        if self.path_length[0] < 0 or self.anxiety[0] < 0:
            raise ValueError("path_length and anxiety must be non-negative")
        if not (-0.5 < self.scale_change[0] and self.scale_change[1] < 0.5):
            raise ValueError(f"scale_change must lie in (-0.5, 0.5), got {self.scale_change}")

    @classmethod
    def from_dict(cls, values) -> MotionConfig:
        return settings_from_mapping(cls, values, "motion")


@dataclass
class MotionPath:
    """One drawn motion: positions at normalized exposure times.

    Attributes:
        knots: ``[S, 2]`` translation (x, y) in output pixels at times ``linspace(0, 1, S)``,
            centred on its mean so the blur stays on the still's position.
        rotation: total in-plane rotation over the exposure, radians (linear in time,
            centred: ``-rotation / 2`` at t = 0).
        scale_change: total relative scale change (linear in time, centred).
    """

    knots: np.ndarray
    rotation: float
    scale_change: float

    def at(self, times: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(translation [T, 2], rotation [T], scale [T]) at ``times`` in [0, 1]."""
        grid = np.linspace(0.0, 1.0, len(self.knots))
        shift = np.stack([np.interp(times, grid, self.knots[:, k]) for k in range(2)], 1)
        ramp = np.asarray(times, np.float64) - 0.5
        return shift, self.rotation * ramp, 1.0 + self.scale_change * ramp

    def shrunk(self, factor: float) -> MotionPath:
        return MotionPath(self.knots * factor, self.rotation * factor,
                          self.scale_change * factor)


def camera_shake_path(rng: np.random.Generator, steps: int, length: float,
                      anxiety: float) -> np.ndarray:
    """A time-ordered camera-shake path: ``[steps, 2]`` points, arc length ``length``.

    A random walk with inertia in the manner of Boracchi and Foi (2012): the velocity keeps
    its direction, is pulled by Gaussian kicks of size ``anxiety`` and, rarely, jerks; the
    path is then scaled to the requested length and centred on its mean.
    """
    angle = rng.uniform(0, 2 * math.pi)
    velocity = np.array([math.cos(angle), math.sin(angle)])
    points = np.zeros((steps, 2))
    for k in range(1, steps):
        kick = anxiety * rng.standard_normal(2)
        if rng.random() < 0.05 * anxiety:  # a sudden jerk
            kick += 2.0 * anxiety * rng.standard_normal(2)
        velocity = velocity + kick
        velocity /= max(np.linalg.norm(velocity), 1e-12)
        points[k] = points[k - 1] + velocity
    arc = np.linalg.norm(np.diff(points, axis=0), axis=1).sum()
    points *= length / max(arc, 1e-12)
    return points - points.mean(0)


def sample_motion(rng: np.random.Generator, face_size: float,
                  config: MotionConfig | None = None) -> MotionPath:
    """Draw one motion for a face of ``face_size`` output pixels."""
    cfg = config or MotionConfig()
    length = rng.uniform(*cfg.path_length) * face_size
    knots = camera_shake_path(rng, cfg.path_steps, length, rng.uniform(*cfg.anxiety))
    rotation = math.radians(rng.uniform(*cfg.rotation_deg))
    return MotionPath(knots, rotation, rng.uniform(*cfg.scale_change))


def _output_to_source(path: MotionPath, times: np.ndarray, centre_out: np.ndarray,
                      origin: np.ndarray, scale: float) -> np.ndarray:
    """``[T, 2, 3]`` affine maps from output pixel (x, y) to source pixel (x, y).

    At time t the still, scaled by ``scale`` and placed with its pixel ``origin`` at the crop's
    (0, 0), is rotated and scaled about the crop centre and then shifted: a source point ``p``
    appears at ``c + R S (scale * (p - origin) - c) + shift``. The inverse is returned.
    """
    shift, rot, zoom = path.at(times)
    cos, sin = np.cos(rot), np.sin(rot)
    maps = np.zeros((len(times), 2, 3))
    for k in range(len(times)):
        # forward linear part: R * zoom * scale; inverse: (R^T / (zoom * scale))
        inv = np.array([[cos[k], sin[k]], [-sin[k], cos[k]]]) / (zoom[k] * scale)
        maps[k, :, :2] = inv
        maps[k, :, 2] = origin + inv @ (-centre_out - shift[k]) + centre_out / scale
    return maps


def _source_to_output(maps: np.ndarray, point: np.ndarray) -> np.ndarray:
    """Where the source ``point`` (x, y) appears in each output frame: ``[T, 2]``."""
    out = np.zeros((len(maps), 2))
    for k, m in enumerate(maps):
        out[k] = np.linalg.solve(m[:, :2], point - m[:, 2])
    return out


def _warp(image: Tensor, maps: np.ndarray, out_hw: tuple[int, int]) -> Tensor:
    """Render ``[T, C, h, w]`` frames of ``image [C, H, W]`` through output->source maps."""
    _, height, width = image.shape
    h, w = out_hw
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64),
                            torch.arange(w, dtype=torch.float64), indexing="ij")
    pix = torch.stack([xs, ys, torch.ones_like(xs)], -1).reshape(-1, 3)  # [h*w, 3]
    src = torch.einsum("tij,pj->tpi", torch.from_numpy(maps), pix)       # [T, h*w, 2]
    # pixel centres -> normalized coordinates of grid_sample (align_corners=False)
    grid = torch.stack([(2 * src[..., 0] + 1) / width - 1, (2 * src[..., 1] + 1) / height - 1],
                       -1).reshape(len(maps), h, w, 2).to(image.dtype)
    frames = F.grid_sample(image.expand(len(maps), *image.shape), grid, mode="bicubic",
                           padding_mode="border", align_corners=False)
    return frames.clamp_(0, 1)


def _fits(maps: np.ndarray, out_hw: tuple[int, int], src_hw: tuple[int, int],
          margin: float) -> bool:
    h, w = out_hw
    corners = np.array([[0, 0, 1], [w - 1, 0, 1], [0, h - 1, 1], [w - 1, h - 1, 1]], float)
    src = np.einsum("tij,cj->tci", maps, corners)
    height, width = src_hw
    return bool((src[..., 0] >= margin).all() and (src[..., 0] <= width - 1 - margin).all()
                and (src[..., 1] >= margin).all() and (src[..., 1] <= height - 1 - margin).all())


def render_motion_sample(image: Tensor, left_eye_xy, *, num_targets: int,
                         crop_size: int | tuple[int, int],
                         rng: np.random.Generator, config: MotionConfig | None = None,
                         scale: float = 1.0, face_size: float | None = None,
                         crop_origin: tuple[float, float] | None = None,
                         target_index: int | None = None) -> dict:
    """Blur one still face by a drawn continuous motion and render its sharp moments.

    Args:
        image: ``[3, H, W]`` float tensor in [0, 1], the still face (source resolution).
        left_eye_xy: (x, y) of the subject's left eye in ``image`` pixels (as seen in the
            picture: after a flip, the mirrored right eye), or None: the crop centre's motion
            stands in for it.
        num_targets: N, the sharp moments to render.
        crop_size: output size ``s`` or ``(h, w)`` in output pixels; the crop plus the motion
            must fit inside the scaled source (the motion is shrunk until it does).
        rng: NumPy generator: the motion and, with ``crop_origin=None``, the crop position.
        config: what is drawn (:class:`MotionConfig`).
        scale: output pixels per source pixel (the base resize, applied in the same warp).
        face_size: face size in output pixels for the path length (default: the crop's short
            side times 0.75).
        crop_origin: source pixel (x, y) at the crop's top-left corner at rest; None centres
            the crop when ``rng`` is not asked for a position, else draws it where it fits.
        target_index: render only the target of this FMR rank (0-based) instead of all N
            (training draws one); the returned ``moments`` then has one frame.

    Returns:
        dict with ``blurry`` ``[3, h, w]``, ``moments`` ``[N or 1, 3, h, w]`` in FMR order,
        ``u`` ``[N or 1]`` float32 (``(rank - 1) / N``), ``times`` ``[N or 1]`` (their exposure
        times in [0, 1]), ``eye_xy`` ``[N, 2]`` (the left eye at the N targets, time order).
    """
    cfg = config or MotionConfig()
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"image must be [3, H, W], got {list(image.shape)}")
    if num_targets < 1:
        raise ValueError(f"num_targets must be at least 1, got {num_targets}")
    h, w = (crop_size, crop_size) if isinstance(crop_size, int) else tuple(crop_size)
    src_h, src_w = image.shape[1:]
    view_w, view_h = (src_w - 1) * scale, (src_h - 1) * scale
    if w > view_w - 2 or h > view_h - 2:
        raise ValueError(f"crop {h}x{w} does not fit inside the {src_h}x{src_w} source at scale "
                         f"{scale:.3g} with room for motion")
    if crop_origin is None:
        # the crop's top-left corner in source pixels, anywhere it fits (centred when the rng
        # draws 0.5)
        slack_x, slack_y = (view_w - w) / scale, (view_h - h) / scale
        origin = np.array([rng.uniform(0.25, 0.75) * slack_x, rng.uniform(0.25, 0.75) * slack_y])
    else:
        origin = np.asarray(crop_origin, np.float64)
    centre = np.array([(w - 1) / 2, (h - 1) / 2])
    path = sample_motion(rng, face_size if face_size is not None else 0.75 * min(h, w), cfg)
    sub_times = (np.arange(cfg.subframes) + 0.5) / cfg.subframes
    # Bicubic taps reach 2 source pixels past the sample point.
    for _ in range(30):
        maps = _output_to_source(path, sub_times, centre, origin, scale)
        if _fits(maps, (h, w), (src_h, src_w), margin=2.0):
            break
        path = path.shrunk(0.8)
    else:
        path = path.shrunk(0.0)
        maps = _output_to_source(path, sub_times, centre, origin, scale)
        if not _fits(maps, (h, w), (src_h, src_w), margin=0.0):
            raise ValueError("the crop does not fit inside the source at this origin")

    target_times = (np.arange(num_targets) + 0.5) / num_targets
    target_maps = _output_to_source(path, target_times, centre, origin, scale)
    anchor = (np.asarray(left_eye_xy, np.float64) if left_eye_xy is not None
              else origin + centre / scale)
    eye_xy = _source_to_output(target_maps, anchor)
    order = fmr_order(eye_xy)
    u = control_factors(num_targets)
    if target_index is not None:
        if not 0 <= target_index < num_targets:
            raise ValueError(f"target_index must be in [0, {num_targets}), got {target_index}")
        order, u = order[target_index:target_index + 1], u[target_index:target_index + 1]

    from ..ops import average_frames

    frames = _warp(image.float(), maps, (h, w))
    blurry = average_frames(frames[None], crf_gamma=cfg.crf_gamma)[0]
    moments = _warp(image.float(), target_maps[order], (h, w))
    return {"blurry": blurry, "moments": moments,
            "u": torch.from_numpy(u.astype(np.float32)),
            "times": torch.from_numpy(target_times[order].astype(np.float32)),
            "eye_xy": torch.from_numpy(eye_xy.astype(np.float32))}
