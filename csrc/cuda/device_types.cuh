#pragma once
// Accumulation types and conversions shared by the device code. No ATen: nvcc compiles the
// kernels that include this on a machine without a CUDA build of torch.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace facedeblur::cuda {

// Half inputs accumulate in float; float64 stays float64.
template <typename T>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

// Back from the accumulation type, rounding to nearest for the half types.
template <typename T>
struct FromAcc;
template <>
struct FromAcc<float> {
  __device__ static float cvt(float v) { return v; }
};
template <>
struct FromAcc<double> {
  __device__ static double cvt(double v) { return v; }
};
template <>
struct FromAcc<__half> {
  __device__ static __half cvt(float v) { return __float2half_rn(v); }
};
template <>
struct FromAcc<__nv_bfloat16> {
  __device__ static __nv_bfloat16 cvt(float v) { return __float2bfloat16_rn(v); }
};

template <typename T, typename A>
__device__ __forceinline__ T from_acc(A v) {
  return FromAcc<T>::cvt(v);
}

}  // namespace facedeblur::cuda
