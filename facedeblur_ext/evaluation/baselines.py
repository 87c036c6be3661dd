"""Classical baselines for the evaluation tables: unsharp masking and Wiener deconvolution.

Both work on batches ``[B, C, H, W]`` of float images in [0, 1] on any device and return
images clamped to [0, 1].

**Wiener deconvolution** (non-blind: it is given the true kernel) restores
``X = conj(K) Y / (|K|^2 + NSR(w))`` in the Fourier domain, with the noise-to-signal power
ratio of a natural-image spectrum model: the sharp image's power falls as ``1 / |w|^2``, i.e.
``S_x(w) = c / |D(w)|^2`` with ``|D(w)|^2 = 4 sin^2(w_x / 2) + 4 sin^2(w_y / 2)`` the power of
the finite-difference gradient and ``c`` the image's gradient energy per pixel. White noise of
variance ``sigma_n^2`` then gives ``NSR(w) = nsr * |D(w)|^2`` with the scalar
``nsr = sigma_n^2 / c``. A constant NSR (flat spectrum) either leaves the blur or amplifies
the noise of SNADNet's sigma = 0.03 protocol below the blurry input's PSNR; this model gains
3-4 dB there and 7 dB on noise-free blur (numbers below).

The FFT treats the image as periodic while the blur was made with reflected borders
(``ops.blur_synthesize``'s default), so the blurry image is first extended by one kernel size
on every side by reflection and the extension is *edge-tapered*: it fades into its own
circularly blurred version towards the wrap-around seam (the idea of MATLAB's ``edgetaper``),
which the periodic model describes exactly, so the seam does not ring. The result is cropped.

``nsr="auto"``: ``(sigma_n^2 + q^2 / 12) / c_face`` with the protocol's noise level
``sigma_n``, the 8-bit quantization step ``q = 1/255`` and ``c_face`` =
:data:`FACE_GRADIENT_ENERGY`, the median gradient energy of the 1000 sharp CelebA test
faces (0.0056; 10-90 % range 0.003-0.009), floored at :data:`MIN_AUTO_NSR`. The floor absorbs
what the model leaves out, mostly the border mismatch (reflect-101 blur vs reflected blurry
image), which long linear motions with their spectral zeros ring into the whole image. On 48
CelebA test faces (PSNR blurry -> auto NSR, best constant NSR in brackets): thesis motion blur
24.2 -> 27.2 dB (27.4), trajectory blur without noise 25.2 -> 32.1 (33.3), trajectory blur
with noise 0.03 23.9 -> 27.4 (27.6).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "DEFAULT_UNSHARP_AMOUNT",
    "DEFAULT_UNSHARP_SIGMA",
    "FACE_GRADIENT_ENERGY",
    "MIN_AUTO_NSR",
    "auto_nsr",
    "gaussian_blur",
    "unsharp_mask",
    "wiener_deconvolve",
]

#: Unsharp-mask defaults: a 2-pixel Gaussian (the blur being undone spans 13-29 pixels, so a
#: 1-pixel radius barely acts) and the textbook amount 1 (add back the detail once).
DEFAULT_UNSHARP_SIGMA = 2.0
DEFAULT_UNSHARP_AMOUNT = 1.0
#: Median gradient energy per pixel, ``mean((dx x)^2) + mean((dy x)^2)`` on [0, 1] RGB, of the
#: 1000 sharp CelebA test faces (celeba_dic_test128): the ``c`` of the spectrum model.
FACE_GRADIENT_ENERGY = 0.0056
#: Floor of the automatic noise-to-signal ratio (see the module docstring).
MIN_AUTO_NSR = 1e-2
_QUANTIZATION_VARIANCE = (1.0 / 255.0) ** 2 / 12.0


def _check_batch(images: Tensor, name: str) -> None:
    if not isinstance(images, Tensor) or images.dim() != 4:
        raise ValueError(f"{name} must be a [B, C, H, W] tensor, got "
                         f"{getattr(images, 'shape', type(images).__name__)}")
    if not images.is_floating_point():
        raise TypeError(f"{name} must be floating (values in [0, 1]), got {images.dtype}")
    if images.numel() == 0:
        raise ValueError(f"{name} must not be empty")


def gaussian_blur(images: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur with reflected borders (radius ``ceil(3 sigma)``)."""
    _check_batch(images, "images")
    if sigma <= 0:
        return images.clone()
    radius = max(1, math.ceil(3.0 * sigma))
    h, w = images.shape[-2:]
    if radius >= min(h, w):
        radius = min(h, w) - 1
    offsets = torch.arange(-radius, radius + 1, device=images.device, dtype=images.dtype)
    taps = torch.exp(-0.5 * (offsets / sigma) ** 2)
    taps = taps / taps.sum()
    c = images.shape[1]
    x = F.pad(images, (radius, radius, radius, radius), mode="reflect")
    x = F.conv2d(x, taps.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(x, taps.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def unsharp_mask(images: Tensor, sigma: float = DEFAULT_UNSHARP_SIGMA,
                 amount: float = DEFAULT_UNSHARP_AMOUNT) -> Tensor:
    """Unsharp masking: ``x + amount * (x - G_sigma * x)``, clamped to [0, 1].

    Args:
        images: [B, C, H, W] float in [0, 1].
        sigma: standard deviation of the Gaussian that defines "unsharp", in pixels.
        amount: how much of the detail layer is added back.

    Returns:
        [B, C, H, W], same dtype.
    """
    _check_batch(images, "images")
    return (images + amount * (images - gaussian_blur(images, sigma))).clamp(0, 1)


def auto_nsr(blurry: Tensor, noise_sigma: float | Tensor = 0.0,
             gradient_energy: float = FACE_GRADIENT_ENERGY) -> Tensor:
    """Per-image ``nsr`` for :func:`wiener_deconvolve` (module docstring).

    Args:
        blurry: [B, C, H, W] float in [0, 1] (gives the batch size and device).
        noise_sigma: the Gaussian noise level of the blur model (a number or [B]).
        gradient_energy: the sharp images' gradient energy per pixel, ``c``.

    Returns:
        [B] float64 values, at least :data:`MIN_AUTO_NSR`.
    """
    _check_batch(blurry, "blurry")
    sigma = torch.as_tensor(noise_sigma, dtype=torch.float64, device=blurry.device).reshape(-1)
    nsr = (sigma**2 + _QUANTIZATION_VARIANCE) / float(gradient_energy)
    return nsr.clamp_min(MIN_AUTO_NSR).expand(blurry.shape[0])


def _taper_ramp(length: int, pad: int, device, dtype) -> Tensor:
    """1 on the image, a raised-cosine fade to 0 across each pad towards the seam."""
    ramp = torch.ones(length, device=device, dtype=dtype)
    if pad > 0:
        t = (torch.arange(pad, device=device, dtype=dtype) + 0.5) / pad
        rise = 0.5 - 0.5 * torch.cos(math.pi * t)  # 0 at the seam -> 1 at the image
        ramp[:pad] = rise
        ramp[length - pad:] = rise.flip(0)
    return ramp


def _gradient_power(size: tuple[int, int], like: Tensor) -> Tensor:
    """``|D(w)|^2`` of the forward-difference gradient on the rfft2 grid [Hp, Wp // 2 + 1]."""
    hp, wp = size
    wy = 2 * math.pi * torch.fft.fftfreq(hp, device=like.device, dtype=like.dtype)
    wx = 2 * math.pi * torch.fft.rfftfreq(wp, device=like.device, dtype=like.dtype)
    return 4 * torch.sin(wy / 2)[:, None] ** 2 + 4 * torch.sin(wx / 2)[None, :] ** 2


def _otf(kernels: Tensor, size: tuple[int, int]) -> Tensor:
    """Transfer functions [B, 1, Hp, Wp // 2 + 1] of kernels [B, Kh, Kw] for a true
    convolution whose origin is tap ((Kh - 1) // 2, (Kw - 1) // 2), as blur_synthesize."""
    b, kh, kw = kernels.shape
    hp, wp = size
    psf = kernels.new_zeros(b, hp, wp)
    psf[:, :kh, :kw] = kernels
    psf = torch.roll(psf, shifts=(-((kh - 1) // 2), -((kw - 1) // 2)), dims=(1, 2))
    return torch.fft.rfft2(psf)[:, None]


def wiener_deconvolve(blurry: Tensor, kernels: Tensor, nsr: float | Tensor | str = "auto",
                      *, noise_sigma: float | Tensor = 0.0, pad: int | None = None) -> Tensor:
    """Non-blind Wiener deconvolution with the true blur kernel (module docstring).

    Args:
        blurry: [B, C, H, W] float in [0, 1].
        kernels: [B, Kh, Kw] (or [Kh, Kw] for all) kernels of the blur, in the convention of
            ``ops.blur_synthesize`` (true convolution, origin at the centre tap).
        nsr: noise-to-signal ratio at the gradient scale, ``sigma_n^2 / c`` (the filter uses
            ``nsr * |D(w)|^2``): a number, [B] values, or ``"auto"`` (:func:`auto_nsr` with
            ``noise_sigma``).
        noise_sigma: noise level used by ``nsr="auto"``.
        pad: border extension in pixels (default: the kernel size).

    Returns:
        [B, C, H, W] restored images, clamped to [0, 1], dtype of ``blurry``.
    """
    _check_batch(blurry, "blurry")
    if kernels.dim() == 2:
        kernels = kernels[None].expand(blurry.shape[0], -1, -1)
    if kernels.dim() != 3 or kernels.shape[0] != blurry.shape[0]:
        raise ValueError(f"kernels must be [B, Kh, Kw] with B = {blurry.shape[0]}, got "
                         f"{tuple(kernels.shape)}")
    b, c, h, w = blurry.shape
    compute = torch.float64 if blurry.dtype == torch.float64 else torch.float32
    y = blurry.to(compute)
    k = kernels.to(device=blurry.device, dtype=compute)
    k = k / k.sum(dim=(1, 2), keepdim=True).clamp_min(1e-12)
    if isinstance(nsr, str):
        if nsr != "auto":
            raise ValueError(f"nsr must be a number, a tensor or 'auto', got {nsr!r}")
        nsr_t = auto_nsr(blurry, noise_sigma)
    else:
        nsr_t = torch.as_tensor(nsr, dtype=torch.float64, device=blurry.device).reshape(-1)
    if bool((nsr_t < 0).any()):
        raise ValueError("nsr must be non-negative")
    nsr_t = nsr_t.to(compute).expand(b).reshape(b, 1, 1, 1)

    p = int(max(k.shape[-2:]) if pad is None else pad)
    mode = "reflect" if p < min(h, w) else "replicate"
    padded = F.pad(y, (p, p, p, p), mode=mode) if p > 0 else y
    hp, wp = padded.shape[-2:]
    otf = _otf(k, (hp, wp))
    if p > 0:
        # Edge taper: near the wrap-around seam use the circularly blurred extension, which
        # the periodic blur model describes exactly.
        circular = torch.fft.irfft2(torch.fft.rfft2(padded) * otf, s=(hp, wp))
        weight = (_taper_ramp(hp, p, y.device, compute)[:, None]
                  * _taper_ramp(wp, p, y.device, compute)[None, :])
        padded = weight * padded + (1 - weight) * circular
    spectrum = torch.fft.rfft2(padded)
    restored = torch.fft.irfft2(
        spectrum * otf.conj() / (otf.abs().square() + nsr_t * _gradient_power((hp, wp), padded)),
        s=(hp, wp))
    restored = restored[..., p:p + h, p:p + w] if p > 0 else restored
    return restored.clamp(0, 1).to(blurry.dtype)
