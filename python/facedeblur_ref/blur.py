"""Reference blur synthesis: plain-Python kernel generators and the grouped-conv composition.

Same signatures and semantics as ``facedeblur_ext.ops.blur`` (see its docstrings). The
trajectory generator is the straightforward per-step Python random walk (the usual way of
making camera-shake kernels, and the baseline of the >= 100x target); ``blur_synthesize``
is the usual composition: reflect pad, grouped ``F.conv2d`` with flipped kernels, blend,
noise, clamp, CRF and quantization as separate tensor ops.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "average_frames",
    "blur_synthesize",
    "defocus_kernels",
    "gaussian_kernels",
    "motion_kernels",
    "pad_kernels",
    "trajectory_kernels",
]

_PAD_MODES = {"reflect": "reflect", "replicate": "replicate", "zeros": "constant",
              "circular": "circular"}


def _values(value, device) -> list[float]:
    if isinstance(value, Tensor):
        return [float(v) for v in value.reshape(-1).tolist()]
    if isinstance(value, (int, float)):
        return [float(value)]
    return [float(v) for v in value]


def _device(device, *values):
    if device is not None:
        return torch.device(device)
    for v in values:
        if isinstance(v, Tensor):
            return v.device
    return torch.device("cpu")


def _sin_cos_deg(deg: float) -> tuple[float, float]:
    """sin and cos of degrees, exact at multiples of 90 (same reduction as the native code)."""
    r = math.fmod(deg, 360.0)
    if r < 0:
        r += 360.0
    quarter = math.floor(r / 90.0 + 0.5)
    rad = (r - 90.0 * quarter) * (math.pi / 180.0)
    s0, c0 = math.sin(rad), math.cos(rad)
    return [(s0, c0), (c0, -s0), (-s0, -c0), (-c0, s0)][quarter & 3]


def _add(acc: list[list[float]], i: int, j: int, w: float) -> None:
    if 0 <= i < len(acc) and 0 <= j < len(acc) and w != 0.0:
        acc[i][j] += w


def _splat_point(acc, x: float, y: float, weight: float) -> None:
    j0, i0 = math.floor(x), math.floor(y)
    fx, fy = x - j0, y - i0
    _add(acc, i0, j0, weight * (1 - fx) * (1 - fy))
    _add(acc, i0, j0 + 1, weight * fx * (1 - fy))
    _add(acc, i0 + 1, j0, weight * (1 - fx) * fy)
    _add(acc, i0 + 1, j0 + 1, weight * fx * fy)


def _splat_segment(acc, ax: float, ay: float, bx: float, by: float, weight: float) -> None:
    """Exact integral of a bilinear splat moving from a to b: split the segment wherever x
    or y crosses an integer, integrate each piece (a quadratic) with Simpson's rule."""
    dx, dy = bx - ax, by - ay
    cuts = {0.0, 1.0}
    for a, d in ((ax, dx), (ay, dy)):
        if d != 0:
            lo, hi = sorted((a, a + d))
            for k in range(math.ceil(lo), math.floor(hi) + 1):
                s = (k - a) / d
                if 0 < s < 1:
                    cuts.add(s)
    cuts = sorted(cuts)
    for s0, s1 in zip(cuts[:-1], cuts[1:]):
        if s1 <= s0:
            continue
        sm = 0.5 * (s0 + s1)
        j0, i0 = math.floor(ax + sm * dx), math.floor(ay + sm * dy)
        fx = [min(max(ax + s * dx - j0, 0.0), 1.0) for s in (s0, sm, s1)]
        fy = [min(max(ay + s * dy - i0, 0.0), 1.0) for s in (s0, sm, s1)]

        def simpson(f, fx=fx, fy=fy):
            return f(fx[0], fy[0]) + 4 * f(fx[1], fy[1]) + f(fx[2], fy[2])

        scale = (s1 - s0) * weight / 6.0
        _add(acc, i0, j0, scale * simpson(lambda u, v: (1 - u) * (1 - v)))
        _add(acc, i0, j0 + 1, scale * simpson(lambda u, v: u * (1 - v)))
        _add(acc, i0 + 1, j0, scale * simpson(lambda u, v: (1 - u) * v))
        _add(acc, i0 + 1, j0 + 1, scale * simpson(lambda u, v: u * v))


def _finish(acc: list[list[float]], size: int, device, dtype) -> Tensor:
    k = torch.tensor(acc, dtype=torch.float64)
    if not k.sum() > 0:
        k.zero_()
        rows = [[0.0] * size for _ in range(size)]
        _splat_point(rows, (size - 1) / 2, (size - 1) / 2, 1.0)
        k = torch.tensor(rows, dtype=torch.float64)
    return (k / k.sum()).to(device=device, dtype=dtype)


def motion_kernels(length, angle, size: int, *, device=None, dtype=torch.float32) -> Tensor:
    """Reference of ``facedeblur_ext.ops.motion_kernels`` (plain Python)."""
    dev = _device(device, length, angle)
    lengths, angles = _values(length, dev), _values(angle, dev)
    n = max(len(lengths), len(angles))
    lengths = lengths * n if len(lengths) == 1 else lengths
    angles = angles * n if len(angles) == 1 else angles
    c = (size - 1) / 2
    out = []
    for L, a in zip(lengths, angles):
        acc = [[0.0] * size for _ in range(size)]
        if L > 0:
            s, co = _sin_cos_deg(a)
            hx, hy = 0.5 * L * co, -0.5 * L * s
            _splat_segment(acc, c - hx, c - hy, c + hx, c + hy, 1.0)
        else:
            _splat_point(acc, c, c, 1.0)
        out.append(_finish(acc, size, dev, dtype))
    return torch.stack(out)


def gaussian_kernels(sigma, size: int, *, device=None, dtype=torch.float32) -> Tensor:
    """Reference of ``facedeblur_ext.ops.gaussian_kernels``."""
    dev = _device(device, sigma)
    sig = torch.tensor(_values(sigma, dev), dtype=torch.float64)
    r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    d2 = r[:, None] ** 2 + r[None, :] ** 2
    k = torch.exp(-d2 / (2 * sig[:, None, None].clamp_min(1e-300) ** 2))
    rows = [[0.0] * size for _ in range(size)]
    _splat_point(rows, (size - 1) / 2, (size - 1) / 2, 1.0)
    point = torch.tensor(rows, dtype=torch.float64)
    total = k.sum(dim=(1, 2), keepdim=True)
    use_point = (sig[:, None, None] <= 0) | (total <= 0)
    k = torch.where(use_point, point, k / total.clamp_min(1e-300))
    return k.to(device=dev, dtype=dtype)


def defocus_kernels(radius, size: int, *, device=None, dtype=torch.float32,
                    samples: int = 4096) -> Tensor:
    """Reference of ``facedeblur_ext.ops.defocus_kernels``: the disk area inside each pixel
    by the midpoint rule over ``samples`` columns per pixel of the vertical chord length."""
    dev = _device(device, radius)
    out = []
    c = (size - 1) / 2
    for r in _values(radius, dev):
        if not r > 0:
            out.append(_finish([[0.0] * size for _ in range(size)], size, dev, dtype))
            continue
        edges = torch.arange(size + 1, dtype=torch.float64) - c - 0.5
        xs = edges[0] + (torch.arange(size * samples, dtype=torch.float64) + 0.5) / samples
        half = torch.sqrt((r * r - xs * xs).clamp_min(0))  # half chord at each column
        y0, y1 = edges[:-1, None], edges[1:, None]  # [size, 1] pixel rows
        overlap = (torch.minimum(y1, half) - torch.maximum(y0, -half)).clamp_min(0)
        area = overlap.reshape(size, size, samples).mean(-1)  # [row, col]
        out.append(_finish(area.tolist(), size, dev, dtype))
    return torch.stack(out)


def _range_value(spec, u: float, index: int) -> float:
    if isinstance(spec, Tensor):
        flat = spec.reshape(-1)
        return float(flat[index if flat.numel() > 1 else 0])
    if isinstance(spec, (tuple, list)):
        return float(spec[0]) + (float(spec[1]) - float(spec[0])) * u
    return float(spec)


def trajectory_kernels(n: int, size: int, *, anxiety=(0.003, 0.01), max_length=None,
                       exposure=1.0, num_steps: int = 2000, centering: str = "box",
                       generator: torch.Generator | None = None, device=None,
                       dtype=torch.float32) -> Tensor:
    """Reference of ``facedeblur_ext.ops.trajectory_kernels``: the random walk of Boracchi &
    Foi's createTrajectory.m one Python step at a time, the same random numbers (drawn in
    the same order) and the same exact segment rasterization."""
    dev = torch.device(device) if device is not None else (
        generator.device if generator is not None else torch.device("cpu"))
    u = torch.rand(n, 7, generator=generator, device=dev, dtype=torch.float64).tolist()
    step_u = torch.rand(n, num_steps - 1, generator=generator, device=dev).double().tolist()
    step_n = torch.randn(n, num_steps - 1, 2, generator=generator, device=dev).double().tolist()
    out = []
    for k in range(n):
        anx = _range_value(anxiety, u[k][0], k)
        centripetal, jerk_freq = 0.7 * u[k][1], 0.2 * u[k][2]
        gaussian_term, init_angle = 10.0 * u[k][3], 360.0 * u[k][4]
        length = _range_value(float(size) if max_length is None else max_length, u[k][5], k)
        expo = _range_value(exposure, u[k][6], k)

        # the walk
        step = length / (num_steps - 1) if num_steps > 1 else 0.0
        s0, c0 = _sin_cos_deg(init_angle)
        vx, vy = c0 * step, s0 * step
        if anx > 0:
            vx, vy = c0 * anx, s0 * anx
        xs, ys = [0.0], [0.0]
        for t in range(num_steps - 1):
            nx = ny = 0.0
            threshold = jerk_freq * anx
            if step_u[k][t] < threshold:
                phi = math.pi + (step_u[k][t] / threshold - 0.5)
                cp, sp = math.cos(phi), math.sin(phi)
                nx, ny = 2.0 * (vx * cp - vy * sp), 2.0 * (vx * sp + vy * cp)
            gx, gy = gaussian_term * step_n[k][t][0], gaussian_term * step_n[k][t][1]
            vx += nx + anx * (gx - centripetal * xs[t]) * step
            vy += ny + anx * (gy - centripetal * ys[t]) * step
            mag = math.sqrt(vx * vx + vy * vy)
            if mag > 0:
                vx, vy = vx / mag * step, vy / mag * step
            xs.append(xs[t] + vx)
            ys.append(ys[t] + vy)

        # the exposed polyline (the last segment possibly partial)
        t_end = min(max(expo, 0.0), 1.0) * (num_steps - 1)
        points, weights = [(xs[0], ys[0])], []
        for t in range(num_steps - 1):
            if t >= t_end:
                break
            w = min(t_end - t, 1.0)
            x1 = xs[t] + w * (xs[t + 1] - xs[t]) if w < 1 else xs[t + 1]
            y1 = ys[t] + w * (ys[t + 1] - ys[t]) if w < 1 else ys[t + 1]
            points.append((x1, y1))
            weights.append(w)
        px = [p[0] for p in points]
        py = [p[1] for p in points]
        half = (size - 1) / 2
        if centering == "mass" and weights:
            total = sum(weights)
            cx = sum(w * 0.5 * (px[i] + px[i + 1]) for i, w in enumerate(weights)) / total
            cy = sum(w * 0.5 * (py[i] + py[i + 1]) for i, w in enumerate(weights)) / total
            dev_max = max(cx - min(px), max(px) - cx, cy - min(py), max(py) - cy)
            scale = half / dev_max if dev_max > half else 1.0
        else:
            cx, cy = 0.5 * (min(px) + max(px)), 0.5 * (min(py) + max(py))
            extent = max(max(px) - min(px), max(py) - min(py))
            scale = 2 * half / extent if extent > 2 * half else 1.0

        acc = [[0.0] * size for _ in range(size)]
        moved = 0.0
        for i, w in enumerate(weights):
            ax, ay = (px[i] - cx) * scale + half, (py[i] - cy) * scale + half
            bx, by = (px[i + 1] - cx) * scale + half, (py[i + 1] - cy) * scale + half
            if ax != bx or ay != by:
                _splat_segment(acc, ax, ay, bx, by, w)
                moved += w
        if not moved > 0:
            _splat_point(acc, (px[0] - cx) * scale + half, (py[0] - cy) * scale + half, 1.0)
        out.append(_finish(acc, size, dev, dtype))
    return torch.stack(out) if out else torch.empty(0, size, size, device=dev, dtype=dtype)


def pad_kernels(kernels: Sequence[Tensor], size: tuple[int, int] | None = None) -> Tensor:
    """Reference of ``facedeblur_ext.ops.pad_kernels``."""
    if size is None:
        size = (max(k.shape[-2] for k in kernels), max(k.shape[-1] for k in kernels))
    Kh, Kw = size
    out = []
    for k in kernels:
        kh, kw = k.shape[-2:]
        top, left = (Kh - 1) // 2 - (kh - 1) // 2, (Kw - 1) // 2 - (kw - 1) // 2
        out.append(F.pad(k, (left, Kw - kw - left, top, Kh - kh - top)))
    return torch.stack(out)


def blur_synthesize(images: Tensor, kernels, mask: Tensor | None = None, noise_sigma=0.0,
                    crf_gamma: float | None = None, quantize: bool = False,
                    border: str = "reflect", generator: torch.Generator | None = None, *,
                    weights: Tensor | None = None) -> Tensor:
    """Reference of ``facedeblur_ext.ops.blur_synthesize``: reflect pad, grouped conv, blend,
    noise (the same draw), clamp, CRF and quantization, each as its own tensor op."""
    n, c, h, w = images.shape
    dtype = torch.float64 if images.dtype == torch.float64 else torch.float32
    x = images.to(dtype) / 255 if images.dtype == torch.uint8 else images.to(dtype)
    if isinstance(kernels, (list, tuple)):
        kernels = pad_kernels(list(kernels))
    if kernels.dim() == 2:
        kernels = kernels[None].expand(n, -1, -1)
    if kernels.dim() == 3:
        kernels = kernels[:, None]
    kernels = kernels.expand(n, -1, -1, -1).to(dtype)
    r, kh, kw = kernels.shape[1:]
    gamma = None if crf_gamma is None or float(crf_gamma) == 1.0 else float(crf_gamma)
    lin = x**gamma if gamma is not None else x

    # true convolution = correlation with the flipped kernel, origin at ((K - 1) // 2)
    padded = F.pad(lin.reshape(1, n * c, h, w), (kw // 2, (kw - 1) // 2, kh // 2, (kh - 1) // 2),
                   mode=_PAD_MODES[border])
    weight = kernels.flip(-1, -2)[:, None].expand(n, c, r, kh, kw).reshape(n * c * r, 1, kh, kw)
    blurred = F.conv2d(padded, weight, groups=n * c).reshape(n, c, r, h, w)
    if weights is not None:
        b = (blurred * weights.to(dtype).expand(n, -1, -1, -1)[:, None]).sum(2)
    else:
        b = blurred[:, :, 0]
    if mask is not None:
        m = mask.to(dtype)
        m = (m[:, None] if m.dim() == 3 else m).expand(n, 1, h, w)
        b = m * b + (1 - m) * lin
    noisy = isinstance(noise_sigma, Tensor) or not (
        isinstance(noise_sigma, (int, float)) and float(noise_sigma) == 0.0)
    if noisy:
        sigma = torch.as_tensor(noise_sigma, dtype=dtype, device=images.device).reshape(-1)
        noise = torch.randn(images.shape, generator=generator, device=images.device, dtype=dtype)
        b = b + sigma.expand(n)[:, None, None, None] * noise
    if noisy or quantize or images.dtype == torch.uint8:
        b = b.clamp(0, 1)
    if gamma is not None:
        b = b.clamp_min(0) ** (1 / gamma)
    if images.dtype == torch.uint8:
        return torch.round(b * 255).to(torch.uint8)
    if quantize:
        b = torch.round(b * 255) / 255
    return b.to(images.dtype)


def average_frames(frames: Tensor, crf_gamma: float | None = 2.2, counts=None) -> Tensor:
    """Reference of ``facedeblur_ext.ops.average_frames``."""
    n, t = frames.shape[:2]
    dtype = torch.float64 if frames.dtype == torch.float64 else torch.float32
    x = frames.to(dtype) / 255 if frames.dtype == torch.uint8 else frames.to(dtype)
    gamma = None if crf_gamma is None or float(crf_gamma) == 1.0 else float(crf_gamma)
    if counts is None:
        counts = torch.full((n,), t)
    counts = torch.as_tensor(counts).reshape(-1).expand(n).to(frames.device)
    lin = x**gamma if gamma is not None else x
    used = (torch.arange(t, device=frames.device)[None] < counts[:, None]).to(dtype)
    mean = (lin * used[:, :, None, None, None]).sum(1) / counts.to(dtype)[:, None, None, None]
    out = mean.clamp_min(0) ** (1 / gamma) if gamma is not None else mean
    if frames.dtype == torch.uint8:
        return torch.round(out.clamp(0, 1) * 255).to(torch.uint8)
    return out.to(frames.dtype)
