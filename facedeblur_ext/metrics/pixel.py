"""Full-reference pixel metrics: PSNR, SSIM, L1 (%), on RGB or on the BT.601 luma channel.

All functions take batched tensors ``[N, C, H, W]`` (or a single image ``[C, H, W]``) with
values in ``[0, data_range]`` (default ``[0, 1]``) and return one value per image, shape
``[N]``, in float64. Averaging over a test set is left to the caller, as papers average the
per-image values.

PSNR and SSIM follow scikit-image's definitions (``skimage.metrics.peak_signal_noise_ratio`` and
``structural_similarity``) to within 1e-4: SSIM defaults to scikit-image's defaults (7x7 uniform
window, sample covariance, K1 = 0.01, K2 = 0.03) and ``gaussian=True`` gives the variant of
Wang et al. that papers report (11x11 Gaussian window with sigma 1.5, population covariance),
equal to ``structural_similarity(..., gaussian_weights=True, sigma=1.5,
use_sample_covariance=False)``. Colour SSIM is the mean of the per-channel values, as in
scikit-image with ``channel_axis``.

``y_channel=True`` converts RGB to the luma of ITU-R BT.601 as MATLAB's ``rgb2ycbcr`` and
``skimage.color.rgb2ycbcr`` define it (studio range, Y in [16, 235] / 255 for inputs in [0, 1]),
the convention of the face-deblurring and super-resolution papers that report "Y channel"
numbers.
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = [
    "as_image_batch",
    "as_image_pair",
    "l1_percent",
    "psnr",
    "rgb_to_y_bt601",
    "ssim",
]

# ITU-R BT.601 studio-range luma for RGB in [0, 1]: Y' = 16 + 65.481 R + 128.553 G + 24.966 B
# (in 8-bit units); the same matrix row as skimage.color.rgb2ycbcr and MATLAB rgb2ycbcr.
_BT601_Y_WEIGHTS = (65.481, 128.553, 24.966)
_BT601_Y_OFFSET = 16.0


def as_image_batch(images: torch.Tensor | np.ndarray, *, name: str = "images") -> torch.Tensor:
    """Turn images into a float tensor ``[N, C, H, W]`` in ``[0, 1]``.

    Args:
        images: a tensor ``[N, C, H, W]`` or ``[C, H, W]`` (returned as a batch; uint8
            tensors are divided by 255, other values are untouched), or a numpy array
            ``[H, W]``, ``[H, W, C]`` or ``[N, H, W, C]`` (channels last, as OpenCV/PIL give
            them, RGB order assumed); uint8 arrays are divided by 255, float arrays are taken
            to be in [0, 1] already.
        name: argument name for error messages.

    Returns:
        A tensor ``[N, C, H, W]``; float32 for numpy input.
    """
    if isinstance(images, np.ndarray):
        array = images
        if array.ndim == 2:
            array = array[None, :, :, None]
        elif array.ndim == 3:
            array = array[None]
        if array.ndim != 4:
            raise ValueError(f"{name}: expected a [H,W], [H,W,C] or [N,H,W,C] array, "
                             f"got shape {images.shape}")
        if array.dtype == np.uint8:
            tensor = torch.tensor(array, dtype=torch.float32).div_(255.0)
        elif np.issubdtype(array.dtype, np.floating):
            tensor = torch.tensor(array, dtype=torch.float32)
        else:
            raise TypeError(f"{name}: expected a uint8 or float array, got {array.dtype}")
        return tensor.permute(0, 3, 1, 2).contiguous()
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor or numpy array, got {type(images)}")
    if images.dtype == torch.uint8:
        images = images.float().div_(255.0)
    if images.dim() == 3:
        images = images.unsqueeze(0)
    if images.dim() != 4:
        raise ValueError(f"{name}: expected [N,C,H,W] or [C,H,W], got shape {tuple(images.shape)}")
    return images


def as_image_pair(x: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Two image batches of a full-reference metric, checked: same shape, not empty, same
    device (each converted by :func:`as_image_batch`)."""
    x = as_image_batch(x, name="x")
    y = as_image_batch(y, name="y")
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same shape, got {tuple(x.shape)} and "
                         f"{tuple(y.shape)}")
    if x.numel() == 0:
        raise ValueError("empty images")
    if x.device != y.device:
        raise ValueError(f"x and y are on different devices ({x.device}, {y.device})")
    return x, y


def rgb_to_y_bt601(images: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """ITU-R BT.601 studio-range luma of RGB images.

    Args:
        images: ``[N, 3, H, W]`` RGB in ``[0, data_range]``.
        data_range: the value of full white (1.0 for [0, 1] images, 255 for 8-bit values).

    Returns:
        ``[N, 1, H, W]`` luma in ``[16, 235] * data_range / 255``.
    """
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected RGB images [N,3,H,W], got shape {tuple(images.shape)}")
    weights = torch.tensor(_BT601_Y_WEIGHTS, dtype=images.dtype, device=images.device)
    y = torch.einsum("nchw,c->nhw", images, weights / 255.0).unsqueeze(1)
    return y + _BT601_Y_OFFSET * data_range / 255.0


# On the CPU, float64 work is done a few images at a time: buffers that stay below glibc's
# mmap threshold are reused instead of being mapped (and page-faulted) afresh for every
# operation, which made whole-batch SSIM about 4x slower than scikit-image's per-image loop.
_CPU_CHUNK_ELEMENTS = 1 << 20


def _prepared_chunks(x, y, y_channel: bool, data_range: float, buffers_per_pixel: int,
                     exact: bool = True):
    """Yield (x, y) chunks of the batch (luma when ``y_channel``), float64 when ``exact``."""
    x, y = as_image_pair(x, y)
    if exact:
        # float64 so that E[x^2] - E[x]^2 in SSIM keeps its precision.
        dtype = torch.float64
    else:
        # Sums of non-negative terms (MSE, MAE): float32 with torch's cascaded summation is
        # accurate to ~1e-6 relative, far below the 1e-4 dB we promise, and saves a copy.
        dtype = torch.promote_types(x.dtype, torch.float32)
    if y_channel and x.shape[1] != 3:
        raise ValueError(f"y_channel needs RGB images [N,3,H,W], got shape {tuple(x.shape)}")
    if x.device.type == "cpu":
        per_image = buffers_per_pixel * x[0].numel()
        step = max(1, _CPU_CHUNK_ELEMENTS // per_image)
    else:
        step = x.shape[0]
    for start in range(0, x.shape[0], step):
        xc = x[start:start + step].to(dtype)
        yc = y[start:start + step].to(dtype)
        if y_channel:
            xc = rgb_to_y_bt601(xc, data_range)
            yc = rgb_to_y_bt601(yc, data_range)
        yield xc, yc


def psnr(x: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray, *,
         data_range: float = 1.0, y_channel: bool = False) -> torch.Tensor:
    """Peak signal-to-noise ratio per image, in dB.

    ``10 log10(data_range^2 / MSE)`` with the MSE over all pixels and channels of each image,
    as ``skimage.metrics.peak_signal_noise_ratio``. Identical images give ``inf``.

    Args:
        x: restored images ``[N, C, H, W]`` in ``[0, data_range]`` (or see
            :func:`as_image_batch` for numpy input).
        y: reference images, same shape.
        data_range: the value range of the images (1.0 for [0, 1]).
        y_channel: compare the BT.601 luma instead of RGB (``C`` must be 3).

    Returns:
        ``[N]`` float64.
    """
    mse = torch.cat([(xc - yc).square().flatten(1).mean(dim=1).double()
                     for xc, yc in _prepared_chunks(x, y, y_channel, data_range, 1,
                                                    exact=False)])
    return 10.0 * torch.log10(data_range**2 / mse)


def l1_percent(x: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray, *,
               data_range: float = 1.0) -> torch.Tensor:
    """Mean absolute error per image in percent of the data range (the "L1 (%)" of SNADNet).

    Args:
        x: restored images ``[N, C, H, W]`` in ``[0, data_range]``.
        y: reference images, same shape.
        data_range: the value range of the images.

    Returns:
        ``[N]`` float64, ``100 * mean(|x - y|) / data_range``.
    """
    mae = torch.cat([(xc - yc).abs().flatten(1).mean(dim=1).double()
                     for xc, yc in _prepared_chunks(x, y, False, data_range, 1, exact=False)])
    return 100.0 * mae / data_range


def _gaussian_taps(sigma: float, truncate: float) -> list[float]:
    # Same support and normalization as scipy.ndimage.gaussian_filter (radius
    # int(truncate * sigma + 0.5)), which scikit-image's SSIM uses.
    radius = int(truncate * sigma + 0.5)
    weights = [math.exp(-0.5 * (offset / sigma) ** 2) for offset in range(-radius, radius + 1)]
    total = math.fsum(weights)
    return [w / total for w in weights]


def _valid_separable_filter(stack: torch.Tensor, taps: list[float]) -> torch.Tensor:
    """Depthwise 2-D filtering with a separable kernel, only where the window fits.

    scikit-image filters with reflected borders and then crops ``(win_size - 1) // 2`` pixels
    from every side before averaging, which leaves exactly the windows that lie inside the
    image: a "valid" convolution.
    """
    # Accumulating shifted views in place, one axis at a time: in float64 on the CPU this is
    # several times faster than a grouped convolution (no fast float64 path) or unfold + matmul
    # (which materializes every window).
    k = len(taps)
    width = stack.shape[-1] - k + 1
    rows = stack[..., 0:width] * taps[0]
    for i in range(1, k):
        rows.add_(stack[..., i:i + width], alpha=taps[i])
    height = stack.shape[-2] - k + 1
    out = rows[..., 0:height, :] * taps[0]
    for i in range(1, k):
        out.add_(rows[..., i:i + height, :], alpha=taps[i])
    return out


def ssim(x: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray, *,
         data_range: float = 1.0, y_channel: bool = False, gaussian: bool = False,
         win_size: int | None = None, sigma: float = 1.5, sample_covariance: bool | None = None,
         k1: float = 0.01, k2: float = 0.03, return_map: bool = False
         ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Structural similarity (mean SSIM) per image, as ``skimage.metrics.structural_similarity``.

    Args:
        x: restored images ``[N, C, H, W]`` in ``[0, data_range]``.
        y: reference images, same shape.
        data_range: the value range of the images (scikit-image requires it for float input;
            1.0 for [0, 1] images, equivalent to 255 on 8-bit values).
        y_channel: compare the BT.601 luma instead of RGB (``C`` must be 3).
        gaussian: Gaussian-weighted window (sigma ``sigma``, truncated at 3.5 sigma: 11x11 for
            sigma 1.5) instead of the uniform ``win_size`` window. With the defaults below this
            is the paper variant (scikit-image ``gaussian_weights=True, sigma=1.5,
            use_sample_covariance=False``).
        win_size: side of the uniform window (odd; default 7). Ignored when ``gaussian``.
        sigma: standard deviation of the Gaussian window.
        sample_covariance: normalize variances by ``NP - 1`` instead of ``NP`` (``NP`` = pixels
            per window). Default: True for the uniform window (scikit-image's default), False
            for the Gaussian one.
        k1, k2: the stabilizing constants, ``C1 = (k1 L)^2``, ``C2 = (k2 L)^2``.
        return_map: also return the SSIM map ``[N, C, H - w + 1, W - w + 1]`` (the region
            scikit-image averages).

    Returns:
        ``[N]`` float64 (and the map when ``return_map``).
    """
    if gaussian:
        taps = _gaussian_taps(sigma, 3.5)
        window = len(taps)
        if sample_covariance is None:
            sample_covariance = False
    else:
        window = 7 if win_size is None else int(win_size)
        if window < 1 or window % 2 == 0:
            raise ValueError(f"win_size must be odd and positive, got {window}")
        taps = [1.0 / window] * window
        if sample_covariance is None:
            sample_covariance = True
    n_window = window * window
    cov_norm = n_window / (n_window - 1) if sample_covariance else 1.0
    c1 = (k1 * data_range) ** 2
    c2 = (k2 * data_range) ** 2

    values, maps = [], []
    for xc, yc in _prepared_chunks(x, y, y_channel, data_range, 5):
        height, width = xc.shape[-2:]
        if height < window or width < window:
            raise ValueError(f"images of {height}x{width} are smaller than the "
                             f"{window}x{window} SSIM window")
        ssim_map = _ssim_map(xc, yc, taps, cov_norm, c1, c2)
        # Mean over each channel's map, then over channels (equal sizes: the overall mean).
        values.append(ssim_map.flatten(1).mean(dim=1))
        if return_map:
            maps.append(ssim_map)
    value = torch.cat(values)
    ssim_map = torch.cat(maps) if return_map else None
    return (value, ssim_map) if return_map else value


def _ssim_map(x: torch.Tensor, y: torch.Tensor, taps: list[float], cov_norm: float, c1: float,
              c2: float) -> torch.Tensor:
    channels = x.shape[1]
    stats = _valid_separable_filter(torch.cat([x, y, x * x, y * y, x * y], dim=1), taps)
    mu_x, mu_y, e_xx, e_yy, e_xy = stats.split(channels, dim=1)
    mu_xy = mu_x * mu_y
    mu_xx = mu_x.square()
    mu_yy = mu_y.square()
    # (2 mu_x mu_y + C1)(2 cov + C2) / ((mu_x^2 + mu_y^2 + C1)(var_x + var_y + C2)), with
    # var = cov_norm (E[x^2] - mu^2) as scikit-image computes it.
    numerator = (2 * mu_xy + c1) * (2 * cov_norm * (e_xy - mu_xy) + c2)
    denominator = (mu_xx + mu_yy + c1) * (cov_norm * (e_xx - mu_xx + e_yy - mu_yy) + c2)
    return numerator / denominator

