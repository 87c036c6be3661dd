#pragma once
// Argument checks and derived sizes of the modulated deformable convolution, shared by the CPU
// and CUDA launchers so that both reject the same inputs with the same messages.
#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <array>
#include <cstdlib>

#include "common/checks.h"

namespace facedeblur {

// Sizes of one call: torchvision's deform_conv2d conventions (groups inferred from the weight,
// offset groups from the offset's channel count).
struct DeformConvGeometry {
  int64_t batch = 0, in_channels = 0, height = 0, width = 0;
  int64_t out_channels = 0, kernel_h = 0, kernel_w = 0;
  int64_t groups = 1, offset_groups = 1;
  int64_t stride_h = 1, stride_w = 1, pad_h = 0, pad_w = 0, dil_h = 1, dil_w = 1;
  int64_t out_h = 0, out_w = 0;
  bool has_mask = false;

  int64_t taps() const { return kernel_h * kernel_w; }
  int64_t in_per_group() const { return in_channels / groups; }
  int64_t out_per_group() const { return out_channels / groups; }
  int64_t in_per_offset_group() const { return in_channels / offset_groups; }
  int64_t out_pixels() const { return out_h * out_w; }
};

// The memory format the op gives its output (and the input gradient): channels_last exactly
// when the input is channels_last-contiguous but not plain contiguous. The Python fake kernels
// apply the same rule, so real and fake tensors agree on strides.
inline bool prefers_channels_last(const at::Tensor& t) {
  return t.dim() == 4 && !t.is_contiguous() &&
         t.is_contiguous(at::MemoryFormat::ChannelsLast);
}

inline DeformConvGeometry check_modulated_deform_conv_args(
    const char* op, const at::Tensor& input, const at::Tensor& offset, const at::Tensor& weight,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& mask,
    c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef dilation) {
  check_dim(input, 4, op, "input");
  check_dim(offset, 4, op, "offset");
  check_dim(weight, 4, op, "weight");
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2, op,
              ": stride, padding and dilation must have two entries each");
  TORCH_CHECK(stride[0] >= 1 && stride[1] >= 1, op, ": stride must be >= 1, got ", stride);
  TORCH_CHECK(dilation[0] >= 1 && dilation[1] >= 1, op, ": dilation must be >= 1, got ",
              dilation);
  TORCH_CHECK(padding[0] >= 0 && padding[1] >= 0, op, ": padding must be >= 0, got ", padding);
  check_same_device(input, offset, op, "offset");
  check_same_device(input, weight, op, "weight");
  check_same_dtype(input, offset, op, "offset");
  check_same_dtype(input, weight, op, "weight");

  DeformConvGeometry g;
  g.batch = input.size(0);
  g.in_channels = input.size(1);
  g.height = input.size(2);
  g.width = input.size(3);
  g.out_channels = weight.size(0);
  g.kernel_h = weight.size(2);
  g.kernel_w = weight.size(3);
  g.stride_h = stride[0];
  g.stride_w = stride[1];
  g.pad_h = padding[0];
  g.pad_w = padding[1];
  g.dil_h = dilation[0];
  g.dil_w = dilation[1];
  TORCH_CHECK(g.kernel_h >= 1 && g.kernel_w >= 1 && weight.size(1) >= 1, op,
              ": weight must be [C_out, C_in / groups, kh, kw] with positive sizes, got ",
              weight.sizes());
  TORCH_CHECK(g.in_channels % weight.size(1) == 0, op, ": input has ", g.in_channels,
              " channels, not a multiple of weight.size(1) = ", weight.size(1),
              " (groups = C_in / weight.size(1))");
  g.groups = g.in_channels / weight.size(1);
  TORCH_CHECK(g.groups >= 1 && g.out_channels % g.groups == 0, op, ": weight has ",
              g.out_channels, " output channels, not a multiple of groups = ", g.groups);
  const int64_t taps = g.taps();
  TORCH_CHECK(offset.size(1) >= 2 * taps && offset.size(1) % (2 * taps) == 0, op,
              ": offset must have 2 * offset_groups * kh * kw channels (kh * kw = ", taps,
              "), got ", offset.size(1));
  g.offset_groups = offset.size(1) / (2 * taps);
  TORCH_CHECK(g.in_channels % g.offset_groups == 0, op, ": input channels ", g.in_channels,
              " are not divisible by offset_groups = ", g.offset_groups);
  g.out_h = (g.height + 2 * g.pad_h - (g.dil_h * (g.kernel_h - 1) + 1)) / g.stride_h + 1;
  g.out_w = (g.width + 2 * g.pad_w - (g.dil_w * (g.kernel_w - 1) + 1)) / g.stride_w + 1;
  TORCH_CHECK(g.out_h > 0 && g.out_w > 0, op, ": input of spatial size ", g.height, "x",
              g.width, " is too small for a ", g.kernel_h, "x", g.kernel_w,
              " kernel with this padding and dilation (output would be ", g.out_h, "x",
              g.out_w, ")");
  TORCH_CHECK(offset.size(0) == g.batch && offset.size(2) == g.out_h &&
                  offset.size(3) == g.out_w,
              op, ": offset must be [", g.batch, ", ", offset.size(1), ", ", g.out_h, ", ",
              g.out_w, "] (batch and output size), got ", offset.sizes());
  if (mask.has_value()) {
    const at::Tensor& m = *mask;
    check_dim(m, 4, op, "mask");
    check_same_device(input, m, op, "mask");
    check_same_dtype(input, m, op, "mask");
    TORCH_CHECK(m.size(0) == g.batch && m.size(1) == g.offset_groups * taps &&
                    m.size(2) == g.out_h && m.size(3) == g.out_w,
                op, ": mask must be [", g.batch, ", ", g.offset_groups * taps, ", ", g.out_h,
                ", ", g.out_w, "] (offset_groups * kh * kw channels), got ", m.sizes());
    g.has_mask = true;
  }
  if (bias.has_value()) {
    const at::Tensor& b = *bias;
    check_dim(b, 1, op, "bias");
    check_same_device(input, b, op, "bias");
    check_same_dtype(input, b, op, "bias");
    TORCH_CHECK(b.size(0) == g.out_channels, op, ": bias must have ", g.out_channels,
                " entries, got ", b.size(0));
  }
  return g;
}

// Which gradients the backward op computes (its output_mask, with the mask gradient dropped
// when there is no mask).
struct GradRequest {
  bool input, offset, mask, weight, bias;
};

inline GradRequest check_modulated_deform_conv_backward_args(
    const char* op, const DeformConvGeometry& g, const at::Tensor& grad_output,
    const at::Tensor& input, const c10::optional<at::Tensor>& mask,
    const std::array<bool, 5>& output_mask) {
  check_dim(grad_output, 4, op, "grad_output");
  check_same_device(input, grad_output, op, "grad_output");
  check_same_dtype(input, grad_output, op, "grad_output");
  TORCH_CHECK(grad_output.size(0) == g.batch && grad_output.size(1) == g.out_channels &&
                  grad_output.size(2) == g.out_h && grad_output.size(3) == g.out_w,
              op, ": grad_output must be [", g.batch, ", ", g.out_channels, ", ", g.out_h, ", ",
              g.out_w, "], got ", grad_output.sizes());
  TORCH_CHECK(!output_mask[2] || mask.has_value(), op,
              ": the mask gradient was requested but no mask was given");
  return {output_mask[0], output_mask[1], output_mask[2] && mask.has_value(), output_mask[3],
          output_mask[4]};
}

// Column-tile budget in elements; FACEDEBLUR_DEFORM_TILE_ELEMENTS overrides the device's
// default (tests use tiny tiles to exercise tile edges; also a tuning knob).
inline int64_t deform_tile_elements(int64_t default_elements) {
  if (const char* env = std::getenv("FACEDEBLUR_DEFORM_TILE_ELEMENTS")) {
    const long long value = std::atoll(env);
    if (value > 0) return static_cast<int64_t>(value);
  }
  return default_elements;
}

}  // namespace facedeblur
