// ATen side of the CUDA blur ops: argument checks, device guard, outputs and scratch, then
// the raw-pointer launchers of blur_kernels.cu on the current stream.
#include <ATen/core/Tensor.h>
#include <ATen/ops/_assert_async.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <optional>
#include <string>
#include <tuple>

#include "common/blur_args.h"
#include "cuda/host_runtime.h"
#include "cuda/blur_kernels.h"

namespace facedeblur {
namespace {

namespace bc = blur::cuda;
using cuda_host::check_launch;

bc::Dtype to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kByte: return bc::Dtype::kUInt8;
    case at::kHalf: return bc::Dtype::kHalf;
    case at::kBFloat16: return bc::Dtype::kBFloat16;
    case at::kFloat: return bc::Dtype::kFloat;
    case at::kDouble: return bc::Dtype::kDouble;
    default: TORCH_CHECK(false, "blur: unsupported dtype ", t);
  }
}

void check_cuda(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(cuda_host::on_kernel_device(t), op, ": expected ", name, " on a CUDA device, got ",
              t.device());
}

const void* opt_ptr(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr() : nullptr;
}

std::optional<at::Tensor> contig(const std::optional<at::Tensor>& t) {
  return t.has_value() ? std::optional<at::Tensor>(t->contiguous()) : std::nullopt;
}

// The CPU ops raise on counts outside [1, T]; here the check stays on the device (a host check
// would synchronize), and the kernels clamp meanwhile so that nothing reads out of bounds.
void assert_counts_in_range(const at::Tensor& counts, int64_t T, const char* op) {
  at::_assert_async(counts.ge(1).logical_and(counts.le(T)).all(),
                    std::string(op) + ": counts must lie in [1, T]");
}

// Kernel sizes: the generators hold a K x K double accumulator in shared memory.
void check_generator_size(int64_t size, const char* op) {
  TORCH_CHECK(size <= 110, op, ": size ", size, " is above the CUDA limit of 110");
}

at::Tensor motion_kernels_cuda(const at::Tensor& length, const at::Tensor& angle, int64_t size,
                               at::ScalarType dtype) {
  const char* op = "motion_kernels";
  blur::check_generator_args(length, size, dtype, op, "length");
  blur::check_generator_args(angle, size, dtype, op, "angle");
  check_cuda(length, op, "length");
  check_same_device(length, angle, op, "angle");
  TORCH_CHECK(length.size(0) == angle.size(0), op, ": length and angle differ in size");
  check_generator_size(size, op);
  const cuda_host::DeviceGuard guard(length.device());
  const at::Tensor L = length.to(at::kDouble).contiguous(), A = angle.to(at::kDouble).contiguous();
  at::Tensor out = at::empty({L.size(0), size, size}, L.options().dtype(dtype));
  check_launch(bc::launch_motion_kernels(L.data_ptr<double>(), A.data_ptr<double>(), L.size(0),
                                         static_cast<int>(size), out.data_ptr(), to_dtype(dtype),
                                         cuda_host::current_stream()),
               op);
  return out;
}

at::Tensor gaussian_kernels_cuda(const at::Tensor& sigma, int64_t size, at::ScalarType dtype) {
  const char* op = "gaussian_kernels";
  blur::check_generator_args(sigma, size, dtype, op, "sigma");
  check_cuda(sigma, op, "sigma");
  check_generator_size(size, op);
  const cuda_host::DeviceGuard guard(sigma.device());
  const at::Tensor S = sigma.to(at::kDouble).contiguous();
  at::Tensor out = at::empty({S.size(0), size, size}, S.options().dtype(dtype));
  check_launch(bc::launch_gaussian_kernels(S.data_ptr<double>(), S.size(0),
                                           static_cast<int>(size), out.data_ptr(),
                                           to_dtype(dtype), cuda_host::current_stream()),
               op);
  return out;
}

at::Tensor defocus_kernels_cuda(const at::Tensor& radius, int64_t size, at::ScalarType dtype) {
  const char* op = "defocus_kernels";
  blur::check_generator_args(radius, size, dtype, op, "radius");
  check_cuda(radius, op, "radius");
  check_generator_size(size, op);
  const cuda_host::DeviceGuard guard(radius.device());
  const at::Tensor R = radius.to(at::kDouble).contiguous();
  at::Tensor out = at::empty({R.size(0), size, size}, R.options().dtype(dtype));
  check_launch(bc::launch_defocus_kernels(R.data_ptr<double>(), R.size(0),
                                          static_cast<int>(size), out.data_ptr(), to_dtype(dtype),
                                          cuda_host::current_stream()),
               op);
  return out;
}

at::Tensor trajectory_kernels_cuda(const at::Tensor& params, const at::Tensor& step_uniform,
                                   const at::Tensor& step_normal, int64_t size, int64_t centering,
                                   at::ScalarType dtype) {
  const char* op = "trajectory_kernels";
  blur::check_trajectory_args(params, step_uniform, step_normal, size, centering, dtype);
  check_cuda(params, op, "params");
  check_generator_size(size, op);
  const cuda_host::DeviceGuard guard(params.device());
  const at::Tensor P = params.contiguous(), U = step_uniform.contiguous(),
                   G = step_normal.contiguous();
  const int64_t N = P.size(0), T = U.size(1) + 1;
  at::Tensor out = at::empty({N, size, size}, P.options().dtype(dtype));
  // The walks' positions are scratch: bound it to 64 MiB by generating in chunks.
  const int64_t chunk = std::max<int64_t>(1, (int64_t{64} << 20) / (16 * T));
  at::Tensor positions = at::empty({std::min(N, chunk), 2, T}, P.options());
  const int64_t rand_elem = U.element_size();
  for (int64_t begin = 0; begin < N; begin += chunk) {
    const int64_t count = std::min(chunk, N - begin);
    check_launch(bc::launch_trajectory_kernels(
                     P.data_ptr<double>() + begin * blur::kTrajectoryParamCount,
                     static_cast<const char*>(U.data_ptr()) + begin * (T - 1) * rand_elem,
                     static_cast<const char*>(G.data_ptr()) + begin * (T - 1) * 2 * rand_elem,
                     U.scalar_type() == at::kDouble, count, T, static_cast<int>(size),
                     static_cast<int>(centering), positions.data_ptr<double>(),
                     static_cast<char*>(out.data_ptr()) + begin * size * size * out.element_size(),
                     to_dtype(dtype), cuda_host::current_stream()),
                 op);
  }
  return out;
}

bc::BlurShape blur_shape(const at::Tensor& images, const at::Tensor& kernels, int border) {
  bc::BlurShape s;
  s.N = images.size(0);
  s.C = images.size(1);
  s.H = images.size(2);
  s.W = images.size(3);
  s.R = kernels.size(1);
  s.Kh = kernels.size(2);
  s.Kw = kernels.size(3);
  s.border = border;
  return s;
}

// The tile kernels stage a halo of the image in shared memory and have no fallback, so kernels
// too large for the device's per-block limit are refused with a clear message before launch.
void check_tile_fits(const bc::BlurShape& s, bc::Dtype dtype, const char* op) {
  const size_t need = bc::blur_tile_smem_bytes(s, dtype);
  size_t limit = 0;
  check_launch(bc::device_smem_limit(&limit), op);
  TORCH_CHECK(need <= limit, op, ": a ", s.Kh, "x", s.Kw, " kernel needs ", need,
              " bytes of shared memory per block on CUDA, above this device's limit of ", limit,
              "; use smaller kernels, float32 instead of float64, or the CPU");
}

at::Tensor tap_scratch(const bc::BlurShape& s, const at::Tensor& like) {
  const size_t bytes = bc::blur_tap_bytes(s, like.scalar_type() == at::kDouble);
  return at::empty({static_cast<int64_t>(bytes)}, like.options().dtype(at::kByte));
}

at::Tensor blur_synthesize_cuda(const at::Tensor& images_in, const at::Tensor& kernels_in,
                                const std::optional<at::Tensor>& weights_in,
                                const std::optional<at::Tensor>& mask_in,
                                const std::optional<at::Tensor>& noise_in,
                                const std::optional<at::Tensor>& noise_sigma_in,
                                std::optional<double> crf_gamma, bool quantize,
                                c10::string_view border_name) {
  const char* op = "blur_synthesize";
  const int border = blur::check_blur_args(images_in, kernels_in, weights_in, mask_in, crf_gamma,
                                           border_name, op);
  blur::check_noise_args(images_in, noise_in, noise_sigma_in, op);
  check_cuda(images_in, op, "images");
  const cuda_host::DeviceGuard guard(images_in.device());
  const at::Tensor images = images_in.contiguous(), kernels = kernels_in.contiguous();
  const auto weights = contig(weights_in), mask = contig(mask_in), noise = contig(noise_in),
             noise_sigma = contig(noise_sigma_in);
  at::Tensor out = at::empty_like(images, at::MemoryFormat::Contiguous);
  const bc::BlurShape s = blur_shape(images, kernels, border);
  check_tile_fits(s, to_dtype(images.scalar_type()), op);
  at::Tensor taps = tap_scratch(s, kernels);
  at::Tensor counts = at::empty({s.N * s.R}, images.options().dtype(at::kInt));
  bc::BlurForwardArgs a{};
  a.images = images.data_ptr();
  a.out = out.data_ptr();
  a.dtype = to_dtype(images.scalar_type());
  a.kernels = kernels.data_ptr();
  a.weights = opt_ptr(weights);
  a.mask = opt_ptr(mask);
  a.noise = opt_ptr(noise);
  a.noise_sigma = opt_ptr(noise_sigma);
  a.crf = crf_gamma.has_value();
  a.gamma = crf_gamma.value_or(1.0);
  a.quantize = quantize;
  a.taps = taps.data_ptr();
  a.tap_counts = counts.data_ptr<int>();
  check_launch(bc::launch_blur_forward(s, a, cuda_host::current_stream()), op);
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> blur_synthesize_backward_cuda(
    const at::Tensor& grad_in, const at::Tensor& images_in, const at::Tensor& kernels_in,
    const std::optional<at::Tensor>& weights_in, const std::optional<at::Tensor>& mask_in,
    std::optional<double> crf_gamma, c10::string_view border_name, std::array<bool, 4> need) {
  const char* op = "blur_synthesize_backward";
  const int border = blur::check_blur_args(images_in, kernels_in, weights_in, mask_in, crf_gamma,
                                           border_name, op);
  TORCH_CHECK(images_in.scalar_type() != at::kByte, op, ": uint8 images are not differentiable");
  TORCH_CHECK(grad_in.sizes() == images_in.sizes() &&
                  grad_in.scalar_type() == images_in.scalar_type(),
              op, ": grad must match images in shape and dtype");
  check_cuda(images_in, op, "images");
  check_same_device(images_in, grad_in, op, "grad");
  const cuda_host::DeviceGuard guard(images_in.device());
  const at::Tensor grad = grad_in.contiguous(), images = images_in.contiguous(),
                   kernels = kernels_in.contiguous();
  const auto weights = contig(weights_in), mask = contig(mask_in);
  const bc::BlurShape s = blur_shape(images, kernels, border);
  check_tile_fits(s, to_dtype(images.scalar_type()), op);
  const auto opts = kernels.options();
  const at::Tensor none = at::empty({0}, opts);
  at::Tensor grad_images = need[0] ? at::empty_like(images) : at::empty({0}, images.options());
  at::Tensor grad_kernels = need[1] ? at::empty_like(kernels) : none;
  at::Tensor grad_weights = need[2] ? at::zeros({s.N, s.R, s.H, s.W}, opts) : none;
  at::Tensor grad_mask = need[3] ? at::zeros({s.N, 1, s.H, s.W}, opts) : none;
  at::Tensor taps = tap_scratch(s, kernels);
  at::Tensor counts = at::empty({s.N * s.R}, images.options().dtype(at::kInt));
  at::Tensor lin = need[1] ? at::empty({s.N, s.C, s.H, s.W}, opts) : none;
  at::Tensor hw = need[0] || need[1] ? at::empty({s.N, s.R, s.C, s.H, s.W}, opts) : none;
  at::Tensor direct = need[0] && mask ? at::empty({s.N, s.C, s.H, s.W}, opts) : none;
  at::Tensor grad_padded =
      need[0] ? at::empty({s.N, s.C, s.H + s.Kh - 1, s.W + s.Kw - 1}, opts) : none;
  bc::BlurBackwardArgs a{};
  a.grad = grad.data_ptr();
  a.images = images.data_ptr();
  a.dtype = to_dtype(images.scalar_type());
  a.kernels = kernels.data_ptr();
  a.weights = opt_ptr(weights);
  a.mask = opt_ptr(mask);
  a.crf = crf_gamma.has_value();
  a.gamma = crf_gamma.value_or(1.0);
  a.grad_images = need[0] ? grad_images.data_ptr() : nullptr;
  a.grad_kernels = need[1] ? grad_kernels.data_ptr() : nullptr;
  a.grad_weights = need[2] ? grad_weights.data_ptr() : nullptr;
  a.grad_mask = need[3] ? grad_mask.data_ptr() : nullptr;
  a.taps = taps.data_ptr();
  a.tap_counts = counts.data_ptr<int>();
  a.lin = lin.numel() ? lin.data_ptr() : nullptr;
  a.hw = hw.numel() ? hw.data_ptr() : nullptr;
  a.direct = direct.numel() ? direct.data_ptr() : nullptr;
  a.grad_padded = grad_padded.numel() ? grad_padded.data_ptr() : nullptr;
  check_launch(bc::launch_blur_backward(s, a, cuda_host::current_stream()), op);
  return {grad_images, grad_kernels, grad_weights, grad_mask};
}

at::Tensor average_frames_cuda(const at::Tensor& frames_in, const at::Tensor& counts_in,
                               std::optional<double> crf_gamma) {
  const char* op = "average_frames";
  blur::check_frames_args(frames_in, counts_in, crf_gamma, op);
  check_cuda(frames_in, op, "frames");
  const cuda_host::DeviceGuard guard(frames_in.device());
  const at::Tensor frames = frames_in.contiguous(), counts = counts_in.contiguous();
  const int64_t N = frames.size(0), T = frames.size(1);
  const int64_t P = frames.size(2) * frames.size(3) * frames.size(4);
  assert_counts_in_range(counts, T, op);
  at::Tensor out = at::empty({N, frames.size(2), frames.size(3), frames.size(4)}, frames.options());
  check_launch(bc::launch_average_frames(frames.data_ptr(), counts.data_ptr<int64_t>(), N, T, P,
                                         to_dtype(frames.scalar_type()), crf_gamma.has_value(),
                                         crf_gamma.value_or(1.0), out.data_ptr(),
                                         cuda_host::current_stream()),
               op);
  return out;
}

at::Tensor average_frames_backward_cuda(const at::Tensor& grad_in, const at::Tensor& frames_in,
                                        const at::Tensor& counts_in,
                                        std::optional<double> crf_gamma) {
  const char* op = "average_frames_backward";
  blur::check_frames_args(frames_in, counts_in, crf_gamma, op);
  TORCH_CHECK(frames_in.scalar_type() != at::kByte, op, ": uint8 frames are not differentiable");
  check_cuda(frames_in, op, "frames");
  check_same_device(frames_in, grad_in, op, "grad");
  const cuda_host::DeviceGuard guard(frames_in.device());
  const at::Tensor frames = frames_in.contiguous(), counts = counts_in.contiguous(),
                   grad = grad_in.contiguous();
  const int64_t N = frames.size(0), T = frames.size(1);
  const int64_t P = frames.size(2) * frames.size(3) * frames.size(4);
  TORCH_CHECK(grad.numel() == N * P && grad.scalar_type() == frames.scalar_type(), op,
              ": grad must have shape [N, C, H, W] and the dtype of frames");
  assert_counts_in_range(counts, T, op);
  at::Tensor out = at::empty_like(frames);
  check_launch(bc::launch_average_frames_backward(
                   grad.data_ptr(), frames.data_ptr(), counts.data_ptr<int64_t>(), N, T, P,
                   to_dtype(frames.scalar_type()), crf_gamma.has_value(), crf_gamma.value_or(1.0),
                   out.data_ptr(), cuda_host::current_stream()),
               op);
  return out;
}

}  // namespace

FACEDEBLUR_CUDA_LAUNCHERS(m) {
  m.impl("motion_kernels", &motion_kernels_cuda);
  m.impl("gaussian_kernels", &gaussian_kernels_cuda);
  m.impl("defocus_kernels", &defocus_kernels_cuda);
  m.impl("trajectory_kernels", &trajectory_kernels_cuda);
  m.impl("blur_synthesize", &blur_synthesize_cuda);
  m.impl("blur_synthesize_backward", &blur_synthesize_backward_cuda);
  m.impl("average_frames", &average_frames_cuda);
  m.impl("average_frames_backward", &average_frames_backward_cuda);
}

}  // namespace facedeblur
