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
  count* (every sharp frame of the window vs the output for its ``u``; a method without a
  moment input is compared with every frame; Table 4).
* :func:`run_face_region_protocol`: the thesis's whole-image vs face-only blur [002 Table
  5.4]: one random linear-motion kernel per image (length 3..27 px capped to the kernel,
  angle 0..180 degrees, sizes 13..29), applied to the whole image or only inside the feathered
  MediaPipe face mask; both test sets share crop and kernel per image.

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
    "TRAJECTORY_NOISE_SIGMA",
    "EvalSettings",
    "face_region_blur_config",
    "kernel_blur_config",
    "run_face_region_protocol",
    "run_frames_protocol",
    "run_kernel_protocol",
]

#: SNADNet's CelebA kernels: 13 x 13 to 29 x 29 [004 Sec. III-A] (odd sizes: a centred kernel).
KERNEL_SIZES = tuple(range(13, 30, 2))
TRAJECTORY_NOISE_SIGMA = 0.03
#: CFMD-GAN's frame counts [003 Table 1, 4].
FRAME_COUNTS = (5, 7, 9, 11, 13)


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
    raise ValueError(f"blur must be 'trajectory' or 'motion45', got {blur!r}")


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


def _score(acc: Accumulator, suite: MetricSuite, row: str, groups, out: Tensor,
           ref: Tensor) -> None:
    acc.add(row, groups, suite.score(out, ref))
    if suite.wants_features:
        acc.add_features(row, groups, suite.features(out))


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
           acc: Accumulator) -> dict:
    cells = {str(g): {m.name: acc.summary(m.name, g) for m in methods
                      if (m.name, g) in acc.values} for g in groups}
    return {"name": name, "title": title, "group_label": group_label,
            "groups": [str(g) for g in groups], "cells": cells}


def _kernel_dataset(data: Path, config, settings: EvalSettings, blur_region: str, seed: int):
    from facedeblur_ext.data import KernelBlurDataset
    from facedeblur_ext.nn import BlurSynthesizer

    return KernelBlurDataset(
        data, BlurSynthesizer(config, generator=torch.Generator()), blur_region=blur_region,
        analyzer=settings.analyzer, crop_size=settings.size,
        base_size="crop" if settings.size else None, augment=False, seed=seed,
        return_blur_info=True)


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
        noise_sigma = TRAJECTORY_NOISE_SIGMA if blur == "trajectory" else 0.0
    config = kernel_blur_config(blur, kernel_sizes, noise_sigma)
    dataset = _kernel_dataset(data, config, settings, "whole", settings.seed)
    loader, n = _loader(dataset, settings.limit, settings.workers)
    acc, examples, sizes_seen = Accumulator(), [], set()
    device = settings.device
    for index, sample in enumerate(_progress(loader, n, f"kernel blur ({blur})",
                                             settings.progress)):
        sharp = sample["sharp"][None].to(device)
        blurry = sample["blurry"][None].to(device)
        info = sample["blur_info"]
        kernels = info["kernels"].to(device)
        ksize = int(info["kernel_sizes"][0])
        sizes_seen.add(ksize)
        noise = float(info["noise_sigma"][0])
        outputs = {}
        _reference(acc, suite, ("all", ksize), sharp)
        for m in methods:
            extra = {"kernels": kernels, "noise_sigma": noise} if m.needs_kernel else {}
            out, seconds = _timed(m, blurry, device, **extra)
            _score(acc, suite, m.name, ("all", ksize), out, sharp)
            acc.add_time(m.name, seconds, 1)
            if index < settings.examples:
                outputs[m.name] = out[0]
        if index < settings.examples:
            examples.append(_example(Path(dataset.files[index]).name, sharp[0], blurry[0],
                                     outputs, {"caption": f"{ksize}x{ksize} kernel"}))
    if n == 0:
        raise ValueError(f"no images to evaluate in {data}")
    title = ("trajectory kernels 13-29 + noise 0.03 (SNADNet CelebA protocol)"
             if blur == "trajectory" and noise_sigma == TRAJECTORY_NOISE_SIGMA
             else f"{blur} kernels, noise sigma {noise_sigma:g}")
    return {
        "protocol": "kernel",
        "title": f"Kernel blur: {title}",
        "settings": {"data": str(data), "images": n, "blur": blur,
                     "kernel_sizes": list(kernel_sizes) if blur == "trajectory" else [25],
                     "noise_sigma": noise_sigma, "quantized": True, "seed": settings.seed,
                     "size": settings.size or "native"},
        "rows": _rows(methods, acc, "kernel"),
        "tables": [
            _table("all", f"all {n} images", None, ["all"], methods, acc),
            _table("by_kernel_size", "per kernel size", "kernel size", sorted(sizes_seen),
                   methods, acc),
        ],
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
                if m.continuous:
                    restored, seconds = [], 0.0
                    for value in u:
                        out, t = _timed(m, blurry, device, u=value)
                        restored.append(out)
                        seconds += t
                    frames = torch.cat(restored)
                    single, t = _timed(m, blurry, device, u=CENTRE_U)
                    seconds += t
                    count = len(u) + 1
                else:
                    single, seconds = _timed(m, blurry, device)
                    frames = single.expand(len(u), -1, -1, -1)
                    count = 1
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
                   "averaged frames", [*counts, "all"], usable, per_n),
        ],
        "examples": examples,
    }
