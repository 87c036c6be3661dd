// Kernels that check the emulator itself (tests/test_cuda_emulation.py): correct warp
// collectives and barriers, and each misuse it must report as a failed launch. Written in
// the device dialect of csrc/cuda (launch.cuh), built only for the emulator (a .cpp, so that
// scripts/nvcc_check.sh does not compile the deliberately broken ones).
#include <cstdint>

#include "cuda/launch.cuh"

namespace facedeblur::emulator_selftest {
namespace {

// out[t]: shfl_xor butterfly sum, shfl_down, shfl_up, shfl from lane 3, ballot of odd lanes,
// a value passed through shared memory across a barrier (reversed thread order).
__global__ void collectives_kernel(int64_t* out) {
  FD_SHARED_ARRAY(int64_t, stage, 64);
  const int t = threadIdx.x, lane = t % 32;
  int64_t sum = t;
  for (int off = 16; off > 0; off /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, off);
  const int64_t down = __shfl_down_sync(0xffffffffu, static_cast<int64_t>(t), 1);
  const int64_t up = __shfl_up_sync(0xffffffffu, static_cast<int64_t>(t), 2);
  const int64_t from3 = __shfl_sync(0xffffffffu, static_cast<int64_t>(t), 3);
  const unsigned odd = __ballot_sync(0xffffffffu, lane % 2);
  __syncwarp();
  stage[t] = t * 10;
  __syncthreads();
  const int64_t mirrored = stage[63 - t];
  int64_t* row = out + t * 6;
  row[0] = sum;
  row[1] = down;
  row[2] = up;
  row[3] = from3;
  row[4] = odd;
  row[5] = mirrored;
}

// Threads below 16 and the others wait at two different barriers.
__global__ void divergent_barrier_kernel(float* out) {
  if (threadIdx.x < 16) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1.0f;
}

// Warp 1 waits at a barrier that warp 0, stuck in a shuffle with lane 31 missing, never reaches.
__global__ void missing_lane_kernel(float* out) {
  if (threadIdx.x == 31) return;
  float v = static_cast<float>(threadIdx.x);
  if (threadIdx.x < 32) v = __shfl_xor_sync(0xffffffffu, v, 1);
  __syncthreads();
  out[threadIdx.x] = v;
}

// A block of 32 threads writes one element past a 31-element shared array.
__global__ void shared_overflow_kernel(float* out) {
  FD_SHARED_ARRAY(float, buffer, 31);
  buffer[threadIdx.x] = 1.0f;
  __syncthreads();
  out[threadIdx.x] = buffer[threadIdx.x % 31];
}

// Reads shared memory no thread wrote: the poison (NaN for floats).
__global__ void unwritten_shared_kernel(float* out) {
  FD_SHARED_ARRAY(float, buffer, 32);
  float* dynamic = dynamic_shared_memory<float>();
  out[threadIdx.x] = buffer[threadIdx.x];
  out[32 + threadIdx.x] = dynamic[threadIdx.x];
}

// 49 KB of static shared memory: over the 48 KB a block may declare statically.
__global__ void large_static_kernel(float* out) {
  FD_SHARED_ARRAY(float, big, 49 * 1024 / 4);
  big[threadIdx.x] = 0.0f;
  out[threadIdx.x] = big[threadIdx.x];
}

__global__ void empty_kernel(float* out) { out[0] = 0.0f; }
__global__ void opt_in_kernel(float* out) { out[0] = 0.0f; }

}  // namespace
}  // namespace facedeblur::emulator_selftest

extern "C" {

// Runs self-test `which`; returns the launch's cudaError_t (cudaGetLastError after it).
int emu_selftest(int which, void* out) {
  namespace st = facedeblur::emulator_selftest;
  using facedeblur::launch_kernel;
  auto* f = static_cast<float*>(out);
  switch (which) {
    case 0:
      launch_kernel<st::collectives_kernel>(1, 64, 0, nullptr, static_cast<int64_t*>(out));
      break;
    case 1: launch_kernel<st::divergent_barrier_kernel>(1, 32, 0, nullptr, f); break;
    case 2: launch_kernel<st::missing_lane_kernel>(1, 64, 0, nullptr, f); break;
    case 3: launch_kernel<st::shared_overflow_kernel>(1, 32, 0, nullptr, f); break;
    case 4: launch_kernel<st::unwritten_shared_kernel>(1, 32, 128, nullptr, f); break;
    case 5: launch_kernel<st::large_static_kernel>(1, 32, 0, nullptr, f); break;
    case 6: launch_kernel<st::empty_kernel>(1, 1025, 0, nullptr, f); break;
    case 7: launch_kernel<st::empty_kernel>(dim3(1, 65536), 1, 0, nullptr, f); break;
    case 8: launch_kernel<st::empty_kernel>(1, 1, 49 * 1024, nullptr, f); break;
    case 9: {  // with the opt-in attribute, 49 KB is fine and 228 KB is not
      cudaError_t err = cudaFuncSetAttribute(
          st::opt_in_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 228 * 1024);
      if (err == cudaSuccess) return -1;
      (void)cudaGetLastError();
      err = cudaFuncSetAttribute(st::opt_in_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                 200 * 1024);
      if (err != cudaSuccess) return err;
      launch_kernel<st::opt_in_kernel>(1, 1, 49 * 1024, nullptr, f);
      err = cudaGetLastError();
      if (err != cudaSuccess) return err;
      launch_kernel<st::opt_in_kernel>(1, 1, 201 * 1024, nullptr, f);
      break;
    }
    default: return -1;
  }
  return cudaGetLastError();
}

}  // extern "C"
