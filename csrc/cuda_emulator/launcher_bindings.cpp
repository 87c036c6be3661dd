// C entry points over every raw-pointer launcher of csrc/cuda/*_kernels.h, for the emulator
// tests (tests/cuda_emulation.py loads the library with ctypes and passes tensor data
// pointers). Structs are passed flattened so that Python does not mirror their layouts. Each
// entry point returns the launcher's cudaError_t as an int.
#include <cstdint>

#include "cuda/blur_kernels.h"
#include "cuda/modulated_deform_conv_kernels.h"
#include "cuda/separable_norm_kernels.h"

namespace {

namespace bc = facedeblur::blur::cuda;
namespace mdc = facedeblur::cuda;
namespace sn = facedeblur::cuda::snorm;

// shape: N, C, H, W, R, Kh, Kw
bc::BlurShape blur_shape(const int64_t* shape, int border) {
  bc::BlurShape s;
  s.N = shape[0];
  s.C = shape[1];
  s.H = shape[2];
  s.W = shape[3];
  s.R = shape[4];
  s.Kh = shape[5];
  s.Kw = shape[6];
  s.border = border;
  return s;
}

// shape: channels, height, width, kernel_h, kernel_w, offset_groups, stride_h, stride_w,
// pad_h, pad_w, dil_h, dil_w, out_h, out_w
mdc::MdcShape mdc_shape(const int64_t* v) {
  return {v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7], v[8], v[9], v[10], v[11], v[12], v[13]};
}

mdc::MdcTile mdc_tile(const int64_t* v) { return {v[0], v[1], v[2], v[3]}; }

mdc::MdcInputs mdc_inputs(const void* input, const void* offset, const int64_t* offset_stride,
                          const void* mask, const int64_t* mask_stride) {
  mdc::MdcInputs in{};
  in.input = input;
  in.offset = offset;
  in.mask = mask;
  for (int d = 0; d < 4; ++d) {
    in.offset_stride[d] = offset_stride[d];
    in.mask_stride[d] = mask != nullptr ? mask_stride[d] : 0;
  }
  return in;
}

// shape: N, C, R, P, channels_last
sn::Shape snorm_shape(const int64_t* v) {
  sn::Shape s;
  s.N = v[0];
  s.C = v[1];
  s.R = v[2];
  s.P = v[3];
  s.channels_last = v[4] != 0;
  return s;
}

// affine: data pointer, then stride_n, stride_c, stride_p
sn::Affine snorm_affine(const void* data, const int64_t* strides) {
  sn::Affine a;
  a.data = data;
  if (data != nullptr) {
    a.stride_n = strides[0];
    a.stride_c = strides[1];
    a.stride_p = strides[2];
  }
  return a;
}

}  // namespace

extern "C" {

// ---- blur ----

int emu_motion_kernels(const double* length, const double* angle, int64_t n, int size, void* out,
                       int dtype) {
  return bc::launch_motion_kernels(length, angle, n, size, out, static_cast<bc::Dtype>(dtype),
                                   nullptr);
}

int emu_gaussian_kernels(const double* sigma, int64_t n, int size, void* out, int dtype) {
  return bc::launch_gaussian_kernels(sigma, n, size, out, static_cast<bc::Dtype>(dtype), nullptr);
}

int emu_defocus_kernels(const double* radius, int64_t n, int size, void* out, int dtype) {
  return bc::launch_defocus_kernels(radius, n, size, out, static_cast<bc::Dtype>(dtype), nullptr);
}

int emu_trajectory_kernels(const double* params, const void* step_uniform,
                           const void* step_normal, int rand_is_double, int64_t n, int64_t T,
                           int size, int centering, double* positions, void* out, int dtype) {
  return bc::launch_trajectory_kernels(params, step_uniform, step_normal, rand_is_double != 0, n,
                                       T, size, centering, positions, out,
                                       static_cast<bc::Dtype>(dtype), nullptr);
}

int64_t emu_blur_tap_bytes(const int64_t* shape, int is_double) {
  return static_cast<int64_t>(bc::blur_tap_bytes(blur_shape(shape, 0), is_double != 0));
}

int64_t emu_blur_tile_smem_bytes(const int64_t* shape, int dtype) {
  return static_cast<int64_t>(
      bc::blur_tile_smem_bytes(blur_shape(shape, 0), static_cast<bc::Dtype>(dtype)));
}

int emu_device_smem_limit(int64_t* bytes) {
  size_t limit = 0;
  const cudaError_t err = bc::device_smem_limit(&limit);
  *bytes = static_cast<int64_t>(limit);
  return err;
}

int emu_blur_forward(const int64_t* shape, int border, const void* images, void* out, int dtype,
                     const void* kernels, const void* weights, const void* mask,
                     const void* noise, const void* noise_sigma, int crf, double gamma,
                     int quantize, void* taps, int* tap_counts) {
  bc::BlurForwardArgs a{};
  a.images = images;
  a.out = out;
  a.dtype = static_cast<bc::Dtype>(dtype);
  a.kernels = kernels;
  a.weights = weights;
  a.mask = mask;
  a.noise = noise;
  a.noise_sigma = noise_sigma;
  a.crf = crf != 0;
  a.gamma = gamma;
  a.quantize = quantize != 0;
  a.taps = taps;
  a.tap_counts = tap_counts;
  return bc::launch_blur_forward(blur_shape(shape, border), a, nullptr);
}

int emu_blur_backward(const int64_t* shape, int border, const void* grad, const void* images,
                      int dtype, const void* kernels, const void* weights, const void* mask,
                      int crf, double gamma, void* grad_images, void* grad_kernels,
                      void* grad_weights, void* grad_mask, void* taps, int* tap_counts, void* lin,
                      void* hw, void* direct, void* grad_padded) {
  bc::BlurBackwardArgs a{};
  a.grad = grad;
  a.images = images;
  a.dtype = static_cast<bc::Dtype>(dtype);
  a.kernels = kernels;
  a.weights = weights;
  a.mask = mask;
  a.crf = crf != 0;
  a.gamma = gamma;
  a.grad_images = grad_images;
  a.grad_kernels = grad_kernels;
  a.grad_weights = grad_weights;
  a.grad_mask = grad_mask;
  a.taps = taps;
  a.tap_counts = tap_counts;
  a.lin = lin;
  a.hw = hw;
  a.direct = direct;
  a.grad_padded = grad_padded;
  return bc::launch_blur_backward(blur_shape(shape, border), a, nullptr);
}

int emu_average_frames(const void* frames, const int64_t* counts, int64_t N, int64_t T,
                       int64_t P, int dtype, int crf, double gamma, void* out) {
  return bc::launch_average_frames(frames, counts, N, T, P, static_cast<bc::Dtype>(dtype),
                                   crf != 0, gamma, out, nullptr);
}

int emu_average_frames_backward(const void* grad, const void* frames, const int64_t* counts,
                                int64_t N, int64_t T, int64_t P, int dtype, int crf,
                                double gamma, void* grad_frames) {
  return bc::launch_average_frames_backward(grad, frames, counts, N, T, P,
                                            static_cast<bc::Dtype>(dtype), crf != 0, gamma,
                                            grad_frames, nullptr);
}

// ---- modulated deformable convolution ----

int emu_mdc_gather_columns(int dtype, const int64_t* shape, const void* input,
                           const void* offset, const int64_t* offset_stride, const void* mask,
                           const int64_t* mask_stride, const int64_t* tile, void* columns) {
  return mdc::launch_mdc_gather_columns(static_cast<mdc::MdcDtype>(dtype), mdc_shape(shape),
                                        mdc_inputs(input, offset, offset_stride, mask,
                                                   mask_stride),
                                        mdc_tile(tile), columns, nullptr);
}

int emu_mdc_backward_samples(int dtype, const int64_t* shape, const void* input,
                             const void* offset, const int64_t* offset_stride, const void* mask,
                             const int64_t* mask_stride, const int64_t* tile,
                             const void* grad_columns, void* grad_input_acc, void* grad_offset,
                             const int64_t* grad_offset_stride, void* grad_mask,
                             const int64_t* grad_mask_stride, void* columns,
                             int atomic_input_grad) {
  mdc::MdcBackwardOutputs out{};
  out.grad_input_acc = grad_input_acc;
  out.grad_offset = grad_offset;
  out.grad_mask = grad_mask;
  out.columns = columns;
  for (int d = 0; d < 4; ++d) {
    out.grad_offset_stride[d] = grad_offset != nullptr ? grad_offset_stride[d] : 0;
    out.grad_mask_stride[d] = grad_mask != nullptr ? grad_mask_stride[d] : 0;
  }
  return mdc::launch_mdc_backward_samples(
      static_cast<mdc::MdcDtype>(dtype), mdc_shape(shape),
      mdc_inputs(input, offset, offset_stride, mask, mask_stride), mdc_tile(tile), grad_columns,
      out, atomic_input_grad != 0, nullptr);
}

int64_t emu_mdc_entry_count(const int64_t* shape, const int64_t* tile) {
  return mdc::mdc_entry_count(mdc_shape(shape), mdc_tile(tile));
}

int64_t emu_mdc_key_count(const int64_t* shape, const int64_t* tile) {
  return mdc::mdc_key_count(mdc_shape(shape), mdc_tile(tile));
}

int emu_mdc_scatter_keys(int dtype, const int64_t* shape, const void* input, const void* offset,
                         const int64_t* offset_stride, const void* mask,
                         const int64_t* mask_stride, const int64_t* tile, int64_t* keys,
                         void* weights) {
  return mdc::launch_mdc_scatter_keys(static_cast<mdc::MdcDtype>(dtype), mdc_shape(shape),
                                      mdc_inputs(input, offset, offset_stride, mask,
                                                 mask_stride),
                                      mdc_tile(tile), keys, weights, nullptr);
}

int emu_mdc_segment_starts(const int64_t* sorted_keys, int64_t entries, int64_t key_count,
                           int64_t* starts) {
  return mdc::launch_mdc_segment_starts(sorted_keys, entries, key_count, starts, nullptr);
}

int emu_mdc_gather_input_grad(int dtype, const int64_t* shape, const int64_t* tile,
                              const int64_t* starts, const int64_t* permutation,
                              const void* weights, const void* grad_columns,
                              void* grad_input_acc) {
  return mdc::launch_mdc_gather_input_grad(static_cast<mdc::MdcDtype>(dtype), mdc_shape(shape),
                                           mdc_tile(tile), starts, permutation, weights,
                                           grad_columns, grad_input_acc, nullptr);
}

// ---- separable normalization ----

int64_t emu_snorm_forward_workspace_bytes(const int64_t* shape, int dtype) {
  return static_cast<int64_t>(
      sn::forward_workspace_bytes(snorm_shape(shape), static_cast<sn::Dtype>(dtype), 0));
}

int64_t emu_snorm_backward_workspace_bytes(const int64_t* shape, int dtype, int want_grad_masks) {
  return static_cast<int64_t>(sn::backward_workspace_bytes(
      snorm_shape(shape), static_cast<sn::Dtype>(dtype), want_grad_masks != 0, 0));
}

int emu_snorm_forward(const int64_t* shape, int dtype, const void* x, const void* masks,
                      const void* gamma, const int64_t* gamma_strides, const void* beta,
                      const int64_t* beta_strides, double eps, void* out, void* mean, void* rstd,
                      void* workspace) {
  sn::ForwardArgs a;
  a.x = x;
  a.masks = masks;
  a.gamma = snorm_affine(gamma, gamma_strides);
  a.beta = snorm_affine(beta, beta_strides);
  a.eps = eps;
  a.out = out;
  a.mean = mean;
  a.rstd = rstd;
  return sn::forward(snorm_shape(shape), static_cast<sn::Dtype>(dtype), a, workspace, 0, nullptr);
}

int emu_snorm_backward(const int64_t* shape, int dtype, const void* grad_out, const void* x,
                       const void* masks, const void* gamma, const int64_t* gamma_strides,
                       const void* mean, const void* rstd, double eps, void* grad_x,
                       void* grad_masks, void* grad_gamma_full, void* grad_beta_full,
                       void* gamma_plane_sums, void* beta_plane_sums, void* workspace) {
  sn::BackwardArgs a;
  a.grad_out = grad_out;
  a.x = x;
  a.masks = masks;
  a.gamma = snorm_affine(gamma, gamma_strides);
  a.mean = mean;
  a.rstd = rstd;
  a.eps = eps;
  a.grad_x = grad_x;
  a.grad_masks = grad_masks;
  a.grad_gamma_full = grad_gamma_full;
  a.grad_beta_full = grad_beta_full;
  a.gamma_plane_sums = gamma_plane_sums;
  a.beta_plane_sums = beta_plane_sums;
  return sn::backward(snorm_shape(shape), static_cast<sn::Dtype>(dtype), a, workspace, 0,
                      nullptr);
}

}  // extern "C"
