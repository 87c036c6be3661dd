"""The papers' evaluation protocols, run on our data.

Every protocol degrades each sharp test image (or video window) once, deterministically from
``(seed, index)`` through the data pipeline's datasets, and feeds the *same* degraded input to
every row, so rows differ only in the method.

* :func:`run_kernel_protocol`: kernel blur on still faces. ``blur="trajectory"`` is SNADNet's
  CelebA protocol [004 Sec. III-A]: a random camera-shake trajectory kernel of size 13..29
  (odd sizes, one drawn per image) plus Gaussian noise sigma 0.03, quantized to 8 bits.
  ``blur="motion45"`` is its CelebA-HQ protocol: a linear motion of 24 px (the longest line a
  25 x 25 kernel holds) at 45 degrees, no noise. Tables: all images, and per kernel size.
* :func:`run_frames_protocol`: CFMD-GAN's [003 Sec. 5.1]: blurry images averaged from
  N = 5..13 consecutive video frames through a gamma-2.2 camera response, sharp frames in FMR
  order with ``u = (i - 1) / N``. Two tables: *single-to-single* (the temporally central sharp
  frame vs the method's single output; CFMD-GAN at ``u = 0.5``, as Tables 2-3) and *per frame
  count* (every sharp frame of the window vs the output for its ``u``; a method without
  learned moments is compared with every frame by its single output; Table 4).
* :func:`run_face_region_protocol`: the thesis's whole-image vs face-only blur [002 Table
  5.4]: one random linear-motion kernel per image (length 3..27 px capped to the kernel,
  angle 0..180 degrees, sizes 13..29), applied to the whole image or only inside the feathered
  MediaPipe face mask; both test sets share crop and kernel per image.
* :func:`run_moments_protocol` (issue 16): continuous motion from each still test face, its
  N = 5, 7, 9 sharp moments in FMR order against the output for each ``u``, in Table 4's
  layout, per moment and at the end moments.
* ``run_kernel_protocol(blur="linear")`` (issue 16): linear motion 7-15 px at any angle plus
  noise 0.01; tables: all images, and per 2-px length bin.
* :func:`run_video_protocol`: real blurry/sharp face video pairs (Ren et al. ICCV 2019),
  resized and cropped to the CelebA test faces' scale.
* :func:`run_sweep_protocol`: u-sweep grids and GIFs (pictures, no table).

Each returns a plain dict (JSON-ready except for the example images, see
:mod:`facedeblur_ext.evaluation.report`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .methods import CENTRE_U, Method
from .scoring import SHARP_ROW, Accumulator, MetricSuite, quantize

__all__ = [
    "FRAME_COUNTS",
    "KERNEL_SIZES",
    "LINEAR_LENGTHS",
    "LINEAR_NOISE_SIGMA",
    "MOMENT_COUNTS",
    "TRAJECTORY_NOISE_SIGMA",
    "EvalSettings",
    "face_region_blur_config",
    "kernel_blur_config",
    "run_face_region_protocol",
    "run_frames_protocol",
    "run_kernel_protocol",
    "run_moments_protocol",
    "run_sweep_protocol",
    "run_video_protocol",
]

#: SNADNet's CelebA kernels: 13 x 13 to 29 x 29 [004 Sec. III-A] (odd sizes: a centred kernel).
KERNEL_SIZES = tuple(range(13, 30, 2))
TRAJECTORY_NOISE_SIGMA = 0.03
#: The linear-motion protocol (issue 16): lengths 7-15 px at any angle on the 128 px faces
#: (a 17 x 17 kernel holds them), noise 0.01, per-length bins of 2 px in its second table.
LINEAR_LENGTHS = (7, 15)
LINEAR_NOISE_SIGMA = 0.01
#: CFMD-GAN's frame counts [003 Table 1, 4].
FRAME_COUNTS = (5, 7, 9, 11, 13)
#: Moments per blurry face in the moments protocol (issue 16).
MOMENT_COUNTS = (5, 7, 9)
#: The moments protocol's blur is the motion alone: no noise, JPEG or second round; the
#: degradation still rounds to 8 bits.
CLEAN_DEGRADATION = {"noise_sigma": (0.0, 0.0), "poisson_prob": 0.0, "jpeg_prob": 0.0,
                     "second_order_prob": 0.0}
#: Side of the video protocol's aligned face crops (the CelebA test faces' scale).
VIDEO_FACE_SIZE = 128


@dataclass
class EvalSettings:
    """What every protocol shares.

    Attributes:
        device: where methods and LPIPS run.
        seed: base seed of the degradations (same seed, same inputs).
        limit: evaluate only the first ``limit`` images (per frame count for the frames
            protocol); None for all.
        size: square evaluation size: images are resized (short side) and centre-cropped to
            it; None keeps still images at their size (CelebA test: 128).
        workers: DataLoader workers preparing the degraded inputs.
        examples: how many inputs to keep for the example grids.
        progress: show progress bars.
        analyzer: shared ``FaceAnalyzer`` (None: the default one, with its disk cache).
    """

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    seed: int = 0
    limit: int | None = None
    size: int | None = None
    workers: int = 0
    examples: int = 4
    progress: bool = True
    analyzer: object = None


def kernel_blur_config(blur: str = "trajectory", kernel_sizes: Sequence[int] = KERNEL_SIZES,
                       noise_sigma: float = TRAJECTORY_NOISE_SIGMA):
    """The ``BlurConfig`` of :func:`run_kernel_protocol` for ``blur`` (module docstring)."""
    from facedeblur_ext.nn import BlurConfig

    off = dict(motion_prob=0.0, trajectory_prob=0.0, gaussian_prob=0.0, defocus_prob=0.0)
    if blur == "trajectory":
        return BlurConfig(**{**off, "trajectory_prob": 1.0}, kernel_sizes=tuple(kernel_sizes),
                          noise_sigma=(noise_sigma, noise_sigma), quantize=True)
    if blur == "motion45":
        return BlurConfig(**{**off, "motion_prob": 1.0}, kernel_sizes=(25,),
                          motion_length=(24.0, 24.0), motion_angle=(45.0, 45.0),
                          noise_sigma=(noise_sigma, noise_sigma), quantize=True)
    if blur == "linear":
        low, high = LINEAR_LENGTHS
        return BlurConfig(**{**off, "motion_prob": 1.0}, kernel_sizes=(high + 2,),
                          motion_length=(float(low), float(high)), motion_angle=(0.0, 180.0),
                          noise_sigma=(noise_sigma, noise_sigma), quantize=True)
    raise ValueError(f"blur must be 'trajectory', 'motion45' or 'linear', got {blur!r}")


def face_region_blur_config(kernel_sizes: Sequence[int] = KERNEL_SIZES, noise_sigma: float = 0.0):
    """The thesis's random linear motion (module docstring) as a ``BlurConfig``."""
    from facedeblur_ext.nn import BlurConfig

    return BlurConfig(motion_prob=1.0, trajectory_prob=0.0, gaussian_prob=0.0, defocus_prob=0.0,
                      kernel_sizes=tuple(kernel_sizes), motion_length=(3.0, 27.0),
                      motion_angle=(0.0, 180.0), noise_sigma=(noise_sigma, noise_sigma),
                      quantize=True, mask_prob=1.0)


# ---------------------------------------------------------------------------- helpers


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(method: Method, blurry: Tensor, device: torch.device, **kwargs) -> tuple[Tensor, float]:
    _sync(device)
    start = time.perf_counter()
    with torch.no_grad():
        out = method(blurry, **kwargs)
    _sync(device)
    return out.float().clamp(0, 1), time.perf_counter() - start


def _restores_moments(method: Method) -> bool:
    """Whether ``method`` restores each moment at its ``u`` (a model that learned moments)."""
    return method.continuous and bool(getattr(method, "moments", False))


def _moment_outputs(method: Method, blurry: Tensor, u: Sequence[float],
                    device: torch.device) -> tuple[Tensor, float, int]:
    """What is compared with the sharp moments at ``u`` of one blurry image ``[1, 3, h, w]``.

    A model that learned moments restores each at its ``u`` (one batch); any other method
    gives one output, which stands for every moment (paper 003 compares single-output methods
    so). Returns ``([len(u), 3, h, w], seconds, images restored)``.
    """
    if _restores_moments(method):
        out, seconds = _timed(method, blurry, device, u=list(u))
        return out, seconds, len(u)
    out, seconds = _timed(method, blurry, device)
    return out.expand(len(u), -1, -1, -1), seconds, 1


def _measure(suite: MetricSuite, out: Tensor, ref: Tensor) -> tuple[dict, Tensor | None]:
    """Per-image scores of ``out`` against ``ref`` and, for the set metrics, its features."""
    return suite.score(out, ref), (suite.features(out) if suite.wants_features else None)


def _record(acc: Accumulator, row: str, groups, measured: tuple[dict, Tensor | None],
            select: int | None = None) -> None:
    """Add measured values (only image ``select`` of the batch, when given) to ``groups``."""
    scores, features = measured
    if select is not None:
        scores = {k: v[select:select + 1] for k, v in scores.items()}
        features = None if features is None else features[select:select + 1]
    acc.add(row, groups, scores)
    if features is not None:
        acc.add_features(row, groups, features)


def _score(acc: Accumulator, suite: MetricSuite, row: str, groups, out: Tensor,
           ref: Tensor) -> None:
    _record(acc, row, groups, _measure(suite, out, ref))


def _reference(acc: Accumulator, suite: MetricSuite, groups, ref: Tensor) -> None:
    """The sharp references of the set metrics (FID, KID) of ``groups``."""
    if suite.wants_features:
        acc.add_features(SHARP_ROW, groups, suite.features(ref))


def _to_uint8(image: Tensor) -> np.ndarray:
    """[3, H, W] in [0, 1] -> [H, W, 3] uint8."""
    return quantize(image.float()).mul(255).round().byte().permute(1, 2, 0).cpu().numpy()


def _progress(iterable, total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, disable=not enabled, unit="img",
                dynamic_ncols=True)


def _loader(dataset, limit: int | None, workers: int):
    from torch.utils.data import DataLoader, Subset

    n = len(dataset) if limit is None else min(int(limit), len(dataset))
    subset = Subset(dataset, range(n))
    return DataLoader(subset, batch_size=None, shuffle=False, num_workers=int(workers)), n


def _check_images_folder(data: str | Path) -> Path:
    path = Path(data)
    if not path.exists():
        raise FileNotFoundError(
            f"test images not found: {path} does not exist. Pass --data DIR, a folder of sharp "
            "face images (the 1000-image CelebA test split is "
            "<shared data>/faces/celeba_dic_test128)")
    return path


def _rows(methods: Sequence[Method], acc: Accumulator, protocol: str) -> list[dict]:
    rows = []
    for m in methods:
        row = {"name": m.name, "description": m.description,
               "ms_per_image": acc.ms_per_image(m.name)}
        if protocol in m.notes:
            row["note"] = m.notes[protocol]
        rows.append(row)
    return rows


def _table(name: str, title: str, group_label: str | None, groups: Sequence, methods,
           acc: Accumulator, layout: str | None = None) -> dict:
    """A result table; ``layout="stacked"`` is paper 003 Table 4's (a line per method and
    group, see :mod:`.report`)."""
    cells = {str(g): {m.name: acc.summary(m.name, g) for m in methods
                      if (m.name, g) in acc.values} for g in groups}
    table = {"name": name, "title": title, "group_label": group_label,
             "groups": [str(g) for g in groups], "cells": cells}
    if layout:
        table["layout"] = layout
    return table


def _kernel_dataset(data: Path, config, settings: EvalSettings, blur_region: str, seed: int):
    from facedeblur_ext.data import KernelBlurDataset
    from facedeblur_ext.nn import BlurSynthesizer

    return KernelBlurDataset(
        data, BlurSynthesizer(config, generator=torch.Generator()), blur_region=blur_region,
        analyzer=settings.analyzer, crop_size=settings.size,
        base_size="crop" if settings.size else None, augment=False, seed=seed,
        return_blur_info=True)


def _length_bin(length: float, width: int = 2) -> str:
    """The ``width``-pixel bin of a motion length, from the protocol's shortest length."""
    low, high = LINEAR_LENGTHS
    start = low + width * min(int((length - low) // width), (high - low - 1) // width)
    return f"{start}-{start + width}"


def _number_key(label) -> float:
    return float(str(label).split("-")[0])


def _example(name: str, sharp: Tensor, blurry: Tensor, outputs: dict[str, Tensor],
             extra: dict | None = None) -> dict:
    return {"name": name, "sharp": _to_uint8(sharp), "blurry": _to_uint8(blurry),
            "outputs": {k: _to_uint8(v) for k, v in outputs.items()}, **(extra or {})}


# ---------------------------------------------------------------------------- protocols


def run_kernel_protocol(data: str | Path, methods: Sequence[Method], suite: MetricSuite,
                        settings: EvalSettings, *, blur: str = "trajectory",
                        kernel_sizes: Sequence[int] = KERNEL_SIZES,
                        noise_sigma: float | None = None) -> dict:
    """Kernel blur on still faces (module docstring).

    Args:
        data: folder of sharp face images.
        methods: the rows.
        suite: the metrics.
        settings: shared settings.
        blur: ``"trajectory"`` or ``"motion45"``.
        kernel_sizes: kernel sizes drawn from (trajectory).
        noise_sigma: Gaussian noise (default 0.03 for trajectory, 0 for motion45).
    """
    data = _check_images_folder(data)
    if noise_sigma is None:
        noise_sigma = {"trajectory": TRAJECTORY_NOISE_SIGMA,
                       "linear": LINEAR_NOISE_SIGMA}.get(blur, 0.0)
    config = kernel_blur_config(blur, kernel_sizes, noise_sigma)
    protocol = "linear" if blur == "linear" else "kernel"
    dataset = _kernel_dataset(data, config, settings, "whole", settings.seed)
    loader, n = _loader(dataset, settings.limit, settings.workers)
    acc, examples, groups_seen = Accumulator(), [], set()
    device = settings.device
    for index, sample in enumerate(_progress(loader, n, f"kernel blur ({blur})",
                                             settings.progress)):
        sharp = sample["sharp"][None].to(device)
        blurry = sample["blurry"][None].to(device)
        info = sample["blur_info"]
        kernels = info["kernels"].to(device)
        if blur == "linear":
            group = _length_bin(float(info["params"][0]["length"]))
            caption = f"{float(info['params'][0]['length']):.1f} px line"
        else:
            group = int(info["kernel_sizes"][0])
            caption = f"{group}x{group} kernel"
        groups_seen.add(group)
        noise = float(info["noise_sigma"][0])
        outputs = {}
        _reference(acc, suite, ("all", group), sharp)
        for m in methods:
            extra = {"kernels": kernels, "noise_sigma": noise} if m.needs_kernel else {}
            out, seconds = _timed(m, blurry, device, **extra)
            _score(acc, suite, m.name, ("all", group), out, sharp)
            acc.add_time(m.name, seconds, 1)
            if index < settings.examples:
                outputs[m.name] = out[0]
        if index < settings.examples:
            examples.append(_example(Path(dataset.files[index]).name, sharp[0], blurry[0],
                                     outputs, {"caption": caption}))
    if n == 0:
        raise ValueError(f"no images to evaluate in {data}")
    if blur == "linear":
        low, high = LINEAR_LENGTHS
        title = (f"Linear motion blur: lengths {low}-{high} px, any angle, noise sigma "
                 f"{noise_sigma:g}")
        by_group = _table("by_length", "per motion length (px)", "length",
                          sorted(groups_seen, key=_number_key), methods, acc)
        kernel_info = {"kernel": f"linear motion, length U({low}, {high}) px, angle "
                                 "U(0, 180) deg, anti-aliased line", "kernel_size": high + 2}
    else:
        what = ("trajectory kernels 13-29 + noise 0.03 (SNADNet CelebA protocol)"
                if blur == "trajectory" and noise_sigma == TRAJECTORY_NOISE_SIGMA
                else f"{blur} kernels, noise sigma {noise_sigma:g}")
        title = f"Kernel blur: {what}"
        by_group = _table("by_kernel_size", "per kernel size", "kernel size",
                          sorted(groups_seen), methods, acc)
        kernel_info = {"kernel_sizes": list(kernel_sizes) if blur == "trajectory" else [25]}
    return {
        "protocol": protocol,
        "title": title,
        "settings": {"data": str(data), "images": n, "blur": blur, **kernel_info,
                     "noise_sigma": noise_sigma, "quantized": True, "seed": settings.seed,
                     "size": settings.size or "native"},
        "rows": _rows(methods, acc, protocol),
        "tables": [_table("all", f"all {n} images", None, ["all"], methods, acc), by_group],
        "examples": examples,
    }


def run_face_region_protocol(data: str | Path, methods: Sequence[Method], suite: MetricSuite,
                             settings: EvalSettings, *,
                             kernel_sizes: Sequence[int] = KERNEL_SIZES,
                             noise_sigma: float = 0.0) -> dict:
    """Whole-image vs face-only linear motion blur (thesis 002 Table 5.4)."""
    data = _check_images_folder(data)
    config = face_region_blur_config(kernel_sizes, noise_sigma)
    # Same seed for both: the same crop and kernel for each image, only the blur region differs.
    whole = _kernel_dataset(data, config, settings, "whole", settings.seed)
    face = _kernel_dataset(data, config, settings, "face", settings.seed)
    loader_w, n = _loader(whole, settings.limit, settings.workers)
    loader_f, _ = _loader(face, settings.limit, settings.workers)
    acc, examples = Accumulator(), []
    device = settings.device
    no_face = 0
    pairs = zip(loader_w, loader_f)
    for index, (sw, sf) in enumerate(_progress(pairs, n, "whole vs face-only blur",
                                               settings.progress)):
        sharp = sw["sharp"][None].to(device)
        no_face += int(not bool(sw["face_found"]))
        outputs = {}
        _reference(acc, suite, ("whole image", "face only"), sharp)
        for region, sample in (("whole image", sw), ("face only", sf)):
            blurry = sample["blurry"][None].to(device)
            info = sample["blur_info"]
            kernels = info["kernels"].to(device)
            noise = float(info["noise_sigma"][0])
            mask = sample["face_mask"][None].to(device) if region == "face only" else None
            for m in methods:
                extra = ({"kernels": kernels, "noise_sigma": noise, "mask": mask}
                         if m.needs_kernel else {})
                out, seconds = _timed(m, blurry, device, **extra)
                _score(acc, suite, m.name, (region,), out, sharp)
                acc.add_time(m.name, seconds, 1)
                if index < settings.examples and region == "face only":
                    outputs[m.name] = out[0]
            if index < settings.examples and region == "face only":
                examples.append(_example(Path(face.files[index]).name, sharp[0], blurry[0],
                                         outputs, {"caption": "face-only blur"}))
    if n == 0:
        raise ValueError(f"no images to evaluate in {data}")
    return {
        "protocol": "face_region",
        "title": "Whole-image vs face-only motion blur (thesis 002 Table 5.4)",
        "settings": {"data": str(data), "images": n, "kernel": "linear motion, length 3-27 px "
                     "(capped to the kernel), angle 0-180 deg", "kernel_sizes": list(kernel_sizes),
                     "noise_sigma": noise_sigma, "quantized": True, "seed": settings.seed,
                     "face_mask": "MediaPipe face mesh (skin + facial parts), feathered",
                     "images_without_face_mesh": no_face, "size": settings.size or "native"},
        "rows": _rows(methods, acc, "face_region"),
        "tables": [_table("by_region", "test set", "blur region", ["whole image", "face only"],
                          methods, acc)],
        "examples": examples,
    }


def run_frames_protocol(sources: str | Path | Sequence[str | Path], methods: Sequence[Method],
                        suite: MetricSuite, settings: EvalSettings, *,
                        frame_counts: Sequence[int] = FRAME_COUNTS, size: int = 256,
                        stride: int | None = None, crf_gamma: float | None = 2.2) -> dict:
    """Frame-averaged blur from videos: single-to-single and per-frame-count tables.

    Args:
        sources: videos, frame folders or trees of them (``FrameStackDataset``).
        methods: the rows; methods that need a kernel are left out (frame averaging has
            none) and say so.
        suite, settings: metrics and shared settings (``settings.limit``: windows per frame
            count; ``settings.size`` overrides ``size``).
        frame_counts: the N values (default 5, 7, 9, 11, 13).
        size: square evaluation size (the videos' short side is resized to it, centre crop).
        stride: first-frame distance between windows (default the largest N: windows do not
            overlap and start at the same frames for every N).
        crf_gamma: camera response gamma of the averaging.
    """
    from facedeblur_ext.data import FrameStackDataset

    paths = [sources] if isinstance(sources, (str, Path)) else list(sources)
    if not paths:
        raise FileNotFoundError("no video sources given; pass --videos PATH")
    for p in paths:
        if not Path(p).exists():
            raise FileNotFoundError(
                f"video source not found: {p} does not exist. Pass --videos with video files "
                "or folders of frames (e.g. <shared data>/face_video/hdtf_via_sadtalker)")
    size = settings.size or size
    stride = stride or max(frame_counts)
    usable = [m for m in methods if not m.needs_kernel]
    for m in methods:
        if m.needs_kernel:
            m.notes["frames"] = "not applicable: frame-averaged blur has no kernel"
    s2s, per_n = Accumulator(), Accumulator()
    examples, windows = [], {}
    device = settings.device
    for n_frames in frame_counts:
        dataset = FrameStackDataset(paths, num_frames=int(n_frames), stride=stride,
                                    crf_gamma=crf_gamma, crop_size=size, base_size="crop",
                                    augment=False, return_stack=True, return_masks=False,
                                    seed=settings.seed, analyzer=settings.analyzer)
        loader, n = _loader(dataset, settings.limit, settings.workers)
        windows[n_frames] = n
        for index, sample in enumerate(_progress(loader, n, f"frames N={n_frames}",
                                                 settings.progress)):
            blurry = sample["blurry"][None].to(device)
            sharp = sample["sharp"].to(device)            # [N, 3, h, w], FMR order
            u = [float(v) for v in sample["u"]]
            frame_ids = sample["frame_indices"]
            centre_frame = int(frame_ids.min()) + n_frames // 2  # temporal middle
            centre = int((frame_ids == centre_frame).nonzero()[0, 0])
            outputs = {}
            _reference(per_n, suite, (n_frames, "all"), sharp)
            _reference(s2s, suite, ("all", n_frames), sharp[centre:centre + 1])
            for m in usable:
                frames, seconds, count = _moment_outputs(m, blurry, u, device)
                if _restores_moments(m):
                    single, t = _timed(m, blurry, device, u=CENTRE_U)
                    seconds, count = seconds + t, count + 1
                else:
                    single = frames[:1]
                _score(per_n, suite, m.name, (n_frames, "all"), frames, sharp)
                _score(s2s, suite, m.name, ("all", n_frames), single, sharp[centre:centre + 1])
                per_n.add_time(m.name, seconds, count)
                s2s.add_time(m.name, seconds, count)
                if index == 0 and len(examples) < settings.examples:
                    outputs[m.name] = single[0]
            if index == 0 and len(examples) < settings.examples:
                examples.append(_example(f"N={n_frames} window 0", sharp[centre], blurry[0],
                                         outputs, {"caption": f"{n_frames} averaged frames"}))
    total = sum(windows.values())
    if total == 0:
        raise ValueError(f"no frame windows in {paths}")
    counts = list(frame_counts)
    return {
        "protocol": "frames",
        "title": "Frame-averaged blur from videos (CFMD-GAN protocol, paper 003)",
        "settings": {"sources": [str(p) for p in paths], "frame_counts": counts,
                     "windows_per_count": {str(k): v for k, v in windows.items()},
                     "size": size, "stride": stride, "crf_gamma": crf_gamma,
                     "fmr": "sharp frames ordered by the left eye position (MediaPipe), "
                            "u = (i - 1) / N",
                     "single_to_single_target": "temporally central sharp frame; "
                                                f"continuous models at u = {CENTRE_U}",
                     "seed": settings.seed},
        "rows": _rows(methods, per_n, "frames"),
        "tables": [
            _table("single_to_single", f"single-to-single, centre frame ({total} blurry images)",
                   None, ["all"], usable, s2s),
            _table("single_to_single_by_count", "single-to-single per frame count",
                   "averaged frames", counts, usable, s2s),
            _table("per_frame_count", "all GT frames per frame count (paper 003 Table 4)",
                   "averaged frames", [*counts, "all"], usable, per_n, layout="stacked"),
        ],
        "examples": examples,
    }


def _not_applicable(methods: Sequence[Method], protocol: str, why: str) -> list[Method]:
    """The methods a kernel-free protocol can run; the others get a note saying ``why``."""
    for m in methods:
        if m.needs_kernel:
            m.notes[protocol] = f"not applicable: {why}"
    return [m for m in methods if not m.needs_kernel]


def _moments_dataset(data: Path, settings: EvalSettings, num_targets: int):
    """Motion from the still faces of ``data`` with all ``num_targets`` moments, no noise."""
    from facedeblur_ext.data import MotionBlurMixDataset

    return MotionBlurMixDataset(
        data, motion_prob=1.0, num_targets=(num_targets, num_targets), return_moments=True,
        degradation=CLEAN_DEGRADATION, analyzer=settings.analyzer,
        crop_size=settings.size - 16 if settings.size else None, base_size=settings.size,
        augment=False, seed=settings.seed)


def run_moments_protocol(data: str | Path, methods: Sequence[Method], suite: MetricSuite,
                         settings: EvalSettings, *,
                         moment_counts: Sequence[int] = MOMENT_COUNTS) -> dict:
    """Motion from still faces: every sharp moment against the method's output for it.

    Each test face is moved by a seeded continuous motion (:mod:`facedeblur_ext.data.motion`,
    the training data's defaults) and averaged into the blurry image (8-bit, no noise); its
    N sharp moments, in FMR order with ``u = (i - 1) / N``, are the ground truth. A model
    that learned moments restores each at its ``u``; any other method's single output is
    compared with every moment, which shows what the ordering adds. The crop is the face's
    centre, 16 px smaller than the image (112 x 112 for the 128 px CelebA test faces), so the
    motion never brings a border in.

    Tables: paper 003 Table 4's layout (all moments per N and over all N), the end moments
    (``u = 0`` and ``u = (N - 1) / N``, over all N) and one table per N with a column per
    moment.

    Args:
        data: folder of sharp face images.
        methods: the rows (methods that need a kernel are left out and say so).
        suite, settings: metrics and shared settings (``settings.limit``: faces per N;
            ``settings.size``: resize the short side to it first).
        moment_counts: the N values.
    """
    from dataclasses import asdict

    from facedeblur_ext.data.fmr import control_factors
    from facedeblur_ext.data.motion import MotionConfig

    from .scoring import SHARP_ROW

    data = _check_images_folder(data)
    counts = [int(n) for n in moment_counts]
    if not counts or min(counts) < 1:
        raise ValueError(f"moment counts must be at least 1, got {list(moment_counts)}")
    usable = _not_applicable(methods, "moments", "motion blur from a still has no kernel")
    first, last = "first (u = 0)", "last (u = (N - 1) / N)"
    by_count, ends = Accumulator(), Accumulator()
    per_moment = {n: Accumulator() for n in counts}
    examples, faces = [], {}
    device = settings.device
    for n_targets in counts:
        dataset = _moments_dataset(data, settings, n_targets)
        loader, n = _loader(dataset, settings.limit, settings.workers)
        faces[n_targets] = n
        labels = [f"{v:.3f}" for v in control_factors(n_targets)]
        for index, sample in enumerate(_progress(loader, n, f"moments N={n_targets}",
                                                 settings.progress)):
            blurry = sample["blurry"][None].to(device)
            moments = sample["moments"].to(device)
            u = [float(v) for v in sample["moment_u"]]
            where = [(per_moment[n_targets], (label,), i) for i, label in enumerate(labels)]
            where += [(ends, (first,), 0), (ends, (last,), n_targets - 1)]
            if suite.wants_features:
                sharp_features = suite.features(moments)
                by_count.add_features(SHARP_ROW, (n_targets, "all"), sharp_features)
                for acc, groups, i in where:
                    acc.add_features(SHARP_ROW, groups, sharp_features[i:i + 1])
            outputs = {}
            for m in usable:
                out, seconds, count = _moment_outputs(m, blurry, u, device)
                measured = _measure(suite, out, moments)
                _record(by_count, m.name, (n_targets, "all"), measured)
                for acc, groups, i in where:
                    _record(acc, m.name, groups, measured, i)
                by_count.add_time(m.name, seconds, count)
                outputs[m.name] = out
            if index < settings.examples and n_targets == counts[0]:
                name = Path(dataset.files[index]).name
                for i in (0, n_targets - 1):
                    examples.append(_example(name, moments[i], blurry[0],
                                             {k: v[i] for k, v in outputs.items()},
                                             {"caption": f"N={n_targets} u={u[i]:.2f}"}))
    if sum(faces.values()) == 0:
        raise ValueError(f"no images to evaluate in {data}")
    tables = [
        _table("by_count", "all GT moments per number of moments (paper 003 Table 4 layout)",
               "# of GT", [*counts, "all"], usable, by_count, layout="stacked"),
        _table("end_moments", "the end moments, over all N", "moment", [first, last], usable,
               ends),
    ]
    tables += [_table(f"per_moment_n{n}", f"per moment, N = {n} (u = (i - 1) / N)", "u",
                      [f"{v:.3f}" for v in control_factors(n)], usable, per_moment[n])
               for n in counts]
    return {
        "protocol": "moments",
        "title": "Moments of motion from still faces (paper 003 Table 4 layout)",
        "settings": {"data": str(data), "faces_per_count": {str(k): v for k, v in faces.items()},
                     "moment_counts": counts,
                     "motion": "facedeblur_ext.data.motion defaults: "
                               + ", ".join(f"{k}={v}" for k, v in
                                           asdict(MotionConfig()).items()),
                     "crop": "centred, image size - 16 px (112 for 128 px faces)",
                     "degradation": "none besides 8-bit quantization",
                     "fmr": "moments ordered by the left eye position, u = (i - 1) / N",
                     "seed": settings.seed, "size": settings.size or "native"},
        "rows": _rows(methods, by_count, "moments"),
        "tables": tables,
        "examples": examples,
    }


def _aligned_face_transform(analysis, size: int):
    """Resize and crop a loosely cropped face so that its eyes sit where they sit in the
    CelebA test faces (``FacePrior``: interocular distance 0.26 of the side, eye line at 0.42
    of the height), in a ``size`` x ``size`` image: the scale the models were trained at."""
    from facedeblur_ext.data.face import FacePrior
    from facedeblur_ext.data.geometry import CropTransform

    prior = FacePrior()
    src_h, src_w = analysis.image_size
    right, left = np.asarray(analysis.eyes, np.float64)
    target = (prior.left_eye[0] - prior.right_eye[0]) * size
    scale = max(target / max(float(np.linalg.norm(left - right)), 1e-6),
                size / min(src_h, src_w))
    resized = (int(round(src_h * scale)), int(round(src_w * scale)))
    mid = (left + right) / 2 * scale
    x0 = int(round(mid[0] - (prior.left_eye[0] + prior.right_eye[0]) / 2 * size))
    y0 = int(round(mid[1] - prior.left_eye[1] * size))
    offset = (min(max(y0, 0), resized[0] - size), min(max(x0, 0), resized[1] - size))
    return CropTransform((src_h, src_w), resized, offset, (size, size), False), scale


def _video_pairs(root: Path) -> dict[str, list[tuple[Path, Path]]]:
    """``{sequence: [(blurry, sharp), ...]}`` of the folders holding ``blurry/`` and
    ``sharp/`` frames with the same names."""
    from facedeblur_ext.data.io import list_images

    sequences = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        if (folder / "blurry").is_dir() and (folder / "sharp").is_dir():
            sharp = {p.name: p for p in list_images(folder / "sharp", recursive=False)}
            pairs = [(b, sharp[b.name])
                     for b in list_images(folder / "blurry", recursive=False) if b.name in sharp]
            if pairs:
                sequences[folder.name] = pairs
    return sequences


def run_video_protocol(root: str | Path, methods: Sequence[Method], suite: MetricSuite,
                       settings: EvalSettings, *, size: int = VIDEO_FACE_SIZE) -> dict:
    """Real blurry/sharp video frame pairs (Ren et al. ICCV 2019: ``<seq>/blurry``,
    ``<seq>/sharp``) at the models' face scale.

    The frames are loosely cropped faces (about 270 x 310 px, faces about twice the CelebA
    test scale), so each pair is brought to that scale: the sharp frame's eyes (MediaPipe)
    fix one resize and crop (:func:`_aligned_face_transform`) applied to both frames, and
    every row is scored on the ``size`` x ``size`` result. Continuous models restore
    ``u = 0.5``: the blurry frame is closest to the sharp frame of its time.

    Args:
        root: folder of sequences.
        methods: the rows (methods that need a kernel are left out and say so).
        suite, settings: metrics and shared settings (``settings.limit``: pairs per sequence).
        size: side of the aligned evaluation crop (128: the CelebA test faces).
    """
    from facedeblur_ext.data.io import load_rgb

    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(
            f"video pairs not found: {root} is not a folder. Pass --video-pairs DIR, a folder "
            "of sequences with blurry/ and sharp/ frames (<shared data>/face_video/"
            "ren_iccv2019_facevideo)")
    sequences = _video_pairs(root)
    if not sequences:
        raise ValueError(f"no sequences with blurry/ and sharp/ frames in {root}")
    usable = _not_applicable(methods, "video", "real blur has no known kernel")
    acc, examples, used, scales, no_face = Accumulator(), [], {}, [], 0
    device = settings.device
    analyzer = settings.analyzer
    if analyzer is None:
        from facedeblur_ext.data import FaceAnalyzer

        analyzer = FaceAnalyzer(warn=False)
    for name, pairs in sequences.items():
        pairs = pairs[: settings.limit] if settings.limit else pairs
        used[name] = len(pairs)
        transform = None
        for index, (blurry_path, sharp_path) in enumerate(
                _progress(pairs, len(pairs), f"video {name}", settings.progress)):
            sharp_np = load_rgb(sharp_path)
            analysis = analyzer.analyze(sharp_np, name=str(sharp_path))
            if analysis.found or transform is None:  # else: the previous frame's alignment
                transform, scale = _aligned_face_transform(analysis, size)
                scales.append(scale)
            no_face += int(not analysis.found)
            sharp = torch.from_numpy(transform.apply_image(sharp_np)).permute(2, 0, 1)
            blurry = torch.from_numpy(transform.apply_image(load_rgb(blurry_path)))
            sharp = sharp[None].float().div(255).to(device)
            blurry = blurry.permute(2, 0, 1)[None].float().div(255).to(device)
            outputs = {}
            _reference(acc, suite, ("all", name), sharp)
            for m in usable:
                out, seconds = _timed(m, blurry, device)
                _score(acc, suite, m.name, ("all", name), out, sharp)
                acc.add_time(m.name, seconds, 1)
                outputs[m.name] = out[0]
            if index == 0 and len(examples) < settings.examples:
                examples.append(_example(f"{name}/{sharp_path.name}", sharp[0], blurry[0],
                                         outputs, {"caption": f"{name} {sharp_path.stem}"}))
    total = sum(used.values())
    return {
        "protocol": "video",
        "title": "Real blurry/sharp face video pairs (Ren et al. ICCV 2019)",
        "settings": {"root": str(root), "pairs_per_sequence": used,
                     "scale": f"frames resized by {min(scales):.3f}-{max(scales):.3f} and "
                              f"cropped to {size} x {size} with the eyes where the CelebA test "
                              "faces have them (interocular 0.26, eye line 0.42 of the side), "
                              "from the sharp frame's MediaPipe eyes",
                     "frames_without_face": no_face, "seed": settings.seed},
        "rows": _rows(methods, acc, "video"),
        "tables": [_table("all", f"all {total} pairs", None, ["all"], usable, acc),
                   _table("by_sequence", "per sequence", "sequence", list(used), usable, acc)],
        "examples": examples,
    }


def run_sweep_protocol(data: str | Path, real_blur: str | Path | None,
                       methods: Sequence[Method], settings: EvalSettings, *,
                       frames: int = 7, faces: int = 2, real_faces: int = 4) -> dict:
    """u-sweep pictures: what each continuous model restores at ``u = (i - 1) / N``.

    For the first ``faces`` test faces, blurred by motion from the still with ``frames``
    moments (as :func:`run_moments_protocol`), the grid shows the ground-truth moments above
    each model's restorations at the same ``u``; for the first ``real_faces`` images of
    ``real_blur`` (real blurred faces, no ground truth) each model's sweep. Every input also
    gets a GIF: blurry | each model | ground truth, one frame per moment.

    Args:
        data: folder of sharp test faces.
        real_blur: folder of real blurred faces (None: test faces only).
        methods: the rows; only continuous models are swept.
        settings: shared settings.
        frames: N, moments per sweep.
        faces, real_faces: how many inputs of each kind.
    """
    from facedeblur_ext.data.fmr import control_factors
    from facedeblur_ext.data.io import list_images, load_rgb

    from .report import image_grid

    models = [m for m in methods if m.continuous]
    if not models:
        raise ValueError("the sweep protocol needs a --model cfmd row")
    u = [float(v) for v in control_factors(frames)]
    device = settings.device
    inputs = []
    if faces:
        dataset = _moments_dataset(_check_images_folder(data), settings, frames)
        for index in range(min(faces, len(dataset))):
            sample = dataset[index]
            inputs.append((f"test_{Path(dataset.files[index]).stem}", sample["blurry"],
                           sample["moments"]))
    if real_blur is not None and real_faces:
        for path in list_images(Path(real_blur), recursive=False)[:real_faces]:
            image = torch.tensor(load_rgb(path, min_size=16)).permute(2, 0, 1)
            inputs.append((f"real_{path.stem}", image.float().div(255), None))
    pictures, spread = [], {}
    for name, blurry, truth in _progress(inputs, len(inputs), "u-sweep", settings.progress):
        batch = blurry[None].to(device)
        sweeps = {m.name: _timed(m, batch, device, u=u)[0] for m in models}
        rows, titles = [], []
        if truth is not None:
            rows.append([_to_uint8(batch[0]), *(_to_uint8(t) for t in truth)])
            titles.append("ground truth")
        for m in models:
            rows.append([_to_uint8(batch[0]), *(_to_uint8(t) for t in sweeps[m.name])])
            titles.append(m.name)
        grid = image_grid(rows, ["blurry", *(f"u={v:.2f}" for v in u)], titles)
        gif = [np.concatenate([_to_uint8(batch[0]), *(_to_uint8(sweeps[m.name][k])
                                                      for m in models),
                               *([] if truth is None else [_to_uint8(truth[k])])], axis=1)
               for k in range(frames)]
        pictures.append({"name": name, "grid": grid, "gif": gif, "fps": 4.0})
        spread[name] = {m.name: _moment_spread(sweeps[m.name]) for m in models}
    return {
        "protocol": "sweep",
        "title": "u-sweep pictures",
        "settings": {"data": str(data), "real_blur": str(real_blur), "moments": frames,
                     "u": [round(v, 4) for v in u],
                     "gif": "blurry | " + " | ".join(m.name for m in models)
                            + " | ground truth (test faces)",
                     "first_to_last_moment_mean_abs_difference_grey_levels": spread,
                     "seed": settings.seed},
        "rows": [{"name": m.name, "description": m.description} for m in models],
        "tables": [],
        "pictures": pictures,
    }


def _moment_spread(frames: Tensor) -> float:
    """Mean absolute difference (8-bit grey levels) between the first and last moment: how
    much a sweep moves."""
    return round(float((frames[-1] - frames[0]).abs().mean()) * 255, 3)
