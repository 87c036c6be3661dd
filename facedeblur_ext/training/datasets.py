"""Frame-averaging blur dataset: blurry image, the sharp frame at ``u``, and ``u``.

A blurry sample averages ``k`` consecutive sharp frames through a gamma camera response,
``b = g(mean_i g^-1(s_i))`` with ``g(x) = x ** (1 / gamma)`` [003 Eq. 5, SPEC section 2], and
its target is frame ``i`` of the window (0-based) with control factor ``u = i / k``, the
paper's ``u = (i - 1) / N`` for 1-based ``i`` [003 Sec. 4.1]. Frames keep their temporal order
(facial motion-based reordering needs landmarks and lives with the face data pipeline).

This is the batch format the CFMD-GAN task consumes: a dict with ``blurry`` and ``sharp``
[3, H, W] float32 in [0, 1] and ``u`` a float32 scalar tensor (collated to [B]).
"""

from __future__ import annotations

import glob
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

__all__ = ["FrameAveragingDataset", "list_frame_folders"]

_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def list_frame_folders(roots: str | Sequence[str]) -> list[Path]:
    """Folders of frames named by ``roots`` (each a folder or a glob pattern), sorted."""
    if isinstance(roots, (str, Path)):
        roots = [roots]
    folders: list[Path] = []
    for root in roots:
        matches = sorted(glob.glob(str(root))) or [str(root)]
        for match in matches:
            path = Path(match)
            if not path.is_dir():
                raise FileNotFoundError(f"frame folder {path} does not exist")
            folders.append(path)
    return folders


class FrameAveragingDataset(Dataset):
    """Blurry/sharp/u samples made by averaging consecutive frames of face videos.

    Args:
        roots: folders (or glob patterns) each holding the consecutive frames of one clip,
            ordered by file name.
        frames_per_blur: frames averaged per blurry image (an int, or a list to use several;
            the paper's test set uses 5 to 13).
        crop: side of the square crop (random in training, centred otherwise); ``None`` keeps
            the whole frame, cut down to multiples of ``multiple_of``.
        scale: range of the random rescale before cropping (1.0-1.5 in the paper); without
            ``augment`` the low end is used.
        augment: random scale and crop, seeded by ``(seed, epoch, index)`` so that any worker
            layout and a resumed run give the same samples.
        gamma: exponent of the camera response function.
        window_stride: step between the first frames of consecutive windows.
        seed: seed of the augmentation.
        multiple_of: uncropped sizes are cut down to a multiple of this.
        cache_frames: decoded frames kept in memory per worker.
    """

    def __init__(self, roots, frames_per_blur: int | Sequence[int] = 7, crop: int | None = 256,
                 scale: Sequence[float] = (1.0, 1.5), augment: bool = True, gamma: float = 2.2,
                 window_stride: int = 1, seed: int = 0, multiple_of: int = 4,
                 cache_frames: int = 64):
        self.clips = []
        for folder in list_frame_folders(roots):
            frames = sorted(p for p in folder.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)
            self.clips.append(frames)
        ks = [frames_per_blur] if isinstance(frames_per_blur, int) else list(frames_per_blur)
        if not ks or min(ks) < 1:
            raise ValueError("frames_per_blur must be positive")
        self.samples: list[tuple[int, int, int, int]] = []  # clip, first frame, k, i
        for c, frames in enumerate(self.clips):
            for k in ks:
                for start in range(0, len(frames) - k + 1, window_stride):
                    self.samples.extend((c, start, k, i) for i in range(k))
        if not self.samples:
            raise ValueError(f"no window of {ks} frames in {roots!r}")
        self.crop = crop
        self.scale = (float(scale[0]), float(scale[1]))
        self.augment = augment
        self.gamma = float(gamma)
        self.seed = int(seed)
        self.multiple_of = int(multiple_of)
        self.epoch = 0
        self._cache: OrderedDict[Path, torch.Tensor] = OrderedDict()
        self._cache_size = cache_frames

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation draw of ``epoch`` (the trainer calls this)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.samples)

    def _frame(self, path: Path) -> torch.Tensor:
        frame = self._cache.get(path)
        if frame is None:
            from PIL import Image

            with Image.open(path) as img:
                array = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
            frame = torch.from_numpy(array).permute(2, 0, 1).contiguous()
            self._cache[path] = frame
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(path)
        return frame

    def _geometry(self, index: int, height: int, width: int):
        """(scale factor, top, left) of the crop for this sample."""
        crop = self.crop
        if crop is None:
            return 1.0, 0, 0
        if not self.augment:  # deterministic: the low end of the scale range, centre crop
            s = max(self.scale[0], crop / min(height, width))
            h, w = round(height * s), round(width * s)
            return s, (h - crop) // 2, (w - crop) // 2
        rng = np.random.default_rng([self.seed, self.epoch, index])
        s = max(rng.uniform(*self.scale), crop / min(height, width))
        h, w = round(height * s), round(width * s)
        return s, int(rng.integers(0, h - crop + 1)), int(rng.integers(0, w - crop + 1))

    def __getitem__(self, index: int) -> dict:
        clip, start, k, i = self.samples[index]
        paths = self.clips[clip][start:start + k]
        frames = torch.stack([self._frame(p) for p in paths])  # [k, 3, H, W]
        linear = frames.clamp(0, 1).pow(self.gamma).mean(dim=0)
        pair = torch.stack([linear.pow(1.0 / self.gamma), frames[i]])  # [2, 3, H, W]
        height, width = pair.shape[-2:]
        s, top, left = self._geometry(index, height, width)
        if s != 1.0:
            size = (round(height * s), round(width * s))
            pair = F.interpolate(pair, size=size, mode="bilinear", align_corners=False,
                                 antialias=True).clamp(0, 1)
        if self.crop is not None:
            pair = pair[..., top:top + self.crop, left:left + self.crop]
        else:
            m = self.multiple_of
            pair = pair[..., : pair.shape[-2] // m * m, : pair.shape[-1] // m * m]
        return {
            "blurry": pair[0].contiguous(),
            "sharp": pair[1].contiguous(),
            "u": torch.tensor(i / k, dtype=torch.float32),
            "index": index,
        }
