"""Separable normalization with adaptive denormalization: fused op vs reference and torch."""

from __future__ import annotations

import contextlib
import copy
import pickle

import facedeblur_ref as ref
import pytest
import torch
import torch.nn.functional as F
from conftest import cpu_kernels, cuda_params, device_params

from facedeblur_ext import ops
from facedeblur_ext.nn import SeparableNorm2d, SNADLayer

FWD = torch.ops.facedeblur_ext.separable_norm_forward
BWD = torch.ops.facedeblur_ext.separable_norm_backward

TOL = {
    torch.float64: dict(atol=1e-10, rtol=1e-10),
    torch.float32: dict(atol=2e-4, rtol=2e-4),
    torch.float16: dict(atol=2e-2, rtol=2e-2),
    torch.bfloat16: dict(atol=8e-2, rtol=8e-2),
}


def dtypes_for(device):
    if device == "cpu":
        return [torch.float32, torch.float64]
    return [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def soft_masks(n, r, h, w, *, device="cpu", dtype=torch.float64):
    """Soft masks: random non-negative weights per region (not normalized across regions)."""
    return torch.rand(n, r, h, w, device=device, dtype=dtype)


def hard_masks(n, r, h, w, *, device="cpu", dtype=torch.float64):
    labels = torch.randint(0, r, (n, h, w), device=device)
    return ops.labels_to_masks(labels, r, dtype=dtype)


def features(n, c, h, w, *, device="cpu", dtype=torch.float64):
    # Per-channel offsets and scales so that region statistics differ from sample to sample.
    offset = torch.randn(n, c, 1, 1, device=device, dtype=dtype) * 3
    scale = torch.rand(n, c, 1, 1, device=device, dtype=dtype) * 2 + 0.5
    return torch.randn(n, c, h, w, device=device, dtype=dtype) * scale + offset


def reference(x, masks, gamma=None, beta=None, eps=1e-5):
    """The reference composition evaluated in float64."""
    up = lambda t: None if t is None else t.double()
    return ref.separable_norm(x.double(), masks.double(), up(gamma), up(beta), eps)


# gamma / beta shapes as functions of x's (N, C, H, W): the paper's per-pixel maps, per-plane
# values, and broadcasts over N, C, H or W.
AFFINE_SHAPES = [
    pytest.param(None, None, id="no-affine"),
    pytest.param(lambda n, c, h, w: (n, c, h, w), lambda n, c, h, w: (n, c, h, w),
                 id="per-pixel"),
    pytest.param(lambda n, c, h, w: (1, c, 1, 1), lambda n, c, h, w: (n, c, 1, 1), id="plane"),
    pytest.param(lambda n, c, h, w: (1, c, h, w), lambda n, c, h, w: (n, 1, h, w),
                 id="broadcast-n-or-c"),
    pytest.param(lambda n, c, h, w: (n, c, h, 1), lambda n, c, h, w: (w,),
                 id="rows-or-columns"),
]


def affine(shape_fn, x):
    if shape_fn is None:
        return None
    return torch.randn(shape_fn(*x.shape), device=x.device, dtype=x.dtype)


# --------------------------------------------------------------------------------------------
# Forward values


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("kind", ["soft", "hard"])
@pytest.mark.parametrize("gamma_spec,beta_spec", AFFINE_SHAPES)
def test_forward_matches_reference(device, kind, gamma_spec, beta_spec):
    make = soft_masks if kind == "soft" else hard_masks
    for dtype in dtypes_for(device):
        x = features(2, 5, 11, 9, device=device, dtype=dtype)
        masks = make(2, 3, 11, 9, device=device, dtype=dtype)
        gamma, beta = affine(gamma_spec, x), affine(beta_spec, x)
        got = ops.separable_norm(x, masks, gamma, beta)
        assert got.dtype == dtype and got.shape == x.shape
        want = reference(x, masks, gamma, beta)
        torch.testing.assert_close(got.double(), want, **TOL[dtype])


@pytest.mark.parametrize("device", device_params())
def test_one_all_ones_region_is_instance_norm(device):
    for dtype in dtypes_for(device):
        x = features(3, 4, 13, 7, device=device, dtype=dtype)
        ones = torch.ones(3, 1, 13, 7, device=device, dtype=dtype)
        got = ops.separable_norm(x, ones, eps=1e-3)
        want = F.instance_norm(x.double(), eps=1e-3)
        torch.testing.assert_close(got.double(), want, **TOL[dtype])


@pytest.mark.parametrize("device", device_params())
def test_every_region_is_standardized(device):
    """Hard regions: zero mean and variance var / (var + eps) ~ 1 inside each region; soft
    masks: the same for the mask-weighted moments."""
    x = features(2, 4, 16, 12, device=device, dtype=torch.float64)
    for masks in (hard_masks(2, 4, 16, 12, device=device), soft_masks(2, 3, 16, 12, device=device)):
        out = ops.separable_norm(x, masks, eps=1e-5)
        for r in range(masks.shape[1]):
            m = masks[:, r:r + 1]
            mass = m.sum(dim=(2, 3))
            # The output restricted to region r is M_r * xhat_r; recover xhat where M_r > 0.
            other = ops.separable_norm(x, masks[:, [q for q in range(masks.shape[1]) if q != r]])
            xhat = torch.where(m > 0, (out - other) / m.clamp_min(1e-300), torch.zeros_like(out))
            mean = (m * xhat).sum(dim=(2, 3)) / mass
            var = (m * (xhat - mean[..., None, None]) ** 2).sum(dim=(2, 3)) / mass
            torch.testing.assert_close(mean, torch.zeros_like(mean), atol=1e-9, rtol=0)
            torch.testing.assert_close(var, torch.ones_like(var), atol=1e-3, rtol=0)


@pytest.mark.parametrize("device", device_params())
def test_empty_regions_contribute_nothing(device):
    x = features(2, 3, 8, 8, device=device).requires_grad_()
    masks = soft_masks(2, 3, 8, 8, device=device)
    masks[0, 1] = 0  # region 1 empty in sample 0
    masks[1, :] = 0  # sample 1: every region empty
    masks.requires_grad_()
    gamma = torch.randn(2, 3, 8, 8, device=device, dtype=torch.float64, requires_grad=True)
    beta = torch.randn(1, 3, 8, 8, device=device, dtype=torch.float64, requires_grad=True)
    out = ops.separable_norm(x, masks, gamma, beta)
    want = ops.separable_norm(x[:1], masks[:1, [0, 2]], gamma[:1], beta)
    torch.testing.assert_close(out[:1], want)
    torch.testing.assert_close(out[1], beta[0].expand(3, 8, 8))  # no region: beta only
    weights = torch.randn_like(out)
    grads = torch.autograd.grad((out * weights).sum(), (x, masks, gamma, beta))
    for g in grads:
        assert torch.isfinite(g).all()
    assert (grads[1][0, 1] == 0).all() and (grads[1][1] == 0).all()
    assert (grads[0][1] == 0).all()
    want_grads = torch.autograd.grad((reference(x, masks, gamma, beta) * weights).sum(),
                                     (x, masks, gamma, beta))
    for got, exp in zip(grads, want_grads):
        torch.testing.assert_close(got, exp)


def test_large_mean_float32_is_accurate():
    """A large common offset must not cost precision (single-pass E[x^2] - E[x]^2 would)."""
    x = (torch.randn(2, 4, 64, 64) + 1e4).float()
    masks = soft_masks(2, 2, 64, 64, dtype=torch.float32)
    got = ops.separable_norm(x, masks)
    want = reference(x, masks)
    # float32 keeps the mean to ~5e-4 at 1e4 (half an ulp), which bounds the output error.
    assert (got.double() - want).abs().max() < 2e-3
    # and the gradients
    xg = x.clone().requires_grad_()
    weights = torch.randn(x.shape)
    (ops.separable_norm(xg, masks) * weights).sum().backward()
    x64 = x.double().requires_grad_()
    (reference(x64, masks) * weights.double()).sum().backward()
    torch.testing.assert_close(xg.grad.double(), x64.grad, atol=5e-3, rtol=5e-3)


def nonfinite_problem(case, device, dtype):
    """x and masks with one kind of non-finite value, and the statistics that must come out NaN.

    [2, 3, 40, 40] with 3 regions: region 1 is the first six rows only (pixels < 240, one
    512-pixel CPU chunk), regions 0 and 2 share the rest; region 2 is empty in sample 1.

    Returns:
        x, masks and nan_stats ([N, C, R] bool): every non-empty region of a plane holding a
        NaN or Inf anywhere (zero-weight pixels included), and region r of every channel where
        masks[n, r] holds one.
    """
    gen = torch.Generator().manual_seed(3)
    labels = torch.randint(0, 2, (2, 40, 40), generator=gen) * 2
    labels[:, :6] = 1
    masks = ref.labels_to_masks(labels, 3, dtype=torch.float64)
    masks[1, 2] = 0
    x = features(2, 3, 40, 40)
    nan_stats = torch.zeros(2, 3, 3, dtype=torch.bool)
    non_empty = masks.sum(dim=(2, 3)) > 0  # [N, R]
    inf, nan = float("inf"), float("nan")
    if case == "inf-in-region":
        x[0, 1, 20, 20] = inf
        nan_stats[0, 1] = non_empty[0]
    elif case == "inf-under-zero-weight":
        # Region 1 has weight 0 at the last pixel, in another chunk: its statistics are NaN too.
        x[0, 1, 39, 39] = inf
        nan_stats[0, 1] = non_empty[0]
    elif case == "both-infinities":
        x[0, 0, 10, 10], x[0, 0, 30, 30] = inf, -inf
        nan_stats[0, 0] = non_empty[0]
    elif case == "nan-with-empty-region":
        x[1, 2, 3, 3] = nan
        nan_stats[1, 2] = non_empty[1]  # region 2 is empty in sample 1: it stays empty
    elif case == "nan-mask":
        masks[1, 0, 25, 25] = nan
        nan_stats[1, :, 0] = True
    elif case == "inf-mask":
        masks[0, 2, 25, 25] = inf
        nan_stats[0, :, 2] = True
    elif case == "no-region":
        masks[1] = 0  # nothing to normalize in sample 1: out = beta, the Inf reaches nothing
        x[1, 0, 5, 5] = inf
    return x.to(device, dtype), masks.to(device, dtype), nan_stats.to(device)


NONFINITE_CASES = ["inf-in-region", "inf-under-zero-weight", "both-infinities",
                   "nan-with-empty-region", "nan-mask", "inf-mask", "no-region"]


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("case", NONFINITE_CASES)
def test_non_finite_values_propagate_like_the_reference(device, case):
    """NaN and Inf make the statistics of the regions they reach NaN, and so the whole output
    plane and its gradients, the same on every device, independent of how pixels are chunked."""
    for dtype in dtypes_for(device):
        x, masks, nan_stats = nonfinite_problem(case, device, dtype)
        gamma = torch.randn(2, 3, 40, 40, device=device, dtype=dtype)
        beta = torch.randn(1, 3, 1, 1, device=device, dtype=dtype)
        out, mean, rstd = FWD(x, masks, gamma, beta, 1e-5)
        assert torch.equal(mean.isnan(), nan_stats) and torch.equal(rstd.isnan(), nan_stats)
        assert torch.isfinite(mean[~nan_stats]).all() and torch.isfinite(rstd[~nan_stats]).all()
        nan_planes = nan_stats.any(dim=2)[..., None, None].expand(out.shape)
        assert torch.equal(out.isnan(), nan_planes), dtype
        want = reference(x, masks, gamma, beta)
        torch.testing.assert_close(out.double(), want, equal_nan=True, **TOL[dtype])

        weights = torch.randn(x.shape, device=device, dtype=torch.float64)
        leaves = [t.clone().requires_grad_() for t in (x, masks, gamma, beta)]
        grads = torch.autograd.grad((ops.separable_norm(*leaves) * weights.to(dtype)).sum(),
                                    leaves)
        leaves64 = [t.double().requires_grad_() for t in (x, masks, gamma, beta)]
        want_grads = torch.autograd.grad((ref.separable_norm(*leaves64) * weights).sum(),
                                         leaves64)
        tol = dict(TOL[dtype])
        if dtype in (torch.float16, torch.bfloat16):
            tol = dict(atol=0.3, rtol=0.1)  # mask gradients sum over channels
        for name, a, b in zip(("x", "masks", "gamma", "beta"), grads, want_grads):
            torch.testing.assert_close(a.double(), b, equal_nan=True, **tol,
                                       msg=lambda m, at=f"{case} {dtype} {name}": f"{at}: {m}")
        assert torch.equal(grads[0].isnan(), nan_planes)  # NaN reaches the gradient too


# --------------------------------------------------------------------------------------------
# Gradients


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("gamma_spec,beta_spec", AFFINE_SHAPES)
def test_gradcheck_all_inputs(device, gamma_spec, beta_spec):
    x = features(2, 3, 5, 4, device=device).requires_grad_()
    masks = soft_masks(2, 3, 5, 4, device=device).requires_grad_()
    gamma, beta = affine(gamma_spec, x), affine(beta_spec, x)
    for t in (gamma, beta):
        if t is not None:
            t.requires_grad_()
    assert torch.autograd.gradcheck(ops.separable_norm, (x, masks, gamma, beta))


@pytest.mark.parametrize("device", device_params())
def test_gradients_match_reference_hard_masks_and_subsets(device):
    x = features(2, 4, 9, 7, device=device)
    masks = hard_masks(2, 3, 9, 7, device=device)
    gamma = torch.randn(2, 4, 9, 7, device=device, dtype=torch.float64)
    beta = torch.randn(1, 4, 1, 1, device=device, dtype=torch.float64)
    weights = torch.randn(x.shape, device=device, dtype=torch.float64)
    # every subset of inputs requiring grad goes through the output mask
    for need in [(1, 0, 0, 0), (0, 1, 0, 0), (0, 0, 1, 1), (1, 1, 1, 1)]:
        args = [t.clone().requires_grad_(bool(k)) for t, k in zip((x, masks, gamma, beta), need)]
        refs = [t.clone().requires_grad_(bool(k)) for t, k in zip((x, masks, gamma, beta), need)]
        (ops.separable_norm(*args) * weights).sum().backward()
        (ref.separable_norm(*refs) * weights).sum().backward()
        for a, b, k in zip(args, refs, need):
            if k:
                torch.testing.assert_close(a.grad, b.grad)
            else:
                assert a.grad is None


def test_backward_op_computes_only_requested_outputs():
    x = features(1, 2, 6, 6)
    masks = soft_masks(1, 2, 6, 6)
    gamma = torch.randn(1, 2, 6, 6, dtype=torch.float64)
    beta = torch.randn(2, 1, 1, dtype=torch.float64)
    out, mean, rstd = FWD(x, masks, gamma, beta, 1e-5)
    assert mean.shape == rstd.shape == (1, 2, 2)
    g = torch.randn_like(out)
    res = BWD(g, x, masks, gamma, beta, mean, rstd, 1e-5, [False, True, False, True])
    assert res[0] is None and res[2] is None
    assert res[1].shape == masks.shape and res[3].shape == beta.shape
    torch.testing.assert_close(res[3], g.sum(dim=(0, 2, 3)).view(2, 1, 1))


def test_double_backward_raises():
    x = features(1, 2, 5, 5).requires_grad_()
    masks = soft_masks(1, 2, 5, 5).requires_grad_()
    gamma = torch.randn(1, 2, 5, 5, dtype=torch.float64, requires_grad=True)
    inputs = (x, masks, gamma)
    # first-order gradients taken with create_graph=True are still right...
    grads = torch.autograd.grad(ops.separable_norm(*inputs).pow(3).sum(), inputs,
                                create_graph=True)
    want = torch.autograd.grad(ops.separable_norm(*inputs).pow(3).sum(), inputs)
    for a, b in zip(grads, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # ...but differentiating them raises instead of treating the second order as zero
    with pytest.raises(RuntimeError, match="separable_norm: double backward is not supported"):
        torch.autograd.grad(grads[0].pow(2).sum(), x)


# --------------------------------------------------------------------------------------------
# Layouts


@pytest.mark.parametrize("device", device_params())
def test_channels_last_and_non_contiguous_inputs(device):
    for dtype in dtypes_for(device):
        base = features(2, 6, 10, 12, device=device, dtype=dtype)
        masks = soft_masks(2, 3, 10, 12, device=device, dtype=dtype)
        gamma = torch.randn(2, 6, 10, 12, device=device, dtype=dtype)
        beta = torch.randn(1, 6, 1, 1, device=device, dtype=dtype)
        variants = {
            "channels_last": (base.contiguous(memory_format=torch.channels_last),
                              masks.contiguous(memory_format=torch.channels_last),
                              gamma.contiguous(memory_format=torch.channels_last)),
            "strided": (torch.stack([base, base], dim=-1)[..., 0],
                        masks.transpose(2, 3).contiguous().transpose(2, 3),
                        gamma.transpose(0, 1).contiguous().transpose(0, 1)),
        }
        want = reference(base, masks, gamma, beta)
        weights = torch.randn(base.shape, device=device, dtype=torch.float64)
        x64, m64, g64 = (t.double().requires_grad_() for t in (base, masks, gamma))
        want_grads = torch.autograd.grad((ref.separable_norm(x64, m64, g64, beta.double())
                                          * weights).sum(), (x64, m64, g64))
        for name, (x, m, g) in variants.items():
            x, m, g = (t.requires_grad_() for t in (x.detach(), m.detach(), g.detach()))
            got = ops.separable_norm(x, m, g, beta)
            torch.testing.assert_close(got.double(), want, **TOL[dtype], msg=name)
            if name == "channels_last":
                assert got.is_contiguous(memory_format=torch.channels_last)
            grads = torch.autograd.grad((got * weights.to(dtype)).sum(), (x, m, g))
            tol = dict(TOL[dtype])
            if dtype in (torch.float16, torch.bfloat16):
                tol = dict(atol=0.3, rtol=0.1)  # mask gradients sum over channels
            for a, b in zip(grads, want_grads):
                torch.testing.assert_close(a.double(), b, **tol, msg=name)


# --------------------------------------------------------------------------------------------
# Registration: opcheck, compile


@pytest.mark.parametrize("device", device_params())
def test_opcheck(device):
    x = features(2, 3, 6, 5, device=device, dtype=torch.float32)
    masks = soft_masks(2, 2, 6, 5, device=device, dtype=torch.float32)
    gamma = torch.randn(2, 3, 6, 5, device=device)
    beta = torch.randn(1, 3, 1, 1, device=device)
    cases = [
        (x, masks, gamma, beta, 1e-5),
        (x.requires_grad_(), masks.requires_grad_(), gamma.requires_grad_(),
         beta.requires_grad_(), 1e-5),
        (x.detach().contiguous(memory_format=torch.channels_last), masks.detach(), None, None,
         1e-3),
    ]
    for args in cases:
        torch.library.opcheck(FWD, args)
    out, mean, rstd = FWD(x.detach(), masks.detach(), gamma.detach(), beta.detach(), 1e-5)
    g = torch.randn_like(out)
    torch.library.opcheck(BWD, (g, x.detach(), masks.detach(), gamma.detach(), beta.detach(),
                                mean, rstd, 1e-5, [True, True, True, True]))
    torch.library.opcheck(BWD, (g, x.detach(), masks.detach(), None, beta.detach(), mean, rstd,
                                1e-5, [True, False, False, True]))


def test_torch_compile_fullgraph_forward_and_backward():
    x = features(2, 4, 8, 8, dtype=torch.float32)
    masks = hard_masks(2, 2, 8, 8, dtype=torch.float32)
    gamma = torch.randn(2, 4, 8, 8)
    beta = torch.randn(2, 4, 8, 8)

    def step(x, masks, gamma, beta):
        return (ops.separable_norm(x, masks, gamma, beta) ** 2).sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    leaves_c = [t.clone().requires_grad_() for t in (x, masks, gamma, beta)]
    leaves_e = [t.clone().requires_grad_() for t in (x, masks, gamma, beta)]
    compiled(*leaves_c).backward()
    step(*leaves_e).backward()
    for a, b in zip(leaves_c, leaves_e):
        torch.testing.assert_close(a.grad, b.grad)


def test_torch_export():
    layer = SNADLayer(4, 3, hidden_channels=8)
    x = features(1, 4, 8, 8, dtype=torch.float32)
    parsing = hard_masks(1, 3, 16, 16, dtype=torch.float32)
    exported = torch.export.export(layer, (x, parsing))
    torch.testing.assert_close(exported.module()(x, parsing), layer(x, parsing))


# --------------------------------------------------------------------------------------------
# Errors


def test_clear_errors():
    x = features(2, 3, 4, 4, dtype=torch.float32)
    m = soft_masks(2, 2, 4, 4, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"x of shape \[N, C, H, W\]"):
        ops.separable_norm(x[0], m)
    with pytest.raises(ValueError, match="labels_to_masks"):
        ops.separable_norm(x, m[:, 0])
    with pytest.raises(ValueError, match="do not match"):
        ops.separable_norm(x, m[:, :, :3])
    with pytest.raises(ValueError, match="do not match"):
        ops.separable_norm(x, m[:1])
    with pytest.raises(TypeError, match="masks must be floating"):
        ops.separable_norm(x, m.long())
    with pytest.raises(TypeError, match="not supported on cpu"):
        ops.separable_norm(x.half(), m)
    with pytest.raises(ValueError, match="does not broadcast"):
        ops.separable_norm(x, m, torch.ones(3, 4))
    with pytest.raises(ValueError, match="does not broadcast"):
        ops.separable_norm(x, m, None, torch.ones(2, 3, 4, 4, 1))
    with pytest.raises(ValueError, match="eps"):
        ops.separable_norm(x, m, eps=-1.0)
    with pytest.raises(TypeError, match="gamma must be a floating-point tensor or None"):
        ops.separable_norm(x, m, 2.0)
    with pytest.raises(TypeError, match="beta must be a floating-point tensor or None"):
        ops.separable_norm(x, m, None, [0.0, 1.0, 2.0])
    with pytest.raises(ValueError, match="empty"):
        ops.separable_norm(x[:, :, :0], m[:, :, :0])
    # The op itself names the argument when called directly.
    with pytest.raises(RuntimeError, match="masks"):
        FWD(x, m.double(), None, None, 1e-5)
    with pytest.raises(RuntimeError, match="float32 and float64"):
        FWD(x.half(), m.half(), None, None, 1e-5)
    with pytest.raises(RuntimeError, match="gamma of shape"):
        FWD(x, m, torch.ones(5, 1, 1), None, 1e-5)


def test_labels_to_masks():
    labels = torch.tensor([[[0, 1], [2, 1]]])
    masks = ops.labels_to_masks(labels, 3)
    assert masks.shape == (1, 3, 2, 2) and masks.dtype == torch.float32
    assert (masks.sum(1) == 1).all() and masks[0, 2, 1, 0] == 1
    torch.testing.assert_close(masks, ref.labels_to_masks(labels, 3))
    torch.testing.assert_close(ops.labels_to_masks(labels[:, None], 3), masks)
    with pytest.raises(ValueError, match="outside"):
        ops.labels_to_masks(labels, 2)
    with pytest.raises(TypeError, match="integers"):
        ops.labels_to_masks(labels.float(), 3)
    with pytest.raises(ValueError, match="num_regions"):
        ops.labels_to_masks(labels, 0)


@pytest.mark.parametrize("device", cuda_params())
def test_cuda_errors(device):
    x = features(1, 2, 4, 4, device=device, dtype=torch.float32)
    # the Python wrapper refuses on a CUDA device, the launcher itself on the emulated one
    # (CPU tensors, which the wrapper lets through)
    with pytest.raises(ValueError if device == "cuda" else RuntimeError,
                       match="at most 16 regions"):
        ops.separable_norm(x, soft_masks(1, 17, 4, 4, device=device, dtype=torch.float32))
    ops.separable_norm(x, soft_masks(1, 16, 4, 4, device=device, dtype=torch.float32))
    if device == "cuda":  # the emulated device shares the CPU's tensors
        with pytest.raises(ValueError, match="is on cpu"):
            ops.separable_norm(x, soft_masks(1, 2, 4, 4, dtype=torch.float32))


@pytest.mark.parametrize("device", cuda_params())
def test_cuda_many_regions_and_large_shapes_match_cpu(device):
    """Region groups (R > 4 runs the reductions in groups), pixel splits and channel splits."""
    for r, (n, c, h, w) in [(7, (2, 40, 33, 35)), (16, (1, 3, 5, 7)), (2, (3, 70, 64, 64))]:
        x = features(n, c, h, w, dtype=torch.float64)
        masks = soft_masks(n, r, h, w)
        gamma = torch.randn(n, c, h, w, dtype=torch.float64)
        beta = torch.randn(1, c, 1, 1, dtype=torch.float64)
        weights = torch.randn(x.shape, dtype=torch.float64)
        for fmt in (torch.contiguous_format, torch.channels_last):
            results = []
            for on, kernels in (("cpu", cpu_kernels), (device, contextlib.nullcontext)):
                leaves = [t.to(on).requires_grad_() for t in (x, masks, gamma, beta)]
                leaves[0] = leaves[0].detach().contiguous(memory_format=fmt).requires_grad_()
                with kernels():
                    out = ops.separable_norm(*leaves)
                    grads = torch.autograd.grad((out * weights.to(on)).sum(), leaves)
                results.append([out.cpu()] + [g.cpu() for g in grads])
            for a, b in zip(*results):
                torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9)


# --------------------------------------------------------------------------------------------
# Layers


@pytest.mark.parametrize("device", device_params())
def test_separable_norm2d_resizes_masks_and_matches_reference(device):
    x = features(2, 4, 8, 8, device=device, dtype=torch.float32)
    labels = torch.randint(0, 2, (2, 32, 32), device=device)
    masks = ops.labels_to_masks(labels, 2)
    layer = SeparableNorm2d()
    got = layer(x, masks)
    want = SeparableNorm2d(backend=ref)(x, masks)
    torch.testing.assert_close(got, want, **TOL[torch.float32])
    small = F.interpolate(masks, size=(8, 8), mode="nearest")
    torch.testing.assert_close(got, ops.separable_norm(x, small))
    assert ((small == 0) | (small == 1)).all()
    with pytest.raises(ValueError, match="resize_mode"):
        SeparableNorm2d(resize_mode="bicubic")


@pytest.mark.parametrize("device", device_params())
def test_snad_layer_matches_reference_backend(device):
    torch.manual_seed(1)
    fused = SNADLayer(6, 5, hidden_channels=8).to(device)
    slow = SNADLayer(6, 5, hidden_channels=8, backend=ref).to(device)
    slow.load_state_dict(fused.state_dict())
    x = features(2, 6, 12, 12, device=device, dtype=torch.float32)
    parsing = torch.softmax(torch.randn(2, 5, 24, 24, device=device), dim=1)
    xs = [x.clone().requires_grad_() for _ in range(2)]
    outs = [fused(xs[0], parsing), slow(xs[1], parsing)]
    torch.testing.assert_close(outs[0], outs[1], **TOL[torch.float32])
    weights = torch.randn_like(outs[0])
    for o in outs:
        (o * weights).sum().backward()
    torch.testing.assert_close(xs[0].grad, xs[1].grad, atol=1e-3, rtol=1e-3)
    for (name, p), q in zip(fused.named_parameters(), slow.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-3, rtol=1e-3, msg=name)


def test_snad_layer_regions_follow_the_paper():
    layer = SNADLayer(3, 4, hidden_channels=4)
    labels = torch.tensor([[[0, 1], [2, 3]]])
    masks = layer.parsing_to_masks(ops.labels_to_masks(labels, 4))
    # foreground = every class but background (channel 0); background = channel 0
    torch.testing.assert_close(masks[0, 0], torch.tensor([[0.0, 1.0], [1.0, 1.0]]))
    torch.testing.assert_close(masks[0, 1], torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    custom = SNADLayer(3, 4, hidden_channels=4, regions=[[1], [2, 3], [0]])
    assert custom.num_regions == 3
    prob = torch.rand(1, 1, 2, 2)
    single = SNADLayer(3, 1, hidden_channels=4).parsing_to_masks(prob)
    torch.testing.assert_close(single, torch.cat([prob, 1 - prob], dim=1))
    # integer label maps are accepted and explicit masks override the derived ones
    x = features(1, 3, 2, 2, dtype=torch.float32)
    torch.testing.assert_close(layer(x, labels), layer(x, ops.labels_to_masks(labels, 4)))
    explicit = torch.ones(1, 1, 2, 2)
    out = layer(x, labels, masks=explicit)
    hidden = layer.conv1(ops.labels_to_masks(labels, 4))
    want = ref.separable_norm(x, explicit, layer.conv2(hidden), layer.conv3(hidden))
    torch.testing.assert_close(out, want, **TOL[torch.float32])
    with pytest.raises(ValueError, match="outside"):
        SNADLayer(3, 4, regions=[[4]])
    # label maps are one-hot encoded in the layer's dtype, e.g. after .double()
    layer64 = copy.deepcopy(layer).double()
    out64 = layer64(x.double(), labels)
    assert out64.dtype == torch.float64
    torch.testing.assert_close(out64, layer64(x.double(), ops.labels_to_masks(labels, 4,
                                                                              torch.float64)))
    with pytest.raises(ValueError, match="parsing map"):
        layer(x, torch.rand(1, 3, 2, 2))


def test_layers_deepcopy_and_pickle_keep_their_backend():
    layer = SNADLayer(2, 3, hidden_channels=4, backend=ref)
    assert copy.deepcopy(layer).backend is ref
    assert pickle.loads(pickle.dumps(layer)).backend is ref
    assert pickle.loads(pickle.dumps(SeparableNorm2d())).backend is None  # facedeblur_ext.ops


def test_self_check_is_registered_and_passes():
    assert "separable_norm" in ops.SELF_CHECKS
    ops.SELF_CHECKS["separable_norm"](torch.device("cpu"))
