#pragma once
// Argument validation of the blur ops, shared by the CPU and CUDA launchers. The Python
// wrappers check the same things first with friendlier messages; these checks keep a direct
// torch.ops call from reading out of bounds.
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <array>
#include <optional>

#include "common/blur_math.h"
#include "common/checks.h"

namespace facedeblur::blur {

inline int parse_border(c10::string_view border) {
  if (border == "reflect") return kReflect;
  if (border == "replicate") return kReplicate;
  if (border == "zeros") return kZeros;
  if (border == "circular") return kCircular;
  TORCH_CHECK(false, "blur_synthesize: border must be one of 'reflect', 'replicate', 'zeros', ",
              "'circular', got '", std::string(border), "'");
}

// float64 images are processed in double, every other dtype (uint8, half, bfloat16, float32)
// in float; kernels, weights, mask and noise come in that dtype.
inline at::ScalarType blur_compute_dtype(at::ScalarType image_dtype) {
  return image_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_image_dtype(const at::Tensor& t, const char* op, const char* name) {
  check_dtype_in(t, {at::kByte, at::kHalf, at::kBFloat16, at::kFloat, at::kDouble}, op, name);
}

inline void check_optional_map(const std::optional<at::Tensor>& t, const at::Tensor& images,
                               int64_t channels, at::ScalarType dtype, const char* op,
                               const char* name) {
  if (!t.has_value()) return;
  check_dim(*t, 4, op, name);
  check_same_device(images, *t, op, name);
  TORCH_CHECK(t->size(0) == images.size(0) && t->size(1) == channels &&
                  t->size(2) == images.size(2) && t->size(3) == images.size(3),
              op, ": expected ", name, " of shape [", images.size(0), ", ", channels, ", ",
              images.size(2), ", ", images.size(3), "], got ", t->sizes());
  TORCH_CHECK(t->scalar_type() == dtype, op, ": expected ", name, " of dtype ", dtype, ", got ",
              t->scalar_type());
}

// Checks of blur_synthesize and its backward; returns the border code.
inline int check_blur_args(const at::Tensor& images, const at::Tensor& kernels,
                           const std::optional<at::Tensor>& weights,
                           const std::optional<at::Tensor>& mask,
                           const std::optional<double>& crf_gamma, c10::string_view border,
                           const char* op) {
  check_dim(images, 4, op, "images");
  check_image_dtype(images, op, "images");
  TORCH_CHECK(images.numel() > 0, op, ": images must not be empty, got shape ", images.sizes());
  check_dim(kernels, 4, op, "kernels");
  check_same_device(images, kernels, op, "kernels");
  const auto dtype = blur_compute_dtype(images.scalar_type());
  TORCH_CHECK(kernels.scalar_type() == dtype, op, ": expected kernels of dtype ", dtype,
              " for ", images.scalar_type(), " images, got ", kernels.scalar_type());
  TORCH_CHECK(kernels.size(0) == images.size(0) && kernels.size(1) >= 1 &&
                  kernels.size(2) >= 1 && kernels.size(3) >= 1,
              op, ": expected kernels of shape [", images.size(0), ", R, Kh, Kw], got ",
              kernels.sizes());
  TORCH_CHECK(kernels.size(1) == 1 || weights.has_value(), op, ": ", kernels.size(1),
              " kernels per sample need weight maps [N, R, H, W]");
  check_optional_map(weights, images, kernels.size(1), dtype, op, "weights");
  check_optional_map(mask, images, 1, dtype, op, "mask");
  TORCH_CHECK(!crf_gamma.has_value() || *crf_gamma > 0, op, ": crf_gamma must be positive, got ",
              crf_gamma.value_or(0.0));
  return parse_border(border);
}

inline void check_noise_args(const at::Tensor& images, const std::optional<at::Tensor>& noise,
                             const std::optional<at::Tensor>& noise_sigma, const char* op) {
  TORCH_CHECK(noise.has_value() == noise_sigma.has_value(), op,
              ": noise and noise_sigma come together");
  if (!noise.has_value()) return;
  const auto dtype = blur_compute_dtype(images.scalar_type());
  check_optional_map(noise, images, images.size(1), dtype, op, "noise");
  check_same_device(images, *noise_sigma, op, "noise_sigma");
  TORCH_CHECK(noise_sigma->dim() == 1 && noise_sigma->size(0) == images.size(0), op,
              ": expected noise_sigma of shape [", images.size(0), "], got ", noise_sigma->sizes());
  TORCH_CHECK(noise_sigma->scalar_type() == dtype, op, ": expected noise_sigma of dtype ", dtype);
}

inline void check_frames_args(const at::Tensor& frames, const at::Tensor& counts,
                              const std::optional<double>& crf_gamma, const char* op) {
  check_dim(frames, 5, op, "frames");
  check_image_dtype(frames, op, "frames");
  TORCH_CHECK(frames.numel() > 0, op, ": frames must not be empty, got shape ", frames.sizes());
  check_same_device(frames, counts, op, "counts");
  TORCH_CHECK(counts.dim() == 1 && counts.size(0) == frames.size(0) &&
                  counts.scalar_type() == at::kLong,
              op, ": expected counts int64 of shape [", frames.size(0), "], got ",
              counts.scalar_type(), " ", counts.sizes());
  TORCH_CHECK(!crf_gamma.has_value() || *crf_gamma > 0, op, ": crf_gamma must be positive");
}

inline void check_generator_args(const at::Tensor& values, int64_t size, at::ScalarType dtype,
                                 const char* op, const char* name) {
  TORCH_CHECK(values.dim() == 1, op, ": expected ", name, " of shape [N], got ", values.sizes());
  TORCH_CHECK(at::isFloatingType(values.scalar_type()), op, ": ", name,
              " must be floating point, got ", values.scalar_type());
  TORCH_CHECK(size >= 1, op, ": size must be at least 1, got ", size);
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf ||
                  dtype == at::kBFloat16,
              op, ": dtype must be a floating dtype, got ", dtype);
}

inline void check_trajectory_args(const at::Tensor& params, const at::Tensor& step_uniform,
                                  const at::Tensor& step_normal, int64_t size, int64_t centering,
                                  at::ScalarType dtype) {
  const char* op = "trajectory_kernels";
  TORCH_CHECK(params.dim() == 2 && params.size(1) == kTrajectoryParamCount &&
                  params.scalar_type() == at::kDouble,
              op, ": expected params float64 of shape [N, ", kTrajectoryParamCount, "], got ",
              params.scalar_type(), " ", params.sizes());
  TORCH_CHECK(step_uniform.dim() == 2 && step_uniform.size(0) == params.size(0), op,
              ": expected step_uniform of shape [N, T - 1], got ", step_uniform.sizes());
  TORCH_CHECK(step_normal.dim() == 3 && step_normal.size(0) == params.size(0) &&
                  step_normal.size(1) == step_uniform.size(1) && step_normal.size(2) == 2,
              op, ": expected step_normal of shape [N, T - 1, 2], got ", step_normal.sizes());
  for (const at::Tensor* t : {&step_uniform, &step_normal}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat || t->scalar_type() == at::kDouble, op,
                ": step random numbers must be float32 or float64");
    check_same_device(params, *t, op, "step random numbers");
  }
  TORCH_CHECK(step_uniform.scalar_type() == step_normal.scalar_type(), op,
              ": step_uniform and step_normal must have the same dtype");
  TORCH_CHECK(size >= 1, op, ": size must be at least 1, got ", size);
  TORCH_CHECK(centering == kCenterBox || centering == kCenterMass, op,
              ": centering must be 0 (bounding box) or 1 (centre of mass)");
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf ||
                  dtype == at::kBFloat16,
              op, ": dtype must be a floating dtype, got ", dtype);
}

}  // namespace facedeblur::blur
