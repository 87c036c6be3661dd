#pragma once
// Host-side argument handling of the separable normalization ops, shared by the CPU and CUDA
// implementations (defined in csrc/separable_norm.cpp).
#include <ATen/core/Tensor.h>

#include <optional>

namespace facedeblur::snorm {

// gamma or beta broadcast onto x, as the kernels read it: element (n, c, p), p = h * W + w, is
// at tensor.data_ptr() + n * stride_n + c * stride_c + p * stride_p (in elements).
struct AffineArg {
  at::Tensor tensor;  // the view the kernels read (a copy when the original could not be)
  int64_t stride_n = 0, stride_c = 0, stride_p = 0;
  bool defined = false;
  bool per_pixel = false;  // read per pixel (stride_p != 0); otherwise one value per plane
  // By shape (the gradient's shape), independent of the strides the values are read with:
  bool full = false;          // x's shape: the gradient is written elementwise, unreduced
  bool plane_shaped = false;  // size 1 (or absent) at H and W: gradient from per-plane sums
};

struct Prepared {
  at::Tensor x;      // in the kernel layout (contiguous or channels_last)
  at::Tensor masks;  // contiguous [N, R, H, W]
  AffineArg gamma, beta;
  int64_t N = 0, C = 0, R = 0, P = 0;
  bool channels_last = false;  // the kernels run on an NHWC x
  at::MemoryFormat out_format = at::MemoryFormat::Contiguous;  // layout of out and grad_x
};

// True when x is in channels_last layout (and not also plain contiguous); out and grad_x then
// come back channels_last. The fake kernels in facedeblur_ext/ops use the same rule.
bool use_channels_last(const at::Tensor& x);

// Validates the arguments (names the op and argument in every message) and brings them into
// the layout the kernels read. kernel_handles_channels_last: the NHWC layout is processed as is
// (CUDA); otherwise a channels_last x is made contiguous first (CPU).
Prepared prepare(const char* op, const at::Tensor& x, const at::Tensor& masks,
                 const std::optional<at::Tensor>& gamma, const std::optional<at::Tensor>& beta,
                 double eps, bool kernel_handles_channels_last);

void check_saved_stats(const char* op, const Prepared& p, const at::Tensor& mean,
                       const at::Tensor& rstd);

// Accumulation and statistics dtype: float64 for float64 inputs, float32 otherwise.
at::ScalarType stats_dtype(at::ScalarType input);

// Gradient of gamma (or beta) in its own shape: from plane_sums (the elementwise gradient
// summed over H and W, [N, C]) when the argument is plane-shaped, otherwise from per_pixel
// (the elementwise gradient in x's shape).
at::Tensor affine_grad(const at::Tensor& per_pixel, const at::Tensor& plane_sums,
                       const AffineArg& arg, at::IntArrayRef shape, at::ScalarType dtype);

}  // namespace facedeblur::snorm
