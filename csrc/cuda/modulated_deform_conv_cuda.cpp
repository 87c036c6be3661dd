// CUDA launcher of the modulated deformable convolution (ATen side): argument checks, tiling,
// buffers, and the GEMMs (cuBLAS through ATen's bmm/baddbmm, on the current stream). The
// sampling kernels are in modulated_deform_conv_kernels.cu.
//
// The problem is cut into tiles of whole images (when one image's columns fit the budget) or
// of pixel ranges of one image, so the column buffer is bounded by the tile budget instead of
// C * kh * kw * H * W per image (torchvision allocates that for up to 32 images at once).
//
// Forward per tile: gather the sampled, modulated columns [C*K][pixels] (one kernel), then
// out[g] = W[g] @ columns[g] (+ bias) per image, written straight into the output.
// Backward per tile: grad_columns[g] = W[g]^T @ grad_out[g] (GEMM), one fused kernel for the
// offset and mask gradients (and the rebuilt columns, and in the default mode the input
// gradient by atomicAdd), then grad_W[g] += grad_out[g] @ columns[g]^T (GEMM, float32
// accumulation for half types). With deterministic=True (or torch's deterministic mode) the
// input gradient is gathered instead: the (destination pixel, contribution) entries of the
// tile are stably sorted by destination and each input element sums its own entries in a
// fixed order, with no floating-point atomics.
//
// The sampling kernels read NCHW planes: a channels_last input is copied to NCHW first (the
// output and input gradient are still channels_last, like the input).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <tuple>

#include "common/checks.h"
#include "cuda/host_runtime.h"
#include "cuda/modulated_deform_conv_kernels.h"
#include "modulated_deform_conv_args.h"

namespace facedeblur {
namespace {

namespace kernels = facedeblur::cuda;
using cuda_host::check_launch;

constexpr const char* kOp = "modulated_deform_conv2d";

// Column-tile budget in elements: 32 MiB per buffer in float32 (the backward pass holds two).
constexpr int64_t kCudaTileElements = int64_t{1} << 23;

kernels::MdcDtype mdc_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return kernels::MdcDtype::kFloat32;
    case at::kDouble: return kernels::MdcDtype::kFloat64;
    case at::kHalf: return kernels::MdcDtype::kFloat16;
    case at::kBFloat16: return kernels::MdcDtype::kBFloat16;
    default: TORCH_CHECK(false, kOp, ": unsupported dtype ", t, " on CUDA");
  }
}

void check_cuda_args(const char* op, const at::Tensor& input) {
  TORCH_CHECK(cuda_host::on_kernel_device(input), op, ": expected CUDA tensors, got ",
              input.device());
  check_dtype_in(input, {at::kFloat, at::kDouble, at::kHalf, at::kBFloat16}, op, "input");
}

kernels::MdcShape to_shape(const DeformConvGeometry& g) {
  return {g.in_channels, g.height,  g.width,  g.kernel_h, g.kernel_w,
          g.offset_groups, g.stride_h, g.stride_w, g.pad_h,    g.pad_w,
          g.dil_h,       g.dil_w,   g.out_h,  g.out_w};
}

kernels::MdcInputs to_inputs(const at::Tensor& x, const at::Tensor& offset,
                             const c10::optional<at::Tensor>& mask) {
  kernels::MdcInputs in{};
  in.input = x.data_ptr();
  in.offset = offset.data_ptr();
  for (int d = 0; d < 4; ++d) in.offset_stride[d] = offset.stride(d);
  in.mask = nullptr;
  if (mask.has_value()) {
    in.mask = mask->data_ptr();
    for (int d = 0; d < 4; ++d) in.mask_stride[d] = mask->stride(d);
  }
  return in;
}

// CUDA's limit on gridDim.y and gridDim.z.
constexpr int64_t kMaxGridYZ = 65535;

// Images per tile and pixels per tile (of each image).
struct TilePlan {
  int64_t images, pixels;
};

TilePlan plan_tiles(const DeformConvGeometry& g) {
  const int64_t budget = deform_tile_elements(kCudaTileElements);
  const int64_t per_pixel = g.in_channels * g.taps();
  const int64_t pixels = g.out_pixels();
  TilePlan plan;
  if (per_pixel * pixels <= budget) {
    plan = {std::min(g.batch, std::max<int64_t>(1, budget / (per_pixel * pixels))), pixels};
  } else {
    plan = {1, std::max<int64_t>(1, budget / per_pixel)};
  }
  TORCH_CHECK(g.height * g.width < (int64_t{1} << 31), kOp,
              ": input images of more than 2^31 pixels are not supported on CUDA");
  // gridDim.y is the tap and gridDim.z is (image, offset group) in sample_grid; both are capped
  // at 65535, so a tile holds at most 65535 / offset_groups images.
  TORCH_CHECK(g.offset_groups <= kMaxGridYZ, kOp, ": more than ", kMaxGridYZ,
              " offset groups are not supported on CUDA (got ", g.offset_groups, ")");
  TORCH_CHECK(g.taps() <= kMaxGridYZ, kOp, ": kernels of more than ", kMaxGridYZ,
              " taps are not supported on CUDA (got ", g.taps(), ")");
  plan.images = std::min(plan.images, kMaxGridYZ / g.offset_groups);
  return plan;
}

// [N, C, H, W] tensor (contiguous in its memory format) viewed as [N, C, H*W].
at::Tensor as_pixels(const at::Tensor& t, bool channels_last) {
  const int64_t n = t.size(0), c = t.size(1), p = t.size(2) * t.size(3);
  if (channels_last) return t.permute({0, 2, 3, 1}).reshape({n, p, c}).transpose(1, 2);
  return t.view({n, c, p});
}

at::Tensor forward_cuda(const at::Tensor& input, const at::Tensor& offset,
                        const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                        const c10::optional<at::Tensor>& mask, c10::IntArrayRef stride,
                        c10::IntArrayRef padding, c10::IntArrayRef dilation) {
  const DeformConvGeometry g = check_modulated_deform_conv_args(
      kOp, input, offset, weight, bias, mask, stride, padding, dilation);
  check_cuda_args(kOp, input);
  const cuda_host::DeviceGuard device_guard(input.device());
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const bool out_cl = prefers_channels_last(input);
  at::Tensor out = at::empty(
      {g.batch, g.out_channels, g.out_h, g.out_w},
      input.options().memory_format(out_cl ? at::MemoryFormat::ChannelsLast
                                           : at::MemoryFormat::Contiguous));
  if (g.batch == 0) return out;
  const cudaStream_t stream = cuda_host::current_stream();
  const at::Tensor x = input.contiguous();
  const kernels::MdcShape shape = to_shape(g);
  const kernels::MdcInputs in = to_inputs(x, offset, mask);
  const kernels::MdcDtype dtype = mdc_dtype(input.scalar_type());
  const TilePlan plan = plan_tiles(g);
  const int64_t groups = g.groups, cout_g = g.out_per_group();
  const int64_t rows_g = g.in_per_group() * g.taps(), rows = g.in_channels * g.taps();
  const at::Tensor w3 = weight.reshape({groups, cout_g, rows_g});
  c10::optional<at::Tensor> bias3;
  if (bias.has_value()) bias3 = bias->reshape({groups, cout_g, 1});
  const at::Tensor out3 = as_pixels(out, out_cl);
  at::Tensor columns = at::empty({plan.images * rows * plan.pixels}, x.options());

  for (int64_t n0 = 0; n0 < g.batch; n0 += plan.images) {
    const int64_t images = std::min(plan.images, g.batch - n0);
    for (int64_t p0 = 0; p0 < g.out_pixels(); p0 += plan.pixels) {
      const int64_t pixels = std::min(plan.pixels, g.out_pixels() - p0);
      const kernels::MdcTile tile{n0, images, p0, pixels};
      check_launch(
          kernels::launch_mdc_gather_columns(dtype, shape, in, tile, columns.data_ptr(), stream),
          kOp);
      const at::Tensor col4 =
          columns.narrow(0, 0, images * rows * pixels).view({images, groups, rows_g, pixels});
      for (int64_t b = 0; b < images; ++b) {
        at::Tensor dst = out3[n0 + b].narrow(1, p0, pixels).view({groups, cout_g, pixels});
        if (bias3.has_value()) {
          at::baddbmm_out(dst, *bias3, w3, col4[b]);
        } else {
          at::bmm_out(dst, w3, col4[b]);
        }
      }
    }
  }
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& offset,
    const at::Tensor& weight, const c10::optional<at::Tensor>& mask, c10::IntArrayRef stride,
    c10::IntArrayRef padding, c10::IntArrayRef dilation, std::array<bool, 5> output_mask,
    bool deterministic) {
  const char* op = "modulated_deform_conv2d_backward";
  const DeformConvGeometry g = check_modulated_deform_conv_args(
      op, input, offset, weight, c10::nullopt, mask, stride, padding, dilation);
  check_cuda_args(op, input);
  const GradRequest want =
      check_modulated_deform_conv_backward_args(op, g, grad_output, input, mask, output_mask);
  deterministic = deterministic || at::globalContext().deterministicAlgorithms();
  const cuda_host::DeviceGuard device_guard(input.device());
  at::AutoDispatchBelowADInplaceOrView below_autograd;

  const bool cl = prefers_channels_last(input);
  const auto fmt = cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  const auto opts = input.options();
  const at::ScalarType acc_type =
      input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  // Unrequested gradients are distinct empty tensors (outputs of an op must not alias).
  auto empty = [&] { return at::empty({0}, opts); };
  at::Tensor grad_input =
      want.input ? at::empty(input.sizes(), opts.memory_format(fmt)) : empty();
  at::Tensor grad_offset = want.offset ? at::empty(offset.sizes(), opts) : empty();
  at::Tensor grad_mask = want.mask ? at::empty(mask->sizes(), opts) : empty();
  at::Tensor grad_weight = want.weight ? at::empty(weight.sizes(), opts) : empty();
  at::Tensor grad_bias =
      want.bias ? grad_output.sum({0, 2, 3}, false, acc_type).to(input.scalar_type()) : empty();
  if (g.batch == 0) {
    if (want.weight) grad_weight.zero_();
    return {grad_input, grad_offset, grad_mask, grad_weight, grad_bias};
  }
  const bool need_gcol = want.input || want.offset || want.mask;
  if (!need_gcol && !want.weight) {
    return {grad_input, grad_offset, grad_mask, grad_weight, grad_bias};
  }

  const cudaStream_t stream = cuda_host::current_stream();
  const at::Tensor x = input.contiguous();
  const kernels::MdcShape shape = to_shape(g);
  const kernels::MdcInputs in = to_inputs(x, offset, mask);
  const kernels::MdcDtype dtype = mdc_dtype(input.scalar_type());
  const TilePlan plan = plan_tiles(g);
  const int64_t groups = g.groups, cout_g = g.out_per_group();
  const int64_t rows_g = g.in_per_group() * g.taps(), rows = g.in_channels * g.taps();
  const int64_t image_elems = g.in_channels * g.height * g.width;
  const at::Tensor w3 = weight.reshape({groups, cout_g, rows_g});
  const at::Tensor w3_t = w3.transpose(1, 2);
  const at::Tensor gout3 = as_pixels(grad_output.contiguous(fmt), cl);
  const int64_t tile_elems = plan.images * rows * plan.pixels;
  at::Tensor columns = want.weight ? at::empty({tile_elems}, opts) : at::Tensor();
  at::Tensor grad_columns = need_gcol ? at::empty({tile_elems}, opts) : at::Tensor();
  // The input gradient accumulates (in float32, float64 for float64 inputs) in grad_input
  // itself when that is a contiguous float32/float64 tensor, else in a buffer for the
  // tile's images that is then converted into grad_input.
  const bool direct_acc = want.input && !cl && input.scalar_type() == acc_type;
  at::Tensor acc_images;
  if (want.input && !direct_acc) {
    acc_images = at::empty({plan.images, g.in_channels, g.height, g.width}, opts.dtype(acc_type));
  }
  if (direct_acc) grad_input.zero_();
  at::Tensor grad_w3 =
      want.weight ? at::zeros({groups, cout_g, rows_g}, opts.dtype(acc_type)) : at::Tensor();
  const bool half_type = acc_type != input.scalar_type();

  kernels::MdcBackwardOutputs outs{};
  if (want.offset) {
    outs.grad_offset = grad_offset.data_ptr();
    for (int d = 0; d < 4; ++d) outs.grad_offset_stride[d] = grad_offset.stride(d);
  }
  if (want.mask) {
    outs.grad_mask = grad_mask.data_ptr();
    for (int d = 0; d < 4; ++d) outs.grad_mask_stride[d] = grad_mask.stride(d);
  }
  outs.columns = want.weight ? columns.data_ptr() : nullptr;

  for (int64_t n0 = 0; n0 < g.batch; n0 += plan.images) {
    const int64_t images = std::min(plan.images, g.batch - n0);
    outs.grad_input_acc = nullptr;
    if (want.input) {
      if (direct_acc) {
        outs.grad_input_acc = static_cast<char*>(grad_input.data_ptr()) +
                              n0 * image_elems * grad_input.element_size();
      } else {
        acc_images.zero_();
        outs.grad_input_acc = acc_images.data_ptr();
      }
    }
    for (int64_t p0 = 0; p0 < g.out_pixels(); p0 += plan.pixels) {
      const int64_t pixels = std::min(plan.pixels, g.out_pixels() - p0);
      const kernels::MdcTile tile{n0, images, p0, pixels};
      auto gout_block = [&](int64_t b) {
        return gout3[n0 + b].narrow(1, p0, pixels).view({groups, cout_g, pixels});
      };
      if (need_gcol) {
        const at::Tensor gcol4 = grad_columns.narrow(0, 0, images * rows * pixels)
                                     .view({images, groups, rows_g, pixels});
        for (int64_t b = 0; b < images; ++b) {
          at::Tensor dst = gcol4[b];
          at::bmm_out(dst, w3_t, gout_block(b));
        }
        check_launch(kernels::launch_mdc_backward_samples(
            dtype, shape, in, tile, grad_columns.data_ptr(), outs,
            /*atomic_input_grad=*/!deterministic, stream), op);
      } else {
        check_launch(kernels::launch_mdc_gather_columns(dtype, shape, in, tile,
                                                          columns.data_ptr(), stream), op);
      }
      if (want.input && deterministic) {
        const int64_t entries = kernels::mdc_entry_count(shape, tile);
        const int64_t key_count = kernels::mdc_key_count(shape, tile);
        at::Tensor keys = at::empty({entries}, opts.dtype(at::kLong));
        at::Tensor weights = at::empty({entries}, opts.dtype(acc_type));
        check_launch(kernels::launch_mdc_scatter_keys(dtype, shape, in, tile,
                                                        keys.data_ptr<int64_t>(),
                                                        weights.data_ptr(), stream), op);
        // Stable: equal keys keep entry order, so every sum below has a fixed order.
        // (std::optional spelled out: a plain `true` would select sort(self, dim, descending).)
        auto [sorted_keys, permutation] =
            at::sort(keys, std::optional<bool>(true), /*dim=*/0, /*descending=*/false);
        at::Tensor starts = at::empty({key_count + 1}, opts.dtype(at::kLong));
        check_launch(kernels::launch_mdc_segment_starts(sorted_keys.data_ptr<int64_t>(),
                                                          entries, key_count,
                                                          starts.data_ptr<int64_t>(), stream), op);
        check_launch(kernels::launch_mdc_gather_input_grad(
            dtype, shape, tile, starts.data_ptr<int64_t>(), permutation.data_ptr<int64_t>(),
            weights.data_ptr(), grad_columns.data_ptr(), outs.grad_input_acc, stream), op);
      }
      if (want.weight) {
        const at::Tensor col4 =
            columns.narrow(0, 0, images * rows * pixels).view({images, groups, rows_g, pixels});
        for (int64_t b = 0; b < images; ++b) {
          if (half_type) {
            // float32 GEMM output: no half rounding of the partial sums.
            grad_w3.add_(cuda_host::bmm_float32_out(gout_block(b), col4[b].transpose(1, 2)));
          } else {
            grad_w3.baddbmm_(gout_block(b), col4[b].transpose(1, 2));
          }
        }
      }
    }
    if (want.input && !direct_acc) {
      grad_input.narrow(0, n0, images).copy_(acc_images.narrow(0, 0, images));
    }
  }
  if (want.weight) grad_weight.copy_(grad_w3.view(weight.sizes()));
  return {grad_input, grad_offset, grad_mask, grad_weight, grad_bias};
}

}  // namespace
}  // namespace facedeblur

FACEDEBLUR_CUDA_LAUNCHERS(m) {
  m.impl("modulated_deform_conv2d", facedeblur::forward_cuda);
  m.impl("modulated_deform_conv2d_backward", facedeblur::backward_cuda);
}
