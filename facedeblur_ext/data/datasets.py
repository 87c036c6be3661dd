"""Training datasets: kernel-blur pairs, frame stacks with FMR, and SNADNet samples.

All three are map-style :class:`torch.utils.data.Dataset` classes that work with DataLoader
workers (the face analyzer and video readers re-open their resources in each process).

**Determinism.** Every random choice of sample ``index`` comes from a NumPy generator seeded
with ``(seed, epoch, index)`` (call :meth:`set_epoch` each epoch to change the augmentation),
and the blur synthesizer runs under a torch seed drawn from it, so a sample depends only on the
seed, the epoch and the index: not on the worker count or the order of access.

**Augmentation** follows CFMD-GAN (paper 003 Sec. 5.1): bring the short side to ``base_size``
(``"crop"``: to the crop size; None: keep the source resolution), scale by U(1.0, 1.5), crop
``crop_size`` at a random position, mirror with probability ``flip_prob``: one
:class:`~facedeblur_ext.data.geometry.CropTransform` applied identically to the sharp image(s),
the blurry image and all masks (masks are drawn from the transformed landmarks).

**Samples are dicts of tensors**: images ``[3, h, w]`` float32 in [0, 1], masks ``[1, h, w]``
or ``[4, h, w]`` float32, parsing labels ``[h, w]`` int64, scalars as 0-d tensors.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .face import FaceAnalysis, FaceAnalyzer
from .fmr import (
    DEFAULT_CRF_GAMMA,
    control_factors,
    crf_average_uint8,
    fill_missing,
    fmr_order,
    left_eye_after_transform,
)
from .geometry import CFMD_CROP_SIZE, CFMD_SCALE_RANGE, center_transform, random_transform
from .io import (
    DEFAULT_MIN_SIZE,
    BadImageError,
    FrameReadError,
    discover_frame_sources,
    load_rgb,
    open_frame_source,
    probe_image,
    resolve_image_list,
    to_uint8,
)
from .masks import (
    DEFAULT_FEATHER,
    face_from_parsing,
    feather_sigma,
    render_masks,
    render_parsing,
    soften,
)

# How many following indices to try when a sample's file turns out to be unusable.
_MAX_SUBSTITUTIONS = 16

Synthesizer = Callable[..., "torch.Tensor | tuple[torch.Tensor, dict]"]

_configured_pid = None


def _configure_worker() -> None:
    """Keep OpenCV single-threaded inside DataLoader workers (each worker is one thread)."""
    global _configured_pid
    if _configured_pid == os.getpid():
        return
    _configured_pid = os.getpid()
    if torch.utils.data.get_worker_info() is not None:
        import cv2

        cv2.setNumThreads(1)


def _image_tensor(image: np.ndarray) -> torch.Tensor:
    """[H, W, 3] uint8 or float -> [3, H, W] float32 in [0, 1]."""
    arr = np.ascontiguousarray(image.transpose(2, 0, 1))
    tensor = torch.from_numpy(arr)
    return tensor.float().div_(255.0) if arr.dtype == np.uint8 else tensor.float()


def _sample_rng(seed: int, stream: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=(stream, *keys)))


class _AugmentedFaceDataset(Dataset):
    """Shared settings and helpers of the datasets (not for direct use)."""

    def __init__(self, *, analyzer: FaceAnalyzer | None, crop_size: int | None,
                 base_size: int | str | None, scale_range: tuple[float, float],
                 flip_prob: float, augment: bool, seed: int, soft_masks: bool, feather: float,
                 min_size: int):
        self.analyzer = analyzer if analyzer is not None else FaceAnalyzer()
        self.crop_size = crop_size
        if base_size == "crop":
            base_size = crop_size
        self.base_size = base_size
        self.scale_range = tuple(scale_range)
        self.flip_prob = float(flip_prob)
        self.augment = bool(augment)
        self.seed = int(seed)
        # In shared memory, so that DataLoader workers (persistent ones included) see
        # set_epoch() calls made in the main process.
        self._epoch = torch.zeros(1, dtype=torch.int64).share_memory_()
        self.soft_masks = bool(soft_masks)
        self.feather = float(feather)
        self.min_size = int(min_size)

    @property
    def epoch(self) -> int:
        return int(self._epoch[0])

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation of ``epoch`` (samples stay deterministic per epoch).

        Call it before ``iter(loader)`` of that epoch: the value lives in shared memory, so
        workers that already exist (``persistent_workers=True``) see it too.
        """
        self._epoch[0] = int(epoch)

    def _augmentation_rng(self, index: int) -> np.random.Generator:
        return _sample_rng(self.seed, 1, self.epoch, index)

    def _transform(self, rng: np.random.Generator, src_size: tuple[int, int]):
        if self.augment:
            crop = self.crop_size if self.crop_size is not None else min(src_size)
            return random_transform(rng, src_size, crop, self.scale_range, self.base_size,
                                    self.flip_prob)
        return center_transform(src_size, self.crop_size, self.base_size)


# ============================================================================================
# (a) kernel-blur pairs and (c) SNADNet samples
# ============================================================================================

class KernelBlurDataset(_AugmentedFaceDataset):
    """Sharp face images blurred on the fly by a blur synthesizer, with face masks.

    Args:
        images: a folder (searched recursively), an image file, or a list of image files.
        synthesizer: callable ``synthesizer(images [1, 3, h, w], mask=None [1, 1, h, w],
            return_info=False)`` returning the blurred batch (and an info dict when
            ``return_info=True``), e.g. ``facedeblur_ext.nn.BlurSynthesizer(config)``. It runs
            on the augmented crop under a per-sample torch seed (a ``generator`` attribute that
            is a ``torch.Generator`` is re-seeded too). None returns no ``blurry`` image: blur
            the batch later, e.g. on the GPU, with :func:`blur_batch`.
        blur_region: ``"whole"`` blurs the whole image; ``"face"`` blurs only the face (thesis
            002): ``y = m * (k * x) + (1 - m) * x`` with the feathered face mask ``m``. For one
            seed, epoch and index both choices get the same crop and the same synthesizer seed,
            so the pairs differ only in where the blur is applied, as in the thesis.
        analyzer: shared :class:`~facedeblur_ext.data.face.FaceAnalyzer` (a default one with
            the default disk cache when None).
        crop_size, base_size, scale_range, flip_prob, augment: augmentation (module docstring);
            ``augment=False`` gives a deterministic centre crop for evaluation.
        seed: base seed.
        soft_masks: feathered (True) or binary masks.
        feather: mask softness, Gaussian sigma as a fraction of the face width.
        return_regions: add ``regions`` ``[4, h, w]`` (SNADNet's four regions).
        return_parsing: add ``parsing`` ``[h, w]`` int64 labels of
            :data:`~facedeblur_ext.data.masks.PARSING_CLASSES`.
        face_masks: analyze the face and return ``face_mask``/``face_found``. False skips
            the face analysis altogether (whole-image blur without regions or parsing only:
            no MediaPipe work per sample).
        return_blur_info: add ``blur_info`` (the synthesizer's info dict; variable-size
            kernels need ``batch_size=1`` or a custom collate).
        on_no_face: ``"fallback"`` keeps images where no face mesh is found, with the fallback
            masks of :mod:`~facedeblur_ext.data.face` (``face_found`` tells which);
            ``"skip"`` replaces them by the next usable image.
        validate: check every file's header at construction and drop unusable ones (grayscale,
            alpha, too small, unreadable) with one summary warning.
        min_size: smallest accepted image side.

    Sample keys: ``sharp``, ``blurry`` (with a synthesizer), ``face_mask`` ``[1, h, w]`` and
    ``face_found`` (bool) unless ``face_masks=False``, ``index``, and the optional ones above.
    """

    def __init__(self, images: str | os.PathLike | Iterable[str | os.PathLike],
                 synthesizer: Synthesizer | None = None, *, blur_region: str = "whole",
                 analyzer: FaceAnalyzer | None = None, crop_size: int | None = CFMD_CROP_SIZE,
                 base_size: int | str | None = "crop",
                 scale_range: tuple[float, float] = CFMD_SCALE_RANGE, flip_prob: float = 0.5,
                 augment: bool = True, seed: int = 0, soft_masks: bool = True,
                 feather: float = DEFAULT_FEATHER, return_regions: bool = False,
                 return_parsing: bool = False, face_masks: bool = True,
                 return_blur_info: bool = False,
                 on_no_face: str = "fallback", validate: bool = True,
                 min_size: int = DEFAULT_MIN_SIZE):
        super().__init__(analyzer=analyzer, crop_size=crop_size, base_size=base_size,
                         scale_range=scale_range, flip_prob=flip_prob, augment=augment,
                         seed=seed, soft_masks=soft_masks, feather=feather, min_size=min_size)
        if blur_region not in ("whole", "face"):
            raise ValueError(f"blur_region must be 'whole' or 'face', got {blur_region!r}")
        if on_no_face not in ("fallback", "skip"):
            raise ValueError(f"on_no_face must be 'fallback' or 'skip', got {on_no_face!r}")
        if not face_masks and (blur_region == "face" or return_regions or return_parsing
                               or on_no_face == "skip"):
            raise ValueError("face_masks=False needs blur_region='whole', no regions or "
                             "parsing, and on_no_face='fallback': those need the face analysis")
        self.face_masks = bool(face_masks)
        self.synthesizer = synthesizer
        self.blur_region = blur_region
        self.return_regions = bool(return_regions)
        self.return_parsing = bool(return_parsing)
        self.return_blur_info = bool(return_blur_info)
        self.on_no_face = on_no_face
        files = resolve_image_list(images)
        if validate:
            files = self._validated(files)
        if not files:
            raise ValueError(f"no usable images in {images!r}")
        self.files = files

    def _validated(self, files: list[Path]) -> list[Path]:
        kept, rejected = [], []
        for path in files:
            reason = probe_image(path, min_size=self.min_size)
            (rejected.append((path, reason)) if reason else kept.append(path))
        if rejected:
            shown = "; ".join(f"{p.name}: {r}" for p, r in rejected[:5])
            more = f" (and {len(rejected) - 5} more)" if len(rejected) > 5 else ""
            warnings.warn(f"skipping {len(rejected)} of {len(files)} images: {shown}{more}",
                          UserWarning, stacklevel=3)
        return kept

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict:
        _configure_worker()
        if not 0 <= index < len(self.files):
            raise IndexError(index)
        last_error = None
        for attempt in range(min(_MAX_SUBSTITUTIONS, len(self.files))):
            real = (index + attempt) % len(self.files)
            path = self.files[real]
            try:
                image = load_rgb(path, min_size=self.min_size)
            except BadImageError as exc:
                last_error = exc
                warnings.warn(f"{exc}; using the next image instead", UserWarning, stacklevel=2)
                continue
            analysis = (self.analyzer.analyze(image, name=str(path)) if self.face_masks
                        else None)
            if analysis is not None and not analysis.found and self.on_no_face == "skip":
                last_error = BadImageError("no face found", path)
                continue
            # The rng depends on the requested index, not on a substitute's, so a substitution
            # does not shift the random stream of other samples.
            return self._make_sample(index, image, analysis, self._augmentation_rng(index))
        raise RuntimeError(f"no usable image found from index {index} on") from last_error

    def _make_sample(self, index: int, image: np.ndarray, analysis: FaceAnalysis | None,
                     rng: np.random.Generator) -> dict:
        transform = self._transform(rng, image.shape[:2])
        synth_seed = int(rng.integers(0, 2**63 - 1))
        crop = transform.apply_image(image)
        sharp = _image_tensor(crop)
        sample = {"sharp": sharp, "index": torch.tensor(index)}
        masks = {}
        if analysis is not None:
            masks = render_masks(analysis, transform, soft=self.soft_masks,
                                 feather=self.feather)
            sample["face_mask"] = torch.from_numpy(masks["face"])[None]
            sample["face_found"] = torch.tensor(analysis.found)
        if self.synthesizer is not None:
            blend = (torch.from_numpy(masks["face_soft"])[None]
                     if self.blur_region == "face" else None)
            blurry, info = run_synthesizer(self.synthesizer, sharp[None],
                                           None if blend is None else blend[None], synth_seed,
                                           return_info=self.return_blur_info)
            sample["blurry"] = blurry[0]
            if self.return_blur_info:
                sample["blur_info"] = info
        if self.return_regions:
            sample["regions"] = torch.from_numpy(masks["regions"])
        if self.return_parsing:
            sample["parsing"] = torch.from_numpy(masks["parsing"].astype(np.int64))
        return sample


class SNADNetDataset(KernelBlurDataset):
    """SNADNet training samples (paper 004): a kernel-blurred face with the region masks of the
    multi-region loss and parsing labels, both made from the *sharp* image (the parsing network
    of stage I is fine-tuned on the blurry image against these labels; stage II uses the face
    mask for separable normalization and the regions for the loss).

    Same arguments as :class:`KernelBlurDataset`; ``regions`` and ``parsing`` are always
    returned. SNADNet's own protocol blurs the whole image (``blur_region="whole"``), with
    CelebA-HQ / CelebA at 256 / 160 pixels: set ``crop_size`` accordingly.
    """

    def __init__(self, images, synthesizer: Synthesizer | None = None, **kwargs):
        kwargs.setdefault("return_regions", True)
        kwargs.setdefault("return_parsing", True)
        if not (kwargs["return_regions"] and kwargs["return_parsing"]):
            raise ValueError("SNADNetDataset always returns regions and parsing labels")
        super().__init__(images, synthesizer, **kwargs)


class MotionBlurMixDataset(KernelBlurDataset):
    """Still faces degraded by the issue-16 mix: continuous motion or a blur kernel, then noise,
    JPEG and optionally a second-order round (CFMD-GAN's default training data).

    With probability ``motion_prob`` a sample is **motion from the still**
    (:func:`~facedeblur_ext.data.motion.render_motion_sample`): N in ``num_targets`` sharp
    moments in FMR order, one of them (rank ``i`` drawn uniformly) is the target, with
    ``u = (i - 1) / N``. Otherwise it is a **kernel blur**
    (:func:`~facedeblur_ext.data.degradation.sample_kernel`, sized relative to the face; the
    whole image, or only the face with ``degradation.face_only_prob``) whose target is the
    middle of the exposure, ``u = 0.5``. Both then go through
    :func:`~facedeblur_ext.data.degradation.degrade`.

    Args:
        images: a folder, an image file, or a list of image files (sharp faces).
        motion_prob: share of motion-from-still samples.
        num_targets: (low, high) range of N, inclusive (paper 003: 5 to 13).
        motion: :class:`~facedeblur_ext.data.motion.MotionConfig` or its dict.
        degradation: :class:`~facedeblur_ext.data.degradation.DegradationConfig` or its dict.
        return_moments: add ``moments`` ``[N, 3, h, w]`` and ``moment_u`` ``[N]`` (all N targets
            of a motion sample; variable N needs ``batch_size=1`` or a fixed ``num_targets``).
        synthesizer: not used (the kernels come from ``degradation``); accepted so that the
            dataset fits :func:`~facedeblur_ext.training.face_data.build_face_datasets`.
        Other arguments as :class:`KernelBlurDataset` (face analysis is always on: the left eye
        orders the moments and the face size scales the blur).

    Sample keys: ``blurry``, ``sharp``, ``u`` (0-d float32), ``is_motion`` (bool), ``index``.
    """

    #: Blurs with its own degradation mix: a config needs no ``data.blur`` table for it.
    uses_synthesizer = False

    def __init__(self, images, synthesizer: Synthesizer | None = None, *,
                 motion_prob: float = 0.5, num_targets: tuple[int, int] = (5, 13),
                 motion=None, degradation=None, return_moments: bool = False, **kwargs):
        from .degradation import DegradationConfig
        from .motion import MotionConfig

        if kwargs.get("face_masks") is False:
            raise ValueError("MotionBlurMixDataset needs the face analysis (face_masks=True)")
        super().__init__(images, None, **kwargs)
        if not 0 <= motion_prob <= 1:
            raise ValueError(f"motion_prob must be in [0, 1], got {motion_prob}")
        low, high = (num_targets, num_targets) if isinstance(num_targets, int) else num_targets
        if not 1 <= low <= high:
            raise ValueError(f"num_targets must be (low, high) with 1 <= low <= high, got "
                             f"{num_targets}")
        self.motion_prob = float(motion_prob)
        self.num_targets = (int(low), int(high))
        self.motion = MotionConfig.from_dict(motion or {})
        self.degradation = DegradationConfig.from_dict(degradation or {})
        self.return_moments = bool(return_moments)

    def _face_size(self, analysis: FaceAnalysis, scale: float, crop: int) -> float:
        """Face size in output pixels: 2.5 interocular distances, else 0.6 of the crop."""
        if analysis.found:
            return 2.5 * float(np.linalg.norm(analysis.eyes[1] - analysis.eyes[0])) * scale
        return 0.6 * crop

    def _make_sample(self, index: int, image: np.ndarray, analysis: FaceAnalysis | None,
                     rng: np.random.Generator) -> dict:
        from .. import ops
        from .degradation import degrade, sample_kernel
        from .motion import render_motion_sample

        crop = self.crop_size if self.crop_size is not None else min(image.shape[:2]) - 16
        sample = {"index": torch.tensor(index)}
        if rng.random() < self.motion_prob:
            src = _image_tensor(image)
            short = min(image.shape[:2])
            base = short if self.base_size is None else float(self.base_size)
            scale = base / short * (rng.uniform(*self.scale_range) if self.augment else 1.0)
            eye = analysis.left_eye
            if self.augment and rng.random() < self.flip_prob:
                src = src.flip(-1)
                eye = np.array([image.shape[1] - 1 - analysis.right_eye[0],
                                analysis.right_eye[1]])
            count = int(rng.integers(self.num_targets[0], self.num_targets[1] + 1))
            rank = int(rng.integers(count))
            face = self._face_size(analysis, scale, crop)
            origin = None
            if not self.augment:  # centred crop
                origin = ((image.shape[1] - 1) / 2 - (crop - 1) / 2 / scale,
                          (image.shape[0] - 1) / 2 - (crop - 1) / 2 / scale)
            rendered = render_motion_sample(
                src, eye, num_targets=count, crop_size=crop, rng=rng, config=self.motion,
                scale=scale, face_size=face, crop_origin=origin,
                target_index=None if self.return_moments else rank)
            pick = rank if self.return_moments else 0
            sample.update(sharp=rendered["moments"][pick], u=rendered["u"][pick],
                          blurry=rendered["blurry"], is_motion=torch.tensor(True))
            if self.return_moments:
                sample.update(moments=rendered["moments"], moment_u=rendered["u"])
        else:
            transform = self._transform(rng, image.shape[:2])
            sharp = _image_tensor(transform.apply_image(image))
            kernel, _ = sample_kernel(rng, self._face_size(analysis, transform.scale_xy[0],
                                                           crop), self.degradation)
            mask = None
            if rng.random() < self.degradation.face_only_prob:
                masks = render_masks(analysis, transform, soft=True, feather=self.feather)
                mask = torch.from_numpy(masks["face_soft"])[None, None]
            with torch.no_grad():
                blurry = ops.blur_synthesize(sharp[None], kernel[None], mask=mask)[0]
            sample.update(sharp=sharp, u=torch.tensor(0.5), blurry=blurry,
                          is_motion=torch.tensor(False))
        sample["blurry"], _ = degrade(sample["blurry"], rng, self.degradation)
        return sample


def run_synthesizer(synthesizer: Synthesizer, images: torch.Tensor,
                    mask: torch.Tensor | None, seed: int, *, return_info: bool = False):
    """Call ``synthesizer(images, mask=..., return_info=...)`` deterministically for ``seed``.

    The global torch RNG is forked (the caller's state is untouched) and seeded; a
    ``synthesizer.generator`` that is a ``torch.Generator`` is seeded as well.

    Returns:
        ``(blurred, info)`` with ``info`` None unless ``return_info``.
    """
    kwargs = {}
    if mask is not None:
        kwargs["mask"] = mask
    if return_info:
        kwargs["return_info"] = True
    generator = getattr(synthesizer, "generator", None)
    devices = [images.device] if images.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        if isinstance(generator, torch.Generator):
            generator.manual_seed(seed)
        with torch.no_grad():
            out = synthesizer(images, **kwargs)
    if return_info:
        blurred, info = out
        return blurred, info
    return out, None


def blur_batch(batch: dict, synthesizer: Synthesizer, *, blur_region: str = "whole",
               seed: int | None = None, return_info: bool = False) -> dict:
    """Blur a collated batch from a dataset built with ``synthesizer=None`` (for synthesis on
    the GPU inside the training loop). Adds ``blurry`` (and ``blur_info``) to ``batch``.

    ``face_mask`` is used as the blend mask for ``blur_region="face"``: build the dataset with
    ``soft_masks=True`` for a feathered blend.
    """
    mask = batch["face_mask"] if blur_region == "face" else None
    if seed is None:
        blurred = synthesizer(batch["sharp"], **({"mask": mask} if mask is not None else {}),
                              **({"return_info": True} if return_info else {}))
        info = None
        if return_info:
            blurred, info = blurred
    else:
        blurred, info = run_synthesizer(synthesizer, batch["sharp"], mask, seed,
                                        return_info=return_info)
    batch["blurry"] = blurred
    if return_info:
        batch["blur_info"] = info
    return batch


# ============================================================================================
# (b) frame stacks with FMR
# ============================================================================================

class FrameStackDataset(_AugmentedFaceDataset):
    """Blurry images made by averaging consecutive video frames, with the sharp frames in FMR
    order and their control factors (CFMD-GAN, paper 003 Sec. 4.1 and Eq. 5).

    Sample ``index`` is a window of ``N`` consecutive frames of one source. ``N`` is drawn
    uniformly from ``num_frames`` per (seed, index), not per epoch, so the set of blurry images
    is fixed like a synthesized dataset while the augmentation changes with the epoch. The
    blurry image is ``g(mean(g^-1(frames)))`` with a gamma CRF, computed at the source
    resolution (where the blur forms), optionally quantized to 8 bits, and then augmented with
    the same transform as the sharp frames. The sharp frames are sorted by the subject's left
    eye position *in the augmented frames* (:mod:`~facedeblur_ext.data.fmr`; after a flip this
    is the source's right eye, mirrored) and frame rank ``i`` gets ``u = (i - 1) / N``.

    Frames without a face mesh use the detector's or the prior's eye position when a face was
    at least detected; frames with nothing found get positions interpolated in time from the
    others; a window with no face at all keeps the temporal order (with a warning).

    Args:
        sources: a video file, a folder of frames, a tree of those, or a list of them.
        num_frames: ``N`` (int) or an inclusive range ``(lo, hi)``; paper 003 uses 5..13.
        stride: first-frame distance between consecutive windows of one source (default: the
            largest ``N``, i.e. non-overlapping windows).
        crf_gamma: CRF gamma (None: plain average).
        quantize: round the blurry image to 8 bits, like a camera would.
        fmr_grid: FMR comparison grid in output pixels (None: exact float comparison).
        return_stack: include all sharp frames (``sharp`` ``[N, 3, h, w]``; with a range of
            ``N`` use :func:`collate_frame_stacks`).
        return_masks: include ``face_mask``: the union of the frames' face masks (the area the
            face swept during the exposure).
        analyzer, crop_size, base_size, scale_range, flip_prob, augment, seed, soft_masks,
        feather, min_size: as for :class:`KernelBlurDataset`.

    Sample keys: ``blurry`` ``[3, h, w]``; ``sharp`` ``[N, 3, h, w]`` (FMR order); ``u``
    ``[N]``; ``frame_indices`` ``[N]`` (source frame number of each FMR-ordered frame);
    ``eye_xy`` ``[N, 2]`` (left-eye positions used, output pixels); ``target`` ``[3, h, w]``
    and ``target_u`` (one rank drawn uniformly, for the (blurry, u) -> s(u) objective);
    ``num_frames``; ``faces_found`` (frames with a detected face); ``face_mask``; ``index``.
    """

    def __init__(self, sources: str | os.PathLike | Sequence[str | os.PathLike], *,
                 num_frames: int | tuple[int, int] = (5, 13), stride: int | None = None,
                 crf_gamma: float | None = DEFAULT_CRF_GAMMA, quantize: bool = True,
                 fmr_grid: float | None = 1.0, return_stack: bool = True,
                 return_masks: bool = True, analyzer: FaceAnalyzer | None = None,
                 crop_size: int | None = CFMD_CROP_SIZE, base_size: int | str | None = "crop",
                 scale_range: tuple[float, float] = CFMD_SCALE_RANGE, flip_prob: float = 0.5,
                 augment: bool = True, seed: int = 0, soft_masks: bool = True,
                 feather: float = DEFAULT_FEATHER, min_size: int = DEFAULT_MIN_SIZE):
        super().__init__(analyzer=analyzer, crop_size=crop_size, base_size=base_size,
                         scale_range=scale_range, flip_prob=flip_prob, augment=augment,
                         seed=seed, soft_masks=soft_masks, feather=feather, min_size=min_size)
        lo, hi = (num_frames, num_frames) if isinstance(num_frames, int) else num_frames
        if not 1 <= lo <= hi:
            raise ValueError(f"num_frames must be >= 1 and lo <= hi, got {num_frames}")
        self.num_frames = (int(lo), int(hi))
        self.stride = int(stride) if stride is not None else int(hi)
        if self.stride < 1:
            raise ValueError("stride must be >= 1")
        self.crf_gamma = crf_gamma
        self.quantize = bool(quantize)
        self.fmr_grid = fmr_grid
        self.return_stack = bool(return_stack)
        self.return_masks = bool(return_masks)

        if isinstance(sources, (str, os.PathLike)):
            sources = [sources]
        paths: list[Path] = []
        for src in sources:
            paths.extend(discover_frame_sources(src))
        self.sources = []
        skipped = []
        for path in paths:
            try:
                source = open_frame_source(path, min_size=self.min_size)
            except (FrameReadError, BadImageError) as exc:
                skipped.append(str(exc))
                continue
            if len(source) >= hi:
                self.sources.append(source)
            else:
                skipped.append(f"{path}: only {len(source)} frames (< {hi})")
        if skipped:
            warnings.warn(f"skipping {len(skipped)} frame sources: " + "; ".join(skipped[:5]),
                          UserWarning, stacklevel=2)
        self.windows = [(s, start) for s, source in enumerate(self.sources)
                        for start in range(0, len(source) - hi + 1, self.stride)]
        if not self.windows:
            raise ValueError(f"no frame windows of {hi} frames in {sources!r}")

    def __len__(self) -> int:
        return len(self.windows)

    def window_length(self, index: int) -> int:
        """``N`` of sample ``index`` (independent of the epoch)."""
        lo, hi = self.num_frames
        return int(_sample_rng(self.seed, 0, index).integers(lo, hi + 1))

    def window(self, index: int) -> tuple[object, int, int]:
        """``(source, first frame, N)`` of sample ``index``."""
        source_index, start = self.windows[index]
        return self.sources[source_index], start, self.window_length(index)

    def __getitem__(self, index: int) -> dict:
        _configure_worker()
        if not 0 <= index < len(self.windows):
            raise IndexError(index)
        last_error = None
        for attempt in range(min(_MAX_SUBSTITUTIONS, len(self.windows))):
            real = (index + attempt) % len(self.windows)
            source, start, _ = self.window(real)
            n = self.window_length(index)
            try:
                frames = source.read(start, n)
            except (FrameReadError, BadImageError) as exc:
                last_error = exc
                warnings.warn(f"{exc}; using the next window instead", UserWarning,
                              stacklevel=2)
                continue
            return self._make_sample(index, source, start, frames,
                                     self._augmentation_rng(index))
        raise RuntimeError(f"no readable frame window from index {index} on") from last_error

    def _make_sample(self, index, source, start, frames, rng) -> dict:
        n = len(frames)
        analyses = [self.analyzer.analyze(f, name=source.describe(start + k))
                    for k, f in enumerate(frames)]
        blurry_src = crf_average_uint8(frames, self.crf_gamma)
        if self.quantize:
            blurry_src = to_uint8(blurry_src)
        transform = self._transform(rng, frames[0].shape[:2])
        target_rank = int(rng.integers(0, n))

        found = [a.found for a in analyses]
        eyes = np.stack([left_eye_after_transform(a, transform) for a in analyses])
        if any(found):
            eyes = fill_missing(eyes, found)
            order = fmr_order(eyes, self.fmr_grid)
        else:
            warnings.warn(f"no face in frames {start}..{start + n - 1} of {source.path}: "
                          f"keeping the temporal order", UserWarning, stacklevel=3)
            order = np.arange(n)
        u = control_factors(n)

        sharp = [transform.apply_image(frames[t]) for t in order]
        sample = {
            "blurry": _image_tensor(transform.apply_image(blurry_src)),
            "u": torch.from_numpy(u.astype(np.float32)),
            "frame_indices": torch.from_numpy(order + start),
            "eye_xy": torch.from_numpy(eyes[order].astype(np.float32)),
            "target": _image_tensor(sharp[target_rank]),
            "target_u": torch.tensor(float(u[target_rank])),
            "num_frames": torch.tensor(n),
            "faces_found": torch.tensor(int(sum(found))),
            "index": torch.tensor(index),
        }
        if self.return_stack:
            # one uint8 stack and one conversion instead of N float tensors and a float stack
            stack = torch.from_numpy(np.stack(sharp)).permute(0, 3, 1, 2)
            sample["sharp"] = stack.float().div_(255.0).contiguous()
        if self.return_masks:
            union = np.zeros(transform.out_size, np.float32)
            for analysis in analyses:
                np.maximum(union, face_from_parsing(render_parsing(analysis, transform)),
                           out=union)
            if self.soft_masks:
                union = soften(union, feather_sigma(analyses[n // 2], transform, self.feather))
            sample["face_mask"] = torch.from_numpy(union)[None]
        return sample


def collate_frame_stacks(samples: list[dict]) -> dict:
    """Collate :class:`FrameStackDataset` samples with different ``N``: ``sharp``, ``u``,
    ``frame_indices`` and ``eye_xy`` are padded to the largest ``N`` (zeros; -1 for
    ``frame_indices`` and ``u``) and ``valid`` ``[B, N_max]`` marks the real frames."""
    from torch.utils.data import default_collate

    ragged = ("sharp", "u", "frame_indices", "eye_xy")
    n_max = max(int(s["num_frames"]) for s in samples)
    batch = default_collate([{k: v for k, v in s.items() if k not in ragged} for s in samples])
    valid = torch.zeros(len(samples), n_max, dtype=torch.bool)
    for b, s in enumerate(samples):
        valid[b, : int(s["num_frames"])] = True
    batch["valid"] = valid
    for key in ragged:
        if key not in samples[0]:
            continue
        first = samples[0][key]
        fill = -1 if key in ("u", "frame_indices") else 0
        out = torch.full((len(samples), n_max, *first.shape[1:]), fill, dtype=first.dtype)
        for b, s in enumerate(samples):
            out[b, : s[key].shape[0]] = s[key]
        batch[key] = out
    return batch
