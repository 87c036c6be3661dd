"""Small training batches from the real faces bundled in the package, for model tests.

TEST STAND-IN ONLY: the region masks here are a fixed, crude geometric layout for aligned
CelebA crops (an ellipse of skin with elliptical eyes, nose and mouth, a larger ellipse of
hair behind it, background elsewhere). They are the same for every image and are not a face
parser; the real masks come from the data pipeline (MediaPipe). The blur is a fixed diagonal
box (motion-like) kernel applied with ``F.conv2d``, not the project's blur synthesis.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from conftest import REPO_ROOT
from PIL import Image

from facedeblur_ext.data import PARSING_CLASSES

FACES_DIR = REPO_ROOT / "facedeblur_ext" / "assets" / "faces"
NUM_REGIONS = 4  # facial parts, skin, hair, background


def load_faces(size: int | tuple[int, int] = 64) -> torch.Tensor:
    """The 8 bundled 128x128 CelebA test faces as [8, 3, h, w] in [0, 1], area-resized."""
    paths = sorted(FACES_DIR.glob("celeba_*.png"))
    assert len(paths) >= 8, f"expected the bundled CelebA faces in {FACES_DIR}"
    imgs = [torch.from_numpy(np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) / 255.0)
            for p in paths[:8]]
    x = torch.stack(imgs).permute(0, 3, 1, 2).contiguous()
    size = (size, size) if isinstance(size, int) else tuple(size)
    if x.shape[-2:] != size:
        x = F.interpolate(x, size=size, mode="area")
    return x


def _ellipse(yy, xx, cy, cx, ry, rx):
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0


def standin_parsing_labels(h: int, w: int) -> torch.Tensor:
    """Test stand-in labels [h, w] of the data pipeline's ``PARSING_CLASSES``."""
    yy, xx = torch.meshgrid((torch.arange(h) + 0.5) / h, (torch.arange(w) + 0.5) / w,
                            indexing="ij")
    cls = {name: i for i, name in enumerate(PARSING_CLASSES)}
    labels = torch.full((h, w), cls["background"], dtype=torch.long)
    labels[_ellipse(yy, xx, 0.40, 0.50, 0.42, 0.40)] = cls["hair"]
    labels[_ellipse(yy, xx, 0.56, 0.50, 0.36, 0.28)] = cls["skin"]
    labels[_ellipse(yy, xx, 0.41, 0.36, 0.04, 0.08) | _ellipse(yy, xx, 0.41, 0.64, 0.04, 0.08)] = (
        cls["eyes"])
    labels[_ellipse(yy, xx, 0.55, 0.50, 0.09, 0.05)] = cls["nose"]
    labels[_ellipse(yy, xx, 0.72, 0.50, 0.05, 0.11)] = cls["lips"]
    return labels


# region of each stand-in class (the data pipeline's CLASS_TO_REGION)
_REGION_OF_CLASS = torch.tensor([3, 1, 0, 0, 0, 0, 0, 2])


def motion_blur(sharp: torch.Tensor, length: int = 7) -> torch.Tensor:
    """Diagonal box blur of the given length (replicate borders)."""
    k = torch.eye(length, dtype=sharp.dtype) / length
    c = sharp.shape[1]
    kernel = k.expand(c, 1, length, length)
    pad = length // 2
    return F.conv2d(F.pad(sharp, (pad, pad, pad, pad), mode="replicate"), kernel, groups=c)


def make_batch(sharp: torch.Tensor) -> dict:
    """Batch dict in the data pipeline's format (``SNADNetDataset``) from sharp faces
    [N, 3, H, W]: ``sharp``, ``blurry``, ``regions`` [N, 4, H, W] and ``parsing`` [N, H, W]."""
    n, _, h, w = sharp.shape
    parsing = standin_parsing_labels(h, w).expand(n, h, w).clone()
    regions = F.one_hot(_REGION_OF_CLASS[parsing], NUM_REGIONS).permute(0, 3, 1, 2).float()
    return {"sharp": sharp, "blurry": motion_blur(sharp), "regions": regions,
            "parsing": parsing}
