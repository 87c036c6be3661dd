// Separable normalization with adaptive denormalization on the CPU (float32, float64).
//
// Work is organized by (n, c) plane: a plane's statistics are gathered in one sweep and the
// plane is normalized and denormalized right after, while it still sits in L2, so the forward
// reads x from memory once. Statistics use a two-level reduction that stays exact for large
// means: within a chunk of kChunk pixels (in L1) the weighted mean is taken around a shift (the
// running mean), then the chunk's centred second moment; chunks are merged with Chan's
// parallel-variance formula in float64.
//
// Non-finite values: a region's sums run over every pixel of the plane, zero-weight ones
// included (0 * Inf = NaN), whatever the chunking. So a NaN or Inf anywhere in x[n, c] makes
// the statistics (mean and rstd) of every non-empty region of plane (n, c) NaN, one in
// masks[n, r] those of region r in every channel; either way the whole output plane is NaN.
// Empty regions (mass 0) stay empty and contribute nothing. facedeblur_ref and the CUDA
// kernels follow the same rule.
//
// The backward does the same per plane: one sweep for the per-region sums it needs, one from
// cache for the gradients. The mask gradient is a sum over channels; tasks cover (sample,
// channel group) pairs and accumulate into per-group buffers that are summed in a fixed order,
// so results do not depend on thread scheduling.
//
// Layout: the kernels are plane-major (NCHW), where a region's mask row and an x row are both
// contiguous and vectorize together. A channels_last x is converted to contiguous once and the
// results converted back: in NHWC a plane is strided by C, and the single-pass-per-plane scheme
// (stats then apply from cache) would become two passes over the whole sample anyway.
//
// Vectorization: plain loops with `omp simd` reductions, compiled twice (x86-64-v3 = AVX2+FMA,
// and the baseline) and picked at load time; at::vec is not used because this extension is
// built without ATen's per-capability compilation, where at::vec falls back to its generic
// emulation.
#include <ATen/Dispatch.h>
#include <ATen/ExpandUtils.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <vector>

#include "common/checks.h"
#include "common/separable_norm.h"

#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11 && defined(__x86_64__) && \
    defined(__linux__)
#define FACEDEBLUR_CPU_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define FACEDEBLUR_CPU_CLONES
#endif

namespace facedeblur::snorm {
namespace {

// Pixels per chunk: x, the R mask rows and the scratch rows of one chunk stay in L1.
constexpr int64_t kChunk = 512;

// Weighted moments merged across chunks in float64 (Chan et al.).
struct Moments {
  double w = 0.0, mean = 0.0, m2 = 0.0;
  void merge(double wb, double mean_b, double m2_b) {
    const double total = w + wb;
    if (total == 0.0) return;
    const double delta = mean_b - mean;
    const double frac = wb / total;
    mean += delta * frac;
    m2 += m2_b + delta * delta * w * frac;
    w = total;
  }
};

// gamma or beta of one plane: per-pixel row (unit stride) or one value.
template <typename scalar_t>
struct AffineRow {
  const scalar_t* data = nullptr;
  bool per_pixel = false;
};

template <typename scalar_t>
AffineRow<scalar_t> affine_row(const AffineArg& a, int64_t n, int64_t c) {
  if (!a.defined) return {};
  return {a.tensor.const_data_ptr<scalar_t>() + n * a.stride_n + c * a.stride_c, a.per_pixel};
}

// Statistics of one plane. x: P values; masks: R rows of P values.
template <typename scalar_t>
FACEDEBLUR_CPU_CLONES void plane_stats(const scalar_t* x, const scalar_t* masks, int64_t R,
                                       int64_t P, double eps, scalar_t* mean, scalar_t* rstd) {
  for (int64_t r = 0; r < R; ++r) {
    const scalar_t* m = masks + r * P;
    Moments acc;
    for (int64_t p0 = 0; p0 < P; p0 += kChunk) {
      const int64_t len = std::min(kChunk, P - p0);
      const scalar_t* xc = x + p0;
      const scalar_t* mc = m + p0;
      // Shift by the running mean (or the chunk's first value) so that the chunk sum holds
      // deviations, not the raw values: no precision is lost to a large common offset.
      const scalar_t shift = acc.w > 0.0 ? static_cast<scalar_t>(acc.mean) : xc[0];
      scalar_t sw = 0, swd = 0;
#pragma omp simd reduction(+ : sw, swd)
      for (int64_t i = 0; i < len; ++i) {
        sw += mc[i];
        swd += mc[i] * (xc[i] - shift);
      }
      if (sw == scalar_t(0)) {
        // Skipped, but a non-finite x under zero weight made swd NaN: carry it into m2 (0 * a
        // finite swd adds nothing), so the result does not depend on where chunks fall.
        acc.m2 += static_cast<double>(swd) * 0.0;
        continue;
      }
      const scalar_t chunk_mean = shift + swd / sw;
      scalar_t m2 = 0;
#pragma omp simd reduction(+ : m2)
      for (int64_t i = 0; i < len; ++i) {
        const scalar_t d = xc[i] - chunk_mean;
        m2 += mc[i] * d * d;
      }
      acc.merge(sw, chunk_mean, m2);
    }
    if (acc.w <= 0.0) {  // empty region: contributes nothing anywhere
      mean[r] = 0;
      rstd[r] = 0;
      continue;
    }
    // Also reached by a NaN mass. A non-finite value met on the way leaves the mean non-finite
    // or m2 NaN; both statistics are then NaN (rstd must not become 0, the empty marker).
    const double var = acc.m2 / acc.w;
    if (std::isfinite(acc.mean) && !std::isnan(var)) {
      mean[r] = static_cast<scalar_t>(acc.mean);
      rstd[r] = static_cast<scalar_t>(1.0 / std::sqrt(std::max(var, 0.0) + eps));
    } else {
      mean[r] = rstd[r] = std::numeric_limits<scalar_t>::quiet_NaN();
    }
  }
}

// out = (sum_r M_r (x - mean_r) rstd_r) * gamma + beta for one plane.
template <typename scalar_t>
FACEDEBLUR_CPU_CLONES void plane_apply(const scalar_t* x, const scalar_t* masks, int64_t R,
                                       int64_t P, const scalar_t* mean, const scalar_t* rstd,
                                       AffineRow<scalar_t> gamma, AffineRow<scalar_t> beta,
                                       scalar_t* out) {
  alignas(64) scalar_t y[kChunk];
  for (int64_t p0 = 0; p0 < P; p0 += kChunk) {
    const int64_t len = std::min(kChunk, P - p0);
    const scalar_t* xc = x + p0;
    std::fill(y, y + len, scalar_t(0));
    for (int64_t r = 0; r < R; ++r) {
      if (rstd[r] == scalar_t(0)) continue;
      const scalar_t mu = mean[r], s = rstd[r];
      const scalar_t* mc = masks + r * P + p0;
#pragma omp simd
      for (int64_t i = 0; i < len; ++i) y[i] += mc[i] * ((xc[i] - mu) * s);
    }
    scalar_t* oc = out + p0;
    if (gamma.data != nullptr && gamma.per_pixel) {
      const scalar_t* gc = gamma.data + p0;
#pragma omp simd
      for (int64_t i = 0; i < len; ++i) y[i] *= gc[i];
    } else if (gamma.data != nullptr) {
      const scalar_t g0 = gamma.data[0];
#pragma omp simd
      for (int64_t i = 0; i < len; ++i) y[i] *= g0;
    }
    if (beta.data != nullptr && beta.per_pixel) {
      const scalar_t* bc = beta.data + p0;
#pragma omp simd
      for (int64_t i = 0; i < len; ++i) oc[i] = y[i] + bc[i];
    } else {
      const scalar_t b0 = beta.data != nullptr ? beta.data[0] : scalar_t(0);
#pragma omp simd
      for (int64_t i = 0; i < len; ++i) oc[i] = y[i] + b0;
    }
  }
}

// gy = grad_out * gamma for one chunk.
template <typename scalar_t>
inline void scaled_grad(const scalar_t* g, AffineRow<scalar_t> gamma, int64_t p0, int64_t len,
                        scalar_t* gy) {
  if (gamma.data != nullptr && gamma.per_pixel) {
    const scalar_t* gc = gamma.data + p0;
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) gy[i] = g[i] * gc[i];
  } else {
    const scalar_t g0 = gamma.data != nullptr ? gamma.data[0] : scalar_t(1);
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) gy[i] = g[i] * g0;
  }
}

// Per-region sums of one plane for the backward: mass, A = sum M gy, B = sum M gy xhat and,
// for a plane gamma, G = sum M g xhat (sum over regions = sum g * y); plus sum g for a plane
// beta. Returned through sums[4 * R] (m, A, B, G per region) and *sum_g.
template <typename scalar_t>
FACEDEBLUR_CPU_CLONES void plane_grad_sums(const scalar_t* g, const scalar_t* x,
                                           const scalar_t* masks, int64_t R, int64_t P,
                                           const scalar_t* mean, const scalar_t* rstd,
                                           AffineRow<scalar_t> gamma, bool want_g_xhat,
                                           bool want_sum_g, double* sums, double* sum_g) {
  alignas(64) scalar_t gy[kChunk];
  std::fill(sums, sums + 4 * R, 0.0);
  double total_g = 0.0;
  for (int64_t p0 = 0; p0 < P; p0 += kChunk) {
    const int64_t len = std::min(kChunk, P - p0);
    const scalar_t* gc = g + p0;
    const scalar_t* xc = x + p0;
    scaled_grad(gc, gamma, p0, len, gy);
    for (int64_t r = 0; r < R; ++r) {
      if (rstd[r] == scalar_t(0)) continue;
      const scalar_t mu = mean[r], s = rstd[r];
      const scalar_t* mc = masks + r * P + p0;
      scalar_t sm = 0, sa = 0, sb = 0, sg = 0;
      if (want_g_xhat) {
#pragma omp simd reduction(+ : sm, sa, sb, sg)
        for (int64_t i = 0; i < len; ++i) {
          const scalar_t w = mc[i];
          const scalar_t wxh = w * ((xc[i] - mu) * s);
          sm += w;
          sa += w * gy[i];
          sb += wxh * gy[i];
          sg += wxh * gc[i];
        }
      } else {
#pragma omp simd reduction(+ : sm, sa, sb)
        for (int64_t i = 0; i < len; ++i) {
          const scalar_t w = mc[i];
          sm += w;
          sa += w * gy[i];
          sb += w * ((xc[i] - mu) * s) * gy[i];
        }
      }
      sums[4 * r + 0] += sm;
      sums[4 * r + 1] += sa;
      sums[4 * r + 2] += sb;
      sums[4 * r + 3] += sg;
    }
    if (want_sum_g) {
      scalar_t sgc = 0;
#pragma omp simd reduction(+ : sgc)
      for (int64_t i = 0; i < len; ++i) sgc += gc[i];
      total_g += sgc;
    }
  }
  *sum_g = total_g;
}

// Gradients of one plane. coef[4 * r + (0..3)] = (a_r, b_r, k_r, unused) with a = A / m,
// b = B / m, k = var * rstd^2 = 1 - eps rstd^2:
//   dx      = sum_r M_r rstd_r (gy - a_r - b_r xhat_r)
//   dmask_r += xhat_r (gy - a_r) - b_r / 2 (xhat_r^2 - k_r)      (summed over channels)
//   dgamma  = g * y,  y = sum_r M_r xhat_r;   dbeta = g.
template <typename scalar_t>
FACEDEBLUR_CPU_CLONES void plane_grad_apply(const scalar_t* g, const scalar_t* x,
                                            const scalar_t* masks, int64_t R, int64_t P,
                                            const scalar_t* mean, const scalar_t* rstd,
                                            const scalar_t* coef, AffineRow<scalar_t> gamma,
                                            scalar_t* dx, scalar_t* dmask, scalar_t* dgamma,
                                            scalar_t* dbeta) {
  alignas(64) scalar_t gy[kChunk];
  alignas(64) scalar_t dxb[kChunk];
  alignas(64) scalar_t yb[kChunk];
  for (int64_t p0 = 0; p0 < P; p0 += kChunk) {
    const int64_t len = std::min(kChunk, P - p0);
    const scalar_t* gc = g + p0;
    const scalar_t* xc = x + p0;
    scaled_grad(gc, gamma, p0, len, gy);
    std::fill(dxb, dxb + len, scalar_t(0));
    std::fill(yb, yb + len, scalar_t(0));
    for (int64_t r = 0; r < R; ++r) {
      if (rstd[r] == scalar_t(0)) continue;
      const scalar_t mu = mean[r], s = rstd[r];
      const scalar_t a = coef[4 * r + 0], b = coef[4 * r + 1], k = coef[4 * r + 2];
      const scalar_t* mc = masks + r * P + p0;
      if (dmask != nullptr) {
        scalar_t* dmc = dmask + r * P + p0;
        const scalar_t half_b = scalar_t(0.5) * b;
#pragma omp simd
        for (int64_t i = 0; i < len; ++i) {
          const scalar_t xh = (xc[i] - mu) * s;
          const scalar_t gya = gy[i] - a;
          dxb[i] += mc[i] * s * (gya - b * xh);
          yb[i] += mc[i] * xh;
          dmc[i] += xh * gya - half_b * (xh * xh - k);
        }
      } else if (dx != nullptr || dgamma != nullptr) {
#pragma omp simd
        for (int64_t i = 0; i < len; ++i) {
          const scalar_t xh = (xc[i] - mu) * s;
          dxb[i] += mc[i] * s * (gy[i] - a - b * xh);
          yb[i] += mc[i] * xh;
        }
      }
    }
    if (dx != nullptr) std::copy(dxb, dxb + len, dx + p0);
    if (dgamma != nullptr) {
      scalar_t* dgc = dgamma + p0;
#pragma omp simd
      for (int64_t i = 0; i < len; ++i) dgc[i] = gc[i] * yb[i];
    }
    if (dbeta != nullptr) std::copy(gc, gc + len, dbeta + p0);
  }
}

void check_cpu_dtype(const char* op, const at::Tensor& x) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, op,
              ": x has dtype ", x.scalar_type(),
              "; the CPU kernels support float32 and float64 (float16 and bfloat16 run on CUDA)");
}

int64_t planes_per_task(int64_t P) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(P, 1)); }

std::tuple<at::Tensor, at::Tensor, at::Tensor> separable_norm_forward_cpu(
    const at::Tensor& x, const at::Tensor& masks, const std::optional<at::Tensor>& gamma,
    const std::optional<at::Tensor>& beta, double eps) {
  constexpr const char* op = "separable_norm_forward";
  TORCH_CHECK(x.device().is_cpu(), op, ": expected x on the CPU, got ", x.device());
  check_cpu_dtype(op, x);
  Prepared p = prepare(op, x, masks, gamma, beta, eps, /*kernel_handles_channels_last=*/false);
  const int64_t N = p.N, C = p.C, R = p.R, P = p.P;
  at::Tensor out = at::empty(x.sizes(), p.x.options());
  at::Tensor mean = at::empty({N, C, R}, p.x.options());
  at::Tensor rstd = at::empty({N, C, R}, p.x.options());
  AT_DISPATCH_FLOATING_TYPES(p.x.scalar_type(), "separable_norm_forward_cpu", [&] {
    const scalar_t* xd = p.x.const_data_ptr<scalar_t>();
    const scalar_t* md = p.masks.const_data_ptr<scalar_t>();
    scalar_t* od = out.mutable_data_ptr<scalar_t>();
    scalar_t* meand = mean.mutable_data_ptr<scalar_t>();
    scalar_t* rstdd = rstd.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, N * C, planes_per_task(P), [&](int64_t begin, int64_t end) {
      for (int64_t plane = begin; plane < end; ++plane) {
        const int64_t n = plane / C, c = plane % C;
        const scalar_t* xp = xd + plane * P;
        const scalar_t* mp = md + n * R * P;
        plane_stats(xp, mp, R, P, eps, meand + plane * R, rstdd + plane * R);
        plane_apply(xp, mp, R, P, meand + plane * R, rstdd + plane * R,
                    affine_row<scalar_t>(p.gamma, n, c), affine_row<scalar_t>(p.beta, n, c),
                    od + plane * P);
      }
    });
  });
  if (p.out_format == at::MemoryFormat::ChannelsLast) {
    out = out.contiguous(at::MemoryFormat::ChannelsLast);
  }
  return {out, mean, rstd};
}

std::tuple<std::optional<at::Tensor>, std::optional<at::Tensor>, std::optional<at::Tensor>,
           std::optional<at::Tensor>>
separable_norm_backward_cpu(const at::Tensor& grad_out, const at::Tensor& x,
                            const at::Tensor& masks, const std::optional<at::Tensor>& gamma,
                            const std::optional<at::Tensor>& beta, const at::Tensor& mean,
                            const at::Tensor& rstd, double eps, std::array<bool, 4> output_mask) {
  constexpr const char* op = "separable_norm_backward";
  TORCH_CHECK(x.device().is_cpu(), op, ": expected x on the CPU, got ", x.device());
  check_cpu_dtype(op, x);
  Prepared p = prepare(op, x, masks, gamma, beta, eps, /*kernel_handles_channels_last=*/false);
  check_saved_stats(op, p, mean, rstd);
  check_same_device(x, grad_out, op, "grad_out");
  check_same_dtype(x, grad_out, op, "grad_out");
  TORCH_CHECK(grad_out.sizes() == x.sizes(), op, ": expected grad_out of shape ", x.sizes(),
              ", got ", grad_out.sizes());
  const int64_t N = p.N, C = p.C, R = p.R, P = p.P;
  const bool want_dx = output_mask[0];
  const bool want_dmask = output_mask[1];
  const bool want_dgamma = output_mask[2] && p.gamma.defined;
  const bool want_dbeta = output_mask[3] && p.beta.defined;
  const at::Tensor g = grad_out.contiguous();
  const at::Tensor mean_c = mean.contiguous(), rstd_c = rstd.contiguous();
  const auto opts = p.x.options();
  const auto acc_opts = opts.dtype(at::kDouble);

  at::Tensor dx = want_dx ? at::empty(x.sizes(), opts) : at::Tensor();
  // Elementwise gamma gradient unless gamma is plane-shaped (then per-plane sums); beta's
  // gradient is grad_out itself (full beta), per-plane sums, or grad_out reduced by ATen.
  const bool dgamma_pixel = want_dgamma && !p.gamma.plane_shaped;
  const bool dgamma_plane = want_dgamma && p.gamma.plane_shaped;
  const bool dbeta_full = want_dbeta && p.beta.full && !p.beta.plane_shaped;
  const bool dbeta_plane = want_dbeta && p.beta.plane_shaped;
  at::Tensor dgamma_px = dgamma_pixel ? at::empty(x.sizes(), opts) : at::Tensor();
  at::Tensor dbeta_px = dbeta_full ? at::empty(x.sizes(), opts) : at::Tensor();
  at::Tensor dgamma_sums = dgamma_plane ? at::empty({N, C}, acc_opts) : at::Tensor();
  at::Tensor dbeta_sums = dbeta_plane ? at::empty({N, C}, acc_opts) : at::Tensor();

  // Mask gradient: channel groups per sample; each (sample, group) task owns a buffer row.
  int64_t groups = C;
  at::Tensor dmask_parts;
  if (want_dmask) {
    const int64_t threads = at::get_num_threads();
    groups = std::clamp<int64_t>((threads + N - 1) / N, 1, C);
    dmask_parts = at::zeros({groups, N, R, x.size(2), x.size(3)}, opts);
  }
  const bool need_sums = want_dx || want_dmask || dgamma_plane || dbeta_plane;
  const bool need_apply = want_dx || want_dmask || dgamma_pixel || dbeta_full;

  AT_DISPATCH_FLOATING_TYPES(p.x.scalar_type(), "separable_norm_backward_cpu", [&] {
    const scalar_t* gd = g.const_data_ptr<scalar_t>();
    const scalar_t* xd = p.x.const_data_ptr<scalar_t>();
    const scalar_t* md = p.masks.const_data_ptr<scalar_t>();
    const scalar_t* meand = mean_c.const_data_ptr<scalar_t>();
    const scalar_t* rstdd = rstd_c.const_data_ptr<scalar_t>();
    scalar_t* dxd = want_dx ? dx.mutable_data_ptr<scalar_t>() : nullptr;
    scalar_t* dgd = dgamma_pixel ? dgamma_px.mutable_data_ptr<scalar_t>() : nullptr;
    scalar_t* dbd = dbeta_full ? dbeta_px.mutable_data_ptr<scalar_t>() : nullptr;
    double* dgs = dgamma_plane ? dgamma_sums.mutable_data_ptr<double>() : nullptr;
    double* dbs = dbeta_plane ? dbeta_sums.mutable_data_ptr<double>() : nullptr;
    scalar_t* dmd = want_dmask ? dmask_parts.mutable_data_ptr<scalar_t>() : nullptr;
    const int64_t grain = want_dmask ? 1 : planes_per_task(P);
    at::parallel_for(0, N * groups, grain, [&](int64_t begin, int64_t end) {
      std::vector<double> sums(4 * R);
      std::vector<scalar_t> coef(4 * R);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t n = task / groups, grp = task % groups;
        const int64_t c_begin = grp * C / groups, c_end = (grp + 1) * C / groups;
        scalar_t* dm_task = dmd != nullptr ? dmd + (grp * N + n) * R * P : nullptr;
        for (int64_t c = c_begin; c < c_end; ++c) {
          const int64_t plane = n * C + c;
          const scalar_t* gp = gd + plane * P;
          const scalar_t* xp = xd + plane * P;
          const scalar_t* mp = md + n * R * P;
          const scalar_t* mu = meand + plane * R;
          const scalar_t* rs = rstdd + plane * R;
          const auto gamma_row = affine_row<scalar_t>(p.gamma, n, c);
          if (need_sums) {
            double sum_g = 0.0;
            plane_grad_sums(gp, xp, mp, R, P, mu, rs, gamma_row, dgamma_plane, dbeta_plane,
                            sums.data(), &sum_g);
            double g_y = 0.0;
            for (int64_t r = 0; r < R; ++r) {
              const double m = sums[4 * r + 0];
              const bool present = rs[r] != scalar_t(0) && m > 0.0;
              const double s = rs[r];
              coef[4 * r + 0] = present ? static_cast<scalar_t>(sums[4 * r + 1] / m) : 0;
              coef[4 * r + 1] = present ? static_cast<scalar_t>(sums[4 * r + 2] / m) : 0;
              coef[4 * r + 2] = static_cast<scalar_t>(1.0 - eps * s * s);
              g_y += sums[4 * r + 3];
            }
            if (dgs != nullptr) dgs[plane] = g_y;
            if (dbs != nullptr) dbs[plane] = sum_g;
          }
          if (need_apply) {
            plane_grad_apply(gp, xp, mp, R, P, mu, rs, coef.data(), gamma_row,
                             dxd != nullptr ? dxd + plane * P : nullptr, dm_task,
                             dgd != nullptr ? dgd + plane * P : nullptr,
                             dbd != nullptr ? dbd + plane * P : nullptr);
          }
        }
      }
    });
  });

  const auto fmt = p.out_format;
  auto to_out_format = [&](const at::Tensor& t) {
    return fmt == at::MemoryFormat::ChannelsLast ? t.contiguous(fmt) : t;
  };
  std::optional<at::Tensor> grad_x, grad_masks, grad_gamma, grad_beta;
  if (want_dx) grad_x = to_out_format(dx);
  if (want_dmask) grad_masks = groups == 1 ? dmask_parts[0] : dmask_parts.sum(0);
  if (want_dgamma) {
    grad_gamma = affine_grad(dgamma_pixel ? to_out_format(dgamma_px) : dgamma_px, dgamma_sums,
                             p.gamma, gamma->sizes(), x.scalar_type());
  }
  if (want_dbeta) {
    if (!dbeta_full && !dbeta_plane) {
      grad_beta = at::sum_to(grad_out, beta->sizes()).contiguous();
    } else {
      grad_beta = affine_grad(dbeta_full ? to_out_format(dbeta_px) : dbeta_px, dbeta_sums,
                              p.beta, beta->sizes(), x.scalar_type());
    }
  }
  return {grad_x, grad_masks, grad_gamma, grad_beta};
}

}  // namespace

TORCH_LIBRARY_IMPL(facedeblur_ext, CPU, m) {
  m.impl("separable_norm_forward", &separable_norm_forward_cpu);
  m.impl("separable_norm_backward", &separable_norm_backward_cpu);
}

}  // namespace facedeblur::snorm
