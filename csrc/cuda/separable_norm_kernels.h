#pragma once
// CUDA kernels of separable normalization with adaptive denormalization: raw-pointer launchers
// taking a cudaStream_t, free of ATen so that nvcc compiles them on a machine without a CUDA
// build of torch. The ATen side (checks, allocation, dispatch) is separable_norm_cuda.cpp.
//
// Tensors: x, out, grad_out, grad_x and the elementwise affine gradients are [N, C, H, W] in
// the NCHW (contiguous) or NHWC (channels_last) layout given by Shape::channels_last; masks and
// grad_masks are contiguous [N, R, H, W]; statistics are [N, C, R] in the accumulation type
// (float32 for float32/float16/bfloat16 data, float64 for float64). P = H * W.
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace facedeblur::cuda::snorm {

enum class Dtype { kFloat32, kFloat16, kBFloat16, kFloat64 };

// Per-region state lives in registers sized at compile time; more regions are refused.
constexpr int kMaxRegions = 16;

struct Shape {
  int64_t N = 0, C = 0, R = 0, P = 0;
  bool channels_last = false;
};

// gamma or beta broadcast onto x: element (n, c, p) is data[n * stride_n + c * stride_c +
// p * stride_p] (elements of the data dtype). data == nullptr: absent (1 for gamma, 0 for beta).
struct Affine {
  const void* data = nullptr;
  int64_t stride_n = 0, stride_c = 0, stride_p = 0;
};

struct ForwardArgs {
  const void* x = nullptr;
  const void* masks = nullptr;
  Affine gamma, beta;
  double eps = 1e-5;
  void* out = nullptr;
  void* mean = nullptr;  // [N, C, R] accumulation type
  void* rstd = nullptr;  // [N, C, R] accumulation type; 0 for an empty region
};

struct BackwardArgs {
  const void* grad_out = nullptr;
  const void* x = nullptr;
  const void* masks = nullptr;
  Affine gamma;
  const void* mean = nullptr;
  const void* rstd = nullptr;
  double eps = 1e-5;
  // Outputs; nullptr: not wanted.
  void* grad_x = nullptr;            // x layout, data dtype
  void* grad_masks = nullptr;        // [N, R, H, W], data dtype
  void* grad_gamma_full = nullptr;   // grad_out * y elementwise, x layout, data dtype
  void* grad_beta_full = nullptr;    // copy of grad_out, x layout, data dtype
  void* gamma_plane_sums = nullptr;  // [N, C] accumulation type: sum over pixels of grad_out * y
  void* beta_plane_sums = nullptr;   // [N, C] accumulation type: sum over pixels of grad_out
};

// Scratch the launchers need (bytes, to be allocated on the device by the caller).
size_t forward_workspace_bytes(const Shape& shape, Dtype dtype, int device);
size_t backward_workspace_bytes(const Shape& shape, Dtype dtype, bool want_grad_masks,
                                int device);

// Enqueue the forward / backward on `stream` (of device `device`, which must be current).
cudaError_t forward(const Shape& shape, Dtype dtype, const ForwardArgs& args, void* workspace,
                    int device, cudaStream_t stream);
cudaError_t backward(const Shape& shape, Dtype dtype, const BackwardArgs& args, void* workspace,
                     int device, cudaStream_t stream);

}  // namespace facedeblur::cuda::snorm
