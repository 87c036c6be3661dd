"""Blur synthesis: kernel generators, blur_synthesize, average_frames and BlurSynthesizer."""

from __future__ import annotations

import math
import time

import facedeblur_ref as ref
import numpy as np
import pytest
import torch
from conftest import cpu_kernels, cuda_params, device_params

import facedeblur_ext.ops as ops
from facedeblur_ext.nn import BlurConfig, BlurSynthesizer

DEVICES = device_params()
OP = torch.ops.facedeblur_ext
BORDERS = ["reflect", "replicate", "zeros", "circular"]
TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-12),
    torch.float32: dict(rtol=1e-5, atol=2e-6),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2),
}


def _images(n, c, h, w, dtype, device, seed=0, low=0.0):
    gen = torch.Generator().manual_seed(seed)
    x = low + (1 - low) * torch.rand(n, c, h, w, generator=gen, dtype=torch.float64)
    if dtype == torch.uint8:
        return (x * 255).round().to(torch.uint8).to(device)
    return x.to(device=device, dtype=dtype)


def _unit_kernels(n, kh, kw, device, dtype=torch.float32, seed=1, sparse=False):
    gen = torch.Generator().manual_seed(seed)
    k = torch.rand(n, kh, kw, generator=gen, dtype=torch.float64)
    if sparse:
        k = k * (torch.rand(n, kh, kw, generator=gen, dtype=torch.float64) < 0.3)
        k[:, (kh - 1) // 2, (kw - 1) // 2] += 0.1
    return (k / k.sum(dim=(1, 2), keepdim=True)).to(device=device, dtype=dtype)


def _compare(actual, expected, quantized=False):
    if actual.dtype == torch.uint8 or quantized:
        # values summed in another order can land on the other side of a rounding tie
        diff = ((actual.double() - expected.double()) * (1 if actual.dtype == torch.uint8
                                                         else 255)).abs()
        assert diff.max() <= 1 + 1e-3, diff.max()
        assert (diff > 1e-3).float().mean() < 2e-3
    else:
        torch.testing.assert_close(actual, expected, **TOL[actual.dtype])


# --------------------------------------------------------------------------------------
# Kernel generators
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("size", [15, 16])
def test_motion_kernels_match_reference(device, size):
    lengths = [0.0, 3.3, 7.0, 10.0, 14.2, 22.0]
    angles = [0.0, 33.0, 90.0, -170.0, 45.0, 180.0]
    got = ops.motion_kernels(lengths, angles, size, device=device, dtype=torch.float64)
    want = ref.motion_kernels(lengths, angles, size, dtype=torch.float64)
    torch.testing.assert_close(got.cpu(), want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("angle", [0.0, 17.0, 45.0, 90.0, 123.4, 200.0])
@pytest.mark.parametrize("length", [0.0, 5.5, 12.0, 20.0])
def test_motion_kernel_extent_matches_length_and_angle(device, angle, length):
    size = 21
    k = ops.motion_kernels(length, angle, size, device=device, dtype=torch.float64)[0].cpu()
    center = (size - 1) / 2
    grid = torch.arange(size, dtype=torch.float64) - center
    ys, xs = torch.meshgrid(grid, grid, indexing="ij")
    rad = math.radians(angle)
    d = torch.tensor([math.cos(rad), -math.sin(rad)], dtype=torch.float64)
    # mean on the centre; covariance: the segment's L^2 / 12 along d plus the tent splat's
    # f (1 - f) per axis averaged over the path (1/6 for a path spanning whole pixels)
    torch.testing.assert_close((k * xs).sum(), torch.tensor(0.0, dtype=torch.float64),
                               rtol=0, atol=1e-12)
    s = (torch.arange(100_000, dtype=torch.float64) + 0.5) / 100_000 - 0.5
    frac = torch.frac(center + length * s[:, None] * d)
    spread = (frac * (1 - frac)).mean(0)
    cov = torch.stack([torch.stack([(k * xs * xs).sum(), (k * xs * ys).sum()]),
                       torch.stack([(k * ys * xs).sum(), (k * ys * ys).sum()])])
    expected = length**2 / 12 * torch.outer(d, d) + torch.diag(spread)
    torch.testing.assert_close(cov, expected, rtol=1e-7, atol=1e-7)


def test_axis_aligned_motion_kernel_is_a_one_pixel_line():
    k = ops.motion_kernels([10.0, 10.0], [0.0, 90.0], 15, dtype=torch.float64)
    rows, cols = torch.nonzero(k[0], as_tuple=True)
    assert set(rows.tolist()) == {7} and (cols.min(), cols.max()) == (2, 12)
    rows, cols = torch.nonzero(k[1], as_tuple=True)
    assert set(cols.tolist()) == {7} and (rows.min(), rows.max()) == (2, 12)
    # uniform along the line, half weight at the ends
    torch.testing.assert_close(k[0, 7, 2:13], torch.tensor([0.05] + [0.1] * 9 + [0.05],
                                                           dtype=torch.float64))


def test_motion_kernels_are_sparse():
    k = ops.motion_kernels(torch.linspace(5, 29, 16), torch.linspace(0, 170, 16), 31)
    taps = (k > 0).sum(dim=(1, 2)).float()
    # a stroke two to three pixels wide: under 10% of the 961 taps
    assert taps.max() <= 3 * 31 and taps.mean() < 0.06 * 31 * 31


@pytest.mark.parametrize("device", DEVICES)
def test_huge_motion_lengths_are_fast_and_give_the_cropped_line(device):
    # A line longer than the kernel is cropped: the rasterizer walks only the part that can
    # reach a tap (uncropped, length 1e9 took about half a minute per kernel).
    size, angles = 15, [0.0, 30.0, 45.0, 123.4, -100.0]
    spanning = (size + 1) * math.sqrt(2) + 1  # past the kernel box and its 1-pixel margin
    want = ops.motion_kernels(spanning, angles, size, dtype=torch.float64)
    torch.testing.assert_close(want, ref.motion_kernels(spanning, angles, size,
                                                        dtype=torch.float64), rtol=0, atol=1e-12)
    ops.motion_kernels(1.0, 0.0, size, device=device)  # device warm-up, not timed
    start = time.perf_counter()
    huge = ops.motion_kernels(1e9, angles, size, device=device, dtype=torch.float64)
    assert time.perf_counter() - start < 1.0
    torch.testing.assert_close(huge.cpu(), want, rtol=0, atol=1e-12)
    torch.testing.assert_close(ops.motion_kernels(1e300, angles, size, dtype=torch.float64),
                               want, rtol=0, atol=1e-12)


def test_kernel_generators_are_not_differentiable():
    # a parameter that requires grad is fine in the forward; a gradient through it raises
    # instead of coming back as None with only a warning
    generators = {
        "motion_kernels": lambda p: ops.motion_kernels(p, 30.0, 7),
        "gaussian_kernels": lambda p: ops.gaussian_kernels(p, 7),
        "defocus_kernels": lambda p: ops.defocus_kernels(p, 7),
        "trajectory_kernels": lambda p: ops.trajectory_kernels(1, 7, max_length=p, num_steps=20),
    }
    for name, make in generators.items():
        param = torch.tensor([1.5], requires_grad=True)
        kernels = make(param)
        with pytest.raises(RuntimeError, match=f"{name} is not differentiable"):
            kernels.sum().backward()


@pytest.mark.parametrize("device", DEVICES)
def test_gaussian_kernels(device):
    sigmas = [0.0, 0.4, 1.0, 2.5]
    got = ops.gaussian_kernels(sigmas, 9, device=device, dtype=torch.float64).cpu()
    want = ref.gaussian_kernels(sigmas, 9, dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-14)
    assert got[0, 4, 4] == 1.0 and got[0].sum() == 1.0
    r = torch.arange(9, dtype=torch.float64) - 4
    g = torch.exp(-(r[:, None] ** 2 + r[None] ** 2) / (2 * 2.5**2))
    torch.testing.assert_close(got[3], g / g.sum())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("size", [7, 15, 16])
def test_defocus_kernels(device, size):
    radii = [0.0, 0.7, 2.5, 3.2, 5.3]
    got = ops.defocus_kernels(radii, size, device=device, dtype=torch.float64).cpu()
    want = ref.defocus_kernels(radii, size, dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=0, atol=2e-7)
    torch.testing.assert_close(got, got.transpose(1, 2), rtol=0, atol=1e-15)
    torch.testing.assert_close(got, got.flip(-1), rtol=0, atol=1e-15)
    if size == 15:  # a disk inside the kernel: a fully covered pixel holds 1 / (pi r^2)
        torch.testing.assert_close(got[4, 7, 7], torch.tensor(1 / (math.pi * 5.3**2),
                                                              dtype=torch.float64))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_generated_kernels_are_nonnegative_with_unit_sum(device, dtype):
    gen = torch.Generator(device=device).manual_seed(0)
    kernels = [
        ops.motion_kernels(torch.rand(8) * 40, torch.rand(8) * 360, 23, device=device,
                           dtype=dtype),
        ops.gaussian_kernels(torch.rand(8) * 4, 12, device=device, dtype=dtype),
        ops.defocus_kernels(torch.rand(8) * 9, 17, device=device, dtype=dtype),
        ops.trajectory_kernels(8, 19, generator=gen, device=device, dtype=dtype,
                               exposure=(0.2, 1.0), num_steps=400),
    ]
    for k in kernels:
        assert k.dtype == dtype and k.device.type == torch.device(device).type
        assert bool((k >= 0).all())
        torch.testing.assert_close(k.sum(dim=(1, 2)), torch.ones(8, dtype=dtype, device=device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("centering", ["box", "mass"])
def test_trajectory_kernels_match_python_random_walk(device, centering):
    kwargs = dict(num_steps=600, centering=centering, exposure=(0.5, 1.0),
                  anxiety=(0.002, 0.05), device=device, dtype=torch.float64)
    got = ops.trajectory_kernels(3, 17, generator=torch.Generator(device).manual_seed(4),
                                 **kwargs)
    want = ref.trajectory_kernels(3, 17, generator=torch.Generator(device).manual_seed(4),
                                  **kwargs)
    atol = 1e-12 if device == "cpu" else 1e-9  # CUDA's sin/cos round differently
    torch.testing.assert_close(got.cpu(), want.cpu(), rtol=0, atol=atol)


def test_trajectory_kernels_default_walk_matches_reference():
    got = ops.trajectory_kernels(1, 25, generator=torch.Generator().manual_seed(9),
                                 dtype=torch.float64)
    want = ref.trajectory_kernels(1, 25, generator=torch.Generator().manual_seed(9),
                                  dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_trajectory_kernels_reproducible(device):
    def make(seed):
        return ops.trajectory_kernels(6, 21, generator=torch.Generator(device).manual_seed(seed),
                                      device=device)

    assert torch.equal(make(1), make(1))
    assert not torch.equal(make(1), make(2))


def _components(support: np.ndarray) -> int:
    """Number of 8-connected components of a boolean image."""
    seen = np.zeros_like(support)
    count = 0
    for start in zip(*np.nonzero(support)):
        if seen[start]:
            continue
        count += 1
        stack = [start]
        seen[start] = True
        while stack:
            i, j = stack.pop()
            for di in (-1, 0, 1):
                for dj in (-1, 0, 1):
                    a, b = i + di, j + dj
                    if 0 <= a < support.shape[0] and 0 <= b < support.shape[1] and \
                            support[a, b] and not seen[a, b]:
                        seen[a, b] = True
                        stack.append((a, b))
    return count


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("size", [13, 31, 51])
def test_trajectory_kernels_are_connected_paths(device, size):
    gen = torch.Generator(device).manual_seed(size)
    k = ops.trajectory_kernels(10, size, generator=gen, device=device, anxiety=(0.001, 0.1),
                               max_length=(0.5 * size, 2.0 * size), dtype=torch.float64).cpu()
    for kernel in k:
        support = kernel.numpy() > 0
        assert _components(support) == 1
        assert support.mean() < 0.5  # a stroke, not a blob filling the box


@pytest.mark.parametrize("device", DEVICES)
def test_trajectory_mass_centering_puts_the_centroid_on_the_centre(device):
    gen = torch.Generator(device).manual_seed(3)
    k = ops.trajectory_kernels(6, 25, centering="mass", generator=gen, device=device,
                               max_length=(10.0, 60.0), dtype=torch.float64).cpu()
    grid = torch.arange(25, dtype=torch.float64) - 12
    torch.testing.assert_close((k * grid[None, None, :]).sum(dim=(1, 2)),
                               torch.zeros(6, dtype=torch.float64), rtol=0, atol=1e-10)
    torch.testing.assert_close((k * grid[None, :, None]).sum(dim=(1, 2)),
                               torch.zeros(6, dtype=torch.float64), rtol=0, atol=1e-10)


def test_trajectory_length_sets_the_extent():
    # with negligible anxiety the walk is nearly straight: its extent ~ max_length
    gen = torch.Generator().manual_seed(0)
    k = ops.trajectory_kernels(4, 41, anxiety=1e-6, max_length=20.0, generator=gen)
    for kernel in k:
        rows, cols = torch.nonzero(kernel > 1e-6, as_tuple=True)
        extent = math.hypot(float(rows.max() - rows.min()), float(cols.max() - cols.min()))
        assert 19.0 <= extent <= 23.0, extent


def test_generator_argument_errors():
    with pytest.raises(ValueError, match="size must be at least 1"):
        ops.motion_kernels(3.0, 0.0, 0)
    with pytest.raises(ValueError, match="length must be non-negative"):
        ops.motion_kernels(-1.0, 0.0, 9)
    with pytest.raises(ValueError, match="one value or N values"):
        ops.motion_kernels([1.0, 2.0], [0.0, 1.0, 2.0], 9)
    with pytest.raises(ValueError, match="radius must be non-negative"):
        ops.defocus_kernels(-2.0, 9)
    with pytest.raises(TypeError, match="floating dtype"):
        ops.gaussian_kernels(1.0, 9, dtype=torch.int32)
    with pytest.raises(ValueError, match="exposure must lie in"):
        ops.trajectory_kernels(2, 9, exposure=1.5)
    with pytest.raises(ValueError, match="centering"):
        ops.trajectory_kernels(2, 9, centering="middle")
    with pytest.raises(ValueError, match=r"anxiety range must have low <= high"):
        ops.trajectory_kernels(2, 9, anxiety=(0.1, 0.0))
    # tensors get the bounds numbers get; the exposure excludes 0
    with pytest.raises(ValueError, match=r"exposure must lie in \(0.0, 1.0\]"):
        ops.trajectory_kernels(2, 9, exposure=torch.tensor([0.5, 2.0]))
    with pytest.raises(ValueError, match=r"exposure must lie in \(0.0, 1.0\]"):
        ops.trajectory_kernels(2, 9, exposure=0.0)
    with pytest.raises(ValueError, match="anxiety must be >= 0.0"):
        ops.trajectory_kernels(2, 9, anxiety=torch.tensor([-5.0]))
    with pytest.raises(ValueError, match="max_length must be >= 0.0"):
        ops.trajectory_kernels(2, 9, max_length=float("nan"))


# --------------------------------------------------------------------------------------
# blur_synthesize
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("border", BORDERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.uint8, torch.float16])
def test_blur_matches_reference(device, border, dtype):
    n, h, w = 3, 13, 17
    x = _images(n, 2, h, w, dtype, device)
    mask = torch.rand(n, 1, h, w, generator=torch.Generator().manual_seed(5)).to(device)
    options = [dict(), dict(mask=mask), dict(mask=mask, crf_gamma=2.2), dict(quantize=True),
               dict(noise_sigma=[0.01, 0.03, 0.0]), dict(noise_sigma=0.02, crf_gamma=1.8)]
    shapes = [(5, 5), (4, 6), (1, 1), (9, 3), (7, 7)]
    if dtype in (torch.uint8, torch.float16):  # the float32 runs cover the geometry
        shapes = [(4, 6), (7, 7)]
    for kh, kw in shapes:
        k = _unit_kernels(n, kh, kw, device, sparse=(kh == 7))
        for kwargs in options:
            got = ops.blur_synthesize(x, k, border=border, **kwargs,
                                      generator=torch.Generator(device).manual_seed(2))
            want = ref.blur_synthesize(x, k, border=border, **kwargs,
                                       generator=torch.Generator(device).manual_seed(2))
            assert got.dtype == dtype and got.shape == x.shape
            _compare(got, want, quantized=bool(kwargs.get("quantize")))


@pytest.mark.parametrize("device", DEVICES)
def test_blur_kernels_of_different_sizes_in_one_batch(device):
    x = _images(4, 3, 20, 18, torch.float64, device)
    kernels = [_unit_kernels(1, s, s, device, torch.float64, seed=s)[0] for s in (5, 9, 3, 8)]
    got = ops.blur_synthesize(x, kernels)
    want = ref.blur_synthesize(x, kernels)
    torch.testing.assert_close(got, want, **TOL[torch.float64])
    for i, k in enumerate(kernels):  # each sample as if blurred alone with its own kernel
        alone = ops.blur_synthesize(x[i:i + 1], k[None])
        torch.testing.assert_close(got[i:i + 1], alone, **TOL[torch.float64])


CV2_BORDERS = {"reflect": "BORDER_REFLECT_101", "replicate": "BORDER_REPLICATE",
               "zeros": "BORDER_CONSTANT"}


@pytest.mark.parametrize("border", list(CV2_BORDERS))
@pytest.mark.parametrize("size", [(3, 3), (4, 4), (31, 31), (6, 11)])
def test_blur_equals_cv2_filter2d_on_the_flipped_kernel(border, size):
    cv2 = pytest.importorskip("cv2")
    x = _images(2, 3, 24, 29, torch.float32, "cpu")
    k = ops.motion_kernels([9.0, 25.0], [30.0, 100.0], 31)[:, :size[0], :size[1]].contiguous()
    k = k + 0.01  # dense too, so every tap position is exercised
    got = ops.blur_synthesize(x, k, border=border)
    flag = getattr(cv2, CV2_BORDERS[border])
    for i in range(2):
        img = x[i].permute(1, 2, 0).numpy()
        want = cv2.filter2D(img, -1, k[i].flip(0, 1).numpy(), borderType=flag)
        torch.testing.assert_close(got[i].permute(1, 2, 0), torch.from_numpy(want),
                                   rtol=1e-5, atol=2e-5)


def test_blur_kernel_larger_than_image_reflects_periodically():
    cv2 = pytest.importorskip("cv2")
    x = _images(1, 1, 7, 5, torch.float32, "cpu")
    k = _unit_kernels(1, 21, 17, "cpu")
    got = ops.blur_synthesize(x, k, border="reflect")
    want = cv2.filter2D(x[0, 0].numpy(), -1, k[0].flip(0, 1).numpy(),
                        borderType=cv2.BORDER_REFLECT_101)
    torch.testing.assert_close(got[0, 0], torch.from_numpy(want), rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_spatially_varying_blur(device):
    n, r, h, w = 2, 3, 15, 12
    x = _images(n, 3, h, w, torch.float64, device)
    k = torch.stack([_unit_kernels(r, 5, 5, device, torch.float64, seed=s) for s in range(n)])
    weights = torch.softmax(torch.randn(n, r, h, w, dtype=torch.float64), dim=1).to(device)
    got = ops.blur_synthesize(x, k, weights=weights, border="replicate")
    want = ref.blur_synthesize(x, k, weights=weights, border="replicate")
    torch.testing.assert_close(got, want, **TOL[torch.float64])
    # one-hot weights select one kernel per pixel
    choice = torch.randint(0, r, (n, 1, h, w)).to(device)
    onehot = torch.zeros(n, r, h, w, dtype=torch.float64, device=device).scatter_(1, choice, 1.0)
    got = ops.blur_synthesize(x, k, weights=onehot)
    per_kernel = torch.stack([ops.blur_synthesize(x, k[:, j]) for j in range(r)], dim=1)
    torch.testing.assert_close(got, torch.gather(per_kernel, 1, choice[:, :, None].expand(
        n, 1, 3, h, w))[:, 0], **TOL[torch.float64])


@pytest.mark.parametrize("device", DEVICES)
def test_mask_blend_limits(device):
    x = _images(2, 3, 11, 9, torch.float64, device)
    k = _unit_kernels(2, 5, 5, device, torch.float64)
    zeros = torch.zeros(2, 1, 11, 9, dtype=torch.float64, device=device)
    assert torch.equal(ops.blur_synthesize(x, k, mask=zeros), x)
    torch.testing.assert_close(ops.blur_synthesize(x, k, mask=zeros + 1),
                               ops.blur_synthesize(x, k), rtol=0, atol=1e-15)
    boolean = torch.zeros(2, 11, 9, dtype=torch.bool, device=device)
    boolean[:, 3:7, 2:6] = True
    got = ops.blur_synthesize(x, k, mask=boolean)
    assert torch.equal(got[:, :, 0], x[:, :, 0])
    torch.testing.assert_close(got[:, :, 3:7, 2:6], ops.blur_synthesize(x, k)[:, :, 3:7, 2:6])


@pytest.mark.parametrize("device", DEVICES)
def test_noise_is_seeded_and_per_sample(device):
    x = torch.full((2, 3, 64, 64), 0.5, device=device)
    k = _unit_kernels(2, 5, 5, device)

    def run(seed):
        return ops.blur_synthesize(x, k, noise_sigma=torch.tensor([0.0, 0.05]),
                                   generator=torch.Generator(device).manual_seed(seed))

    a, b, c = run(7), run(7), run(8)
    assert torch.equal(a, b) and not torch.equal(a, c)
    torch.testing.assert_close(a[0], x[0])  # sigma 0: noise-free
    residual = (a[1] - 0.5).flatten()
    assert abs(float(residual.std()) - 0.05) < 0.003
    assert abs(float(residual.mean())) < 0.003


@pytest.mark.parametrize("device", DEVICES)
def test_crf_and_quantization(device):
    x = torch.full((1, 3, 9, 9), 0.3, dtype=torch.float64, device=device)
    k = _unit_kernels(1, 5, 5, device, torch.float64)
    # the blur of a constant is the constant, through the CRF and back
    torch.testing.assert_close(ops.blur_synthesize(x, k, crf_gamma=2.2), x)
    y = ops.blur_synthesize(_images(2, 3, 9, 9, torch.float32, device), _unit_kernels(
        2, 3, 3, device), quantize=True)
    torch.testing.assert_close(y * 255, torch.round(y * 255), rtol=0, atol=1e-4)
    u8 = ops.blur_synthesize(torch.full((1, 1, 4, 4), 77, dtype=torch.uint8, device=device),
                             _unit_kernels(1, 3, 3, device), crf_gamma=2.2)
    assert u8.dtype == torch.uint8 and bool((u8 == 77).all())


def _grad_inputs(device, crf):
    gen = torch.Generator().manual_seed(11)
    n, c, h, w, r = 2, 2, 6, 7, 2
    low = 0.2 if crf else 0.0
    x = (low + (1 - low) * torch.rand(n, c, h, w, generator=gen, dtype=torch.float64))
    k = torch.rand(n, r, 3, 4, generator=gen, dtype=torch.float64)
    weights = torch.rand(n, r, h, w, generator=gen, dtype=torch.float64)
    mask = torch.rand(n, 1, h, w, generator=gen, dtype=torch.float64)
    return [t.to(device).requires_grad_() for t in (x, k, weights, mask)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("border,crf", [("reflect", None), ("zeros", None), ("replicate", 2.2),
                                        ("circular", None), ("reflect", 1.8)])
def test_gradcheck(device, border, crf):
    x, k, weights, mask = _grad_inputs(device, crf)
    assert torch.autograd.gradcheck(
        lambda x, k, wt, m: ops.blur_synthesize(x, k, mask=m, crf_gamma=crf, border=border,
                                                weights=wt),
        (x, k, weights, mask))
    assert torch.autograd.gradcheck(
        lambda x, k: ops.blur_synthesize(x, k[:, 0], border=border, crf_gamma=crf), (x, k))


@pytest.mark.parametrize("device", DEVICES)
def test_gradients_match_reference_autograd(device):
    x, k, weights, mask = _grad_inputs(device, True)
    g = torch.randn(x.shape, dtype=torch.float64, device=device)
    for fn in (ops.blur_synthesize, ref.blur_synthesize):
        out = fn(x, k, mask=mask, crf_gamma=2.2, weights=weights, border="reflect")
        grads = torch.autograd.grad((out * g).sum(), (x, k, weights, mask))
        if fn is ops.blur_synthesize:
            mine = grads
    for a, b in zip(mine, grads):
        torch.testing.assert_close(a, b, **TOL[torch.float64])
    # only the gradient asked for is computed
    out = ops.blur_synthesize(x.detach(), k, border="zeros", weights=weights.detach())
    (gk,) = torch.autograd.grad(out.sum(), (k,))
    assert gk.shape == k.shape


def test_double_backward_raises():
    x, k, weights, mask = _grad_inputs("cpu", 2.2)
    frames = (0.2 + 0.8 * torch.rand(2, 4, 2, 3, 5, dtype=torch.float64)).requires_grad_()
    for name, fn, inputs in [
        ("blur_synthesize", lambda x, k, w, m: ops.blur_synthesize(x, k, mask=m, crf_gamma=2.2,
                                                                   weights=w),
         (x, k, weights, mask)),
        ("average_frames", lambda f: ops.average_frames(f, 2.2, [4, 2]), (frames,)),
    ]:
        # first-order gradients taken with create_graph=True are still right...
        grads = torch.autograd.grad(fn(*inputs).pow(2).sum(), inputs, create_graph=True)
        want = torch.autograd.grad(fn(*inputs).pow(2).sum(), inputs)
        for a, b in zip(grads, want):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        # ...but differentiating them raises instead of treating the second order as zero
        with pytest.raises(RuntimeError, match=f"{name}: double backward is not supported"):
            torch.autograd.grad(sum(g.pow(2).sum() for g in grads), inputs)


def test_opcheck():
    x, k, weights, mask = _grad_inputs("cpu", True)
    cases = [
        (x, k, weights, mask, None, None, 2.2, False, "reflect"),
        (x, k[:, :1], None, None, None, None, None, False, "zeros"),
        (x.detach().float(), k[:, :1].detach().float(), None, mask.detach().float(),
         torch.randn(x.shape), torch.tensor([0.1, 0.0]), None, True, "replicate"),
        ((x.detach() * 255).to(torch.uint8), k[:, :1].detach().float(), None, None, None, None,
         2.2, False, "circular"),
    ]
    for args in cases:
        torch.library.opcheck(OP.blur_synthesize, args)
    params, su, sn = ops.blur.trajectory_random_inputs(3, 11, num_steps=50,
                                                       generator=torch.Generator().manual_seed(0))
    torch.library.opcheck(OP.trajectory_kernels, (params, su, sn, 11, 1, torch.float32))
    lengths = torch.tensor([3.0, 5.0], dtype=torch.float64)
    torch.library.opcheck(OP.motion_kernels, (lengths, lengths * 10, 9, torch.float64))
    torch.library.opcheck(OP.gaussian_kernels, (lengths, 9, torch.float32))
    torch.library.opcheck(OP.defocus_kernels, (lengths, 8, torch.float32))
    frames = torch.rand(2, 4, 2, 5, 6, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(OP.average_frames, (frames, torch.tensor([4, 2]), 2.2))


def test_torch_compile_fullgraph():
    x = _images(2, 3, 16, 16, torch.float32, "cpu")
    k = _unit_kernels(2, 5, 5, "cpu")
    mask = torch.rand(2, 1, 16, 16)

    def fn(x, k, mask):
        return OP.blur_synthesize(x, k[:, None], None, mask, None, None, 2.2, False, "reflect")

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, k, mask), ops.blur_synthesize(x, k, mask=mask,
                                                                          crf_gamma=2.2))


def test_value_checks_do_not_break_torch_compile():
    # The wrappers check tensor values only eagerly: a traced graph cannot branch on data.
    x = _images(2, 3, 8, 8, torch.float32, "cpu")
    k = _unit_kernels(2, 3, 3, "cpu")
    frames = torch.rand(2, 4, 3, 5, 5)
    values = torch.tensor([1.0, 2.0])
    cases = [
        (lambda f: ops.average_frames(f, counts=2), (frames,)),
        (lambda f, c: ops.average_frames(f, counts=c), (frames, torch.tensor([4, 2]))),
        (lambda s: ops.gaussian_kernels(s, 7), (values,)),
        (lambda length: ops.motion_kernels(length, 30.0, 7), (values,)),
        (lambda r: ops.defocus_kernels(r, 7), (values,)),
        # noise of sigma 0 (still the noise path): the plain blur
        (lambda x, k, s: ops.blur_synthesize(x, k, noise_sigma=s), (x, k, torch.zeros(2))),
    ]
    for fn, args in cases:
        compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(compiled(*args), fn(*args))
    walk = torch.compile(lambda e: ops.trajectory_kernels(2, 9, exposure=e, num_steps=50),
                         fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(walk(torch.tensor([0.5, 1.0])).sum(dim=(1, 2)), torch.ones(2))


def test_value_checks_do_not_break_torch_export():
    class Generate(torch.nn.Module):
        def forward(self, sigma, frames, counts):
            return ops.gaussian_kernels(sigma, 7), ops.average_frames(frames, counts=counts)

    args = (torch.tensor([1.0, 2.0]), torch.rand(2, 4, 3, 5, 5), torch.tensor([4, 2]))
    exported = torch.export.export(Generate(), args)
    for got, want in zip(exported.module()(*args), Generate()(*args)):
        torch.testing.assert_close(got, want)


def test_blur_argument_errors():
    x = torch.rand(2, 3, 8, 8)
    k = _unit_kernels(2, 3, 3, "cpu")
    with pytest.raises(ValueError, match=r"images must be \[N, C, H, W\]"):
        ops.blur_synthesize(x[0], k)
    with pytest.raises(TypeError, match="uint8 or floating"):
        ops.blur_synthesize(x.to(torch.int32), k)
    with pytest.raises(ValueError, match="must not be empty"):
        ops.blur_synthesize(x[:, :, :0], k)
    with pytest.raises(ValueError, match="expected kernels for 2 images"):
        ops.blur_synthesize(x, _unit_kernels(3, 3, 3, "cpu"))
    with pytest.raises(ValueError, match="expected 2 kernels"):
        ops.blur_synthesize(x, [k[0]])
    with pytest.raises(ValueError, match="need weights"):
        ops.blur_synthesize(x, k[:, None].expand(2, 2, 3, 3))
    with pytest.raises(ValueError, match="mask must be"):
        ops.blur_synthesize(x, k, mask=torch.rand(2, 1, 8, 7))
    with pytest.raises(TypeError, match="mask must be bool or floating"):
        ops.blur_synthesize(x, k, mask=torch.ones(2, 1, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="border must be one of"):
        ops.blur_synthesize(x, k, border="mirror")
    with pytest.raises(ValueError, match="crf_gamma must be positive"):
        ops.blur_synthesize(x, k, crf_gamma=0.0)
    with pytest.raises(ValueError, match="noise_sigma must be a number or 2 values"):
        ops.blur_synthesize(x, k, noise_sigma=[0.1, 0.1, 0.1])
    with pytest.raises(TypeError, match="kernels must be floating"):
        ops.blur_synthesize(x, k.to(torch.int64))
    with pytest.raises(ValueError, match=r"kernel 0 must be \[kh, kw\] or \[R, kh, kw\]"):
        ops.pad_kernels([torch.rand(3)])
    with pytest.raises(RuntimeError, match="differentiable only"):
        ops.blur_synthesize(x.requires_grad_(), k, noise_sigma=0.1)
    with pytest.raises(RuntimeError, match="border must be one of"):
        OP.blur_synthesize(x.detach(), k[:, None], None, None, None, None, None, False, "bad")
    with pytest.raises(RuntimeError, match="expected kernels of dtype"):
        OP.blur_synthesize(x.detach(), k[:, None].double(), None, None, None, None, None, False,
                           "reflect")


# --------------------------------------------------------------------------------------
# average_frames
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.uint8])
@pytest.mark.parametrize("crf", [2.2, None])
def test_average_frames_matches_reference(device, dtype, crf):
    frames = _images(3 * 7, 3, 10, 12, dtype, device).reshape(3, 7, 3, 10, 12)
    counts = torch.tensor([7, 5, 1])
    got = ops.average_frames(frames, crf_gamma=crf, counts=counts)
    want = ref.average_frames(frames, crf_gamma=crf, counts=counts)
    _compare(got, want)
    if crf is None and dtype == torch.float64:  # one frame: its own average
        assert torch.equal(got[2], frames[2, 0])
    torch.testing.assert_close(ops.average_frames(frames[:, :5], crf),
                               ops.average_frames(frames, crf, counts=5))


@pytest.mark.parametrize("device", DEVICES)
def test_average_frames_gradcheck(device):
    frames = (0.2 + 0.8 * torch.rand(2, 4, 2, 3, 5, dtype=torch.float64)).to(device)
    counts = torch.tensor([4, 2])
    for crf in (2.2, None):
        assert torch.autograd.gradcheck(
            lambda f, crf=crf: ops.average_frames(f, crf, counts), (frames.requires_grad_(),))


def test_average_frames_errors():
    frames = torch.rand(2, 4, 3, 5, 5)
    with pytest.raises(ValueError, match=r"counts must lie in \[1, 4\]"):
        ops.average_frames(frames, counts=[4, 5])
    with pytest.raises(ValueError, match=r"frames must be \[N, T, C, H, W\]"):
        ops.average_frames(frames[0])
    with pytest.raises(TypeError, match="counts must be integer"):
        ops.average_frames(frames, counts=torch.tensor([1.0, 2.0]))
    for counts in (2.0, True, [1, 2.5]):
        with pytest.raises(TypeError, match="counts must be integer"):
            ops.average_frames(frames, counts=counts)
    torch.testing.assert_close(ops.average_frames(frames, counts=np.int64(2)),
                               ops.average_frames(frames, counts=2))


# --------------------------------------------------------------------------------------
# BlurSynthesizer
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_blur_synthesizer_is_seeded_and_matches_the_reference_backend(device):
    x = _images(8, 3, 32, 32, torch.float32, device)
    mask = torch.rand(8, 1, 32, 32).to(device)
    config = BlurConfig(kernel_sizes=(9, 13, 17), trajectory_steps=300, mask_prob=0.5)

    def synth(seed, backend=None):
        return BlurSynthesizer(config, torch.Generator(device).manual_seed(seed), backend=backend)

    a, info = synth(0)(x, mask=mask, return_info=True)
    b = synth(0)(x, mask=mask)
    c, info_ref = synth(0, ref)(x, mask=mask, return_info=True)
    assert torch.equal(a, b) and not torch.equal(a, synth(1)(x, mask=mask))
    torch.testing.assert_close(a, c, **TOL[torch.float32])
    assert info["kernel_types"] == info_ref["kernel_types"]
    assert info["params"] == info_ref["params"]
    assert info["kernels"].shape == (8, 17, 17)
    torch.testing.assert_close(info["kernels"].sum(dim=(1, 2)), torch.ones(8, device=device))
    assert info["mask_used"].dtype == torch.bool and info["noise_sigma"].shape == (8,)
    # the info reproduces the noise-free part of the blur
    quiet = BlurSynthesizer({"kernel_sizes": [9, 13], "noise_sigma": [0.0, 0.0]},
                            torch.Generator(device).manual_seed(3))
    y, info = quiet(x, return_info=True)
    torch.testing.assert_close(y, ops.blur_synthesize(x, info["kernels"]))
    expected_keys = {"motion": {"length", "angle"}, "trajectory": set(), "gaussian": {"sigma"},
                     "defocus": {"radius"}}
    for t, size, params in zip(info["kernel_types"], info["kernel_sizes"], info["params"]):
        assert set(params) == expected_keys[t] and int(size) in (9, 13)
        if t == "motion":
            assert params["length"] <= int(size) - 1


def test_blur_synthesizer_in_a_collate_function():
    synth = BlurSynthesizer(BlurConfig(kernel_sizes=(7,), trajectory_steps=200),
                            torch.Generator().manual_seed(0))
    data = [(torch.rand(3, 16, 16) * 255).to(torch.uint8) for _ in range(6)]

    def collate(batch):
        sharp = torch.stack(batch)
        return synth(sharp), sharp

    loader = torch.utils.data.DataLoader(data, batch_size=3, collate_fn=collate)
    for blurry, sharp in loader:
        assert blurry.dtype == torch.uint8 and blurry.shape == sharp.shape


def test_blur_config_validation():
    with pytest.raises(ValueError, match="probabilities"):
        BlurConfig(motion_prob=0, trajectory_prob=0, gaussian_prob=0, defocus_prob=0)
    with pytest.raises(ValueError, match="motion_length must be a"):
        BlurConfig(motion_length=(5.0, 1.0))
    with pytest.raises(ValueError, match="mask_prob"):
        BlurConfig(mask_prob=1.5)
    with pytest.raises(ValueError, match="unknown BlurConfig keys"):
        BlurSynthesizer({"kernel_size": 9})
    with pytest.raises(TypeError, match="config must be"):
        BlurSynthesizer(3)
    only_gauss = BlurConfig(motion_prob=0, trajectory_prob=0, defocus_prob=0)
    _, info = BlurSynthesizer(only_gauss).sample_kernels(5)
    assert info["kernel_types"] == ["gaussian"] * 5


# --------------------------------------------------------------------------------------
# Implementation variants: the baseline-ISA CPU path and CUDA against the CPU
# --------------------------------------------------------------------------------------


def test_baseline_isa_path_matches_the_avx2_path(tmp_path):
    import os
    import subprocess
    import sys

    from conftest import REPO_ROOT

    script = tmp_path / "blur_once.py"
    script.write_text(
        "import sys, torch, facedeblur_ext.ops as ops\n"
        "g = torch.Generator().manual_seed(0)\n"
        "x = torch.rand(2, 3, 37, 75, generator=g)\n"
        "k = ops.motion_kernels([9.0, 21.0], [20.0, 110.0], 23)\n"
        "m = torch.rand(2, 1, 37, 75, generator=g)\n"
        "y = ops.blur_synthesize(x, k, mask=m, border='reflect')\n"
        "torch.save(y, sys.argv[1])\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), str(REPO_ROOT / "python")]))
    outs = []
    for name, extra in (("avx2", {}), ("baseline", {"FACEDEBLUR_NO_AVX2": "1"})):
        path = tmp_path / f"{name}.pt"
        subprocess.run([sys.executable, str(script), str(path)], check=True,
                       env=dict(env, **extra), cwd=REPO_ROOT)
        outs.append(torch.load(path))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("device", cuda_params())
def test_cuda_generators_match_cpu(device):
    params, su, sn = ops.blur.trajectory_random_inputs(
        6, 31, num_steps=1500, anxiety=(0.001, 0.05), generator=torch.Generator().manual_seed(0))
    for centering in (0, 1):
        with cpu_kernels():
            cpu = OP.trajectory_kernels(params, su, sn, 31, centering, torch.float64)
        gpu = OP.trajectory_kernels(params.to(device), su.to(device), sn.to(device), 31,
                                    centering, torch.float64)
        torch.testing.assert_close(gpu.cpu(), cpu, rtol=0, atol=1e-9)
    lengths, angles = torch.rand(7) * 60, torch.rand(7) * 360
    for size in (15, 51, 64):
        with cpu_kernels():
            cpu = [ops.motion_kernels(lengths, angles, size),
                   ops.defocus_kernels(lengths / 4, size), ops.gaussian_kernels(lengths / 8, size)]
        gpu = [ops.motion_kernels(lengths, angles, size, device=device),
               ops.defocus_kernels(lengths / 4, size, device=device),
               ops.gaussian_kernels(lengths / 8, size, device=device)]
        for a, b in zip(gpu, cpu):
            torch.testing.assert_close(a.cpu(), b, rtol=0, atol=1e-7)
    half = ops.motion_kernels(lengths, angles, 15, device=device, dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16
    # long walks: the launcher generates in chunks of 4 kernels here (64 MiB of positions)
    params, su, sn = ops.blur.trajectory_random_inputs(
        9, 25, num_steps=1_000_001, generator=torch.Generator().manual_seed(1))
    with cpu_kernels():
        cpu = OP.trajectory_kernels(params, su, sn, 25, 1, torch.float64)
    gpu = OP.trajectory_kernels(params.to(device), su.to(device), sn.to(device), 25, 1,
                                torch.float64)
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=0, atol=1e-8)


@pytest.mark.parametrize("device", cuda_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.uint8, torch.float16,
                                   torch.bfloat16])
@pytest.mark.parametrize("border", BORDERS)
def test_cuda_blur_matches_cpu(dtype, border, device):
    # sizes that are not multiples of the 32 x 32 tile, several regions, a 51 x 51 kernel
    n, c, h, w, r = 3, 3, 70, 45, 2
    x = _images(n, c, h, w, dtype, "cpu")
    k = torch.stack([ops.motion_kernels(torch.rand(n) * 50, torch.rand(n) * 180, 51)
                     for _ in range(r)], dim=1)
    k[:, 1] = _unit_kernels(n, 51, 51, "cpu", sparse=True)
    if dtype == torch.float64:
        k = k.double()
    compute = k.dtype
    weights = torch.softmax(torch.randn(n, r, h, w, dtype=compute), dim=1)
    mask = torch.rand(n, 1, h, w, dtype=compute)
    noise = torch.randn(n, c, h, w, dtype=compute)
    sigma = torch.tensor([0.0, 0.02, 0.05], dtype=compute)
    for args in [(weights, mask, None, None, 2.2, False), (weights, None, noise, sigma, None, True),
                 (None, mask, None, None, None, False)]:
        kk = k if args[0] is not None else k[:, :1].contiguous()
        with cpu_kernels():
            cpu = OP.blur_synthesize(x, kk, *args, border)
        gpu = OP.blur_synthesize(x.to(device), kk.to(device),
                                 *[a.to(device) if isinstance(a, torch.Tensor) else a
                                   for a in args], border)
        _compare(gpu.cpu(), cpu, quantized=bool(args[5]))


@pytest.mark.parametrize("device", cuda_params())
def test_cuda_blur_refuses_kernels_beyond_shared_memory(device):
    # a 151 x 151 float64 halo tile needs (32 + 150)^2 * 8 = 265 KB, above every GPU's per-block
    # limit (227 KB on H100): a clear error before launch, not "invalid argument"
    x = torch.rand(1, 1, 160, 160, dtype=torch.float64, device=device)
    k = torch.zeros(1, 1, 151, 151, dtype=torch.float64, device=device)
    k[..., 75, 75] = 1
    with pytest.raises(RuntimeError, match="bytes of shared memory per block"):
        OP.blur_synthesize(x, k, None, None, None, None, None, False, "reflect")
    with pytest.raises(RuntimeError, match="bytes of shared memory per block"):
        OP.blur_synthesize_backward(x, x, k, None, None, None, "reflect",
                                    [True, True, False, False])


@pytest.mark.parametrize("device", cuda_params())
@pytest.mark.parametrize("border", BORDERS)
def test_cuda_blur_backward_matches_cpu(border, device):
    x, k, weights, mask = _grad_inputs("cpu", True)
    x = torch.rand(2, 2, 40, 37, dtype=torch.float64) * 0.8 + 0.2
    weights = torch.rand(2, 2, 40, 37, dtype=torch.float64)
    mask = torch.rand(2, 1, 40, 37, dtype=torch.float64)
    k = torch.rand(2, 2, 9, 6, dtype=torch.float64)
    grad = torch.randn_like(x)
    for crf in (None, 2.2):
        for need in ([True, True, True, True], [True, False, False, False],
                     [False, True, False, True]):
            with cpu_kernels():
                cpu = OP.blur_synthesize_backward(grad, x, k, weights, mask, crf, border, need)
            gpu = OP.blur_synthesize_backward(grad.to(device), x.to(device), k.to(device),
                                              weights.to(device), mask.to(device), crf, border,
                                              need)
            for a, b, wanted in zip(gpu, cpu, need):
                assert a.numel() == b.numel() and (a.numel() > 0) == wanted
                torch.testing.assert_close(a.cpu(), b, rtol=1e-10, atol=1e-10)
    frames = torch.rand(2, 5, 3, 9, 11, dtype=torch.float64)
    counts = torch.tensor([5, 3])
    g = torch.randn(2, 3, 9, 11, dtype=torch.float64)
    with cpu_kernels():
        cpu = OP.average_frames_backward(g, frames, counts, 2.2)
    torch.testing.assert_close(
        OP.average_frames_backward(g.to(device), frames.to(device), counts.to(device),
                                   2.2).cpu(), cpu)


@pytest.mark.parametrize("device", cuda_params())
def test_opcheck_cuda(device):
    x, k, weights, mask = _grad_inputs(device, True)
    torch.library.opcheck(OP.blur_synthesize,
                          (x, k, weights, mask, None, None, 2.2, False, "reflect"))
    torch.library.opcheck(OP.blur_synthesize,
                          ((x.detach() * 255).to(torch.uint8), k[:, :1].detach().float(), None,
                           None, None, None, None, False, "zeros"))
    params, su, sn = ops.blur.trajectory_random_inputs(
        3, 11, num_steps=50, generator=torch.Generator(device).manual_seed(0), device=device)
    torch.library.opcheck(OP.trajectory_kernels, (params, su, sn, 11, 0, torch.float32))
    frames = torch.rand(2, 4, 2, 5, 6, dtype=torch.float64, device=device, requires_grad=True)
    torch.library.opcheck(OP.average_frames,
                          (frames, torch.tensor([4, 2], device=device), 2.2))
