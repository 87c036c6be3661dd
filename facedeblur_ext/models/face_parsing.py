"""Stage I of SNADNet: a face parsing network for blurry faces [paper 004, Sec. II-A].

SNADNet fine-tunes the BiSeNet of face-parsing.PyTorch (the repository its footnote names) on
blurry faces with a focal loss. Its released weights cannot be fetched here, so this module is
our own implementation of the same architecture family, trained from scratch:

* context path: a ResNet-18 layout (stem conv 7x7/2 + max-pool, four stages of two basic
  residual blocks, widths w, 2w, 4w, 8w at 1/4 ... 1/32) with attention refinement modules
  (ARM) on the 1/16 and 1/32 features and a global-average context vector;
* spatial detail: the 1/8 backbone features (as face-parsing.PyTorch does, instead of a
  separate spatial path);
* a feature fusion module (FFM) and a 1/8 output head upsampled bilinearly to the input size;
  two auxiliary heads on the 1/8 and 1/16 context features for deep supervision in training.

Why this one: it is the network the paper fine-tunes, it is compact (about 13 M parameters
at the default width 64, 4 classes), runs at 1/8 resolution for most of its compute, and its
ARM/global context see the whole face, which matters when blur has erased local edges. The
width is configurable (tests use a few channels).

Classes follow the data pipeline's region order: 0 facial parts (eyes, brows, nose, lips),
1 skin, 2 hair, 3 background. Inputs are RGB in [0, 1] whose height and width are multiples of
32 (the backbone's total stride).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

PARSER_STRIDE = 32


def check_spatial_multiple(x: Tensor, multiple: int, what: str) -> None:
    """Raise a ValueError unless x is [N, C, H, W] with H and W multiples of ``multiple``."""
    if x.dim() != 4:
        raise ValueError(f"{what}: expected a [N, C, H, W] tensor, got shape {tuple(x.shape)}")
    h, w = x.shape[-2:]
    if h % multiple or w % multiple or h == 0 or w == 0:
        raise ValueError(
            f"{what}: height and width must be positive multiples of {multiple} "
            f"(the network's total stride), got {h}x{w}; pad or crop the input"
        )


class _ConvBNReLU(nn.Sequential):
    def __init__(self, cin: int, cout: int, k: int = 3, stride: int = 1):
        super().__init__(
            nn.Conv2d(cin, cout, k, stride, k // 2, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        )


class _BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convs with batch norm and an identity (or 1x1) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                          nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out))
        identity = x if self.shortcut is None else self.shortcut(x)
        return F.relu(out + identity, inplace=True)


class _AttentionRefinement(nn.Module):
    """ARM: 3x3 conv, then channel attention from the globally pooled features."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = _ConvBNReLU(cin, cout, 3)
        # No batch norm on the pooled 1x1 path (BiSeNet has one): it breaks batches of one.
        self.attention = nn.Conv2d(cout, cout, 1)

    def forward(self, x: Tensor) -> Tensor:
        feat = self.conv(x)
        att = torch.sigmoid(self.attention(F.adaptive_avg_pool2d(feat, 1)))
        return feat * att


class _FeatureFusion(nn.Module):
    """FFM: fuse spatial detail and context, reweighted by squeeze-excitation attention."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = _ConvBNReLU(cin, cout, 1)
        squeeze = max(cout // 4, 1)
        self.attention = nn.Sequential(
            nn.Conv2d(cout, squeeze, 1, bias=False), nn.ReLU(inplace=True),
            nn.Conv2d(squeeze, cout, 1, bias=False),
        )

    def forward(self, spatial: Tensor, context: Tensor) -> Tensor:
        feat = self.conv(torch.cat([spatial, context], dim=1))
        att = torch.sigmoid(self.attention(F.adaptive_avg_pool2d(feat, 1)))
        return feat + feat * att


class _Head(nn.Sequential):
    def __init__(self, cin: int, mid: int, num_classes: int):
        super().__init__(_ConvBNReLU(cin, mid, 3), nn.Conv2d(mid, num_classes, 1))


class FaceParsingNet(nn.Module):
    """BiSeNet-style face parser (ResNet-18 context path, ARM, FFM), see the module docstring.

    Args:
        num_classes: number of regions (4: facial parts, skin, hair, background).
        width: backbone base width w (ResNet-18: 64); stages have w, 2w, 4w, 8w channels.
        context_channels: channels of the ARM / context features (BiSeNet: 128).
        fusion_channels: channels of the fused features and output head (BiSeNet: 256).

    Input: [N, 3, H, W] RGB in [0, 1], H and W multiples of 32.
    Output: [N, num_classes, H, W] logits; with ``return_aux=True`` a tuple
    ``(logits, aux_1_8, aux_1_16)`` of three full-size logit maps for deep supervision.
    """

    def __init__(self, num_classes: int = 4, width: int = 64, context_channels: int = 128,
                 fusion_channels: int = 256):
        super().__init__()
        self.num_classes = num_classes
        w = width
        self.stem = _ConvBNReLU(3, w, 7, stride=2)
        self.layer1 = nn.Sequential(_BasicBlock(w, w), _BasicBlock(w, w))
        self.layer2 = nn.Sequential(_BasicBlock(w, 2 * w, 2), _BasicBlock(2 * w, 2 * w))
        self.layer3 = nn.Sequential(_BasicBlock(2 * w, 4 * w, 2), _BasicBlock(4 * w, 4 * w))
        self.layer4 = nn.Sequential(_BasicBlock(4 * w, 8 * w, 2), _BasicBlock(8 * w, 8 * w))
        c = context_channels
        self.arm16 = _AttentionRefinement(4 * w, c)
        self.arm32 = _AttentionRefinement(8 * w, c)
        self.global_context = nn.Sequential(nn.Conv2d(8 * w, c, 1), nn.ReLU(inplace=True))
        self.refine32 = _ConvBNReLU(c, c, 3)
        self.refine16 = _ConvBNReLU(c, c, 3)
        self.fusion = _FeatureFusion(2 * w + c, fusion_channels)
        self.head = _Head(fusion_channels, fusion_channels, num_classes)
        self.aux_head8 = _Head(c, max(c // 2, 1), num_classes)
        self.aux_head16 = _Head(c, max(c // 2, 1), num_classes)

    def forward(self, image: Tensor, return_aux: bool = False):
        check_spatial_multiple(image, PARSER_STRIDE, "FaceParsingNet")
        size = image.shape[-2:]
        x = self.stem(image * 2.0 - 1.0)
        x = F.max_pool2d(x, 3, 2, 1)
        feat4 = self.layer1(x)
        feat8 = self.layer2(feat4)
        feat16 = self.layer3(feat8)
        feat32 = self.layer4(feat16)

        ctx32 = self.arm32(feat32) + self.global_context(F.adaptive_avg_pool2d(feat32, 1))
        ctx32_up = self.refine32(F.interpolate(ctx32, size=feat16.shape[-2:], mode="nearest"))
        ctx16 = self.arm16(feat16) + ctx32_up
        ctx16_up = self.refine16(F.interpolate(ctx16, size=feat8.shape[-2:], mode="nearest"))

        fused = self.fusion(feat8, ctx16_up)
        logits = F.interpolate(self.head(fused), size=size, mode="bilinear", align_corners=False)
        if not return_aux:
            return logits
        aux8 = F.interpolate(self.aux_head8(ctx16_up), size=size, mode="bilinear",
                             align_corners=False)
        aux16 = F.interpolate(self.aux_head16(ctx32_up), size=size, mode="bilinear",
                              align_corners=False)
        return logits, aux8, aux16

    @torch.no_grad()
    def parse(self, image: Tensor, soft: bool = False) -> Tensor:
        """Parsing map for the SNADNet generator.

        Args:
            image: [N, 3, H, W] blurry face in [0, 1].
            soft: return softmax probabilities instead of a one-hot of the arg-max.

        Returns:
            [N, num_classes, H, W] float map whose channels sum to 1 at every pixel.
        """
        logits = self(image)
        if soft:
            return logits.softmax(dim=1)
        labels = logits.argmax(dim=1)
        return F.one_hot(labels, self.num_classes).permute(0, 3, 1, 2).to(image.dtype)


def confusion_matrix(pred: Tensor, target: Tensor, num_classes: int,
                     ignore_index: int | None = None) -> Tensor:
    """Confusion counts ``cm[t, p]`` (target class t predicted as p) as an int64 [K, K] tensor.

    Args:
        pred, target: integer label maps of the same shape.
        num_classes: K.
        ignore_index: target label excluded from the counts.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    pred = pred.reshape(-1).long()
    target = target.reshape(-1).long()
    keep = (target >= 0) & (target < num_classes)
    if ignore_index is not None:
        keep &= target != ignore_index
    idx = target[keep] * num_classes + pred[keep].clamp(0, num_classes - 1)
    counts = torch.bincount(idx, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def iou_from_confusion(cm: Tensor) -> tuple[float, list[float]]:
    """Mean and per-class intersection over union from a confusion matrix.

    IoU_k = TP / (TP + FP + FN). Classes absent from both prediction and target (union 0) get
    NaN in the per-class list and are left out of the mean.

    Returns:
        ``(miou, per_class)``.
    """
    cm = cm.double()
    tp = cm.diag()
    union = cm.sum(0) + cm.sum(1) - tp
    iou = torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, float("nan")))
    present = union > 0
    miou = float(iou[present].mean()) if bool(present.any()) else float("nan")
    return miou, [float(v) for v in iou]


def mean_iou(pred: Tensor, target: Tensor, num_classes: int,
             ignore_index: int | None = None) -> float:
    """Mean IoU of two label maps (see :func:`iou_from_confusion`)."""
    return iou_from_confusion(confusion_matrix(pred, target, num_classes, ignore_index))[0]


@torch.no_grad()
def evaluate_parsing(
    model: FaceParsingNet,
    batches: Iterable[dict],
    device: torch.device | str | None = None,
    image_key: str = "blurry",
) -> dict:
    """mIoU of a parser over held-out batches.

    Args:
        model: the parser (switched to eval mode for the evaluation and restored afterwards).
        batches: data-pipeline dicts with ``image_key`` [N, 3, H, W] and ``parsing`` labels or
            ``regions`` masks (see :func:`parsing_labels`).
        device: where to run (default: the model's device).
        image_key: which image to parse (SNADNet parses the blurry input).

    Returns:
        dict with ``miou``, ``iou_per_class`` (list, NaN for classes never seen) and
        ``pixel_accuracy``.
    """
    was_training = model.training
    model.eval()
    if device is None:
        device = next(model.parameters()).device
    k = model.num_classes
    cm = torch.zeros(k, k, dtype=torch.long)
    try:
        for batch in batches:
            image = batch[image_key].to(device)
            labels = parsing_labels(batch).to(device)
            pred = model(image).argmax(dim=1)
            cm += confusion_matrix(pred, labels, k).cpu()
    finally:
        model.train(was_training)
    miou, per_class = iou_from_confusion(cm)
    total = int(cm.sum())
    acc = float(cm.diag().sum()) / total if total else float("nan")
    return {"miou": miou, "iou_per_class": per_class, "pixel_accuracy": acc}


def parsing_labels(batch: dict) -> Tensor:
    """Region labels [N, H, W] (facial parts, skin, hair, background) of a data-pipeline batch.

    ``parsing`` holds the pipeline's finer classes (:data:`facedeblur_ext.data.PARSING_CLASSES`),
    grouped into the four regions by :data:`facedeblur_ext.data.CLASS_TO_REGION`; without it
    the labels are the arg-max of the ``regions`` masks.
    """
    if "parsing" in batch:
        from ..data.masks import CLASS_TO_REGION

        parsing = batch["parsing"].long()
        lut = torch.as_tensor(CLASS_TO_REGION, device=parsing.device)
        return lut[parsing]
    if "regions" in batch:
        return batch["regions"].argmax(dim=1)
    raise KeyError("batch has neither 'parsing' labels nor 'regions' masks")


#: display colours (RGB in [0, 1]) of the regions: facial parts, skin, hair, background
REGION_COLORS = ((0.90, 0.20, 0.20), (0.95, 0.75, 0.55), (0.35, 0.22, 0.10), (0.15, 0.15, 0.20))


def colorize_regions(parsing: Tensor) -> Tensor:
    """An RGB picture [N, 3, H, W] in [0, 1] of region labels [N, H, W] or a parsing map
    [N, R, H, W] (its arg-max), with :data:`REGION_COLORS` (grey for further classes)."""
    labels = parsing.argmax(dim=1) if parsing.dim() == 4 else parsing.long()
    count = max(len(REGION_COLORS), int(labels.max()) + 1 if labels.numel() else 0)
    colors = torch.full((count, 3), 0.5)
    colors[: len(REGION_COLORS)] = torch.tensor(REGION_COLORS)
    return colors.to(labels.device)[labels].permute(0, 3, 1, 2).contiguous()
