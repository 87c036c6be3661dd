#pragma once
// CPU emulator of the CUDA subset that the device code in csrc/cuda uses, so that the very
// same *_kernels.cu sources compile with a host C++ compiler and run on the CPU in CI.
//
// How the device code reaches it (no text rewriting of the sources): the emulator build puts
// csrc/cuda_emulator/include first on the include path, where cuda_runtime.h, cuda_fp16.h,
// ... forward to this header, and defines FACEDEBLUR_CUDA_EMULATOR, which switches
// csrc/cuda/launch.cuh (launch_kernel, dynamic_shared_memory, FD_SHARED_ARRAY) to the
// emulator's versions below.
//
// Execution model (see cuda_emulator.cpp): one block at a time; each CUDA thread of the block
// is a fiber with its own stack; __syncthreads, __syncwarp and the warp collectives are the
// points where a fiber yields to the scheduler, which picks the next thread by the schedule
// mode (forward, reverse, seeded random, one warp running ahead to its next barrier) and
// reports divergent barriers, deadlocks and lanes missing from a warp collective as a failed
// launch naming the kernel. Shared memory is a per-block arena filled with 0xff bytes at block
// start (unwritten floats read as NaN) with guard bytes around every variable, checked when
// the block ends. Launch configurations are checked against an H100's limits and errors come
// back through cudaGetLastError, as from a real failed launch. The emulator proves
// correctness only: its speed says nothing about a GPU's.
#ifndef FACEDEBLUR_CUDA_EMULATOR
#define FACEDEBLUR_CUDA_EMULATOR 1
#endif

#include <math.h>  // float overloads of sqrt, floor, ... in the global namespace, as on CUDA

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <source_location>
#include <tuple>
#include <type_traits>
#include <utility>

// ---- CUDA keywords ----
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
// __restrict__ is a GNU C++ keyword already.

// ---- built-in vector types and variables ----
struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
};

// Set by the scheduler before it resumes a thread (one thread runs at a time).
inline uint3 threadIdx{0, 0, 0};
inline uint3 blockIdx{0, 0, 0};
inline dim3 blockDim{1, 1, 1};
inline dim3 gridDim{1, 1, 1};
constexpr int warpSize = 32;

// ---- runtime API subset ----
enum cudaError_t : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInvalidDevice = 101,
  cudaErrorLaunchOutOfResources = 701,
  cudaErrorLaunchFailure = 719,
};
using cudaError = cudaError_t;
struct CUstream_st;
using cudaStream_t = CUstream_st*;
enum cudaDeviceAttr : int {
  cudaDevAttrMaxThreadsPerBlock = 1,
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
};
enum cudaFuncAttribute : int { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };

cudaError_t cudaGetLastError();
cudaError_t cudaPeekAtLastError();
const char* cudaGetErrorString(cudaError_t error);
cudaError_t cudaGetDevice(int* device);
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device);

namespace facedeblur::emulator {
cudaError_t set_func_attribute(const void* kernel, cudaFuncAttribute attr, int value);
}  // namespace facedeblur::emulator

template <typename F>
cudaError_t cudaFuncSetAttribute(F* kernel, cudaFuncAttribute attr, int value) {
  return facedeblur::emulator::set_func_attribute(reinterpret_cast<const void*>(kernel), attr,
                                                  value);
}

// ---- fp16 / bf16 storage types (bit layouts of IEEE binary16 and bfloat16) ----
struct __half {
  uint16_t bits;
};
struct __nv_bfloat16 {
  uint16_t bits;
};

namespace facedeblur::emulator {

// float -> binary16, round to nearest even (subnormals, overflow to Inf, NaN kept quiet).
inline uint16_t float_to_half_bits(float f) {
  uint32_t x;
  std::memcpy(&x, &f, sizeof x);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t abs_x = x & 0x7fffffffu;
  if (abs_x >= 0x7f800000u) return static_cast<uint16_t>(sign | (abs_x > 0x7f800000u ? 0x7e00u : 0x7c00u));
  if (abs_x >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // >= 65520: Inf
  if (abs_x < 0x38800000u) {                                                // below 2^-14
    const int exponent = static_cast<int>(abs_x >> 23);
    if (exponent < 102) return static_cast<uint16_t>(sign);  // below 2^-25: zero
    const uint32_t mantissa = (abs_x & 0x7fffffu) | 0x800000u;
    const int shift = 126 - exponent;
    uint32_t h = mantissa >> shift;
    const uint32_t rest = mantissa & ((1u << shift) - 1u), halfway = 1u << (shift - 1);
    if (rest > halfway || (rest == halfway && (h & 1u))) ++h;
    return static_cast<uint16_t>(sign | h);
  }
  uint32_t h = (abs_x >> 13) - (112u << 10);
  const uint32_t rest = abs_x & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;
  return static_cast<uint16_t>(sign | h);
}

inline float half_bits_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1fu, mantissa = h & 0x3ffu;
  uint32_t x;
  if (exponent == 0) {
    const float v = static_cast<float>(mantissa) * 5.9604644775390625e-8f;  // m * 2^-24, exact
    return sign ? -v : v;
  }
  if (exponent == 31) {
    x = sign | 0x7f800000u | (mantissa << 13);
  } else {
    x = sign | ((exponent + 112u) << 23) | (mantissa << 13);
  }
  float f;
  std::memcpy(&f, &x, sizeof f);
  return f;
}

inline uint16_t float_to_bfloat16_bits(float f) {
  uint32_t x;
  std::memcpy(&x, &f, sizeof x);
  if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((x >> 16) | 0x40u);
  return static_cast<uint16_t>((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

inline float bfloat16_bits_to_float(uint16_t b) {
  const uint32_t x = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &x, sizeof f);
  return f;
}

}  // namespace facedeblur::emulator

inline float __half2float(__half h) { return facedeblur::emulator::half_bits_to_float(h.bits); }
inline __half __float2half_rn(float f) { return {facedeblur::emulator::float_to_half_bits(f)}; }
inline float __bfloat162float(__nv_bfloat16 b) {
  return facedeblur::emulator::bfloat16_bits_to_float(b.bits);
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  return {facedeblur::emulator::float_to_bfloat16_bits(f)};
}

// ---- device math with CUDA's semantics where they differ from <cmath> ----
inline int __popc(unsigned v) { return __builtin_popcount(v); }
// CUDA's floating min/max are fminf/fmaxf: a NaN operand is dropped.
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }
inline double min(double a, double b) { return fmin(a, b); }
inline double max(double a, double b) { return fmax(a, b); }
template <typename T>
  requires std::is_integral_v<T>
inline T min(T a, T b) {
  return a < b ? a : b;
}
template <typename T>
  requires std::is_integral_v<T>
inline T max(T a, T b) {
  return a < b ? b : a;
}

// Atomics: one emulated thread runs at a time, so a plain read-modify-write is atomic.
template <typename T>
inline T atomicAdd(T* address, T value) {
  const T old = *address;
  *address = old + value;
  return old;
}

// ---- synchronisation ----
namespace facedeblur::emulator {

enum class WarpOp : int { kShfl, kShflUp, kShflDown, kShflXor, kBallot, kSyncwarp };

// Blocks the calling thread until every thread of its block that has not exited reaches a
// __syncthreads (all at the same one), then lets the schedule pick who runs next.
void syncthreads(const std::source_location& where);
// Blocks until every lane named in `mask` reaches the same collective with the same mask;
// returns this lane's result (the shuffled value's bits, or the ballot).
uint64_t warp_collective(WarpOp op, unsigned mask, uint64_t value, int arg, int width,
                         const std::source_location& where);
// This thread's lane, 0..31.
int lane_id();

template <typename T>
uint64_t to_bits(T v) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8, "shuffle of a wide type");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  return bits;
}
template <typename T>
T from_bits(uint64_t bits) {
  T v;
  std::memcpy(&v, &bits, sizeof(T));
  return v;
}

}  // namespace facedeblur::emulator

inline void __syncthreads(std::source_location where = std::source_location::current()) {
  facedeblur::emulator::syncthreads(where);
}
inline void __syncwarp(unsigned mask = 0xffffffffu,
                       std::source_location where = std::source_location::current()) {
  facedeblur::emulator::warp_collective(facedeblur::emulator::WarpOp::kSyncwarp, mask, 0, 0, 32,
                                        where);
}
inline unsigned __ballot_sync(unsigned mask, int predicate,
                              std::source_location where = std::source_location::current()) {
  return static_cast<unsigned>(facedeblur::emulator::warp_collective(
      facedeblur::emulator::WarpOp::kBallot, mask, predicate != 0, 0, 32, where));
}
#define FACEDEBLUR_EMULATOR_SHUFFLE(NAME, OP)                                               \
  template <typename T>                                                                     \
  inline T NAME(unsigned mask, T var, int arg, int width = 32,                              \
                std::source_location where = std::source_location::current()) {           \
    namespace emu = facedeblur::emulator;                                                   \
    return emu::from_bits<T>(                                                               \
        emu::warp_collective(emu::WarpOp::OP, mask, emu::to_bits(var), arg, width, where)); \
  }
FACEDEBLUR_EMULATOR_SHUFFLE(__shfl_sync, kShfl)
FACEDEBLUR_EMULATOR_SHUFFLE(__shfl_up_sync, kShflUp)
FACEDEBLUR_EMULATOR_SHUFFLE(__shfl_down_sync, kShflDown)
FACEDEBLUR_EMULATOR_SHUFFLE(__shfl_xor_sync, kShflXor)
#undef FACEDEBLUR_EMULATOR_SHUFFLE

// ---- launches and shared memory ----
namespace facedeblur::emulator {

struct KernelInfo {
  const void* address;  // identifies the kernel (attributes, static shared memory size)
  const char* name;     // for messages: "ns::kernel<float, 2>"
};

// Runs body(params) as the kernel on every thread of every block (or records the launch
// error); errors are read with cudaGetLastError.
void launch(const KernelInfo& kernel, dim3 grid, dim3 block, size_t dynamic_smem,
            void (*body)(void*), void* params);

// The calling thread's view of its block's dynamic shared memory.
void* dynamic_shared_memory();
// The block's `index`-th static shared variable (declaration order of the calling thread),
// allocated by the first thread that reaches its declaration.
void* static_shared_memory(size_t bytes, size_t align, const std::source_location& where);

// "facedeblur::cuda::k<float, 2>" out of __PRETTY_FUNCTION__ of kernel_name<K>.
const char* kernel_name_from_signature(const char* pretty_function);

template <auto Kernel>
const char* kernel_name() {
  static const char* name = kernel_name_from_signature(__PRETTY_FUNCTION__);
  return name;
}

template <typename F>
struct KernelParams;
template <typename... P>
struct KernelParams<void (*)(P...)> {
  using type = std::tuple<std::decay_t<P>...>;
};

}  // namespace facedeblur::emulator

namespace facedeblur {

template <auto Kernel, typename... Args>
inline void launch_kernel(dim3 grid, dim3 block, size_t dynamic_smem, cudaStream_t /*stream*/,
                          Args&&... args) {
  using Params = typename emulator::KernelParams<decltype(Kernel)>::type;
  // Converted to the parameter types once, like a real launch; each thread gets its own copy.
  Params params(std::forward<Args>(args)...);
  struct Body {
    static void run(void* p) {
      Params copy = *static_cast<const Params*>(p);
      std::apply(Kernel, copy);
    }
  };
  emulator::launch({reinterpret_cast<const void*>(Kernel), emulator::kernel_name<Kernel>()},
                   grid, block, dynamic_smem, &Body::run, &params);
}

template <typename T>
inline T* dynamic_shared_memory() {
  return static_cast<T*>(emulator::dynamic_shared_memory());
}

}  // namespace facedeblur

#define FACEDEBLUR_EMULATOR_SHARED_ARRAY(T, name, count)                                      \
  T(&name)[(count)] = *static_cast<T(*)[(count)]>(facedeblur::emulator::static_shared_memory( \
      sizeof(T) * (count), alignof(T), std::source_location::current()))
#define FACEDEBLUR_EMULATOR_SHARED_VAR(T, name)                             \
  T& name = *static_cast<T*>(facedeblur::emulator::static_shared_memory( \
      sizeof(T), alignof(T), std::source_location::current()))
