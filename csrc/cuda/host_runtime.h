#pragma once
// What the ATen-side CUDA launchers (csrc/cuda/*_cuda.cpp) take from c10's CUDA runtime: the
// device check, the device guard, the current stream, the launch error check and the
// registration block. One switch: a CUDA build gets the c10/cuda pieces; the emulated-launcher
// build (FACEDEBLUR_CUDA_EMULATOR, tests/cuda_emulation.py) gets stand-ins with which the same
// launchers run on CPU tensors, their kernels in the CPU emulator (csrc/cuda_emulator) and their
// GEMMs on the CPU, registered for CPU tensors under the test-only library `facedeblur_emu`.
#include <ATen/core/Tensor.h>
#include <ATen/ops/bmm.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <string>

#ifdef FACEDEBLUR_CUDA_EMULATOR
#include "cuda_emulator/cuda_emulator.h"
#else
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#endif

namespace facedeblur::cuda_host {

#ifdef FACEDEBLUR_CUDA_EMULATOR

extern "C" const char* facedeblur_emulator_message();  // cuda_emulator.cpp

// The emulated "device" is the CPU: its tensors are the kernels' global memory.
inline bool on_kernel_device(const at::Tensor& t) { return t.is_cpu(); }
inline int device_index(const at::Tensor&) { return 0; }

class DeviceGuard {
 public:
  explicit DeviceGuard(c10::Device) {}
};

// The emulator runs a launch to completion before it returns: one stream.
inline cudaStream_t current_stream(int = -1) { return nullptr; }

// What the emulator found (the kernel, the barrier, the limit), for the launch error.
inline std::string launch_detail() { return std::string("; ") + facedeblur_emulator_message(); }

// a @ b of half inputs with float32 output (cuBLAS accumulates in float32); the CPU has no
// bmm.dtype kernel, so the emulated build multiplies float32 copies.
inline at::Tensor bmm_float32_out(const at::Tensor& a, const at::Tensor& b) {
  return at::bmm(a.to(at::kFloat), b.to(at::kFloat));
}

#else

inline bool on_kernel_device(const at::Tensor& t) { return t.is_cuda(); }
inline int device_index(const at::Tensor& t) { return t.get_device(); }

using DeviceGuard = c10::cuda::CUDAGuard;

inline cudaStream_t current_stream(int device = -1) {
  return c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(device)).stream();
}

inline std::string launch_detail() { return {}; }

// a @ b of half inputs with float32 output (cuBLAS accumulates in float32).
inline at::Tensor bmm_float32_out(const at::Tensor& a, const at::Tensor& b) {
  return at::bmm(a, b, at::kFloat);
}

#endif

// Fails the op with the launcher's CUDA error (a bad launch configuration, or an emulator
// check such as a divergent barrier).
inline void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err),
              " (CUDA error ", static_cast<int>(err), ")", launch_detail());
}

}  // namespace facedeblur::cuda_host

// The registration block of a launcher file: the CUDA kernels of facedeblur_ext, or in the
// emulated-launcher build the CPU kernels of its test-only twin library.
#ifdef FACEDEBLUR_CUDA_EMULATOR
#define FACEDEBLUR_CUDA_LAUNCHERS(m) TORCH_LIBRARY_IMPL(facedeblur_emu, CPU, m)
#else
#define FACEDEBLUR_CUDA_LAUNCHERS(m) TORCH_LIBRARY_IMPL(facedeblur_ext, CUDA, m)
#endif
