"""The CUDA device code (csrc/cuda/*_kernels.cu) run on the CPU emulator against the CPU ops.

Every ``launch_*`` entry point of the three op families runs, through the real ATen launchers
built for the emulator (tests/cuda_emulation.py, ``torch.ops.facedeblur_emu``), under each
schedule of the emulator (forward, reverse, seeded random, one warp ahead), on random shapes
and the edge cases; results are compared with the CPU ops, and where the op promises
determinism (separable-norm reductions, the deterministic DCN backward, the blur kernel
gradient) bit-identical across schedules. The
library is built from the checkout the tests run in (or FACEDEBLUR_EMULATOR_CSRC) with small
grid caps, so grid-stride loops, plane loops and split reductions run on these small inputs.
Select with ``pytest -m cuda_emulation``.
"""

from __future__ import annotations

import pytest
import test_modulated_deform_conv as mdc_tests
import test_separable_norm as snorm_tests
import torch
from cuda_emulation import (
    SCHEDULES,
    CudaEmulator,
    EmulatedLaunchError,
    build_emulator,
    sanitized,
)

pytestmark = pytest.mark.cuda_emulation

OPS = torch.ops.facedeblur_ext
ORDERS = list(SCHEDULES)
FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


@pytest.fixture(scope="module")
def emulator() -> CudaEmulator:
    return CudaEmulator(build_emulator())


@pytest.fixture(params=ORDERS)
def emu(request, emulator, one_torch_thread) -> CudaEmulator:
    """The emulator under one schedule, with a 1-SM device so that launch plans split work
    over several blocks even for small inputs."""
    emulator.set_schedule(request.param, seed=1234)
    emulator.set_sm_count(1)
    emulator.reset()
    return emulator


def tol(dtype: torch.dtype) -> dict:
    return {
        torch.float64: dict(rtol=1e-9, atol=1e-10),
        torch.float32: dict(rtol=1e-4, atol=1e-5),
        torch.float16: dict(rtol=1e-2, atol=2e-3),
        torch.bfloat16: dict(rtol=2e-2, atol=1e-2),
    }[dtype]


def assert_close(actual, expected, dtype=None, **kw):
    opts = tol(dtype or expected.dtype) if dtype or expected.is_floating_point() else {}
    opts.update(kw)
    torch.testing.assert_close(actual, expected, equal_nan=True, check_stride=False, **opts)


def cpu_op(op, *args):
    """The CPU op; half inputs (which it does not take) run in float32 and the tensors it
    returns are rounded back, as the CUDA kernels accumulate half data in float32."""
    half = next((a.dtype for a in args if isinstance(a, torch.Tensor)
                 and a.dtype in (torch.float16, torch.bfloat16)), None)
    if half is None:
        return op(*args)
    up = [a.float() if isinstance(a, torch.Tensor) and a.dtype == half else a for a in args]
    result = op(*up)
    if isinstance(result, torch.Tensor):
        return result.to(half)
    return tuple(r if r is None or r.dtype != torch.float32 else r.to(half) for r in result)


def bits(t: torch.Tensor) -> torch.Tensor:
    """Raw bytes, for bit-identical comparisons (NaN payloads included)."""
    return t.contiguous().view(torch.uint8)


# ---------------------------------------------------------------------------------------------
# The emulator itself


def test_collectives_give_cuda_results(emu):
    out = torch.zeros(64, 6, dtype=torch.int64)
    assert emu.selftest(0, out) == 0, emu.message()
    t = torch.arange(64)
    lane, base = t % 32, t - t % 32
    assert out[:, 0].tolist() == [sum(range(b, b + 32)) for b in base.tolist()]  # xor tree
    assert out[:, 1].tolist() == torch.where(lane < 31, t + 1, t).tolist()  # shfl_down 1
    assert out[:, 2].tolist() == torch.where(lane >= 2, t - 2, t).tolist()  # shfl_up 2
    assert out[:, 3].tolist() == (base + 3).tolist()  # shfl from lane 3
    assert set(out[:, 4].tolist()) == {0xAAAAAAAA}  # ballot of odd lanes
    assert out[:, 5].tolist() == ((63 - t) * 10).tolist()  # across __syncthreads


@pytest.mark.parametrize(
    "case, error, words",
    [
        (1, 719, ["divergent_barrier_kernel", "divergent __syncthreads", "threads 0-15",
                  "threads 16-31"]),
        (2, 719, ["missing_lane_kernel", "deadlock", "__shfl_xor_sync", "lanes 31",
                  "threads 32-63 wait at __syncthreads"]),
        (3, 719, ["shared_overflow_kernel", "past the end of the static shared variable"]),
        (5, 1, ["large_static_kernel", "static shared memory"]),
        (6, 9, ["more than 1024 threads"]),
        (7, 9, ["grid (1,65536,1)"]),
        (8, 1, ["cudaFuncAttributeMaxDynamicSharedMemorySize"]),
        (9, 1, ["opt_in_kernel", "over the kernel's maximum of 204800"]),
    ],
)
def test_misuse_fails_the_launch_naming_the_kernel(emulator, case, error, words):
    if case == 3 and sanitized():
        pytest.skip("in the sanitized build UBSan's bounds check stops the process first")
    emulator.set_schedule("forward")
    emulator.reset()
    out = torch.zeros(64 * 1024)
    assert emulator.selftest(case, out) == error
    message = emulator.message()
    for word in words:
        assert word in message, message
    emulator.reset()  # a failed kernel is sticky until the reset, as a CUDA context is


def test_failed_kernel_is_sticky(emulator):
    emulator.set_schedule("forward")
    emulator.reset()
    out = torch.zeros(64 * 1024)
    assert emulator.selftest(1, out) == 719
    assert emulator.selftest(4, out) == 719  # a correct kernel after the fault still fails
    emulator.reset()
    assert emulator.selftest(4, out) == 0


def test_unwritten_shared_memory_reads_nan(emulator):
    emulator.set_schedule("forward")
    emulator.reset()
    out = torch.zeros(64)
    assert emulator.selftest(4, out) == 0
    assert out.isnan().all()  # static and dynamic shared memory are poisoned at block start


# ---------------------------------------------------------------------------------------------
# Blur family: generators, blur_synthesize (+ backward), average_frames (+ backward)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("size", [1, 6, 25, 110])  # 110: 97 KB accumulator, the opt-in path
def test_kernel_generators(emu, dtype, size):
    g = torch.Generator().manual_seed(size)
    n = 3 if size < 100 else 1
    length = torch.rand(n, generator=g, dtype=torch.float64) * size
    angle = torch.rand(n, generator=g, dtype=torch.float64) * 360
    sigma = torch.rand(n, generator=g, dtype=torch.float64) * size / 3
    sigma[0] = 0.0  # an empty kernel becomes a point
    radius = torch.rand(n, generator=g, dtype=torch.float64) * size / 2
    assert_close(emu.motion_kernels(length, angle, size, dtype),
                 OPS.motion_kernels(length, angle, size, dtype))
    assert_close(emu.gaussian_kernels(sigma, size, dtype),
                 OPS.gaussian_kernels(sigma, size, dtype))
    assert_close(emu.defocus_kernels(radius, size, dtype),
                 OPS.defocus_kernels(radius, size, dtype))


@pytest.mark.parametrize("rand_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("centering", [0, 1])
def test_trajectory_kernels(emu, rand_dtype, centering):
    from facedeblur_ext.ops.blur import trajectory_random_inputs

    params, su, sn = trajectory_random_inputs(3, 13, num_steps=120,
                                              generator=torch.Generator().manual_seed(3))
    su, sn = su.to(rand_dtype), sn.to(rand_dtype)
    for dtype in (torch.float32, torch.float64):
        assert_close(emu.trajectory_kernels(params, su, sn, 13, centering, dtype),
                     OPS.trajectory_kernels(params, su, sn, 13, centering, dtype))


def test_generators_empty_batch(emu):
    empty = torch.empty(0, dtype=torch.float64)
    assert emu.motion_kernels(empty, empty, 5, torch.float32).shape == (0, 5, 5)
    assert emu.gaussian_kernels(empty, 5, torch.float32).shape == (0, 5, 5)
    assert emu.launch_log() == []


def compute_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def blur_case(seed, dtype, n, c, h, w, r, kh, kw, *, weights=False, mask=False, noise=False):
    g = torch.Generator().manual_seed(seed)
    cd = compute_dtype(dtype)
    if dtype == torch.uint8:
        images = torch.randint(0, 256, (n, c, h, w), generator=g, dtype=torch.uint8)
    else:
        images = torch.rand(n, c, h, w, generator=g, dtype=torch.float64).to(dtype)
    kernels = torch.rand(n, r, kh, kw, generator=g, dtype=cd)
    kernels[kernels < 0.3] = 0  # sparse taps: the compaction keeps only nonzero ones
    kernels /= kernels.sum((2, 3), keepdim=True).clamp_min(1e-3)
    w_ = torch.rand(n, r, h, w, generator=g, dtype=cd) if weights else None
    if w_ is not None:
        w_ /= w_.sum(1, keepdim=True)
    m_ = torch.rand(n, 1, h, w, generator=g, dtype=cd) if mask else None
    nz = torch.randn(n, c, h, w, generator=g, dtype=cd) if noise else None
    sig = torch.rand(n, generator=g, dtype=cd) * 0.1 if noise else None
    return images, kernels, w_, m_, nz, sig


BLUR_SHAPES = [
    # n, c, h, w, r, kh, kw: planes (n * c) above the grid-z cap of 3 loop in a block
    (2, 3, 13, 17, 1, 5, 3),
    (1, 2, 40, 35, 2, 7, 7),    # more than one 32 x 32 tile, two regions
    (1, 1, 1, 1, 1, 3, 3),      # 1x1 image
    (2, 1, 4, 5, 1, 9, 11),     # kernel larger than the image
]


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float16, torch.bfloat16, torch.float32,
                                   torch.float64])
@pytest.mark.parametrize("shape", BLUR_SHAPES)
@pytest.mark.parametrize("border", ["reflect", "replicate", "zeros", "circular"])
def test_blur_synthesize(emu, dtype, shape, border):
    n, c, h, w, r, kh, kw = shape
    images, kernels, weights, mask, noise, sigma = blur_case(
        sum(shape), dtype, *shape, weights=r > 1, mask=True, noise=dtype != torch.uint8)
    for crf, quantize in ((None, False), (2.2, dtype != torch.uint8)):
        args = (images, kernels, weights, mask, noise, sigma, crf, quantize, border)
        out = emu.blur_synthesize(*args)
        ref = OPS.blur_synthesize(*args)
        if dtype == torch.uint8:
            assert (out.int() - ref.int()).abs().max() <= 1
        else:
            assert_close(out, ref)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", BLUR_SHAPES)
def test_blur_synthesize_backward(emu, dtype, shape):
    n, c, h, w, r, kh, kw = shape
    images, kernels, weights, mask, _, _ = blur_case(sum(shape) + 1, dtype, *shape,
                                                     weights=r > 1, mask=True)
    grad = torch.randn(images.shape, generator=torch.Generator().manual_seed(5),
                       dtype=torch.float64).to(dtype)
    for crf, border, use_mask in ((None, "reflect", True), (2.2, "circular", False),
                                  (None, "zeros", False)):
        m = mask if use_mask else None
        need = [True, True, r > 1, use_mask]
        got = emu.blur_synthesize_backward(grad, images, kernels, weights, m, crf, border, need)
        ref = OPS.blur_synthesize_backward(grad, images, kernels, weights, m, crf, border, need)
        for a, b in zip(got, ref):
            assert_close(a, b, dtype=compute_dtype(dtype) if a.dtype != dtype else dtype)


def test_blur_kernel_gradient_is_bitwise_reproducible(emulator, one_torch_thread):
    """The backward has no atomics: every schedule gives the same bits."""
    shape = (2, 2, 21, 19, 2, 5, 5)
    images, kernels, weights, mask, _, _ = blur_case(7, torch.float32, *shape, weights=True,
                                                     mask=True)
    grad = torch.randn(images.shape, generator=torch.Generator().manual_seed(1))
    results = []
    for order in ORDERS:
        emulator.set_schedule(order, seed=99)
        got = emulator.blur_synthesize_backward(grad, images, kernels, weights, mask, 2.2,
                                                "reflect", [True, True, True, True])
        results.append(torch.cat([bits(t).flatten() for t in got]))
    for other in results[1:]:
        assert torch.equal(results[0], other)


def test_blur_refuses_a_halo_over_the_shared_memory_limit(emu):
    images, kernels, *_ = blur_case(1, torch.float64, 1, 1, 8, 8, 1, 151, 151)
    with pytest.raises(RuntimeError, match="shared memory"):
        emu.blur_synthesize(images, kernels, None, None, None, None, None, False, "reflect")


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float16, torch.bfloat16, torch.float32,
                                   torch.float64])
@pytest.mark.parametrize("crf", [None, 2.2])
def test_average_frames(emu, dtype, crf):
    g = torch.Generator().manual_seed(11)
    n, t, c, h, w = 3, 5, 3, 9, 11  # n * P = 891 elements: a grid-stride loop over 2 blocks
    if dtype == torch.uint8:
        frames = torch.randint(0, 256, (n, t, c, h, w), generator=g, dtype=torch.uint8)
    else:
        frames = torch.rand(n, t, c, h, w, generator=g, dtype=torch.float64).to(dtype)
    counts = torch.tensor([1, 3, 5])
    out = emu.average_frames(frames, counts, crf)
    ref = OPS.average_frames(frames, counts, crf)
    if dtype == torch.uint8:
        assert (out.int() - ref.int()).abs().max() <= 1
    else:
        assert_close(out, ref)
        grad = torch.randn(out.shape, generator=g, dtype=torch.float64).to(dtype)
        assert_close(emu.average_frames_backward(grad, frames, counts, crf),
                     OPS.average_frames_backward(grad, frames, counts, crf))
    empty = frames[:0]
    for op in (emu.average_frames, OPS.average_frames):  # the launcher checks as the CPU op
        with pytest.raises(RuntimeError, match="frames must not be empty"):
            op(empty, counts[:0], crf)


# ---------------------------------------------------------------------------------------------
# Modulated deformable convolution: gather_columns, backward_samples (atomic and fused), and
# the deterministic input gradient (scatter_keys, segment_starts, gather_input_grad)


def dcn_case(seed, dtype, n, c, h, w, cout, k, *, stride=1, pad=1, dil=1, groups=1,
             offset_groups=1, with_mask=True, channels_last=False, strided_offsets=False):
    g = torch.Generator().manual_seed(seed)
    out_h = (h + 2 * pad - dil * (k - 1) - 1) // stride + 1
    out_w = (w + 2 * pad - dil * (k - 1) - 1) // stride + 1

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    x = rnd(n, c, h, w)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    off_shape = (n, 2 * offset_groups * k * k, out_h, out_w)
    if strided_offsets:  # a view with the channel dimension innermost: strides the kernel sees
        offset = rnd(n, out_h, out_w, off_shape[1], scale=2.0).permute(0, 3, 1, 2)
    else:
        offset = rnd(*off_shape, scale=2.0)
    mask = None
    if with_mask:
        mask = torch.rand(n, offset_groups * k * k, out_h, out_w, generator=g,
                          dtype=torch.float64).to(dtype)
        if strided_offsets:
            mask = mask.transpose(2, 3).contiguous().transpose(2, 3)
    weight = rnd(cout, c // groups, k, k, scale=0.3)
    bias = rnd(cout)
    return x, offset, weight, bias, mask, (stride, stride), (pad, pad), (dil, dil), groups


DCN_CASES = [
    # n, c, h, w, cout, k, options
    (2, 4, 7, 9, 6, 3, {}),
    (2, 8, 6, 5, 4, 3, dict(groups=2, offset_groups=2, stride=2)),
    (1, 40, 5, 6, 3, 3, dict(offset_groups=1)),  # 40 channels: 4 channel slices per block
    (2, 4, 1, 1, 2, 3, dict(pad=1)),  # 1x1 image
    (1, 3, 2, 3, 2, 5, dict(pad=2, dil=1)),  # kernel larger than the image
    (2, 4, 8, 7, 4, 3, dict(dil=2, pad=2, with_mask=False)),  # DCNv1
    (2, 6, 6, 6, 4, 3, dict(channels_last=True, strided_offsets=True)),
]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("case", DCN_CASES)
@pytest.mark.parametrize("tile_elements", [1 << 23, 40])  # 40: tiles of a few pixels
def test_modulated_deform_conv_forward(emu, dtype, case, tile_elements):
    n, c, h, w, cout, k, opts = case
    x, offset, weight, bias, mask, stride, pad, dil, _ = dcn_case(
        n + c + h, dtype, n, c, h, w, cout, k, **opts)
    got = emu.modulated_deform_conv2d(x, offset, weight, bias, mask, stride, pad, dil,
                                      tile_elements=tile_elements)
    ref = cpu_op(OPS.modulated_deform_conv2d, x, offset, weight, bias, mask, stride, pad, dil)
    assert_close(got, ref, **({"rtol": 3e-2, "atol": 3e-2} if dtype == torch.bfloat16 else {}))
    if opts.get("channels_last"):
        assert got.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("case", DCN_CASES)
@pytest.mark.parametrize("deterministic", [False, True])
def test_modulated_deform_conv_backward(emu, dtype, case, deterministic):
    n, c, h, w, cout, k, opts = case
    x, offset, weight, bias, mask, stride, pad, dil, _ = dcn_case(
        n + c + w, dtype, n, c, h, w, cout, k, **opts)
    out_shape = cpu_op(OPS.modulated_deform_conv2d, x, offset, weight, bias, mask, stride, pad,
                       dil).shape
    grad = torch.randn(out_shape, generator=torch.Generator().manual_seed(2),
                       dtype=torch.float64).to(dtype)
    want = [True, True, mask is not None, True, True]
    got = emu.modulated_deform_conv2d_backward(grad, x, offset, weight, mask, stride, pad, dil,
                                               want, deterministic, tile_elements=60)
    ref = cpu_op(OPS.modulated_deform_conv2d_backward, grad, x, offset, weight, mask, stride,
                 pad, dil, want, deterministic)
    loose = {"rtol": 5e-2, "atol": 5e-2} if dtype in (torch.float16, torch.bfloat16) else {}
    for name, a, b in zip(["input", "offset", "mask", "weight", "bias"], got, ref):
        assert a.shape == b.shape, name
        assert_close(a, b, **loose)


def test_modulated_deform_conv_empty_batch(emu):
    x, offset, weight, bias, mask, stride, pad, dil, _ = dcn_case(0, torch.float32, 0, 4,
                                                                       5, 5, 2, 3)
    out = emu.modulated_deform_conv2d(x, offset, weight, bias, mask, stride, pad, dil)
    assert out.shape == (0, 2, 5, 5)
    grads = emu.modulated_deform_conv2d_backward(torch.zeros(out.shape), x, offset, weight, mask,
                                                 stride, pad, dil, [True] * 5, True)
    assert grads[3].abs().sum() == 0 and emu.launch_log() == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_deterministic_dcn_backward_is_bitwise_reproducible(emulator, one_torch_thread, dtype):
    x, offset, weight, bias, mask, stride, pad, dil, _ = dcn_case(
        5, dtype, 2, 8, 6, 7, 4, 3, groups=2, offset_groups=2)
    grad = torch.randn(2, 4, 6, 7, generator=torch.Generator().manual_seed(8)).to(dtype)
    results = []
    for order in ORDERS:
        for seed in (1, 2):
            emulator.set_schedule(order, seed=seed)
            got = emulator.modulated_deform_conv2d_backward(
                grad, x, offset, weight, mask, stride, pad, dil, [True] * 5, True,
                tile_elements=100)
            results.append(torch.cat([bits(t).flatten() for t in got]))
    for other in results[1:]:
        assert torch.equal(results[0], other)


# ---------------------------------------------------------------------------------------------
# Separable normalization: forward (stats, finalize, apply) and backward (grad sums,
# coefficients, apply NCHW / NHWC, mask-gradient finalize)


def snorm_case(seed, dtype, n, c, h, w, r, *, affine="pixel", channels_last=False, soft=True,
               empty_region=False):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, c, h, w, generator=g, dtype=torch.float64) * 2 + 3).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    if soft:
        masks = torch.rand(n, r, h, w, generator=g, dtype=torch.float64)
        masks /= masks.sum(1, keepdim=True)
    else:
        labels = torch.randint(0, r, (n, h, w), generator=g)
        masks = torch.nn.functional.one_hot(labels, r).permute(0, 3, 1, 2).double()
    if empty_region:
        masks[:, -1] = 0
    masks = masks.to(dtype)
    if affine == "pixel":
        gamma = torch.randn(n, c, h, w, generator=g, dtype=torch.float64).to(dtype)
        beta = torch.randn(n, c, h, w, generator=g, dtype=torch.float64).to(dtype)
    elif affine == "channel":
        gamma = torch.randn(1, c, 1, 1, generator=g, dtype=torch.float64).to(dtype)
        beta = torch.randn(1, c, 1, 1, generator=g, dtype=torch.float64).to(dtype)
    else:
        gamma = beta = None
    return x, masks, gamma, beta


SNORM_CASES = [
    # n, c, h, w, r, options
    (2, 5, 9, 11, 2, {}),  # splits over pixels (99 > 16 per split)
    (2, 12, 7, 9, 3, dict(affine="channel")),  # channel splits of the backward
    (1, 3, 1, 1, 2, dict(affine=None)),  # 1x1 image
    (2, 40, 5, 7, 5, dict(channels_last=True)),  # NHWC, two channel tiles, region groups
    (2, 36, 6, 5, 2, dict(channels_last=True, affine="channel", soft=False)),
    (1, 4, 8, 8, 3, dict(empty_region=True, soft=False)),
    (2, 3, 5, 6, 16, dict(affine=None)),  # the most regions the kernels take
]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("case", SNORM_CASES)
def test_separable_norm(emu, dtype, case):
    n, c, h, w, r, opts = case
    x, masks, gamma, beta = snorm_case(n * c + r, dtype, n, c, h, w, r, **opts)
    eps = 1e-5
    out, mean, rstd = emu.separable_norm_forward(x, masks, gamma, beta, eps)
    ref_out, ref_mean, ref_rstd = cpu_op(OPS.separable_norm_forward, x, masks, gamma, beta, eps)
    if dtype in (torch.float16, torch.bfloat16):  # statistics stay float32 on CUDA
        ref_mean, ref_rstd = ref_mean.float(), ref_rstd.float()
    loose = {"rtol": 3e-2, "atol": 3e-2} if dtype in (torch.float16, torch.bfloat16) else {}
    assert_close(mean, ref_mean, dtype=dtype, **loose)
    assert_close(rstd, ref_rstd, dtype=dtype, **loose)
    assert_close(out, ref_out, **loose)
    if opts.get("channels_last"):
        assert out.is_contiguous(memory_format=torch.channels_last)
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(4),
                       dtype=torch.float64).to(dtype)
    want = [True, True, gamma is not None, beta is not None]
    got = emu.separable_norm_backward(grad, x, masks, gamma, beta, ref_mean, ref_rstd, eps, want)
    ref = cpu_op(OPS.separable_norm_backward, grad, x, masks, gamma, beta, ref_mean, ref_rstd,
                 eps, want)
    for name, a, b in zip(["x", "masks", "gamma", "beta"], got, ref):
        if b is None:
            assert a is None, name
        else:
            assert_close(a, b, **loose)


@pytest.mark.parametrize("channels_last", [False, True])
def test_separable_norm_is_bitwise_reproducible(emulator, one_torch_thread, channels_last):
    """Reductions merge in a fixed order: every schedule gives the same bits."""
    x, masks, gamma, beta = snorm_case(9, torch.float32, 2, 36, 9, 8, 3,
                                       channels_last=channels_last)
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(6))
    results = []
    for order in ORDERS:
        for seed in (1, 2):
            emulator.set_schedule(order, seed=seed)
            out, mean, rstd = emulator.separable_norm_forward(x, masks, gamma, beta, 1e-5)
            got = emulator.separable_norm_backward(grad, x, masks, gamma, beta, mean, rstd, 1e-5,
                                                   [True] * 4)
            results.append(torch.cat([bits(t).flatten() for t in (out, mean, rstd, *got)]))
    for other in results[1:]:
        assert torch.equal(results[0], other)


def test_split_paths_ran(emulator, one_torch_thread):
    """The small grid caps of the test build make the split and loop paths run."""
    emulator.set_schedule("forward")
    emulator.set_sm_count(1)
    x, masks, gamma, beta = snorm_case(1, torch.float32, 1, 2, 9, 11, 2)
    emulator.separable_norm_forward(x, masks, gamma, beta, 1e-5)
    stats = [line for line in emulator.launch_log() if "stats_kernel" in line]
    assert stats and all("grid=(2,3,1)" in line for line in stats), stats  # 3 pixel splits
    images, kernels, *_ = blur_case(1, torch.float32, 3, 3, 8, 8, 1, 3, 3)
    emulator.blur_synthesize(images, kernels, None, None, None, None, None, False, "reflect")
    assert any("blur_forward_k" in line and "grid=(1,1,3)" in line
               for line in emulator.launch_log())  # 9 planes looped over 3 grid-z slices


def test_launch_error_comes_back_through_the_launcher(emulator, one_torch_thread):
    """A launch over a hardware limit inside a launcher surfaces as its cudaError_t: an image
    of 32 * 65535 + 1 rows needs 65536 tiles along grid y, one more than CUDA allows."""
    emulator.set_schedule("forward")
    images, kernels, *_ = blur_case(1, torch.float32, 1, 1, 32 * 65535 + 1, 1, 1, 1, 1)
    with pytest.raises(EmulatedLaunchError, match="CUDA error 9\\).*grid \\(1,65536,1\\)"):
        emulator.blur_synthesize(images, kernels, None, None, None, None, None, False, "zeros")


# ---------------------------------------------------------------------------------------------
# Non-finite inputs: the CUDA kernels follow the CPU kernels' NaN/Inf rules, on the problems of
# the CPU tests (tests/test_separable_norm.py, tests/test_modulated_deform_conv.py)


@pytest.mark.parametrize("dtype,channels_last", [(torch.float32, False),
                                                  (torch.float32, True),
                                                  (torch.float16, False)])
@pytest.mark.parametrize("case", snorm_tests.NONFINITE_CASES)
def test_separable_norm_non_finite(emu, dtype, channels_last, case):
    """NaN/Inf make exactly the statistics the CPU makes NaN (CUDA's max(var, 0) used to drop
    the NaN), independent of batches and splits; empty regions add nothing at an Inf."""
    x, masks, nan_stats = snorm_tests.nonfinite_problem(case, "cpu", dtype)
    gen = torch.Generator().manual_seed(5)
    gamma = torch.randn(x.shape, generator=gen, dtype=torch.float64).to(dtype)
    beta = torch.randn(1, x.shape[1], 1, 1, generator=gen, dtype=torch.float64).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    eps = 1e-5
    out, mean, rstd = emu.separable_norm_forward(x, masks, gamma, beta, eps)
    ref_out, ref_mean, ref_rstd = cpu_op(OPS.separable_norm_forward, x, masks, gamma, beta, eps)
    if dtype == torch.float16:  # statistics stay float32 on CUDA
        ref_mean, ref_rstd = ref_mean.float(), ref_rstd.float()
    assert torch.equal(mean.isnan(), nan_stats) and torch.equal(rstd.isnan(), nan_stats)
    loose = {"rtol": 3e-2, "atol": 3e-2} if dtype == torch.float16 else {}
    assert_close(mean, ref_mean, dtype=dtype, **loose)
    assert_close(rstd, ref_rstd, dtype=dtype, **loose)
    assert_close(out, ref_out, **loose)
    grad = torch.randn(x.shape, generator=gen, dtype=torch.float64).to(dtype)
    want = [True, True, True, True]
    got = emu.separable_norm_backward(grad, x, masks, gamma, beta, ref_mean, ref_rstd, eps, want)
    ref = cpu_op(OPS.separable_norm_backward, grad, x, masks, gamma, beta, ref_mean, ref_rstd,
                 eps, want)
    loose = {"rtol": 0.1, "atol": 0.3} if dtype == torch.float16 else {}  # masks: sums over C
    for name, a, b in zip(["x", "masks", "gamma", "beta"], got, ref):
        assert_close(a, b, **loose, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("kind", mdc_tests.NON_FINITE_KINDS)
def test_modulated_deform_conv_non_finite(emu, kind, deterministic):
    """A NaN offset, mask or input reaches the output and gradients as on the CPU (a NaN
    sampling point used to sample zeros: bias only)."""
    case, leaves = mdc_tests._non_finite_problem(kind, torch.float32, "cpu")
    x, offset, weight, bias, mask = (t.detach() for t in leaves)
    geometry = [(v, v) if isinstance(v, int) else v
                for v in (case.stride, case.padding, case.dilation)]
    got = emu.modulated_deform_conv2d(x, offset, weight, bias, mask, *geometry,
                                      tile_elements=200)
    ref = OPS.modulated_deform_conv2d(x, offset, weight, bias, mask, *geometry)
    assert got.isnan().any()
    assert_close(got, ref)
    grad = torch.randn(ref.shape, generator=torch.Generator().manual_seed(6))
    want = [True] * 5
    got = emu.modulated_deform_conv2d_backward(grad, x, offset, weight, mask, *geometry,
                                               want, deterministic, tile_elements=200)
    ref = OPS.modulated_deform_conv2d_backward(grad, x, offset, weight, mask, *geometry, want,
                                               deterministic)
    for name, a, b in zip(["input", "offset", "mask", "weight", "bias"], got, ref):
        assert_close(a, b, msg=lambda m, name=name: f"{name}: {m}")
