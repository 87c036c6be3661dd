#pragma once
// Raw-pointer launchers of the blur-synthesis CUDA kernels (csrc/cuda/blur_kernels.cu). No
// ATen types: the ATen side (blur_cuda.cpp) checks arguments, allocates outputs and scratch,
// and passes device pointers and the current stream. Every launcher returns the first CUDA
// error it meets (cudaSuccess otherwise).
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace facedeblur::blur::cuda {

// Element types of images, frames and generated kernels.
enum class Dtype : int { kUInt8 = 0, kHalf = 1, kBFloat16 = 2, kFloat = 3, kDouble = 4 };

// ---- kernel generators: one CUDA block per kernel, out is [n, size, size] of out_dtype ----
cudaError_t launch_motion_kernels(const double* length, const double* angle, int64_t n,
                                  int size, void* out, Dtype out_dtype, cudaStream_t stream);
cudaError_t launch_gaussian_kernels(const double* sigma, int64_t n, int size, void* out,
                                    Dtype out_dtype, cudaStream_t stream);
cudaError_t launch_defocus_kernels(const double* radius, int64_t n, int size, void* out,
                                   Dtype out_dtype, cudaStream_t stream);
// params [n, 7] (TrajectoryParams order); step_uniform [n, T - 1] and step_normal
// [n, T - 1, 2] in float (rand_is_double false) or double; positions: n * T * 2 doubles.
cudaError_t launch_trajectory_kernels(const double* params, const void* step_uniform,
                                      const void* step_normal, bool rand_is_double, int64_t n,
                                      int64_t T, int size, int centering, double* positions,
                                      void* out, Dtype out_dtype, cudaStream_t stream);

// ---- blur_synthesize ----
struct BlurShape {
  int64_t N, C, H, W;  // images
  int64_t R, Kh, Kw;   // kernels [N, R, Kh, Kw]
  int border;          // Border code (blur_math.h)
};

// Bytes of tap scratch for compacted kernels (N * R * Kh * Kw taps); counts need N * R ints.
size_t blur_tap_bytes(const BlurShape& s, bool is_double);

// Bytes of dynamic shared memory per block of the blur tile kernels: the (32 + Kh - 1) x
// (32 + Kw - 1) halo in the compute dtype, plus a 256-entry table for uint8 images.
size_t blur_tile_smem_bytes(const BlurShape& s, Dtype dtype);
// The current device's opt-in limit of dynamic shared memory per block, in bytes.
cudaError_t device_smem_limit(size_t* bytes);

struct BlurForwardArgs {
  const void* images;       // [N, C, H, W] of dtype
  void* out;                // [N, C, H, W] of dtype
  Dtype dtype;              // float64 computes in double, everything else in float
  const void* kernels;      // [N, R, Kh, Kw] compute dtype
  const void* weights;      // [N, R, H, W] compute dtype or null
  const void* mask;         // [N, 1, H, W] compute dtype or null
  const void* noise;        // [N, C, H, W] compute dtype or null
  const void* noise_sigma;  // [N] compute dtype or null (with noise)
  bool crf;
  double gamma;
  bool quantize;
  void* taps;               // blur_tap_bytes scratch
  int* tap_counts;          // N * R ints scratch
};
cudaError_t launch_blur_forward(const BlurShape& s, const BlurForwardArgs& a,
                                cudaStream_t stream);

struct BlurBackwardArgs {
  const void* grad;         // [N, C, H, W] of dtype
  const void* images;       // [N, C, H, W] of dtype (floating)
  Dtype dtype;
  const void* kernels;      // [N, R, Kh, Kw]
  const void* weights;      // or null
  const void* mask;         // or null
  bool crf;
  double gamma;
  // outputs (null when not requested); grad_weights and grad_mask must be zero-filled
  void* grad_images;        // [N, C, H, W] of dtype
  void* grad_kernels;       // [N, R, Kh, Kw]
  void* grad_weights;       // [N, R, H, W]
  void* grad_mask;          // [N, 1, H, W]
  // scratch in the compute dtype
  void* taps;               // blur_tap_bytes
  int* tap_counts;          // N * R
  void* lin;                // [N, C, H, W], needed with grad_kernels
  void* hw;                 // [N, R, C, H, W], needed with grad_images or grad_kernels
  void* direct;             // [N, C, H, W], needed with grad_images and a mask
  void* grad_padded;        // [N, C, H + Kh - 1, W + Kw - 1], needed with grad_images
};
cudaError_t launch_blur_backward(const BlurShape& s, const BlurBackwardArgs& a,
                                 cudaStream_t stream);

// ---- average_frames: frames [N, T, P], counts [N] (clamped to [1, T]), out [N, P] ----
cudaError_t launch_average_frames(const void* frames, const int64_t* counts, int64_t N,
                                  int64_t T, int64_t P, Dtype dtype, bool crf, double gamma,
                                  void* out, cudaStream_t stream);
cudaError_t launch_average_frames_backward(const void* grad, const void* frames,
                                           const int64_t* counts, int64_t N, int64_t T,
                                           int64_t P, Dtype dtype, bool crf, double gamma,
                                           void* grad_frames, cudaStream_t stream);

}  // namespace facedeblur::blur::cuda
