// Schemas of the blur-synthesis family: kernel generators, the fused blur (with its backward)
// and frame averaging. The CPU and CUDA implementations live in csrc/cpu/blur_cpu.cpp and
// csrc/cuda/blur_cuda.cpp; fake kernels and autograd are registered from Python
// (facedeblur_ext/ops/blur.py).
#include "ops.h"

namespace facedeblur {

void define_blur(torch::Library& m) {
  // Deterministic generators: every random number is an input, drawn by the caller with torch.
  m.def("motion_kernels(Tensor length, Tensor angle, int size, ScalarType dtype) -> Tensor");
  m.def("gaussian_kernels(Tensor sigma, int size, ScalarType dtype) -> Tensor");
  m.def("defocus_kernels(Tensor radius, int size, ScalarType dtype) -> Tensor");
  // params [N, 7] float64 (TrajectoryParams order), step_uniform [N, T - 1], step_normal
  // [N, T - 1, 2].
  m.def(
      "trajectory_kernels(Tensor params, Tensor step_uniform, Tensor step_normal, int size, "
      "int centering, ScalarType dtype) -> Tensor");
  // images [N, C, H, W]; kernels [N, R, Kh, Kw]; weights [N, R, H, W] (R > 1); mask
  // [N, 1, H, W]; noise [N, C, H, W] standard normal with per-sample noise_sigma [N].
  m.def(
      "blur_synthesize(Tensor images, Tensor kernels, Tensor? weights, Tensor? mask, "
      "Tensor? noise, Tensor? noise_sigma, float? crf_gamma, bool quantize, str border) -> Tensor");
  // Gradients for (images, kernels, weights, mask); an entry not asked for in output_mask
  // comes back as an empty tensor.
  m.def(
      "blur_synthesize_backward(Tensor grad, Tensor images, Tensor kernels, Tensor? weights, "
      "Tensor? mask, float? crf_gamma, str border, bool[4] output_mask) -> "
      "(Tensor, Tensor, Tensor, Tensor)");
  // frames [N, T, C, H, W], counts [N] int64 in [1, T].
  m.def("average_frames(Tensor frames, Tensor counts, float? crf_gamma) -> Tensor");
  m.def(
      "average_frames_backward(Tensor grad, Tensor frames, Tensor counts, float? crf_gamma) "
      "-> Tensor");
}

}  // namespace facedeblur
