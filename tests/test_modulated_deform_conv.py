"""Modulated deformable convolution: the fused op against the pure-PyTorch reference."""

from __future__ import annotations

import copy
import pickle
from dataclasses import dataclass

import facedeblur_ref
import pytest
import torch
import torch.nn.functional as F
from conftest import cuda_params, device_params

import facedeblur_ext
from facedeblur_ext.nn import ConditionedDeformConv2d, ModulatedDeformConv2d
from facedeblur_ext.ops import modulated_deform_conv2d

OP = torch.ops.facedeblur_ext.modulated_deform_conv2d.default
BACKWARD_OP = torch.ops.facedeblur_ext.modulated_deform_conv2d_backward.default

TOLERANCES = {
    torch.float64: dict(rtol=1e-9, atol=1e-9),
    torch.float32: dict(rtol=1e-4, atol=1e-4),
    torch.float16: dict(rtol=2e-2, atol=2e-2),
    torch.bfloat16: dict(rtol=5e-2, atol=5e-2),
}


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


@dataclass
class Case:
    batch: int = 2
    in_channels: int = 6
    out_channels: int = 4
    size: tuple = (9, 11)
    kernel: tuple = (3, 3)
    stride: object = 1
    padding: object = 1
    dilation: object = 1
    groups: int = 1
    offset_groups: int = 1
    mask: bool = True
    bias: bool = True
    offset_scale: float = 2.0

    def output_size(self):
        (h, w), (kh, kw) = self.size, self.kernel
        (sh, sw), (ph, pw), (dh, dw) = _pair(self.stride), _pair(self.padding), _pair(self.dilation)
        return ((h + 2 * ph - (dh * (kh - 1) + 1)) // sh + 1,
                (w + 2 * pw - (dw * (kw - 1) + 1)) // sw + 1)

    def tensors(self, dtype=torch.float64, device="cpu", requires_grad=True, generator=None):
        g = generator or torch.Generator().manual_seed(1234)
        kh, kw = self.kernel
        ho, wo = self.output_size()
        taps = kh * kw

        def rand(*shape, scale=1.0, positive=False):
            t = torch.rand(*shape, generator=g) if positive else torch.randn(*shape, generator=g)
            return (t * scale).to(dtype=dtype, device=device).requires_grad_(requires_grad)

        x = rand(self.batch, self.in_channels, *self.size)
        offset = rand(self.batch, 2 * self.offset_groups * taps, ho, wo, scale=self.offset_scale)
        weight = rand(self.out_channels, self.in_channels // self.groups, kh, kw, scale=0.5)
        bias = rand(self.out_channels) if self.bias else None
        mask = (rand(self.batch, self.offset_groups * taps, ho, wo, positive=True)
                if self.mask else None)
        return x, offset, weight, bias, mask

    def call(self, fn, x, offset, weight, bias, mask):
        return fn(x, offset, weight, bias, self.stride, self.padding, self.dilation, mask)


CASES = {
    "basic": Case(),
    "dcnv1": Case(mask=False),
    "no_bias": Case(bias=False),
    "stride2": Case(stride=2),
    "rect_kernel_mixed_args": Case(kernel=(3, 2), stride=(2, 1), padding=(1, 0),
                                   dilation=(1, 2)),
    "dilation2": Case(dilation=2, padding=2),
    "groups": Case(in_channels=6, out_channels=4, groups=2),
    "offset_groups": Case(in_channels=6, offset_groups=3),
    "groups_and_offset_groups": Case(in_channels=12, out_channels=6, groups=3, offset_groups=2),
    "kernel_1x1": Case(kernel=(1, 1), padding=0),
    "kernel_5x5": Case(kernel=(5, 5), padding=2, size=(7, 8)),
    "batch1_odd": Case(batch=1, size=(7, 5)),
    "no_padding_small": Case(size=(3, 4), padding=0),
    "large_offsets": Case(offset_scale=12.0),
}


def _grads(out, inputs, grad):
    inputs = [t for t in inputs if t is not None]
    return torch.autograd.grad(out, inputs, grad)


def _assert_matches_reference(case, dtype=torch.float64, device="cpu", tensors=None):
    tensors = tensors or case.tensors(dtype=dtype, device=device)
    ours = case.call(modulated_deform_conv2d, *tensors)
    ref = case.call(facedeblur_ref.modulated_deform_conv2d, *tensors)
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(ours, ref, **tol)
    grad = torch.randn(ours.shape, generator=torch.Generator().manual_seed(7)).to(ours)
    for a, b in zip(_grads(ours, tensors, grad), _grads(ref, tensors, grad)):
        torch.testing.assert_close(a, b, **tol)
    return ours


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference_float64(name, device):
    _assert_matches_reference(CASES[name], device=device)


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("name", ["basic", "groups_and_offset_groups", "large_offsets"])
def test_matches_reference_float32(name, device):
    _assert_matches_reference(CASES[name], dtype=torch.float32, device=device)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("tile_elements", ["1", "1000"])
def test_tile_edges_and_thread_splits(monkeypatch, threads, batch, tile_elements):
    """Tiny tiles (partial last tiles, tiles split between threads, private gradients)."""
    monkeypatch.setenv("FACEDEBLUR_DEFORM_TILE_ELEMENTS", tile_elements)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        # Large enough (N * H_out * W_out * C * kh * kw >= 2^16) for the kernels to use threads.
        _assert_matches_reference(Case(batch=batch, in_channels=8, size=(32, 33),
                                       offset_groups=2))
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("device", device_params())
def test_matches_torchvision_where_it_imports(device):
    """Same numbers as torchvision's deform_conv2d (away from samples exactly at -1)."""
    tv_ops = pytest.importorskip("torchvision.ops")
    case = CASES["groups_and_offset_groups"]
    tensors = case.tensors(dtype=torch.float64, device=device)
    ours = case.call(modulated_deform_conv2d, *tensors)
    theirs = case.call(tv_ops.deform_conv2d, *tensors)
    torch.testing.assert_close(ours, theirs)
    grad = torch.randn_like(ours)
    for a, b in zip(_grads(ours, tensors, grad), _grads(theirs, tensors, grad)):
        torch.testing.assert_close(a, b)


def test_batch_zero():
    case = Case(batch=0)
    x, offset, weight, bias, mask = case.tensors()
    out = case.call(modulated_deform_conv2d, x, offset, weight, bias, mask)
    assert out.shape == (0, case.out_channels, *case.output_size())
    out.sum().backward()
    assert torch.equal(weight.grad, torch.zeros_like(weight))
    assert torch.equal(bias.grad, torch.zeros_like(bias))
    assert x.grad.shape == x.shape and offset.grad.shape == offset.shape


def test_non_contiguous_inputs():
    case = Case(in_channels=4)
    x, offset, weight, bias, mask = case.tensors(requires_grad=False)
    # Same values, unusual strides: transposed spatial dims, channel slices, expanded bias.
    x_nc = x.transpose(2, 3).contiguous().transpose(2, 3).requires_grad_()
    offset_nc = torch.cat([offset, offset], 1)[:, ::2].detach()
    offset_nc.copy_(offset)
    offset_nc.requires_grad_()
    mask_nc = mask.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2).requires_grad_()
    weight_nc = weight.permute(1, 0, 2, 3).contiguous().permute(1, 0, 2, 3).requires_grad_()
    assert not (x_nc.is_contiguous() or offset_nc.is_contiguous() or weight_nc.is_contiguous())
    _assert_matches_reference(case, tensors=(x_nc, offset_nc, weight_nc,
                                             bias.requires_grad_(), mask_nc))


def test_channels_last():
    case = Case(in_channels=4, out_channels=6)
    x, offset, weight, bias, mask = case.tensors(requires_grad=False)
    x_cl = x.to(memory_format=torch.channels_last).requires_grad_()
    out = _assert_matches_reference(
        case, tensors=(x_cl, offset.requires_grad_(), weight.requires_grad_(),
                       bias.requires_grad_(), mask.requires_grad_()))
    assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
    grad_input, = torch.autograd.grad(case.call(modulated_deform_conv2d, x_cl, offset, weight,
                                                bias, mask).sum(), x_cl)
    assert grad_input.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("far", [1e4, -1e4, float("inf"), -float("inf")])
def test_offsets_far_outside_give_bias_only(far):
    """Infinite offsets are just outside, as in torchvision: bias only, zero gradients."""
    case = Case()
    x, offset, weight, bias, mask = case.tensors()
    offset = torch.full_like(offset, far).requires_grad_()
    out = case.call(modulated_deform_conv2d, x, offset, weight, bias, mask)
    torch.testing.assert_close(out, bias.view(1, -1, 1, 1).expand_as(out))
    grads = torch.autograd.grad(out.sum(), (x, offset, mask, weight))
    for g in grads:
        assert torch.equal(g, torch.zeros_like(g))


def _non_finite_problem(kind, dtype, device):
    """Case tensors (leaves) with one kind of NaN, and the output pixels it must reach.

    Offset group 1 of image 0 at output pixel (4, 5) gets the NaN (tap 4, the centre, samples
    inside the image), or input channel 9 (offset group 1) at (4, 5) does.
    """
    case = CASES["groups_and_offset_groups"]  # 12 -> 6 channels, groups 3, offset groups 2
    x, offset, weight, bias, mask = (t.detach() for t in case.tensors(dtype=dtype,
                                                                       device=device))
    offset = offset * 0.2  # keep the centre tap of pixel (4, 5) inside the image
    nan = float("nan")
    ch = 9 + 4  # offset group 1, tap 4
    if kind == "nan-offset-y":
        offset[0, 2 * ch, 4, 5] = nan
    elif kind == "nan-offset-x":
        offset[0, 2 * ch + 1, 4, 5] = nan
    elif kind == "nan-offsets":
        offset[0, 2 * ch : 2 * ch + 2, 4, 5] = nan
    elif kind == "nan-mask":
        mask[0, ch, 4, 5] = nan
    elif kind == "nan-mask-outside":
        # Pixel (0, 0)'s tap 0 samples near (-1, -1): outside, but mask * 0 is still NaN.
        offset[0, 18:20, 0, 0] = -0.5
        mask[0, 9, 0, 0] = nan
    elif kind == "nan-input":
        x[0, 9, 4, 5] = nan
    # Offset group 1 feeds input channels 6..11: conv groups 1 and 2 (output channels 2..5).
    return case, [t.requires_grad_() for t in (x, offset, weight, bias, mask)]


NON_FINITE_KINDS = ["nan-offset-y", "nan-offset-x", "nan-offsets", "nan-mask",
                    "nan-mask-outside", "nan-input"]


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("kind", NON_FINITE_KINDS)
def test_nan_inputs_reach_output_and_gradients(device, kind):
    """A NaN in input, offset or mask makes the output pixels that sample it NaN, with NaN
    gradients for the mask, the weight and the offsets its fraction enters, as torchvision
    does; a NaN sampling point gives the input no gradient (torchvision neither)."""
    for dtype in (torch.float64, torch.float32):
        case, tensors = _non_finite_problem(kind, dtype, device)
        x, offset, weight, bias, mask = tensors
        ours = case.call(modulated_deform_conv2d, *tensors)
        ref = case.call(facedeblur_ref.modulated_deform_conv2d, *tensors)
        tol = TOLERANCES[dtype]
        torch.testing.assert_close(ours, ref, equal_nan=True, **tol)
        nan_pixels = ours.isnan().any(dim=1)[0]
        assert nan_pixels.any(), (kind, dtype)
        assert not ours[1].isnan().any()  # image 1 is untouched
        assert not ours[0, :2].isnan().any()  # conv group 0 reads offset group 0 only
        if kind != "nan-input":  # one sampling point: one output pixel
            assert nan_pixels.sum() == 1
        grad = torch.randn(ours.shape, generator=torch.Generator().manual_seed(7)).to(ours)
        got = _grads(ours, tensors, grad)
        want = _grads(ref, tensors, grad)
        for name, a, b in zip(("input", "offset", "weight", "bias", "mask"), got, want):
            torch.testing.assert_close(a, b, equal_nan=True, **tol,
                                       msg=lambda m, at=f"{kind} {dtype} {name}": f"{at}: {m}")
        g_input, g_offset, g_weight, _, g_mask = got
        assert g_weight.isnan().any() and g_offset.isnan().any()
        if kind.startswith("nan-offset"):
            assert torch.isfinite(g_input).all()
            assert g_mask.isnan().sum() == 1


# A NaN in one coordinate only is left out: torchvision's CPU kernel then reads outside the
# image (floor(NaN) cast to int; a segfault in torchvision 0.29.1).
@pytest.mark.parametrize("kind", ["nan-offsets", "nan-mask", "nan-mask-outside", "nan-input"])
def test_nan_inputs_match_torchvision_where_it_imports(kind):
    tv_ops = pytest.importorskip("torchvision.ops")
    case, tensors = _non_finite_problem(kind, torch.float64, "cpu")
    ours = case.call(modulated_deform_conv2d, *tensors)
    theirs = case.call(tv_ops.deform_conv2d, *tensors)
    torch.testing.assert_close(ours, theirs, equal_nan=True)
    grad = torch.randn_like(ours)
    for a, b in zip(_grads(ours, tensors, grad), _grads(theirs, tensors, grad)):
        torch.testing.assert_close(a, b, equal_nan=True)


def test_zero_offsets_unit_mask_equal_conv2d():
    case = Case(groups=2, stride=2)
    x, offset, weight, bias, mask = case.tensors()
    out = case.call(modulated_deform_conv2d, x, torch.zeros_like(offset), weight, bias,
                    torch.ones_like(mask))
    expected = F.conv2d(x, weight, bias, stride=2, padding=1, groups=2)
    torch.testing.assert_close(out, expected, **TOLERANCES[torch.float64])


def test_sample_exactly_at_minus_one_is_outside():
    """vision#6885: at y == -1 exactly the value and every gradient are zero here (torchvision
    gives a nonzero offset gradient there); the reference agrees with us."""
    x = torch.randn(1, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(3, 2, 1, 1, dtype=torch.float64, requires_grad=True)
    offset = torch.zeros(1, 2, 4, 4, dtype=torch.float64)
    offset[0, 0, 0, 1] = -1.0  # output (0, 1) samples y = -1, x = 1
    offset[0, 1, 2, 0] = -1.0  # output (2, 0) samples y = 2, x = -1
    offset[0, 0, 3, 3] = -0.999  # just inside: contributes
    offset.requires_grad_()
    mask = torch.rand(1, 1, 4, 4, dtype=torch.float64, requires_grad=True)
    ours = modulated_deform_conv2d(x, offset, weight, mask=mask)
    ref = facedeblur_ref.modulated_deform_conv2d(x, offset, weight, mask=mask)
    torch.testing.assert_close(ours, ref)
    assert torch.all(ours[0, :, 0, 1] == 0) and torch.all(ours[0, :, 2, 0] == 0)
    grad = torch.randn_like(ours)
    g_ours = torch.autograd.grad(ours, (x, offset, mask), grad)
    g_ref = torch.autograd.grad(ref, (x, offset, mask), grad)
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b)
    g_offset, g_mask = g_ours[1], g_ours[2]
    assert g_offset[0, :, 0, 1].abs().sum() == 0 and g_offset[0, :, 2, 0].abs().sum() == 0
    assert g_mask[0, 0, 0, 1] == 0 and g_mask[0, 0, 2, 0] == 0
    assert g_offset[0, 0, 3, 3] != 0  # the sample just inside does get a gradient


def _gradcheck(case, fast_mode):
    tensors = [t for t in case.tensors() if t is not None]

    def fn(*args):
        it = iter(args)
        x, offset, weight = next(it), next(it), next(it)
        bias = next(it) if case.bias else None
        mask = next(it) if case.mask else None
        return case.call(modulated_deform_conv2d, x, offset, weight, bias, mask)

    assert torch.autograd.gradcheck(fn, tensors, eps=1e-6, atol=1e-5, rtol=1e-4,
                                    fast_mode=fast_mode)


@pytest.mark.parametrize("name", ["basic", "dcnv1", "rect_kernel_mixed_args",
                                  "groups_and_offset_groups", "large_offsets"])
def test_gradcheck_fast(name):
    """Random-projection gradcheck of every input (float64)."""
    case = CASES[name]
    _gradcheck(Case(**{**case.__dict__, "batch": 1, "size": (5, 6)}), fast_mode=True)


def test_gradcheck_full_small():
    """Element-by-element gradcheck of every input on a tiny problem."""
    _gradcheck(Case(batch=1, in_channels=2, out_channels=2, size=(4, 4), offset_groups=2,
                    kernel=(2, 2), padding=0), fast_mode=False)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("mask", [True, False])
def test_opcheck(mask, channels_last):
    case = Case(batch=2, in_channels=4, size=(6, 5), mask=mask, groups=2, offset_groups=2)
    x, offset, weight, bias, m = case.tensors(dtype=torch.float32)
    if channels_last:
        x = x.detach().to(memory_format=torch.channels_last).requires_grad_()
    args = (x, offset, weight, bias, m, [1, 1], [1, 1], [1, 1])
    torch.library.opcheck(OP, args)
    grad = torch.randn(2, 4, 6, 5)
    bwd_args = (grad, x.detach(), offset.detach(), weight.detach(),
                None if m is None else m.detach(), [1, 1], [1, 1], [1, 1],
                [True, True, mask, True, True], False)
    torch.library.opcheck(BACKWARD_OP, bwd_args)


def test_backward_op_skips_unrequested_gradients():
    case = Case()
    x, offset, weight, bias, mask = case.tensors(requires_grad=False)
    grad = torch.randn(case.batch, case.out_channels, *case.output_size(), dtype=x.dtype)
    full = BACKWARD_OP(grad, x, offset, weight, mask, [1, 1], [1, 1], [1, 1], [True] * 5, False)
    for i in range(5):
        only = [j == i for j in range(5)]
        part = BACKWARD_OP(grad, x, offset, weight, mask, [1, 1], [1, 1], [1, 1], only, False)
        for j in range(5):
            if j == i:
                torch.testing.assert_close(part[j], full[j])
            else:
                assert part[j].numel() == 0


def test_double_backward_raises():
    case = Case(batch=1, in_channels=2, out_channels=2, size=(5, 5))
    inputs = [t for t in case.tensors() if t is not None]

    def loss():
        return case.call(modulated_deform_conv2d, *inputs).pow(2).sum()

    # first-order gradients taken with create_graph=True are still right...
    grads = torch.autograd.grad(loss(), inputs, create_graph=True)
    for a, b in zip(grads, torch.autograd.grad(loss(), inputs)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # ...but differentiating them (a gradient penalty) raises instead of giving zeros
    with pytest.raises(RuntimeError,
                       match="modulated_deform_conv2d: double backward is not supported"):
        torch.autograd.grad(grads[0].pow(2).sum(), inputs[0])


def test_torch_compile_fullgraph():
    case = Case(in_channels=4)
    x, offset, weight, bias, mask = case.tensors(dtype=torch.float32)

    def fn(x, offset, weight, bias, mask):
        return modulated_deform_conv2d(x, offset, weight, bias, 1, 1, 1, mask).relu().sum()

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    inputs = (x, offset, weight, bias, mask)
    out = compiled(*inputs)
    expected = fn(*inputs)
    torch.testing.assert_close(out, expected)
    for a, b in zip(torch.autograd.grad(out, inputs), torch.autograd.grad(expected, inputs)):
        torch.testing.assert_close(a, b)


def test_torch_export():
    layer = ModulatedDeformConv2d(4, 6, 3, padding=1)
    x = torch.randn(2, 4, 7, 7)
    offset = torch.randn(2, 18, 7, 7)
    mask = torch.rand(2, 9, 7, 7)
    exported = torch.export.export(layer, (x, offset, mask))
    torch.testing.assert_close(exported.module()(x, offset, mask), layer(x, offset, mask))


def test_deterministic_mode_matches_default():
    case = CASES["groups_and_offset_groups"]
    tensors = case.tensors(dtype=torch.float32)
    out = case.call(modulated_deform_conv2d, *tensors)
    grad = torch.randn_like(out)
    default = _grads(out, tensors, grad)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        out = case.call(modulated_deform_conv2d, *tensors)
        det = _grads(out, tensors, grad)
        again = _grads(case.call(modulated_deform_conv2d, *tensors), tensors, grad)
    finally:
        torch.use_deterministic_algorithms(previous)
    for a, b, c in zip(default, det, again):
        torch.testing.assert_close(a, b, **TOLERANCES[torch.float32])
        assert torch.equal(b, c)  # run to run: bitwise


def test_cpu_autocast_runs_in_float32():
    case = Case(in_channels=4)
    x, offset, weight, bias, mask = case.tensors(dtype=torch.float32, requires_grad=False)
    expected = case.call(modulated_deform_conv2d, x, offset, weight, bias, mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = case.call(modulated_deform_conv2d, x, offset.bfloat16(), weight, bias, mask)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected, rtol=0.05, atol=0.05)


# ------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------


def _valid_args():
    case = Case()
    return case.tensors(dtype=torch.float32, requires_grad=False)


@pytest.mark.parametrize("mutate, error, match", [
    (lambda a: {**a, "input": a["input"][0]}, ValueError, "input must have 4 dimensions"),
    (lambda a: {**a, "offset": a["offset"][:, :17]}, ValueError, "2 \\* offset_groups"),
    (lambda a: {**a, "offset": a["offset"][:, :, :-1]}, ValueError, "offset must have shape"),
    (lambda a: {**a, "mask": a["mask"][:, :8]}, ValueError, "mask must have shape"),
    (lambda a: {**a, "bias": a["bias"][:3]}, ValueError, "bias must have 4 entries"),
    (lambda a: {**a, "weight": a["weight"][:, :4]}, ValueError, "multiple of weight.shape"),
    (lambda a: {**a, "weight": torch.randn(5, 3, 3, 3)}, ValueError, "not divisible by groups"),
    (lambda a: {**a, "input": a["input"][..., :2, :2], "padding": 0}, ValueError, "too small"),
    (lambda a: {**a, "input": a["input"].double()}, TypeError, "share one dtype"),
    (lambda a: {**a, "input": a["input"].half(), "offset": a["offset"].half(),
                "weight": a["weight"].half(), "bias": None, "mask": None},
     TypeError, "supported on cpu"),
    (lambda a: {**a, "offset": a["offset"].to("meta")}, ValueError, "same device"),
    (lambda a: {**a, "mask": a["mask"].tolist()}, TypeError, "mask must be a Tensor"),
    (lambda a: {**a, "stride": 0}, ValueError, "stride >= 1"),
    (lambda a: {**a, "padding": (1, 1, 1)}, ValueError, "padding must be an int or a pair"),
    (lambda a: {**a, "stride": 1.5}, TypeError, "stride must be an int or a pair of ints"),
    (lambda a: {**a, "dilation": (1, 2.0)}, TypeError, "dilation must be an int or a pair"),
    (lambda a: {**a, "padding": True}, TypeError, "padding must be an int or a pair"),
    (lambda a: {**a, "input": a["input"][:, :0], "weight": a["weight"][:, :1]}, ValueError,
     "input must have at least one channel"),
    (lambda a: {**a, "weight": a["weight"][:0], "bias": None}, ValueError,
     "weight must have at least one output channel"),
])
def test_clear_errors(mutate, error, match):
    x, offset, weight, bias, mask = _valid_args()
    args = mutate(dict(input=x, offset=offset, weight=weight, bias=bias, mask=mask, stride=1,
                       padding=1, dilation=1))
    with pytest.raises(error, match=match):
        modulated_deform_conv2d(**args)


def test_native_op_checks_its_arguments_too():
    x, offset, weight, bias, mask = _valid_args()
    with pytest.raises(RuntimeError, match="offset must be"):
        OP(x, offset[:, :, :-1], weight, bias, mask, [1, 1], [1, 1], [1, 1])
    with pytest.raises(RuntimeError, match="mask must be"):
        OP(x, offset, weight, bias, mask[:, :4], [1, 1], [1, 1], [1, 1])
    with pytest.raises(RuntimeError, match="unsupported dtype"):
        OP(x.half(), offset.half(), weight.half(), None, None, [1, 1], [1, 1], [1, 1])
    with pytest.raises(RuntimeError, match="mask gradient was requested"):
        BACKWARD_OP(torch.randn(2, 4, 9, 11), x, offset, weight, None, [1, 1], [1, 1], [1, 1],
                    [True] * 5, False)


# ------------------------------------------------------------------------------------------
# Layers
# ------------------------------------------------------------------------------------------


def test_modulated_layer_matches_reference_backend():
    torch.manual_seed(0)
    ours = ModulatedDeformConv2d(4, 6, (3, 2), stride=(2, 1), padding=1, groups=2)
    ref = ModulatedDeformConv2d(4, 6, (3, 2), stride=(2, 1), padding=1, groups=2,
                                backend=facedeblur_ref)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(2, 4, 9, 8)
    offset = torch.randn(2, 12, 5, 9)
    mask = torch.rand(2, 6, 5, 9)
    torch.testing.assert_close(ours(x, offset, mask), ref(x, offset, mask), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours(x, offset), ref(x, offset), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("offset_groups", [1, 2])
def test_conditioned_layer_initialization_and_gradients(offset_groups):
    torch.manual_seed(0)
    layer = ConditionedDeformConv2d(8, 6, offset_groups=offset_groups, condition_channels=5)
    assert layer.offset_conv.out_channels == 2 * offset_groups * 9
    assert layer.mask_conv.out_channels == offset_groups * 9
    x = torch.randn(2, 8, 10, 9)
    condition = torch.randn(2, 5, 10, 9)
    offset, mask = layer.offsets_and_mask(condition)
    assert torch.all(offset == 0) and torch.all(mask == 0.5)
    out = layer(x, condition)
    conv = F.conv2d(x, layer.deform.weight, None, padding=1)
    torch.testing.assert_close(out, 0.5 * conv + layer.deform.bias.view(1, -1, 1, 1))
    out.square().sum().backward()
    # Zero-initialized predictors still learn: their gradients are nonzero.
    assert layer.offset_conv.weight.grad.abs().sum() > 0
    assert layer.mask_conv.weight.grad.abs().sum() > 0


def test_conditioned_layer_defaults_and_serialization():
    layer = ConditionedDeformConv2d(4, 4, kernel_size=5, dilation=2, modulated=False)
    assert layer.mask_conv is None and layer.deform.padding == (4, 4)
    x = torch.randn(1, 4, 11, 12)
    assert layer(x).shape == (1, 4, 11, 12)
    clone = copy.deepcopy(layer)
    torch.testing.assert_close(clone(x), layer(x))
    restored = pickle.loads(pickle.dumps(layer))
    torch.testing.assert_close(restored(x), layer(x))
    with pytest.raises(ValueError, match="offset_groups"):
        ConditionedDeformConv2d(6, 4, offset_groups=4)
    with pytest.raises(TypeError, match="stride must be an int or a pair of ints"):
        ModulatedDeformConv2d(4, 4, stride=1.5)
    with pytest.raises(TypeError, match="kernel_size must be an int or a pair of ints"):
        ConditionedDeformConv2d(4, 4, kernel_size=(3, 3.0))
    # The backend is resolved at call time (a model may be built before the op is loaded).
    no_op_layer = ModulatedDeformConv2d(4, 4, backend=object())
    with pytest.raises(RuntimeError, match="provides no modulated_deform_conv2d"):
        no_op_layer(torch.randn(1, 4, 5, 5), torch.zeros(1, 18, 3, 3))


def test_self_check_registered():
    from facedeblur_ext.ops import SELF_CHECKS

    SELF_CHECKS["modulated_deform_conv2d"](torch.device("cpu"))


# ------------------------------------------------------------------------------------------
# CUDA (skipped without a GPU and a CUDA build)
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", cuda_params())
@pytest.mark.parametrize("tile_elements", ["1", "150", "100000000"])
@pytest.mark.parametrize("deterministic", [False, True])
def test_cuda_tiles_and_deterministic_path(monkeypatch, tile_elements, deterministic, device):
    monkeypatch.setenv("FACEDEBLUR_DEFORM_TILE_ELEMENTS", tile_elements)
    case = Case(batch=3, in_channels=8, out_channels=6, size=(8, 7), groups=2, offset_groups=2)
    tensors = case.tensors(dtype=torch.float64, device=device, requires_grad=False)
    out = case.call(modulated_deform_conv2d, *tensors)
    grad = torch.randn_like(out)
    ref_inputs = [t.requires_grad_() if t is not None else None for t in tensors]
    ref = case.call(facedeblur_ref.modulated_deform_conv2d, *ref_inputs)
    torch.testing.assert_close(out, ref, **TOLERANCES[torch.float64])
    ref_grads = _grads(ref, ref_inputs, grad)
    x, offset, weight, bias, mask = tensors
    ours = BACKWARD_OP(grad, x.detach(), offset.detach(), weight.detach(), mask.detach(),
                       [1, 1], [1, 1], [1, 1], [True] * 5, deterministic)
    g_in, g_off, g_mask, g_w, g_b = ours
    for a, b in zip((g_in, g_off, g_w, g_b, g_mask), ref_grads):
        torch.testing.assert_close(a, b, **TOLERANCES[torch.float64])


@pytest.mark.cuda
@pytest.mark.parametrize("offset_groups", [1, 8])
def test_cuda_many_small_images(offset_groups):
    # one tile would hold every image; the launch grid's z extent (images x offset groups) is
    # capped at 65535, so the tile must be split rather than refused
    batch, channels = 70000 // offset_groups + 1, 8
    x = torch.randn(batch, channels, 2, 2, device="cuda")
    offset = torch.randn(batch, 2 * offset_groups * 9, 2, 2, device="cuda")
    mask = torch.rand(batch, offset_groups * 9, 2, 2, device="cuda")
    weight = torch.randn(4, channels, 3, 3, device="cuda")
    got = modulated_deform_conv2d(x, offset, weight, padding=1, mask=mask)
    want = modulated_deform_conv2d(x.cpu(), offset.cpu(), weight.cpu(), padding=1,
                                   mask=mask.cpu())
    torch.testing.assert_close(got.cpu(), want, **TOLERANCES[torch.float32])


@pytest.mark.cuda  # emulated: tests/test_cuda_emulation.py (the wrapper takes no half CPU data)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_half_types_accumulate_in_float32(dtype):
    case = Case(in_channels=16, out_channels=8, size=(12, 13), offset_groups=2)
    full = case.tensors(dtype=torch.float32, device="cuda")
    half = [t.detach().to(dtype).requires_grad_() if t is not None else None for t in full]
    out32 = case.call(modulated_deform_conv2d, *full)
    out16 = case.call(modulated_deform_conv2d, *half)
    assert out16.dtype == dtype
    torch.testing.assert_close(out16.float(), out32, **TOLERANCES[dtype])
    grad = torch.randn_like(out32)
    for a, b in zip(_grads(out16, half, grad.to(dtype)), _grads(out32, full, grad)):
        assert a.dtype == dtype
        torch.testing.assert_close(a.float(), b, rtol=0.1, atol=0.1 * b.abs().max().item())


@pytest.mark.cuda
def test_cuda_autocast_keeps_half():
    case = Case(in_channels=8)
    x, offset, weight, bias, mask = case.tensors(dtype=torch.float32, device="cuda")
    with torch.autocast("cuda", dtype=torch.float16):
        out = case.call(modulated_deform_conv2d, x, offset, weight, bias, mask)
    assert out.dtype == torch.float16
    out.float().sum().backward()
    assert x.grad.dtype == torch.float32 and weight.grad.dtype == torch.float32


@pytest.mark.parametrize("device", cuda_params())
def test_cuda_deterministic_is_bitwise_reproducible(device):
    case = Case(batch=4, in_channels=32, out_channels=16, size=(24, 24), offset_scale=3.0)
    tensors = case.tensors(dtype=torch.float32, device=device)
    grad = torch.randn(case.batch, 16, 24, 24, device=device)
    x, offset, weight, bias, mask = (t.detach() for t in tensors)
    runs = [BACKWARD_OP(grad, x, offset, weight, mask, [1, 1], [1, 1], [1, 1], [True] * 5, True)
            for _ in range(3)]
    for run in runs[1:]:
        for a, b in zip(run, runs[0]):
            assert torch.equal(a, b)
    default = BACKWARD_OP(grad, x, offset, weight, mask, [1, 1], [1, 1], [1, 1], [True] * 5,
                          False)
    for a, b in zip(default, runs[0]):
        torch.testing.assert_close(a, b, **TOLERANCES[torch.float32])


@pytest.mark.cuda
def test_cuda_channels_last_and_side_stream():
    case = Case(in_channels=8, out_channels=8)
    x, offset, weight, bias, mask = case.tensors(dtype=torch.float32, device="cuda",
                                                 requires_grad=False)
    expected = case.call(modulated_deform_conv2d, x, offset, weight, bias, mask)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        out = case.call(modulated_deform_conv2d, x.to(memory_format=torch.channels_last),
                        offset, weight, bias, mask)
    stream.synchronize()
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("device", cuda_params())
def test_cuda_self_check_and_opcheck(device):
    from facedeblur_ext.ops import SELF_CHECKS

    SELF_CHECKS["modulated_deform_conv2d"](torch.device(device))
    case = Case(in_channels=4)
    x, offset, weight, bias, mask = case.tensors(dtype=torch.float32, device=device)
    torch.library.opcheck(OP, (x, offset, weight, bias, mask, [1, 1], [1, 1], [1, 1]))


def test_extension_reports_its_build():
    assert "with_cuda" in facedeblur_ext.build_info()
