"""Blur synthesis: kernel generators, the fused one-pass blur and frame averaging.

Blur formation follows SPEC.md section 2: ``y = g(m * (k * g^-1(x)) + (1 - m) * g^-1(x) + n)``
with ``k`` a blur kernel (true convolution), ``m`` an optional face mask, ``g`` an optional
camera response (gamma) and ``n`` Gaussian noise, optionally quantized to 8 bits.

Kernel generators return ``[N, K, K]`` non-negative kernels with unit sum. Geometry: pixel
``(row i, column j)`` of a kernel sits at ``(x = j, y = i)`` with y pointing down; generated
shapes are centred on ``((K - 1) / 2, (K - 1) / 2)``, the pixel that ``blur_synthesize``
treats as the origin for odd ``K`` (for even ``K`` the origin is pixel ``(K - 1) // 2``, half
a pixel up-left of the shape's centre). Angles are in degrees, counter-clockwise as seen on
screen. The generators are not differentiable: propagating a gradient through one to a
parameter tensor that requires grad raises a ``RuntimeError``.

Randomness is always drawn with torch from the caller's ``generator`` on the target device
and handed to the native ops, which are deterministic: the same seed gives the same kernels
and noise on a given device.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ._autograd import register_no_derivative
from ._selfcheck import register_self_check

__all__ = [
    "BORDERS",
    "TRAJECTORY_PARAMS",
    "average_frames",
    "blur_synthesize",
    "defocus_kernels",
    "gaussian_kernels",
    "motion_kernels",
    "pad_kernels",
    "trajectory_kernels",
    "trajectory_random_inputs",
]

_OPS = torch.ops.facedeblur_ext

#: Border rules of ``blur_synthesize``: ``reflect`` is reflect-101 (OpenCV's default
#: ``BORDER_REFLECT_101``, torch's pad mode ``"reflect"``), ``replicate`` repeats the edge,
#: ``zeros`` reads zeros, ``circular`` wraps around.
BORDERS = ("reflect", "replicate", "zeros", "circular")

#: Per-kernel parameters of the camera-shake walk, in the column order of the native op.
TRAJECTORY_PARAMS = (
    "anxiety",
    "centripetal",
    "jerk_freq",
    "gaussian_term",
    "init_angle",
    "max_length",
    "exposure",
)
_CENTERING = {"box": 0, "mass": 1}
_IMAGE_DTYPES = (torch.uint8, torch.float16, torch.bfloat16, torch.float32, torch.float64)
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# --------------------------------------------------------------------------------------
# Argument helpers
# --------------------------------------------------------------------------------------

Scalars = float | Sequence[float] | Tensor


def _as_vector(value: Scalars, name: str, device: torch.device | None) -> Tensor:
    """A float64 vector from a number, a sequence or a 0-/1-D tensor."""
    if isinstance(value, Tensor):
        if value.dim() > 1:
            raise ValueError(f"{name} must be a number or a 1-D tensor, got shape "
                             f"{tuple(value.shape)}")
        if value.is_complex() or not (value.is_floating_point() or value.dtype in (
                torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)):
            raise TypeError(f"{name} must be real, got {value.dtype}")
        out = value.reshape(-1).to(torch.float64)
        return out if device is None else out.to(device)
    if isinstance(value, (int, float)):
        values = [float(value)]
    else:
        values = [float(v) for v in value]
    return torch.tensor(values, dtype=torch.float64, device=device)


def _target_device(device, *values) -> torch.device:
    if device is not None:
        return torch.device(device)
    for v in values:
        if isinstance(v, Tensor):
            return v.device
    return torch.device("cpu")


def _broadcast(vectors: list[Tensor], names: list[str]) -> list[Tensor]:
    n = max(v.numel() for v in vectors)
    out = []
    for v, name in zip(vectors, names):
        if v.numel() not in (1, n):
            raise ValueError(f"{', '.join(names)} must have one value or N values each; "
                             f"{name} has {v.numel()} and another has {n}")
        out.append(v.expand(n).contiguous())
    return out


def _check_size(size: int, name: str = "size") -> int:
    if isinstance(size, bool) or not isinstance(size, int):
        raise TypeError(f"{name} must be an int, got {type(size).__name__}")
    if size < 1:
        raise ValueError(f"{name} must be at least 1, got {size}")
    return size


def _check_kernel_dtype(dtype: torch.dtype) -> None:
    if dtype not in _KERNEL_DTYPES:
        raise TypeError(f"dtype must be a floating dtype, got {dtype}")


def _values_checkable(values: Tensor) -> bool:
    """Whether a check of tensor values may run here: only eagerly (a traced graph cannot
    branch on data) and on the CPU (on a GPU the check would synchronize the stream).

    Where it does not run, only ``average_frames``' counts are still checked (by its native
    op); the other native ops take what they get: a negative length, sigma or radius gives a
    point kernel, a negative noise sigma acts as its magnitude.
    """
    return (not torch.compiler.is_compiling() and values.device.type == "cpu"
            and values.numel() > 0)


def _check_nonnegative(values: Tensor, name: str) -> None:
    if _values_checkable(values) and not bool((values >= 0).all()):
        raise ValueError(f"{name} must be non-negative")


# --------------------------------------------------------------------------------------
# Kernel generators
# --------------------------------------------------------------------------------------


def motion_kernels(
    length: Scalars,
    angle: Scalars,
    size: int,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Linear motion kernels: anti-aliased line segments through the kernel centre.

    Each kernel is the exact integral of a bilinear (tent) splat moving at constant speed
    along a segment of ``length`` pixels at ``angle`` degrees, so its weighted covariance is
    ``length**2 / 12 * d d^T`` plus the splat's own spread (about ``I / 6``) for direction
    ``d``. Lengths up to ``size - 1`` fit at any angle; longer lines are cropped to the
    kernel before normalization. Length 0 gives a point.

    Args:
        length: segment length in pixels, a number or N values (``>= 0``).
        angle: direction in degrees, counter-clockwise on screen; a number or N values.
        size: kernel size K.
        device: where to create the kernels (default: the device of a tensor argument, else
            CPU).
        dtype: floating dtype of the result.

    Returns:
        [N, K, K] kernels, non-negative with unit sum.
    """
    _check_size(size)
    _check_kernel_dtype(dtype)
    dev = _target_device(device, length, angle)
    lengths, angles = _broadcast(
        [_as_vector(length, "length", dev), _as_vector(angle, "angle", dev)], ["length", "angle"]
    )
    _check_nonnegative(lengths, "length")
    return _OPS.motion_kernels(lengths, angles, size, dtype)


def gaussian_kernels(
    sigma: Scalars,
    size: int,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Isotropic Gaussian kernels sampled at pixel centres (survey 001 Eq. 5).

    Args:
        sigma: standard deviation in pixels, a number or N values (``>= 0``; 0 is a point).
        size: kernel size K.
        device: where to create the kernels.
        dtype: floating dtype of the result.

    Returns:
        [N, K, K] kernels, non-negative with unit sum.
    """
    _check_size(size)
    _check_kernel_dtype(dtype)
    sigmas = _as_vector(sigma, "sigma", _target_device(device, sigma)).contiguous()
    _check_nonnegative(sigmas, "sigma")
    return _OPS.gaussian_kernels(sigmas, size, dtype)


def defocus_kernels(
    radius: Scalars,
    size: int,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Defocus (pillbox) kernels: each tap is the exact area of the disk inside its pixel.

    The uniform disk of survey 001 Eq. 3, anti-aliased by area coverage; radius 0 is a point.

    Args:
        radius: disk radius in pixels, a number or N values (``>= 0``).
        size: kernel size K (a disk wider than the kernel is cropped).
        device: where to create the kernels.
        dtype: floating dtype of the result.

    Returns:
        [N, K, K] kernels, non-negative with unit sum.
    """
    _check_size(size)
    _check_kernel_dtype(dtype)
    radii = _as_vector(radius, "radius", _target_device(device, radius)).contiguous()
    _check_nonnegative(radii, "radius")
    return _OPS.defocus_kernels(radii, size, dtype)


def _param_column(spec, uniform: Tensor, n: int, name: str, low: float,
                  high: float | None = None, low_open: bool = False):
    """A per-kernel parameter from a fixed value, a (low, high) range or N values, each of
    which must lie between ``low`` (excluded when ``low_open``) and ``high`` (included)."""

    def inside(v):  # a float or, elementwise, a tensor; NaN is outside
        above = v > low if low_open else v >= low
        return above if high is None else above & (v <= high)

    def outside_error():
        if high is None:
            bound = f"be {'>' if low_open else '>='} {low}"
        else:
            bound = f"lie in {'(' if low_open else '['}{low}, {high}]"
        return ValueError(f"{name} must {bound}, got {spec}")

    if isinstance(spec, Tensor):
        values = spec.reshape(-1).to(device=uniform.device, dtype=torch.float64)
        if values.numel() not in (1, n):
            raise ValueError(f"{name} must have 1 or {n} values, got {values.numel()}")
        if _values_checkable(values) and not bool(inside(values).all()):
            raise outside_error()
        return values.expand(n)
    if isinstance(spec, (tuple, list)):
        if len(spec) != 2:
            raise ValueError(f"{name} range must be (low, high), got {spec}")
        lo, hi = float(spec[0]), float(spec[1])
        if hi < lo:
            raise ValueError(f"{name} range must have low <= high, got {spec}")
    else:
        lo = hi = float(spec)
    if not (inside(lo) and inside(hi)):
        raise outside_error()
    return lo + (hi - lo) * uniform


def trajectory_random_inputs(
    n: int,
    size: int,
    *,
    anxiety=(0.003, 0.01),
    max_length=None,
    exposure=1.0,
    num_steps: int = 2000,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The random numbers of ``trajectory_kernels``, drawn in its documented order.

    Draw order (all from ``generator`` on ``device``): ``u = rand(n, 7, float64)`` gives one
    uniform per kernel and parameter (columns as in ``TRAJECTORY_PARAMS``); then
    ``rand(n, num_steps - 1)`` (jerk or not, and the jerk's direction) and
    ``randn(n, num_steps - 1, 2)`` (the Gaussian acceleration), float32, drive the steps.
    Derived parameters, as in Boracchi & Foi's createTrajectory.m: centripetal ``0.7 u``,
    jerk frequency ``0.2 u``, Gaussian term ``10 u``, initial angle ``360 u``; anxiety,
    max_length and exposure map ``u`` into their range (a fixed value ignores its column).

    Returns:
        params [n, 7] float64, step_uniform [n, num_steps - 1] and step_normal
        [n, num_steps - 1, 2] float32.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    _check_size(size)
    _check_size(num_steps, "num_steps")
    dev = torch.device(device) if device is not None else (
        generator.device if generator is not None else torch.device("cpu"))
    u = torch.rand(n, 7, generator=generator, device=dev, dtype=torch.float64)
    params = torch.stack(
        [
            _param_column(anxiety, u[:, 0], n, "anxiety", 0.0),
            0.7 * u[:, 1],
            0.2 * u[:, 2],
            10.0 * u[:, 3],
            360.0 * u[:, 4],
            _param_column(float(size) if max_length is None else max_length, u[:, 5], n,
                          "max_length", 0.0),
            _param_column(exposure, u[:, 6], n, "exposure", 0.0, 1.0, low_open=True),
        ],
        dim=1,
    ).contiguous()
    step_uniform = torch.rand(n, num_steps - 1, generator=generator, device=dev)
    step_normal = torch.randn(n, num_steps - 1, 2, generator=generator, device=dev)
    return params, step_uniform, step_normal


def trajectory_kernels(
    n: int,
    size: int,
    *,
    anxiety=(0.003, 0.01),
    max_length=None,
    exposure=1.0,
    num_steps: int = 2000,
    centering: str = "box",
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Random camera-shake kernels (Boracchi & Foi 2012, as used by DeblurGAN, MSPL, SNADNet).

    A particle moves ``num_steps - 1`` steps at constant speed ``max_length / (num_steps -
    1)``; its velocity gets a Gaussian random acceleration, a centripetal pull towards the
    start and, with small probability, an impulsive jerk, all scaled by ``anxiety``. The
    first ``exposure`` fraction of the path is rasterized with exact sub-pixel (bilinear)
    weights, so each kernel is a connected, anti-aliased stroke. A path that would not fit
    is shrunk to fit.

    Args:
        n: number of kernels.
        size: kernel size K (datasets use 13 to 29, some up to 51).
        anxiety: shake amount: a value, a (low, high) range sampled uniformly per kernel, or n
            values. Default (0.003, 0.01), the span DeblurGAN draws from (Boracchi & Foi's
            demo uses 0.005); larger values (their ``0.1 * rand`` default) curl the path into
            a small blob.
        max_length: total path length in pixels (value, range or n values); default ``size``
            as in the original's demo (PSF size = MaxTotalLength).
        exposure: fraction (0, 1] of the path integrated (value, range or n values).
        num_steps: samples of the walk (2000 in the original).
        centering: ``"box"`` centres the path's bounding box (the original); ``"mass"`` puts
            the kernel's centroid on the centre, so the blur does not shift the image.
        generator: torch.Generator for all random numbers (see ``trajectory_random_inputs``
            for the draw order); it must live on ``device``.
        device: where to draw and generate (default: the generator's device, else CPU).
        dtype: floating dtype of the result.

    Returns:
        [n, K, K] kernels, non-negative with unit sum.
    """
    if centering not in _CENTERING:
        raise ValueError(f"centering must be 'box' or 'mass', got {centering!r}")
    _check_kernel_dtype(dtype)
    params, step_uniform, step_normal = trajectory_random_inputs(
        n, size, anxiety=anxiety, max_length=max_length, exposure=exposure,
        num_steps=num_steps, generator=generator, device=device)
    return _OPS.trajectory_kernels(params, step_uniform, step_normal, size,
                                   _CENTERING[centering], dtype)


# --------------------------------------------------------------------------------------
# blur_synthesize
# --------------------------------------------------------------------------------------


def pad_kernels(kernels: Sequence[Tensor], size: tuple[int, int] | None = None) -> Tensor:
    """Stack kernels of different sizes into one tensor, zero-padded around their origins.

    A ``[..., kh, kw]`` kernel's origin (the tap applied to the output pixel itself) is tap
    ``((kh - 1) // 2, (kw - 1) // 2)``; padding keeps it on the origin of the larger box, so
    the padded kernel blurs exactly like the original.

    Args:
        kernels: N tensors ``[kh, kw]`` or ``[R, kh, kw]`` (R equal across them).
        size: (Kh, Kw) of the result; default the largest of each.

    Returns:
        [N, Kh, Kw] or [N, R, Kh, Kw].
    """
    if len(kernels) == 0:
        raise ValueError("pad_kernels: no kernels")
    for i, k in enumerate(kernels):
        if k.dim() not in (2, 3):
            raise ValueError(f"kernel {i} must be [kh, kw] or [R, kh, kw], got shape "
                             f"{tuple(k.shape)}")
    if size is None:
        size = (max(k.shape[-2] for k in kernels), max(k.shape[-1] for k in kernels))
    Kh, Kw = size
    out = []
    for i, k in enumerate(kernels):
        kh, kw = k.shape[-2:]
        if kh > Kh or kw > Kw:
            raise ValueError(f"kernel {i} of size {kh}x{kw} does not fit in {Kh}x{Kw}")
        top = (Kh - 1) // 2 - (kh - 1) // 2
        left = (Kw - 1) // 2 - (kw - 1) // 2
        out.append(F.pad(k, (left, Kw - kw - left, top, Kh - kh - top)))
    try:
        return torch.stack(out)
    except RuntimeError as exc:
        raise ValueError(f"pad_kernels: kernels disagree in dtype, device or R ({exc})") from exc


def _check_images(images: Tensor, name: str = "images", dims: int = 4) -> None:
    if not isinstance(images, Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(images).__name__}")
    if images.dim() != dims:
        layout = "[N, C, H, W]" if dims == 4 else "[N, T, C, H, W]"
        raise ValueError(f"{name} must be {layout}, got shape {tuple(images.shape)}")
    if images.dtype not in _IMAGE_DTYPES:
        raise TypeError(f"{name} must be uint8 or floating (float16, bfloat16, float32, "
                        f"float64), got {images.dtype}")
    if images.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(images.shape)}")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _prepare_kernels(kernels, n: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    if isinstance(kernels, (list, tuple)):
        if len(kernels) != n:
            raise ValueError(f"expected {n} kernels (one per image), got {len(kernels)}")
        kernels = pad_kernels(list(kernels))
    if not isinstance(kernels, Tensor):
        raise TypeError(f"kernels must be a tensor or a list of tensors, got "
                        f"{type(kernels).__name__}")
    if kernels.dtype not in _KERNEL_DTYPES:
        raise TypeError(f"kernels must be floating, got {kernels.dtype}")
    if kernels.device != device:
        raise ValueError(f"kernels are on {kernels.device} but images on {device}")
    if kernels.numel() == 0:
        raise ValueError(f"kernels must not be empty, got shape {tuple(kernels.shape)}")
    if kernels.dim() == 2:
        kernels = kernels[None, None].expand(n, 1, -1, -1)
    elif kernels.dim() == 3:
        kernels = kernels[:, None]
    elif kernels.dim() != 4:
        raise ValueError("kernels must be [K, K], [N, K, K], [N, R, K, K] or a list of N "
                         f"kernels, got shape {tuple(kernels.shape)}")
    if kernels.shape[0] == 1 and n > 1:
        kernels = kernels.expand(n, -1, -1, -1)
    if kernels.shape[0] != n:
        raise ValueError(f"expected kernels for {n} images, got {kernels.shape[0]}")
    return kernels.to(dtype).contiguous()


def _prepare_map(value: Tensor, name: str, n: int, channels: int, hw: tuple[int, int],
                 device: torch.device, dtype: torch.dtype) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(value).__name__}")
    if value.device != device:
        raise ValueError(f"{name} is on {value.device} but images on {device}")
    if value.dtype != torch.bool and not value.is_floating_point():
        raise TypeError(f"{name} must be bool or floating (values in [0, 1]), got {value.dtype}")
    if name == "mask" and value.dim() == 3:
        value = value[:, None]
    if value.dim() == 2:
        value = value[None, None]
    if value.dim() != 4 or value.shape[1] != channels or tuple(value.shape[2:]) != hw or \
            value.shape[0] not in (1, n):
        raise ValueError(f"{name} must be [N, {channels}, H, W] matching images "
                         f"({n}, {channels}, {hw[0]}, {hw[1]}), got shape {tuple(value.shape)}")
    return value.to(dtype).expand(n, -1, -1, -1).contiguous()


def blur_synthesize(
    images: Tensor,
    kernels: Tensor | Sequence[Tensor],
    mask: Tensor | None = None,
    noise_sigma: Scalars = 0.0,
    crf_gamma: float | None = None,
    quantize: bool = False,
    border: str = "reflect",
    generator: torch.Generator | None = None,
    *,
    weights: Tensor | None = None,
) -> Tensor:
    """Blur a batch of sharp images, one kernel per sample, in a single pass.

    Per sample, with ``lin = x ** crf_gamma`` (or ``x``): ``b = sum_r w_r (k_r * lin)``
    (true convolution; ``k * x`` equals ``cv2.filter2D(x, -1, k[::-1, ::-1])``), then
    ``c = m b + (1 - m) lin`` when a mask is given (face-only blur, thesis 002), ``c += sigma
    z`` with standard normal ``z`` when noise is on, ``c`` clamped to [0, 1] when noise or
    quantization is on, ``y = max(c, 0) ** (1 / crf_gamma)`` and, when quantizing, ``y =
    round(255 y) / 255``. The noise is thus added in the linear domain (sensor noise); without
    ``crf_gamma`` the domains coincide. uint8 images give uint8 results (always rounded).

    Only the nonzero taps of each kernel are visited, so sparse motion and trajectory kernels
    cost a small fraction of their K*K box.

    Differentiable with respect to images, kernels, weights and mask when noise and
    quantization are off (floating images). Double backward is not supported: differentiating
    the gradients (e.g. for a gradient penalty) raises a ``RuntimeError``.

    Args:
        images: [N, C, H, W] float in [0, 1] (float16, bfloat16, float32, float64) or uint8.
        kernels: [N, K, K] (or [K, K] for all samples); a list of N kernels of different
            sizes (padded to the largest, see ``pad_kernels``); or [N, R, K, K] with
            ``weights`` for spatially varying blur. Kernels may be rectangular.
        mask: optional [N, 1, H, W] (or [N, H, W]) blend mask in [0, 1], bool or floating.
        noise_sigma: Gaussian noise standard deviation on the [0, 1] scale: a number or N
            values (per-sample). 0 disables noise.
        crf_gamma: gamma of the camera response ``g(v) = v ** (1 / gamma)``; None for none.
        quantize: round to 8-bit levels (implied for uint8 images).
        border: one of ``BORDERS``; ``"reflect"`` is reflect-101.
        generator: torch.Generator for the noise (on the images' device).
        weights: [N, R, H, W] per-pixel weights of the R kernels of each sample (typically a
            partition of unity), applied as given.

    Returns:
        [N, C, H, W] blurred images, dtype of ``images``.
    """
    _check_images(images)
    n, c, h, w = images.shape
    dev = images.device
    dtype = _compute_dtype(images.dtype)
    kernels = _prepare_kernels(kernels, n, dev, dtype)
    regions = kernels.shape[1]
    if weights is not None:
        weights = _prepare_map(weights, "weights", n, regions, (h, w), dev, dtype)
    elif regions > 1:
        raise ValueError(f"{regions} kernels per sample need weights of shape [N, {regions}, H, W]")
    if mask is not None:
        mask = _prepare_map(mask, "mask", n, 1, (h, w), dev, dtype)
    if border not in BORDERS:
        raise ValueError(f"border must be one of {BORDERS}, got {border!r}")
    if crf_gamma is not None:
        crf_gamma = float(crf_gamma)
        if not crf_gamma > 0:
            raise ValueError(f"crf_gamma must be positive, got {crf_gamma}")
        if crf_gamma == 1.0:
            crf_gamma = None
    noise = sigma = None
    if isinstance(noise_sigma, Tensor) or not (
            isinstance(noise_sigma, (int, float)) and float(noise_sigma) == 0.0):
        sigma = _as_vector(noise_sigma, "noise_sigma", dev).to(dtype)
        if sigma.numel() not in (1, n):
            raise ValueError(f"noise_sigma must be a number or {n} values, got {sigma.numel()}")
        _check_nonnegative(sigma, "noise_sigma")
        sigma = sigma.expand(n).contiguous()
        noise = torch.randn(images.shape, generator=generator, device=dev, dtype=dtype)
    if (noise is not None or quantize or images.dtype == torch.uint8) and torch.is_grad_enabled() \
            and any(t is not None and t.requires_grad for t in (images, kernels, weights, mask)):
        raise RuntimeError("blur_synthesize is differentiable only for floating images without "
                           "noise and quantization; wrap it in torch.no_grad() or turn those off")
    return _OPS.blur_synthesize(images.contiguous(), kernels, weights, mask, noise, sigma,
                                crf_gamma, bool(quantize), border)


# --------------------------------------------------------------------------------------
# average_frames
# --------------------------------------------------------------------------------------


def average_frames(frames: Tensor, crf_gamma: float | None = 2.2,
                   counts: int | Sequence[int] | Tensor | None = None) -> Tensor:
    """Blur by frame averaging (paper 003 Eq. 5, GoPro/REDS): ``g(mean_t g^-1(frames_t))``.

    With ``g(v) = v ** (1 / crf_gamma)``: the frames are linearized, averaged and mapped back.
    Differentiable with respect to floating frames; double backward raises a ``RuntimeError``.

    Args:
        frames: [N, T, C, H, W] consecutive sharp frames, float in [0, 1] or uint8.
        crf_gamma: camera-response gamma (2.2 is the usual stand-in); None averages directly.
        counts: frames to average per sample (the first ``counts[n]`` of its T, 5 to 13 in
            paper 003): None for all T, an int, or N ints in [1, T].

    Returns:
        [N, C, H, W] blurred images, dtype of ``frames`` (uint8 rounded).
    """
    _check_images(frames, "frames", dims=5)
    n, t = frames.shape[:2]
    if counts is None:
        counts = torch.full((n,), t, dtype=torch.int64, device=frames.device)
    else:
        if not isinstance(counts, Tensor):
            counts = torch.tensor(counts)  # checked as a tensor below: 2.0 and True are no ints
        if counts.is_floating_point() or counts.is_complex() or counts.dtype == torch.bool:
            raise TypeError(f"counts must be integer (an int, ints or an integer tensor), got "
                            f"{counts.dtype}")
        counts = counts.reshape(-1).to(device=frames.device, dtype=torch.int64)
        if counts.numel() not in (1, n):
            raise ValueError(f"counts must be one int or {n} ints, got {counts.numel()}")
        counts = counts.expand(n).contiguous()
        # on CUDA and when compiling only the op itself checks the range
        if _values_checkable(counts) and not bool(((counts >= 1) & (counts <= t)).all()):
            raise ValueError(f"counts must lie in [1, {t}], got {counts.tolist()}")
    if crf_gamma is not None:
        crf_gamma = float(crf_gamma)
        if not crf_gamma > 0:
            raise ValueError(f"crf_gamma must be positive, got {crf_gamma}")
        if crf_gamma == 1.0:
            crf_gamma = None
    return _OPS.average_frames(frames.contiguous(), counts, crf_gamma)


# --------------------------------------------------------------------------------------
# Fake kernels (shape propagation for torch.compile / torch.export) and autograd
# --------------------------------------------------------------------------------------


@torch.library.register_fake("facedeblur_ext::motion_kernels")
def _motion_kernels_fake(length, angle, size, dtype):
    return length.new_empty((length.shape[0], size, size), dtype=dtype)


@torch.library.register_fake("facedeblur_ext::gaussian_kernels")
def _gaussian_kernels_fake(sigma, size, dtype):
    return sigma.new_empty((sigma.shape[0], size, size), dtype=dtype)


@torch.library.register_fake("facedeblur_ext::defocus_kernels")
def _defocus_kernels_fake(radius, size, dtype):
    return radius.new_empty((radius.shape[0], size, size), dtype=dtype)


@torch.library.register_fake("facedeblur_ext::trajectory_kernels")
def _trajectory_kernels_fake(params, step_uniform, step_normal, size, centering, dtype):
    return params.new_empty((params.shape[0], size, size), dtype=dtype)


@torch.library.register_fake("facedeblur_ext::blur_synthesize")
def _blur_synthesize_fake(images, kernels, weights, mask, noise, noise_sigma, crf_gamma,
                          quantize, border):
    torch._check(kernels.dim() == 4 and kernels.shape[0] == images.shape[0],
                 lambda: "blur_synthesize: kernels must be [N, R, Kh, Kw]")
    return images.new_empty(images.shape)


@torch.library.register_fake("facedeblur_ext::blur_synthesize_backward")
def _blur_synthesize_backward_fake(grad, images, kernels, weights, mask, crf_gamma, border,
                                   output_mask):
    n, _, h, w = images.shape
    empty = kernels.new_empty((0,))
    return (
        images.new_empty(images.shape) if output_mask[0] else images.new_empty((0,)),
        kernels.new_empty(kernels.shape) if output_mask[1] else empty,
        kernels.new_empty((n, kernels.shape[1], h, w)) if output_mask[2] else empty,
        kernels.new_empty((n, 1, h, w)) if output_mask[3] else empty,
    )


@torch.library.register_fake("facedeblur_ext::average_frames")
def _average_frames_fake(frames, counts, crf_gamma):
    n, _, c, h, w = frames.shape
    return frames.new_empty((n, c, h, w))


@torch.library.register_fake("facedeblur_ext::average_frames_backward")
def _average_frames_backward_fake(grad, frames, counts, crf_gamma):
    return frames.new_empty(frames.shape)


def _blur_setup_context(ctx, inputs, output):
    images, kernels, weights, mask, noise, _sigma, crf_gamma, quantize, border = inputs
    ctx.differentiable = noise is None and not quantize and images.dtype != torch.uint8
    ctx.crf_gamma = crf_gamma
    ctx.border = border
    ctx.save_for_backward(images, kernels, weights, mask)


def _blur_backward(ctx, grad):
    images, kernels, weights, mask = ctx.saved_tensors
    if not ctx.differentiable:
        raise RuntimeError("blur_synthesize is not differentiable with noise, quantization or "
                           "uint8 images")
    need = [bool(v) for v in ctx.needs_input_grad[:4]]
    gi, gk, gw, gm = _OPS.blur_synthesize_backward(grad.contiguous(), images, kernels, weights,
                                                   mask, ctx.crf_gamma, ctx.border, need)
    return (gi if need[0] else None, gk if need[1] else None, gw if need[2] else None,
            gm if need[3] else None, None, None, None, None, None)


torch.library.register_autograd("facedeblur_ext::blur_synthesize", _blur_backward,
                                setup_context=_blur_setup_context)
register_no_derivative("facedeblur_ext::blur_synthesize_backward",
                       "blur_synthesize: double backward is not supported")


def _frames_setup_context(ctx, inputs, output):
    frames, counts, crf_gamma = inputs
    ctx.crf_gamma = crf_gamma
    ctx.save_for_backward(frames, counts)


def _frames_backward(ctx, grad):
    frames, counts = ctx.saved_tensors
    if frames.dtype == torch.uint8:
        raise RuntimeError("average_frames is not differentiable for uint8 frames")
    grad_frames = _OPS.average_frames_backward(grad.contiguous(), frames, counts, ctx.crf_gamma)
    return grad_frames, None, None


torch.library.register_autograd("facedeblur_ext::average_frames", _frames_backward,
                                setup_context=_frames_setup_context)
register_no_derivative("facedeblur_ext::average_frames_backward",
                       "average_frames: double backward is not supported")
for _generator in ("motion_kernels", "gaussian_kernels", "defocus_kernels", "trajectory_kernels"):
    register_no_derivative(f"facedeblur_ext::{_generator}",
                           f"{_generator} is not differentiable: its parameters get no gradient")


# --------------------------------------------------------------------------------------
# Self checks (facedeblur selfcheck): compare with what torch computes itself
# --------------------------------------------------------------------------------------


@register_self_check("blur_synthesize")
def _check_blur_synthesize(device: torch.device) -> None:
    gen = torch.Generator(device=device).manual_seed(0)
    images = torch.rand(2, 3, 24, 20, generator=gen, device=device)
    kernels = torch.rand(2, 5, 5, generator=gen, device=device)
    kernels = kernels / kernels.sum(dim=(1, 2), keepdim=True)
    out = blur_synthesize(images, kernels)
    padded = F.pad(images.reshape(1, 6, 24, 20), (2, 2, 2, 2), mode="reflect")
    weight = kernels.flip(-1, -2).repeat_interleave(3, dim=0)[:, None]
    expected = F.conv2d(padded, weight, groups=6).reshape(2, 3, 24, 20)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


@register_self_check("blur_kernels")
def _check_blur_kernels(device: torch.device) -> None:
    length, angle, size = 12.0, 30.0, 21
    k = motion_kernels(length, angle, size, device=device, dtype=torch.float64)[0].cpu()
    torch.testing.assert_close(k.sum(), torch.tensor(1.0, dtype=torch.float64))
    # Covariance of a tent-splatted segment: the segment's L^2/12 d d^T plus, per axis, the
    # splat's mean f (1 - f) over the fractional positions f along the path (1/6 on average).
    center = (size - 1) / 2
    ys, xs = torch.meshgrid(torch.arange(size, dtype=torch.float64) - center,
                            torch.arange(size, dtype=torch.float64) - center, indexing="ij")
    rad = torch.deg2rad(torch.tensor(angle, dtype=torch.float64))
    d = torch.stack([torch.cos(rad), -torch.sin(rad)])
    s = (torch.arange(200_000, dtype=torch.float64) + 0.5) / 200_000 - 0.5
    frac = torch.frac(center + length * s[:, None] * d)
    spread = (frac * (1 - frac)).mean(0)
    cov = torch.stack([torch.stack([(k * xs * xs).sum(), (k * xs * ys).sum()]),
                       torch.stack([(k * ys * xs).sum(), (k * ys * ys).sum()])])
    expected = length**2 / 12 * torch.outer(d, d) + torch.diag(spread)
    torch.testing.assert_close(cov, expected, rtol=1e-7, atol=1e-7)
    gen = torch.Generator(device=device).manual_seed(0)
    t = trajectory_kernels(4, 17, generator=gen, device=device)
    torch.testing.assert_close(t.sum(dim=(1, 2)).cpu(), torch.ones(4))
    if bool((t < 0).any()):
        raise AssertionError("negative trajectory kernel taps")


@register_self_check("average_frames")
def _check_average_frames(device: torch.device) -> None:
    gen = torch.Generator(device=device).manual_seed(0)
    frames = torch.rand(2, 5, 3, 8, 8, generator=gen, device=device, dtype=torch.float64)
    out = average_frames(frames, crf_gamma=2.2, counts=torch.tensor([5, 3]))
    linear_mean = torch.stack([(frames[0] ** 2.2).mean(0), (frames[1, :3] ** 2.2).mean(0)])
    expected = linear_mean ** (1 / 2.2)
    torch.testing.assert_close(out, expected)
