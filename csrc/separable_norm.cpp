// Schemas of the separable normalization ops (SNADNet Eq. 3-9, SPEC.md 4.2), and the host-side
// argument handling shared by the CPU and CUDA implementations.
//
// For sample n, channel c and region r with mask M_r (soft or binary, non-negative):
//   mu_r  = sum(M_r x) / sum(M_r),   var_r = sum(M_r (x - mu_r)^2) / sum(M_r),
//   out   = (sum_r M_r (x - mu_r) / sqrt(var_r + eps)) * gamma + beta.
// A region whose mass sum(M_r) is not positive is dropped: it contributes nothing to the output
// and receives no gradient (its saved mean and rstd are 0).
#include "common/separable_norm.h"

#include <ATen/ExpandUtils.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "common/checks.h"
#include "ops.h"

namespace facedeblur {

void define_separable_norm(torch::Library& m) {
  // Returns (out, mean, rstd); mean and rstd are [N, C, R] in the accumulation type (float32
  // for float16/bfloat16/float32 inputs, float64 for float64) and are saved for the backward.
  m.def(
      "separable_norm_forward(Tensor x, Tensor masks, Tensor? gamma, Tensor? beta, float eps) "
      "-> (Tensor out, Tensor mean, Tensor rstd)",
      {at::Tag::pt2_compliant_tag});
  // output_mask selects (grad_x, grad_masks, grad_gamma, grad_beta); unselected ones are None.
  // Only the shape of beta is read (the gradient of beta is grad_out reduced to that shape), so
  // a caller may pass a zero-stride stand-in instead of keeping beta alive.
  m.def(
      "separable_norm_backward(Tensor grad_out, Tensor x, Tensor masks, Tensor? gamma, "
      "Tensor? beta, Tensor mean, Tensor rstd, float eps, bool[4] output_mask) "
      "-> (Tensor? grad_x, Tensor? grad_masks, Tensor? grad_gamma, Tensor? grad_beta)",
      {at::Tag::pt2_compliant_tag});
}

namespace snorm {

namespace {

// How gamma or beta is read by the kernels once broadcast onto x: element (n, c, p) of the
// broadcast view lives at n * stride_n + c * stride_c + p * stride_p, p = h * W + w.
AffineArg make_affine(const at::Tensor& t, const at::Tensor& x, bool channels_last) {
  AffineArg a;
  a.defined = true;
  a.full = t.sizes() == x.sizes();
  const int64_t d = t.dim();
  a.plane_shaped = (d < 2 || t.size(d - 2) == 1) && (d < 1 || t.size(d - 1) == 1);
  const int64_t H = x.size(2), W = x.size(3);
  auto try_view = [&](const at::Tensor& src) -> bool {
    at::Tensor e = src.expand(x.sizes());
    const int64_t sn = e.stride(0), sc = e.stride(1), sh = e.stride(2), sw = e.stride(3);
    const bool plane = (H == 1 || sh == 0) && (W == 1 || sw == 0);
    int64_t sp = 0;
    if (!plane) {
      if (W == 1) {
        sp = sh;
      } else if (H == 1 || sh == W * sw) {
        sp = sw;
      } else {
        return false;  // h and w do not merge into one pixel index
      }
      // The kernels walk the contiguous axis of x; reading gamma along a strided axis there
      // would be correct but slow, so such a view is copied into x's layout instead.
      if (channels_last ? (sc != 0 && sc != 1) : (sp != 1)) return false;
    }
    a.tensor = e;
    a.stride_n = sn;
    a.stride_c = sc;
    a.stride_p = sp;
    a.per_pixel = !plane;
    return true;
  };
  const auto fmt = channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  if (try_view(t)) return a;
  // A compact copy keeps broadcast dimensions broadcast ([1, C, H, W] stays that size).
  if (t.dim() == 4 && try_view(t.contiguous(fmt))) return a;
  if (try_view(t.contiguous())) return a;
  const bool ok = try_view(t.expand(x.sizes()).contiguous(fmt));
  TORCH_INTERNAL_ASSERT(ok);
  return a;
}

}  // namespace

bool use_channels_last(const at::Tensor& x) {
  return !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
}

Prepared prepare(const char* op, const at::Tensor& x, const at::Tensor& masks,
                 const std::optional<at::Tensor>& gamma, const std::optional<at::Tensor>& beta,
                 double eps, bool kernel_handles_channels_last) {
  check_dim(x, 4, op, "x");
  check_dim(masks, 4, op, "masks");
  TORCH_CHECK(x.numel() > 0, op, ": x must not be empty, got shape ", x.sizes());
  TORCH_CHECK(masks.size(0) == x.size(0) && masks.size(2) == x.size(2) &&
                  masks.size(3) == x.size(3) && masks.size(1) >= 1,
              op, ": expected masks of shape [N, R, H, W] = [", x.size(0), ", R >= 1, ",
              x.size(2), ", ", x.size(3), "] for x of shape ", x.sizes(), ", got ",
              masks.sizes());
  check_same_device(x, masks, op, "masks");
  check_same_dtype(x, masks, op, "masks");
  TORCH_CHECK(eps >= 0.0, op, ": eps must be >= 0, got ", eps);
  Prepared p;
  p.out_format = use_channels_last(x) ? at::MemoryFormat::ChannelsLast
                                      : at::MemoryFormat::Contiguous;
  p.channels_last = kernel_handles_channels_last && p.out_format == at::MemoryFormat::ChannelsLast;
  const auto kernel_fmt =
      p.channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  p.x = x.contiguous(kernel_fmt);
  p.masks = masks.contiguous();
  p.N = x.size(0);
  p.C = x.size(1);
  p.R = masks.size(1);
  p.P = x.size(2) * x.size(3);
  const std::pair<const std::optional<at::Tensor>*, const char*> affine[] = {{&gamma, "gamma"},
                                                                              {&beta, "beta"}};
  AffineArg* dst[] = {&p.gamma, &p.beta};
  for (int i = 0; i < 2; ++i) {
    const auto& t = *affine[i].first;
    if (!t.has_value()) continue;
    check_same_device(x, *t, op, affine[i].second);
    check_same_dtype(x, *t, op, affine[i].second);
    TORCH_CHECK(t->dim() <= 4 && at::is_expandable_to(t->sizes(), x.sizes()), op, ": ",
                affine[i].second, " of shape ", t->sizes(),
                " does not broadcast to x of shape ", x.sizes());
    *dst[i] = make_affine(*t, p.x, p.channels_last);
  }
  return p;
}

void check_saved_stats(const char* op, const Prepared& p, const at::Tensor& mean,
                       const at::Tensor& rstd) {
  const auto acc = stats_dtype(p.x.scalar_type());
  for (const auto* t : {&mean, &rstd}) {
    TORCH_CHECK(t->dim() == 3 && t->size(0) == p.N && t->size(1) == p.C && t->size(2) == p.R,
                op, ": expected saved statistics of shape [", p.N, ", ", p.C, ", ", p.R,
                "], got ", t->sizes());
    TORCH_CHECK(t->scalar_type() == acc, op, ": expected saved statistics of dtype ", acc,
                ", got ", t->scalar_type());
    check_same_device(p.x, *t, op, "saved statistics");
  }
}

at::ScalarType stats_dtype(at::ScalarType input) {
  return input == at::kDouble ? at::kDouble : at::kFloat;
}

at::Tensor affine_grad(const at::Tensor& per_pixel, const at::Tensor& plane_sums,
                       const AffineArg& arg, at::IntArrayRef shape, at::ScalarType dtype) {
  if (!arg.plane_shaped) {
    TORCH_INTERNAL_ASSERT(per_pixel.defined());
    if (arg.full) return per_pixel;
    return at::sum_to(per_pixel, shape).contiguous();
  }
  TORCH_INTERNAL_ASSERT(plane_sums.defined());
  const auto n = plane_sums.size(0), c = plane_sums.size(1);
  return at::sum_to(plane_sums.view({n, c, 1, 1}), shape).to(dtype).contiguous();
}

}  // namespace snorm
}  // namespace facedeblur
