// Schemas of the modulated deformable convolution (DCNv2, CFMD-GAN's CADC core) and its
// autocast rules. Kernels: csrc/cpu/modulated_deform_conv_cpu.cpp and
// csrc/cuda/modulated_deform_conv_cuda.cpp; autograd and fake kernels are registered from
// Python (facedeblur_ext/ops/modulated_deform_conv.py).
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include "ops.h"

namespace facedeblur {

void define_modulated_deform_conv(torch::Library& m) {
  // Argument order follows the native op convention (optional tensors after the required
  // ones); the Python wrapper keeps torchvision's order (..., dilation, mask).
  m.def(
      "modulated_deform_conv2d(Tensor input, Tensor offset, Tensor weight, Tensor? bias, "
      "Tensor? mask, int[2] stride, int[2] padding, int[2] dilation) -> Tensor");
  // output_mask selects the gradients to compute, in the order (input, offset, mask, weight,
  // bias); an unselected gradient comes back as an empty tensor. deterministic=True computes
  // the input gradient without floating-point atomics (CUDA; the CPU kernels are always
  // deterministic for a given thread count).
  m.def(
      "modulated_deform_conv2d_backward(Tensor grad_output, Tensor input, Tensor offset, "
      "Tensor weight, Tensor? mask, int[2] stride, int[2] padding, int[2] dilation, "
      "bool[5] output_mask, bool deterministic) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

namespace {

at::Tensor call_forward(const at::Tensor& input, const at::Tensor& offset,
                        const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                        const std::optional<at::Tensor>& mask, c10::IntArrayRef stride,
                        c10::IntArrayRef padding, c10::IntArrayRef dilation) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("facedeblur_ext::modulated_deform_conv2d", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&,
                                         const at::Tensor&, const std::optional<at::Tensor>&,
                                         const std::optional<at::Tensor>&, c10::IntArrayRef,
                                         c10::IntArrayRef, c10::IntArrayRef)>();
  return op.call(input, offset, weight, bias, mask, stride, padding, dilation);
}

// CUDA autocast: run in the autocast dtype (float16 or bfloat16). torchvision's deform_conv2d
// casts to float32 under autocast and so gains nothing from AMP; our CUDA kernels take half
// types directly and accumulate in float32. float64 tensors are left alone (autocast's rule).
at::Tensor forward_autocast_cuda(const at::Tensor& input, const at::Tensor& offset,
                                 const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                 const std::optional<at::Tensor>& mask, c10::IntArrayRef stride,
                                 c10::IntArrayRef padding, c10::IntArrayRef dilation) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::DispatchKey::Autocast);
  const auto dtype = at::autocast::get_autocast_dtype(at::kCUDA);
  const auto device = c10::DeviceType::CUDA;
  return call_forward(at::autocast::cached_cast(dtype, input, device),
                      at::autocast::cached_cast(dtype, offset, device),
                      at::autocast::cached_cast(dtype, weight, device),
                      at::autocast::cached_cast(dtype, bias, device),
                      at::autocast::cached_cast(dtype, mask, device), stride, padding,
                      dilation);
}

// CPU autocast: the CPU kernels compute in float32 or float64, so lower-precision inputs (a
// bfloat16 offset from an autocast conv, say) are cast to float32 rather than rejected.
at::Tensor forward_autocast_cpu(const at::Tensor& input, const at::Tensor& offset,
                                const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                const std::optional<at::Tensor>& mask, c10::IntArrayRef stride,
                                c10::IntArrayRef padding, c10::IntArrayRef dilation) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::DispatchKey::AutocastCPU);
  const auto dtype = at::kFloat;
  const auto device = c10::DeviceType::CPU;
  return call_forward(at::autocast::cached_cast(dtype, input, device),
                      at::autocast::cached_cast(dtype, offset, device),
                      at::autocast::cached_cast(dtype, weight, device),
                      at::autocast::cached_cast(dtype, bias, device),
                      at::autocast::cached_cast(dtype, mask, device), stride, padding,
                      dilation);
}

}  // namespace

}  // namespace facedeblur

TORCH_LIBRARY_IMPL(facedeblur_ext, Autocast, m) {
  m.impl("modulated_deform_conv2d", facedeblur::forward_autocast_cuda);
}

TORCH_LIBRARY_IMPL(facedeblur_ext, AutocastCPU, m) {
  m.impl("modulated_deform_conv2d", facedeblur::forward_autocast_cpu);
}
