#pragma once
// Kernel launches and shared memory, one source for nvcc and for the CPU emulator
// (csrc/cuda_emulator, built with FACEDEBLUR_CUDA_EMULATOR defined):
//   launch_kernel<kernel>(grid, block, dynamic_smem, stream, args...)  instead of <<<...>>>;
//     launch errors are read with cudaGetLastError, as after <<<...>>>;
//   dynamic_shared_memory<T>()                 instead of extern __shared__ T name[];
//   FD_SHARED_ARRAY(T, name, count), FD_SHARED_VAR(T, name)  instead of __shared__ T ...;
// and the grid caps the launchers use, which the emulator tests lower at compile time so that
// grid-stride loops and split paths run on small inputs.
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <utility>

#ifndef FACEDEBLUR_GRID_YZ_CAP
#define FACEDEBLUR_GRID_YZ_CAP 65535  // CUDA's limit on gridDim.y and gridDim.z
#endif
#ifndef FACEDEBLUR_GRID_STRIDE_BLOCKS_CAP
#define FACEDEBLUR_GRID_STRIDE_BLOCKS_CAP (65536 * 32)  // blocks of a grid-stride kernel
#endif

#if defined(FACEDEBLUR_CUDA_EMULATOR)
#include "cuda_emulator/cuda_emulator.h"
#define FD_SHARED_ARRAY(T, name, count) FACEDEBLUR_EMULATOR_SHARED_ARRAY(T, name, count)
#define FD_SHARED_VAR(T, name) FACEDEBLUR_EMULATOR_SHARED_VAR(T, name)
#else
#define FD_SHARED_ARRAY(T, name, count) __shared__ T name[(count)]
#define FD_SHARED_VAR(T, name) __shared__ T name
#endif

namespace facedeblur {

constexpr int64_t kGridYZCap = FACEDEBLUR_GRID_YZ_CAP;
constexpr int64_t kGridStrideBlocksCap = FACEDEBLUR_GRID_STRIDE_BLOCKS_CAP;

#if !defined(FACEDEBLUR_CUDA_EMULATOR)
template <auto Kernel, typename... Args>
inline void launch_kernel(dim3 grid, dim3 block, size_t dynamic_smem, cudaStream_t stream,
                          Args&&... args) {
  Kernel<<<grid, block, dynamic_smem, stream>>>(std::forward<Args>(args)...);
}

template <typename T>
__device__ __forceinline__ T* dynamic_shared_memory() {
  extern __shared__ __align__(16) unsigned char facedeblur_dynamic_smem[];
  return reinterpret_cast<T*>(facedeblur_dynamic_smem);
}
#endif

}  // namespace facedeblur
