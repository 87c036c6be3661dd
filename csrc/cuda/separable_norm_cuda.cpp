// ATen side of the CUDA separable normalization: argument checks, output and workspace
// allocation on the current stream, and the launch of the kernels in separable_norm_kernels.cu.
// x and grad_out are processed in their own layout (NCHW or channels_last, no transpose).
#include <ATen/ExpandUtils.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <optional>
#include <tuple>

#include "common/checks.h"
#include "common/separable_norm.h"
#include "cuda/host_runtime.h"
#include "cuda/separable_norm_kernels.h"

namespace facedeblur::snorm {
namespace {

namespace kern = facedeblur::cuda::snorm;
using cuda_host::check_launch;

constexpr int64_t kMaxBatch = 65535;  // the batch is a grid dimension of the backward kernels

kern::Dtype kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return kern::Dtype::kFloat32;
    case at::kHalf:
      return kern::Dtype::kFloat16;
    case at::kBFloat16:
      return kern::Dtype::kBFloat16;
    case at::kDouble:
      return kern::Dtype::kFloat64;
    default:
      TORCH_CHECK(false, "separable_norm: unsupported dtype ", t);
  }
}

kern::Affine kernel_affine(const AffineArg& a) {
  kern::Affine k;
  if (!a.defined) return k;
  k.data = a.tensor.const_data_ptr();
  k.stride_n = a.stride_n;
  k.stride_c = a.stride_c;
  k.stride_p = a.stride_p;
  return k;
}

void check_cuda_input(const char* op, const at::Tensor& x, const Prepared& p) {
  TORCH_CHECK(p.R <= kern::kMaxRegions, op, ": at most ", kern::kMaxRegions,
              " regions on CUDA, got ", p.R);
  TORCH_CHECK(p.N <= kMaxBatch, op, ": at most ", kMaxBatch, " samples on CUDA, got ", p.N);
  // Other grid limits (N * C and H * W / 32 below 2^31, C below 2M) are far beyond feature maps
  // that fit in memory; the launcher refuses them with cudaErrorInvalidValue.
}

void check_dtype(const char* op, const at::Tensor& x) {
  TORCH_CHECK(cuda_host::on_kernel_device(x), op, ": expected x on a CUDA device, got ",
              x.device());
  check_dtype_in(x, {at::kFloat, at::kHalf, at::kBFloat16, at::kDouble}, op, "x");
}

at::Tensor workspace(size_t bytes, const at::Tensor& like) {
  return at::empty({static_cast<int64_t>(std::max<size_t>(bytes, 1))},
                   like.options().dtype(at::kByte));
}

kern::Shape kernel_shape(const Prepared& p) {
  kern::Shape s;
  s.N = p.N;
  s.C = p.C;
  s.R = p.R;
  s.P = p.P;
  s.channels_last = p.channels_last;
  return s;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> separable_norm_forward_cuda(
    const at::Tensor& x, const at::Tensor& masks, const std::optional<at::Tensor>& gamma,
    const std::optional<at::Tensor>& beta, double eps) {
  constexpr const char* op = "separable_norm_forward";
  check_dtype(op, x);
  const cuda_host::DeviceGuard guard(x.device());
  Prepared p = prepare(op, x, masks, gamma, beta, eps, /*kernel_handles_channels_last=*/true);
  check_cuda_input(op, x, p);
  const auto acc = stats_dtype(x.scalar_type());
  at::Tensor out = at::empty(x.sizes(), p.x.options().memory_format(p.out_format));
  at::Tensor mean = at::empty({p.N, p.C, p.R}, p.x.options().dtype(acc));
  at::Tensor rstd = at::empty({p.N, p.C, p.R}, p.x.options().dtype(acc));
  const kern::Shape shape = kernel_shape(p);
  const kern::Dtype dtype = kernel_dtype(x.scalar_type());
  const int device = cuda_host::device_index(x);
  at::Tensor ws = workspace(kern::forward_workspace_bytes(shape, dtype, device), p.x);
  kern::ForwardArgs args;
  args.x = p.x.const_data_ptr();
  args.masks = p.masks.const_data_ptr();
  args.gamma = kernel_affine(p.gamma);
  args.beta = kernel_affine(p.beta);
  args.eps = eps;
  args.out = out.mutable_data_ptr();
  args.mean = mean.mutable_data_ptr();
  args.rstd = rstd.mutable_data_ptr();
  check_launch(kern::forward(shape, dtype, args, ws.mutable_data_ptr(), device,
                             cuda_host::current_stream(device)),
               op);
  return {out, mean, rstd};
}

std::tuple<std::optional<at::Tensor>, std::optional<at::Tensor>, std::optional<at::Tensor>,
           std::optional<at::Tensor>>
separable_norm_backward_cuda(const at::Tensor& grad_out, const at::Tensor& x,
                             const at::Tensor& masks, const std::optional<at::Tensor>& gamma,
                             const std::optional<at::Tensor>& beta, const at::Tensor& mean,
                             const at::Tensor& rstd, double eps,
                             std::array<bool, 4> output_mask) {
  constexpr const char* op = "separable_norm_backward";
  check_dtype(op, x);
  const cuda_host::DeviceGuard guard(x.device());
  Prepared p = prepare(op, x, masks, gamma, beta, eps, /*kernel_handles_channels_last=*/true);
  check_cuda_input(op, x, p);
  check_saved_stats(op, p, mean, rstd);
  check_same_device(x, grad_out, op, "grad_out");
  check_same_dtype(x, grad_out, op, "grad_out");
  TORCH_CHECK(grad_out.sizes() == x.sizes(), op, ": expected grad_out of shape ", x.sizes(),
              ", got ", grad_out.sizes());
  const bool want_dx = output_mask[0];
  const bool want_dmask = output_mask[1];
  const bool want_dgamma = output_mask[2] && p.gamma.defined;
  const bool want_dbeta = output_mask[3] && p.beta.defined;
  const bool dgamma_pixel = want_dgamma && !p.gamma.plane_shaped;
  const bool dgamma_plane = want_dgamma && p.gamma.plane_shaped;
  const bool dbeta_full = want_dbeta && p.beta.full && !p.beta.plane_shaped;
  const bool dbeta_plane = want_dbeta && p.beta.plane_shaped;

  const auto fmt = p.out_format;
  const auto opts = p.x.options();
  const auto acc_opts = opts.dtype(stats_dtype(x.scalar_type()));
  const at::Tensor g = grad_out.contiguous(p.channels_last ? at::MemoryFormat::ChannelsLast
                                                           : at::MemoryFormat::Contiguous);
  const at::Tensor mean_c = mean.contiguous(), rstd_c = rstd.contiguous();
  at::Tensor dx = want_dx ? at::empty(x.sizes(), opts.memory_format(fmt)) : at::Tensor();
  at::Tensor dmask = want_dmask ? at::empty(p.masks.sizes(), opts) : at::Tensor();
  at::Tensor dgamma_px =
      dgamma_pixel ? at::empty(x.sizes(), opts.memory_format(fmt)) : at::Tensor();
  at::Tensor dbeta_px = dbeta_full ? at::empty(x.sizes(), opts.memory_format(fmt)) : at::Tensor();
  at::Tensor dgamma_sums = dgamma_plane ? at::empty({p.N, p.C}, acc_opts) : at::Tensor();
  at::Tensor dbeta_sums = dbeta_plane ? at::empty({p.N, p.C}, acc_opts) : at::Tensor();

  const kern::Shape shape = kernel_shape(p);
  const kern::Dtype dtype = kernel_dtype(x.scalar_type());
  const int device = cuda_host::device_index(x);
  if (want_dx || want_dmask || dgamma_pixel || dgamma_plane || dbeta_full || dbeta_plane) {
    at::Tensor ws =
        workspace(kern::backward_workspace_bytes(shape, dtype, want_dmask, device), p.x);
    kern::BackwardArgs args;
    args.grad_out = g.const_data_ptr();
    args.x = p.x.const_data_ptr();
    args.masks = p.masks.const_data_ptr();
    args.gamma = kernel_affine(p.gamma);
    args.mean = mean_c.const_data_ptr();
    args.rstd = rstd_c.const_data_ptr();
    args.eps = eps;
    args.grad_x = want_dx ? dx.mutable_data_ptr() : nullptr;
    args.grad_masks = want_dmask ? dmask.mutable_data_ptr() : nullptr;
    args.grad_gamma_full = dgamma_pixel ? dgamma_px.mutable_data_ptr() : nullptr;
    args.grad_beta_full = dbeta_full ? dbeta_px.mutable_data_ptr() : nullptr;
    args.gamma_plane_sums = dgamma_plane ? dgamma_sums.mutable_data_ptr() : nullptr;
    args.beta_plane_sums = dbeta_plane ? dbeta_sums.mutable_data_ptr() : nullptr;
    check_launch(kern::backward(shape, dtype, args, ws.mutable_data_ptr(), device,
                                cuda_host::current_stream(device)),
                 op);
  }

  std::optional<at::Tensor> grad_x, grad_masks, grad_gamma, grad_beta;
  if (want_dx) grad_x = dx;
  if (want_dmask) grad_masks = dmask;
  if (want_dgamma) {
    grad_gamma = affine_grad(dgamma_px, dgamma_sums, p.gamma, gamma->sizes(), x.scalar_type());
  }
  if (want_dbeta) {
    if (!dbeta_full && !dbeta_plane) {
      grad_beta = at::sum_to(grad_out, beta->sizes()).contiguous();
    } else {
      grad_beta = affine_grad(dbeta_px, dbeta_sums, p.beta, beta->sizes(), x.scalar_type());
    }
  }
  return {grad_x, grad_masks, grad_gamma, grad_beta};
}

}  // namespace

FACEDEBLUR_CUDA_LAUNCHERS(m) {
  m.impl("separable_norm_forward", &separable_norm_forward_cuda);
  m.impl("separable_norm_backward", &separable_norm_backward_cuda);
}

}  // namespace facedeblur::snorm
