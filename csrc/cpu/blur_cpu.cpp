// CPU implementation of the blur-synthesis ops.
//
// blur_synthesize works on rows. A task owns a band of output rows of one (sample, channel)
// plane and keeps a ring of the Kh source rows those output rows read, each converted once
// to the linear domain (uint8 through a lookup table, CRF inverse applied) and padded
// horizontally per the border rule. The kernel is compacted into its nonzero taps (a motion
// or trajectory kernel covers a few percent of its K x K box); an output row is then the sum
// over taps of a weight times a shifted ring row, accumulated in registers 64 floats at a
// time, followed by the per-pixel tail (region weights, mask blend, noise, clamp, CRF,
// quantization, store) on the same row while it is in L1. On x86-64 the row code is compiled
// twice, for AVX2+FMA and for the baseline ISA, and picked at run time.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "common/blur_args.h"
#include "common/blur_math.h"

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define FD_X86_DISPATCH 1
#define FD_TARGET_AVX2 __attribute__((target("avx2,fma")))
#else
#define FD_X86_DISPATCH 0
#define FD_TARGET_AVX2
#endif
#if defined(__GNUC__)
#define FD_ALWAYS_INLINE __attribute__((always_inline)) inline
#define FD_VECTOR_EXT 1
#else
#define FD_ALWAYS_INLINE inline
#define FD_VECTOR_EXT 0
#endif

namespace facedeblur {
namespace {

using blur::border_index;

// FACEDEBLUR_NO_AVX2=1 forces the baseline build of the row code (tests compare the two).
bool cpu_has_avx2() {
#if FD_X86_DISPATCH
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                          std::getenv("FACEDEBLUR_NO_AVX2") == nullptr;
  return has;
#else
  return false;
#endif
}

// Grain size for at::parallel_for over `tasks` tasks of about `work` operations each: small
// problems run on the calling thread, since waking the pool costs more than they do.
int64_t grain_for(int64_t tasks, int64_t work) {
  constexpr int64_t kMinParallelWork = int64_t{1} << 16;
  work = std::max<int64_t>(work, 1);
  if (tasks * work < kMinParallelWork) return tasks + 1;
  return std::max<int64_t>(1, kMinParallelWork / work);
}

// ---------------------------------------------------------------------------------------
// Kernel generators
// ---------------------------------------------------------------------------------------

// Divides by the sum and stores; an empty kernel (nothing landed inside, e.g. a Gaussian
// narrower than float precision on an even grid) becomes a point at the centre.
template <typename out_t>
void normalize_store(std::vector<double>& acc, int64_t K, out_t* out) {
  double sum = 0.0;
  for (double v : acc) sum += v;
  if (!(sum > 0)) {
    std::fill(acc.begin(), acc.end(), 0.0);
    const double c = 0.5 * static_cast<double>(K - 1);
    blur::splat_point(acc.data(), static_cast<int>(K), c, c, 1.0);
    sum = 0.0;
    for (double v : acc) sum += v;
  }
  for (int64_t i = 0; i < K * K; ++i) out[i] = static_cast<out_t>(acc[i] / sum);
}

template <typename Fill>
at::Tensor generate_kernels(int64_t N, int64_t K, at::ScalarType dtype, const at::Tensor& like,
                            int64_t work_per_kernel, Fill fill) {
  at::Tensor out = at::empty({N, K, K}, like.options().dtype(dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "blur_kernels_cpu", [&] {
    scalar_t* dst = out.data_ptr<scalar_t>();
    at::parallel_for(0, N, grain_for(N, work_per_kernel), [&](int64_t begin, int64_t end) {
      std::vector<double> acc(static_cast<size_t>(K * K));
      for (int64_t n = begin; n < end; ++n) {
        std::fill(acc.begin(), acc.end(), 0.0);
        fill(n, acc.data());
        normalize_store(acc, K, dst + n * K * K);
      }
    });
  });
  return out;
}

at::Tensor motion_kernels_cpu(const at::Tensor& length, const at::Tensor& angle, int64_t size,
                              at::ScalarType dtype) {
  blur::check_generator_args(length, size, dtype, "motion_kernels", "length");
  blur::check_generator_args(angle, size, dtype, "motion_kernels", "angle");
  TORCH_CHECK(length.size(0) == angle.size(0), "motion_kernels: length and angle differ in size");
  const at::Tensor len = length.to(at::kDouble).contiguous();
  const at::Tensor ang = angle.to(at::kDouble).contiguous();
  const double* L = len.data_ptr<double>();
  const double* A = ang.data_ptr<double>();
  const int K = static_cast<int>(size);
  return generate_kernels(len.size(0), size, dtype, length, 8 * size, [&](int64_t n, double* acc) {
    blur::rasterize_motion(acc, K, L[n], A[n]);
  });
}

at::Tensor gaussian_kernels_cpu(const at::Tensor& sigma, int64_t size, at::ScalarType dtype) {
  blur::check_generator_args(sigma, size, dtype, "gaussian_kernels", "sigma");
  const at::Tensor sig = sigma.to(at::kDouble).contiguous();
  const double* S = sig.data_ptr<double>();
  const int K = static_cast<int>(size);
  return generate_kernels(sig.size(0), size, dtype, sigma, 8 * size * size,
                          [&](int64_t n, double* acc) {
    if (!(S[n] > 0)) return;  // normalize_store turns the empty kernel into a point
    for (int i = 0; i < K; ++i)
      for (int j = 0; j < K; ++j) acc[i * K + j] = blur::gaussian_tap(K, i, j, S[n]);
  });
}

at::Tensor defocus_kernels_cpu(const at::Tensor& radius, int64_t size, at::ScalarType dtype) {
  blur::check_generator_args(radius, size, dtype, "defocus_kernels", "radius");
  const at::Tensor rad = radius.to(at::kDouble).contiguous();
  const double* Rd = rad.data_ptr<double>();
  const int K = static_cast<int>(size);
  return generate_kernels(rad.size(0), size, dtype, radius, 32 * size * size,
                          [&](int64_t n, double* acc) {
    if (!(Rd[n] > 0)) return;
    for (int i = 0; i < K; ++i)
      for (int j = 0; j < K; ++j) acc[i * K + j] = blur::defocus_tap(K, i, j, Rd[n]);
  });
}

at::Tensor trajectory_kernels_cpu(const at::Tensor& params, const at::Tensor& step_uniform,
                                  const at::Tensor& step_normal, int64_t size, int64_t centering,
                                  at::ScalarType dtype) {
  blur::check_trajectory_args(params, step_uniform, step_normal, size, centering, dtype);
  const at::Tensor P = params.contiguous();
  const at::Tensor U = step_uniform.contiguous();
  const at::Tensor G = step_normal.contiguous();
  const int64_t N = P.size(0), T = U.size(1) + 1;
  const int K = static_cast<int>(size);
  const double* prm = P.data_ptr<double>();
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES(U.scalar_type(), "trajectory_kernels_cpu", [&] {
    const scalar_t* u = U.data_ptr<scalar_t>();
    const scalar_t* g = G.data_ptr<scalar_t>();
    out = generate_kernels(N, size, dtype, params, 64 * T, [&](int64_t n, double* acc) {
      const double* q = prm + n * blur::kTrajectoryParamCount;
      const blur::TrajectoryParams p{q[0], q[1], q[2], q[3], q[4], q[5], q[6]};
      std::vector<double> xs(static_cast<size_t>(T)), ys(static_cast<size_t>(T));
      blur::walk_trajectory(p, u + n * (T - 1), g + n * (T - 1) * 2, T, xs.data(), ys.data());
      const auto pl = blur::place_trajectory(xs.data(), ys.data(), T, K, p.exposure,
                                             static_cast<int>(centering));
      blur::rasterize_trajectory(acc, K, xs.data(), ys.data(), T, pl);
    });
  });
  return out;
}

// ---------------------------------------------------------------------------------------
// Row primitives of blur_synthesize
// ---------------------------------------------------------------------------------------

// out[x] = sum_t w[t] * ptrs[t][x] for x in [0, W): the taps of one output row. Blocks of
// eight VB-byte vectors stay in registers across all taps (VB = 32 for AVX2, 16 for the
// baseline's SSE2, whose 16 registers would not hold eight 32-byte accumulators).
template <int VB, typename T>
FD_ALWAYS_INLINE void accumulate_taps(const T* const* ptrs, const T* w, int64_t ntaps, int64_t W,
                                      T* out) {
  int64_t x = 0;
#if FD_VECTOR_EXT
  typedef T vec __attribute__((vector_size(VB)));
  constexpr int64_t L = VB / static_cast<int64_t>(sizeof(T));
  for (; x + 8 * L <= W; x += 8 * L) {
    vec a0 = {}, a1 = {}, a2 = {}, a3 = {}, a4 = {}, a5 = {}, a6 = {}, a7 = {};
    for (int64_t t = 0; t < ntaps; ++t) {
      const T* p = ptrs[t] + x;
      const vec wv = vec{} + w[t];
      vec v0, v1, v2, v3, v4, v5, v6, v7;
      __builtin_memcpy(&v0, p, VB);
      __builtin_memcpy(&v1, p + L, VB);
      __builtin_memcpy(&v2, p + 2 * L, VB);
      __builtin_memcpy(&v3, p + 3 * L, VB);
      __builtin_memcpy(&v4, p + 4 * L, VB);
      __builtin_memcpy(&v5, p + 5 * L, VB);
      __builtin_memcpy(&v6, p + 6 * L, VB);
      __builtin_memcpy(&v7, p + 7 * L, VB);
      a0 += wv * v0;
      a1 += wv * v1;
      a2 += wv * v2;
      a3 += wv * v3;
      a4 += wv * v4;
      a5 += wv * v5;
      a6 += wv * v6;
      a7 += wv * v7;
    }
    __builtin_memcpy(out + x, &a0, VB);
    __builtin_memcpy(out + x + L, &a1, VB);
    __builtin_memcpy(out + x + 2 * L, &a2, VB);
    __builtin_memcpy(out + x + 3 * L, &a3, VB);
    __builtin_memcpy(out + x + 4 * L, &a4, VB);
    __builtin_memcpy(out + x + 5 * L, &a5, VB);
    __builtin_memcpy(out + x + 6 * L, &a6, VB);
    __builtin_memcpy(out + x + 7 * L, &a7, VB);
  }
  for (; x + L <= W; x += L) {
    vec a = {};
    for (int64_t t = 0; t < ntaps; ++t) {
      vec v;
      __builtin_memcpy(&v, ptrs[t] + x, VB);
      a += (vec{} + w[t]) * v;
    }
    __builtin_memcpy(out + x, &a, VB);
  }
#endif
  for (; x < W; ++x) {
    T a = 0;
    for (int64_t t = 0; t < ntaps; ++t) a += w[t] * ptrs[t][x];
    out[x] = a;
  }
}

// Sum over x of a[x] * b[x], reassociated into vector lanes (used by the kernel gradient).
template <typename T>
FD_ALWAYS_INLINE T dot_row(const T* a, const T* b, int64_t W) {
  int64_t x = 0;
  T total = 0;
#if FD_VECTOR_EXT
  typedef T vec __attribute__((vector_size(16)));
  constexpr int64_t L = 16 / static_cast<int64_t>(sizeof(T));
  vec s0 = {}, s1 = {};
  for (; x + 2 * L <= W; x += 2 * L) {
    vec a0, a1, b0, b1;
    __builtin_memcpy(&a0, a + x, 16);
    __builtin_memcpy(&a1, a + x + L, 16);
    __builtin_memcpy(&b0, b + x, 16);
    __builtin_memcpy(&b1, b + x + L, 16);
    s0 += a0 * b0;
    s1 += a1 * b1;
  }
  s0 += s1;
  for (int64_t l = 0; l < L; ++l) total += s0[l];
#endif
  for (; x < W; ++x) total += a[x] * b[x];
  return total;
}

// Conversion of an input pixel to the linear domain: x / 255 for uint8 (through a table that
// also holds the CRF inverse), x or x^gamma for floating dtypes.
template <typename in_t, typename acc_t>
struct Linearize {
  const acc_t* lut = nullptr;  // 256 entries, uint8 only
  bool crf = false;
  acc_t gamma = 1;
  FD_ALWAYS_INLINE acc_t operator()(in_t v) const {
    if constexpr (std::is_same_v<in_t, uint8_t>) {
      return lut[v];
    } else {
      const acc_t a = static_cast<acc_t>(v);
      return crf ? std::pow(a, gamma) : a;
    }
  }
};

template <typename in_t, typename acc_t>
std::vector<acc_t> make_lut(const std::optional<double>& crf_gamma) {
  std::vector<acc_t> lut;
  if constexpr (std::is_same_v<in_t, uint8_t>) {
    lut.resize(256);
    for (int v = 0; v < 256; ++v) {
      const acc_t a = static_cast<acc_t>(v) / static_cast<acc_t>(255);
      lut[v] = crf_gamma ? std::pow(a, static_cast<acc_t>(*crf_gamma)) : a;
    }
  }
  return lut;
}

// Virtual row u of a plane, linearized and padded: dst[X] = lin(img[idx(u), idx(X - pad_l)]).
template <typename in_t, typename acc_t>
FD_ALWAYS_INLINE void fill_padded_row(const in_t* plane, int64_t H, int64_t W, int64_t u,
                                      int border, int64_t pad_l, int64_t Wp,
                                      const Linearize<in_t, acc_t>& lin, acc_t* dst) {
  const int64_t row = border_index(u, H, border);
  if (row < 0) {
    std::fill(dst, dst + Wp, acc_t(0));
    return;
  }
  const in_t* src = plane + row * W;
  acc_t* mid = dst + pad_l;
  if constexpr (std::is_same_v<in_t, acc_t>) {
    if (!lin.crf) {
      std::memcpy(mid, src, static_cast<size_t>(W) * sizeof(acc_t));
    } else {
      for (int64_t x = 0; x < W; ++x) mid[x] = lin(src[x]);
    }
  } else {
    for (int64_t x = 0; x < W; ++x) mid[x] = lin(src[x]);
  }
  for (int64_t X = 0; X < Wp; ++X) {
    if (X == pad_l) X = pad_l + W;
    if (X >= Wp) break;
    const int64_t xi = border_index(X - pad_l, W, border);
    dst[X] = xi < 0 ? acc_t(0) : mid[xi];
  }
}

template <typename acc_t>
FD_ALWAYS_INLINE acc_t round_to_255(acc_t v) {
  return std::nearbyint(v * static_cast<acc_t>(255));
}

// ---------------------------------------------------------------------------------------
// blur_synthesize forward
// ---------------------------------------------------------------------------------------

// Nonzero taps of every (sample, region) kernel: out(y, x) += w * in(y + dy, x + dx), the
// offsets of a true convolution (dy = cy - p for kernel row p).
template <typename acc_t>
struct Taps {
  std::vector<int64_t> dy, dx, begin;  // begin[n * R + r] .. begin[n * R + r + 1]
  std::vector<acc_t> w;
  int64_t max_count = 0;
};

template <typename acc_t>
Taps<acc_t> compact_taps(const at::Tensor& kernels, bool negate) {
  const int64_t NR = kernels.size(0) * kernels.size(1), Kh = kernels.size(2), Kw = kernels.size(3);
  const int64_t cy = (Kh - 1) / 2, cx = (Kw - 1) / 2;
  const acc_t* k = kernels.data_ptr<acc_t>();
  Taps<acc_t> taps;
  taps.begin.push_back(0);
  for (int64_t g = 0; g < NR; ++g) {
    for (int64_t p = 0; p < Kh; ++p) {
      for (int64_t q = 0; q < Kw; ++q) {
        const acc_t w = k[(g * Kh + p) * Kw + q];
        if (w != acc_t(0)) {
          taps.dy.push_back(negate ? p - cy : cy - p);
          taps.dx.push_back(negate ? q - cx : cx - q);
          taps.w.push_back(w);
        }
      }
    }
    taps.begin.push_back(static_cast<int64_t>(taps.w.size()));
    taps.max_count = std::max(taps.max_count, taps.begin[g + 1] - taps.begin[g]);
  }
  return taps;
}

template <typename in_t, typename acc_t>
struct ForwardArgs {
  const in_t* images;
  in_t* out;
  int64_t N, C, H, W, R, Kh, Kw, cy, cx, pad_t, pad_l, Wp;
  int border;
  const Taps<acc_t>* taps;
  const acc_t* weights;      // [N, R, H, W] or null
  const acc_t* mask;         // [N, 1, H, W] or null
  const acc_t* noise;        // [N, C, H, W] or null
  const acc_t* noise_sigma;  // [N] or null
  Linearize<in_t, acc_t> lin;
  bool crf, clamp, quantize;
  acc_t inv_gamma;
  int64_t rows_per_task, tasks_per_plane;
};

template <int VB, typename in_t, typename acc_t>
FD_ALWAYS_INLINE void forward_task_body(const ForwardArgs<in_t, acc_t>& a, int64_t task) {
  const int64_t plane = task / a.tasks_per_plane, band = task % a.tasks_per_plane;
  const int64_t n = plane / a.C;
  const int64_t y0 = band * a.rows_per_task, y1 = std::min(a.H, y0 + a.rows_per_task);
  if (y0 >= y1) return;
  const int64_t HW = a.H * a.W;
  const in_t* img = a.images + plane * HW;
  std::vector<acc_t> ring(static_cast<size_t>(a.Kh * a.Wp));
  std::vector<acc_t> acc(static_cast<size_t>(a.W)), tmp(a.R > 1 ? static_cast<size_t>(a.W) : 0);
  std::vector<const acc_t*> ptrs(static_cast<size_t>(std::max<int64_t>(a.taps->max_count, 1)));
  auto slot = [&](int64_t u) {
    int64_t s = u % a.Kh;
    return ring.data() + (s < 0 ? s + a.Kh : s) * a.Wp;
  };
  // Output row y reads source rows y - pad_t .. y + cy; row y + cy enters the ring at y.
  for (int64_t u = y0 - a.pad_t; u < y0 + a.cy; ++u)
    fill_padded_row(img, a.H, a.W, u, a.border, a.pad_l, a.Wp, a.lin, slot(u));
  const acc_t sigma = a.noise_sigma ? a.noise_sigma[n] : acc_t(0);
  for (int64_t y = y0; y < y1; ++y) {
    fill_padded_row(img, a.H, a.W, y + a.cy, a.border, a.pad_l, a.Wp, a.lin, slot(y + a.cy));
    for (int64_t r = 0; r < a.R; ++r) {
      const int64_t g = n * a.R + r;
      const int64_t t0 = a.taps->begin[g], nt = a.taps->begin[g + 1] - t0;
      for (int64_t t = 0; t < nt; ++t)
        ptrs[t] = slot(y + a.taps->dy[t0 + t]) + a.pad_l + a.taps->dx[t0 + t];
      if (a.R == 1) {
        accumulate_taps<VB>(ptrs.data(), a.taps->w.data() + t0, nt, a.W, acc.data());
        if (a.weights) {
          const acc_t* wm = a.weights + (n * a.R) * HW + y * a.W;
          for (int64_t x = 0; x < a.W; ++x) acc[x] *= wm[x];
        }
      } else {
        accumulate_taps<VB>(ptrs.data(), a.taps->w.data() + t0, nt, a.W, tmp.data());
        const acc_t* wm = a.weights + (n * a.R + r) * HW + y * a.W;
        if (r == 0) {
          for (int64_t x = 0; x < a.W; ++x) acc[x] = wm[x] * tmp[x];
        } else {
          for (int64_t x = 0; x < a.W; ++x) acc[x] += wm[x] * tmp[x];
        }
      }
    }
    // Tail, one simple pass per enabled stage so that each vectorizes.
    acc_t* b = acc.data();
    const acc_t* lin_row = slot(y) + a.pad_l;
    if (a.mask) {
      const acc_t* m = a.mask + n * HW + y * a.W;
      for (int64_t x = 0; x < a.W; ++x) b[x] = m[x] * b[x] + (acc_t(1) - m[x]) * lin_row[x];
    }
    if (a.noise) {
      const acc_t* z = a.noise + plane * HW + y * a.W;
      for (int64_t x = 0; x < a.W; ++x) b[x] += sigma * z[x];
    }
    if (a.clamp) {
      for (int64_t x = 0; x < a.W; ++x) b[x] = std::min(std::max(b[x], acc_t(0)), acc_t(1));
    }
    if (a.crf) {
      for (int64_t x = 0; x < a.W; ++x) b[x] = std::pow(std::max(b[x], acc_t(0)), a.inv_gamma);
    }
    in_t* o = a.out + plane * HW + y * a.W;
    if constexpr (std::is_same_v<in_t, uint8_t>) {
      for (int64_t x = 0; x < a.W; ++x) o[x] = static_cast<uint8_t>(round_to_255(b[x]));
    } else {
      if (a.quantize) {
        for (int64_t x = 0; x < a.W; ++x) b[x] = round_to_255(b[x]) / static_cast<acc_t>(255);
      }
      for (int64_t x = 0; x < a.W; ++x) o[x] = static_cast<in_t>(b[x]);
    }
  }
}

template <typename in_t, typename acc_t>
FD_TARGET_AVX2 void forward_task_avx2(const ForwardArgs<in_t, acc_t>& a, int64_t task) {
  forward_task_body<32>(a, task);
}

template <typename in_t, typename acc_t>
void forward_task_baseline(const ForwardArgs<in_t, acc_t>& a, int64_t task) {
  forward_task_body<16>(a, task);
}

// Bands of rows per plane: enough tasks to feed every thread (a band re-reads Kh - 1 rows).
int64_t bands_per_plane(int64_t planes, int64_t H, int64_t Kh) {
  const int64_t want = 4 * static_cast<int64_t>(at::get_num_threads());
  const int64_t bands = (want + planes - 1) / planes;
  const int64_t max_bands = std::max<int64_t>(1, H / std::max<int64_t>(16, Kh));
  return std::clamp<int64_t>(bands, 1, max_bands);
}

at::Tensor blur_synthesize_cpu(const at::Tensor& images_in, const at::Tensor& kernels_in,
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
  const at::Tensor images = images_in.contiguous();
  const at::Tensor kernels = kernels_in.contiguous();
  const auto contig = [](const std::optional<at::Tensor>& t) {
    return t.has_value() ? std::optional<at::Tensor>(t->contiguous()) : std::nullopt;
  };
  const auto weights = contig(weights_in), mask = contig(mask_in), noise = contig(noise_in),
             noise_sigma = contig(noise_sigma_in);
  at::Tensor out = at::empty_like(images, at::MemoryFormat::Contiguous);
  const int64_t N = images.size(0), C = images.size(1), H = images.size(2), W = images.size(3);
  const int64_t R = kernels.size(1), Kh = kernels.size(2), Kw = kernels.size(3);
  AT_DISPATCH_FLOATING_TYPES_AND3(at::kByte, at::kHalf, at::kBFloat16, images.scalar_type(), "blur_synthesize_cpu", [&] {
    using in_t = scalar_t;
    using acc_t = std::conditional_t<std::is_same_v<in_t, double>, double, float>;
    const Taps<acc_t> taps = compact_taps<acc_t>(kernels, false);
    const std::vector<acc_t> lut = make_lut<in_t, acc_t>(crf_gamma);
    ForwardArgs<in_t, acc_t> a{};
    a.images = images.data_ptr<in_t>();
    a.out = out.data_ptr<in_t>();
    a.N = N; a.C = C; a.H = H; a.W = W; a.R = R; a.Kh = Kh; a.Kw = Kw;
    a.cy = (Kh - 1) / 2; a.cx = (Kw - 1) / 2;
    a.pad_t = Kh - 1 - a.cy; a.pad_l = Kw - 1 - a.cx; a.Wp = W + Kw - 1;
    a.border = border;
    a.taps = &taps;
    a.weights = weights ? weights->data_ptr<acc_t>() : nullptr;
    a.mask = mask ? mask->data_ptr<acc_t>() : nullptr;
    a.noise = noise ? noise->data_ptr<acc_t>() : nullptr;
    a.noise_sigma = noise_sigma ? noise_sigma->data_ptr<acc_t>() : nullptr;
    a.lin.lut = lut.empty() ? nullptr : lut.data();
    a.lin.crf = crf_gamma.has_value();
    a.lin.gamma = static_cast<acc_t>(crf_gamma.value_or(1.0));
    a.crf = crf_gamma.has_value();
    a.inv_gamma = static_cast<acc_t>(1.0 / crf_gamma.value_or(1.0));
    a.quantize = quantize || std::is_same_v<in_t, uint8_t>;
    a.clamp = a.noise != nullptr || a.quantize;
    a.tasks_per_plane = bands_per_plane(N * C, H, Kh);
    a.rows_per_task = (H + a.tasks_per_plane - 1) / a.tasks_per_plane;
    const bool avx2 = cpu_has_avx2();
    const int64_t tasks = N * C * a.tasks_per_plane;
    const int64_t work = a.rows_per_task * W * (taps.max_count + 4);
    at::parallel_for(0, tasks, grain_for(tasks, work), [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        if (avx2) {
          forward_task_avx2(a, task);
        } else {
          forward_task_baseline(a, task);
        }
      }
    });
  });
  return out;
}

// ---------------------------------------------------------------------------------------
// blur_synthesize backward
// ---------------------------------------------------------------------------------------
//
// Forward, per pixel: lin = g^-1(x), b = sum_r w_r (k_r * lin), c = m b + (1 - m) lin,
// y = g(c). With gc = dy/dc * grad:
//   grad_mask    = sum_channels gc (b - lin)
//   grad_w_r     = sum_channels m gc (k_r * lin)
//   grad_k_r[p]  = sum_{c,y,x} w_r m gc (y, x) lin_pad(y + dy_p, x + dx_p)
//   grad_lin     = (1 - m) gc + fold(sum_r k_r^T * (w_r m gc))
// where the correlation with the transposed kernel runs over the padded domain and `fold`
// adds every padded position onto the pixel the border rule made it read.

template <typename acc_t>
FD_ALWAYS_INLINE acc_t crf_forward_slope(acc_t c, acc_t inv_gamma) {
  // d/dc c^(1/gamma); zero at c <= 0 where the forward clamps
  return c > acc_t(0) ? inv_gamma * std::pow(c, inv_gamma - acc_t(1)) : acc_t(0);
}

template <typename in_t, typename acc_t>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_impl(
    const at::Tensor& grad, const at::Tensor& images, const at::Tensor& kernels,
    const std::optional<at::Tensor>& weights, const std::optional<at::Tensor>& mask,
    std::optional<double> crf_gamma, int border, std::array<bool, 4> need) {
  const int64_t N = images.size(0), C = images.size(1), H = images.size(2), W = images.size(3);
  const int64_t R = kernels.size(1), Kh = kernels.size(2), Kw = kernels.size(3);
  const int64_t cy = (Kh - 1) / 2, cx = (Kw - 1) / 2, pad_t = Kh - 1 - cy, pad_l = Kw - 1 - cx;
  const int64_t Hp = H + Kh - 1, Wp = W + Kw - 1;       // padded input domain
  const int64_t Hh = H + 2 * (Kh - 1), Wh = W + 2 * (Kw - 1);  // zero-extended gradient
  const int64_t HW = H * W;
  const auto opts = kernels.options();
  const bool crf = crf_gamma.has_value();
  const acc_t gamma = static_cast<acc_t>(crf_gamma.value_or(1.0));
  const acc_t inv_gamma = acc_t(1) / gamma;
  const bool need_h = need[0] || need[1];

  const in_t* x_ptr = images.data_ptr<in_t>();
  const in_t* g_ptr = grad.data_ptr<in_t>();
  const acc_t* w_ptr = weights ? weights->data_ptr<acc_t>() : nullptr;
  const acc_t* m_ptr = mask ? mask->data_ptr<acc_t>() : nullptr;
  const Taps<acc_t> taps = compact_taps<acc_t>(kernels, false);
  Linearize<in_t, acc_t> lin;
  lin.crf = crf;
  lin.gamma = gamma;

  // Linear, padded input planes.
  at::Tensor lin_pad = at::empty({N, C, Hp, Wp}, opts);
  acc_t* lp = lin_pad.data_ptr<acc_t>();
  at::parallel_for(0, N * C * Hp, grain_for(N * C * Hp, Wp), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t plane = i / Hp, U = i % Hp;
      fill_padded_row(x_ptr + plane * HW, H, W, U - pad_t, border, pad_l, Wp, lin,
                      lp + i * Wp);
    }
  });

  at::Tensor grad_mask = need[3] ? at::zeros({N, 1, H, W}, opts) : at::empty({0}, opts);
  at::Tensor grad_w = need[2] ? at::zeros({N, R, H, W}, opts) : at::empty({0}, opts);
  at::Tensor hw = need_h ? at::zeros({N, R, C, Hh, Wh}, opts) : at::empty({0}, opts);
  at::Tensor direct = need[0] && mask ? at::empty({N, C, H, W}, opts) : at::empty({0}, opts);
  acc_t* gm_ptr = need[3] ? grad_mask.data_ptr<acc_t>() : nullptr;
  acc_t* gw_ptr = need[2] ? grad_w.data_ptr<acc_t>() : nullptr;
  acc_t* hw_ptr = need_h ? hw.data_ptr<acc_t>() : nullptr;
  acc_t* dir_ptr = direct.numel() ? direct.data_ptr<acc_t>() : nullptr;

  // Pass A, per output row: recompute the blur, then the per-pixel chain rule.
  const int64_t row_work = C * W * (taps.max_count * R + 8);
  at::parallel_for(0, N * H, grain_for(N * H, row_work), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> b(static_cast<size_t>(W)), br(static_cast<size_t>(R * W));
    std::vector<const acc_t*> ptrs(static_cast<size_t>(std::max<int64_t>(taps.max_count, 1)));
    for (int64_t row = begin; row < end; ++row) {
      const int64_t n = row / H, y = row % H;
      const acc_t* m = m_ptr ? m_ptr + n * HW + y * W : nullptr;
      for (int64_t c = 0; c < C; ++c) {
        const acc_t* plane = lp + (n * C + c) * Hp * Wp;
        for (int64_t r = 0; r < R; ++r) {
          const int64_t g = n * R + r, t0 = taps.begin[g], nt = taps.begin[g + 1] - t0;
          for (int64_t t = 0; t < nt; ++t)
            ptrs[t] = plane + (y + pad_t + taps.dy[t0 + t]) * Wp + pad_l + taps.dx[t0 + t];
          accumulate_taps<16>(ptrs.data(), taps.w.data() + t0, nt, W, br.data() + r * W);
        }
        for (int64_t x = 0; x < W; ++x) {
          acc_t bx = 0;
          if (w_ptr) {
            for (int64_t r = 0; r < R; ++r) bx += w_ptr[((n * R + r) * H + y) * W + x] * br[r * W + x];
          } else {
            bx = br[x];
          }
          b[x] = bx;
        }
        const acc_t* lrow = plane + (y + pad_t) * Wp + pad_l;
        const in_t* grow = g_ptr + ((n * C + c) * H + y) * W;
        for (int64_t x = 0; x < W; ++x) {
          const acc_t mx = m ? m[x] : acc_t(1);
          const acc_t cpre = m ? mx * b[x] + (acc_t(1) - mx) * lrow[x] : b[x];
          acc_t gc = static_cast<acc_t>(grow[x]);
          if (crf) gc *= crf_forward_slope(cpre, inv_gamma);
          if (gm_ptr) gm_ptr[(n * H + y) * W + x] += gc * (b[x] - lrow[x]);
          if (dir_ptr) dir_ptr[((n * C + c) * H + y) * W + x] = (acc_t(1) - mx) * gc;
          const acc_t h = mx * gc;
          for (int64_t r = 0; r < R; ++r) {
            const acc_t wr = w_ptr ? w_ptr[((n * R + r) * H + y) * W + x] : acc_t(1);
            if (gw_ptr) gw_ptr[((n * R + r) * H + y) * W + x] += h * br[r * W + x];
            if (hw_ptr) {
              hw_ptr[(((n * R + r) * C + c) * Hh + y + Kh - 1) * Wh + x + Kw - 1] = wr * h;
            }
          }
        }
      }
    }
  });

  at::Tensor grad_images = at::empty({0}, images.options());
  if (need[0]) {
    grad_images = at::empty_like(images);
    in_t* gi_ptr = grad_images.data_ptr<in_t>();
    const Taps<acc_t> tapsT = compact_taps<acc_t>(kernels, true);
    // Pass B, per plane: correlate over the padded domain, fold, add the direct term and
    // chain through the CRF inverse.
    const int64_t plane_work = Hp * Wp * (R * tapsT.max_count + 4);
    at::parallel_for(0, N * C, grain_for(N * C, plane_work), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> gpad(static_cast<size_t>(Hp * Wp)), colfold(static_cast<size_t>(Hp * W));
      std::vector<acc_t> rowfold(static_cast<size_t>(HW));
      const int64_t total_taps = R * std::max<int64_t>(tapsT.max_count, 1);
      std::vector<const acc_t*> ptrs(static_cast<size_t>(total_taps));
      std::vector<acc_t> wts(static_cast<size_t>(total_taps));
      for (int64_t plane = begin; plane < end; ++plane) {
        const int64_t n = plane / C, c = plane % C;
        for (int64_t U = 0; U < Hp; ++U) {
          int64_t k = 0;
          for (int64_t r = 0; r < R; ++r) {
            const acc_t* hplane = hw_ptr + ((n * R + r) * C + c) * Hh * Wh;
            const int64_t g = n * R + r, t0 = tapsT.begin[g], nt = tapsT.begin[g + 1] - t0;
            for (int64_t t = 0; t < nt; ++t, ++k) {
              // padded position (U, V) reads h at virtual (U - pad_t + dyT, V - pad_l + dxT)
              ptrs[k] = hplane + (U - pad_t + tapsT.dy[t0 + t] + Kh - 1) * Wh +
                        (Kw - 1 - pad_l + tapsT.dx[t0 + t]);
              wts[k] = tapsT.w[t0 + t];
            }
          }
          accumulate_taps<16>(ptrs.data(), wts.data(), k, Wp, gpad.data() + U * Wp);
        }
        std::fill(colfold.begin(), colfold.end(), acc_t(0));
        for (int64_t U = 0; U < Hp; ++U) {
          for (int64_t V = 0; V < Wp; ++V) {
            const int64_t xi = border_index(V - pad_l, W, border);
            if (xi >= 0) colfold[U * W + xi] += gpad[U * Wp + V];
          }
        }
        std::fill(rowfold.begin(), rowfold.end(), acc_t(0));
        for (int64_t U = 0; U < Hp; ++U) {
          const int64_t yi = border_index(U - pad_t, H, border);
          if (yi < 0) continue;
          for (int64_t x = 0; x < W; ++x) rowfold[yi * W + x] += colfold[U * W + x];
        }
        const in_t* xp = x_ptr + plane * HW;
        in_t* gp = gi_ptr + plane * HW;
        for (int64_t i = 0; i < HW; ++i) {
          acc_t g = rowfold[i] + (dir_ptr ? dir_ptr[plane * HW + i] : acc_t(0));
          if (crf) {
            const acc_t xv = static_cast<acc_t>(xp[i]);
            g *= xv > acc_t(0) ? gamma * std::pow(xv, gamma - acc_t(1)) : acc_t(0);
          }
          gp[i] = static_cast<in_t>(g);
        }
      }
    });
  }

  at::Tensor grad_kernels = at::empty({0}, opts);
  if (need[1]) {
    grad_kernels = at::empty({N, R, Kh, Kw}, opts);
    acc_t* gk_ptr = grad_kernels.data_ptr<acc_t>();
    // Pass C: one kernel tap per task, a dot product of h with the shifted input per row.
    const int64_t taps_total = N * R * Kh * Kw;
    at::parallel_for(0, taps_total, grain_for(taps_total, C * HW), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t q = i % Kw, p = (i / Kw) % Kh, r = (i / (Kw * Kh)) % R, n = i / (Kw * Kh * R);
        const int64_t dy = cy - p, dx = cx - q;
        acc_t total = 0;
        for (int64_t c = 0; c < C; ++c) {
          const acc_t* hplane = hw_ptr + ((n * R + r) * C + c) * Hh * Wh;
          const acc_t* plane = lp + (n * C + c) * Hp * Wp;
          for (int64_t y = 0; y < H; ++y) {
            total += dot_row(hplane + (y + Kh - 1) * Wh + Kw - 1,
                             plane + (y + pad_t + dy) * Wp + pad_l + dx, W);
          }
        }
        gk_ptr[i] = total;
      }
    });
  }
  return {grad_images, grad_kernels, grad_w, grad_mask};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> blur_synthesize_backward_cpu(
    const at::Tensor& grad, const at::Tensor& images_in, const at::Tensor& kernels_in,
    const std::optional<at::Tensor>& weights_in, const std::optional<at::Tensor>& mask_in,
    std::optional<double> crf_gamma, c10::string_view border_name, std::array<bool, 4> need) {
  const char* op = "blur_synthesize_backward";
  const int border = blur::check_blur_args(images_in, kernels_in, weights_in, mask_in, crf_gamma,
                                           border_name, op);
  TORCH_CHECK(images_in.scalar_type() != at::kByte, op,
              ": uint8 images are not differentiable");
  TORCH_CHECK(grad.sizes() == images_in.sizes() && grad.scalar_type() == images_in.scalar_type(),
              op, ": grad must match images in shape and dtype");
  const auto contig = [](const std::optional<at::Tensor>& t) {
    return t.has_value() ? std::optional<at::Tensor>(t->contiguous()) : std::nullopt;
  };
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> result;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, images_in.scalar_type(), "blur_synthesize_backward_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    result = backward_impl<scalar_t, acc_t>(grad.contiguous(), images_in.contiguous(),
                                            kernels_in.contiguous(), contig(weights_in),
                                            contig(mask_in), crf_gamma, border, need);
  });
  return result;
}

// ---------------------------------------------------------------------------------------
// average_frames
// ---------------------------------------------------------------------------------------

std::vector<int64_t> read_counts(const at::Tensor& counts, int64_t T, const char* op) {
  const at::Tensor c = counts.contiguous();
  std::vector<int64_t> out(c.data_ptr<int64_t>(), c.data_ptr<int64_t>() + c.numel());
  for (int64_t v : out) {
    TORCH_CHECK(v >= 1 && v <= T, op, ": counts must lie in [1, ", T, "], got ", v);
  }
  return out;
}

at::Tensor average_frames_cpu(const at::Tensor& frames_in, const at::Tensor& counts,
                              std::optional<double> crf_gamma) {
  const char* op = "average_frames";
  blur::check_frames_args(frames_in, counts, crf_gamma, op);
  const at::Tensor frames = frames_in.contiguous();
  const int64_t N = frames.size(0), T = frames.size(1);
  const int64_t P = frames.size(2) * frames.size(3) * frames.size(4);
  const std::vector<int64_t> cnt = read_counts(counts, T, op);
  at::Tensor out = at::empty({N, frames.size(2), frames.size(3), frames.size(4)}, frames.options());
  AT_DISPATCH_FLOATING_TYPES_AND3(at::kByte, at::kHalf, at::kBFloat16, frames.scalar_type(), "average_frames_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const std::vector<acc_t> lut = make_lut<scalar_t, acc_t>(crf_gamma);
    Linearize<scalar_t, acc_t> lin;
    lin.lut = lut.empty() ? nullptr : lut.data();
    lin.crf = crf_gamma.has_value();
    lin.gamma = static_cast<acc_t>(crf_gamma.value_or(1.0));
    const acc_t inv_gamma = static_cast<acc_t>(1.0 / crf_gamma.value_or(1.0));
    const scalar_t* src = frames.data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    constexpr int64_t kChunk = 1024;
    const int64_t chunks = (P + kChunk - 1) / kChunk;
    at::parallel_for(0, N * chunks, grain_for(N * chunks, kChunk * T), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> acc(kChunk);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t n = task / chunks, i0 = (task % chunks) * kChunk;
        const int64_t len = std::min(kChunk, P - i0);
        std::fill(acc.begin(), acc.begin() + len, acc_t(0));
        for (int64_t t = 0; t < cnt[n]; ++t) {
          const scalar_t* f = src + (n * T + t) * P + i0;
          for (int64_t i = 0; i < len; ++i) acc[i] += lin(f[i]);
        }
        const acc_t scale = acc_t(1) / static_cast<acc_t>(cnt[n]);
        scalar_t* o = dst + n * P + i0;
        for (int64_t i = 0; i < len; ++i) {
          acc_t v = acc[i] * scale;
          if (lin.crf) v = std::pow(std::max(v, acc_t(0)), inv_gamma);
          if constexpr (std::is_same_v<scalar_t, uint8_t>) {
            o[i] = static_cast<uint8_t>(round_to_255(std::min(std::max(v, acc_t(0)), acc_t(1))));
          } else {
            o[i] = static_cast<scalar_t>(v);
          }
        }
      }
    });
  });
  return out;
}

at::Tensor average_frames_backward_cpu(const at::Tensor& grad_in, const at::Tensor& frames_in,
                                       const at::Tensor& counts, std::optional<double> crf_gamma) {
  const char* op = "average_frames_backward";
  blur::check_frames_args(frames_in, counts, crf_gamma, op);
  TORCH_CHECK(frames_in.scalar_type() != at::kByte, op, ": uint8 frames are not differentiable");
  const at::Tensor frames = frames_in.contiguous(), grad = grad_in.contiguous();
  const int64_t N = frames.size(0), T = frames.size(1);
  const int64_t P = frames.size(2) * frames.size(3) * frames.size(4);
  TORCH_CHECK(grad.numel() == N * P && grad.scalar_type() == frames.scalar_type(), op,
              ": grad must have shape [N, C, H, W] and the dtype of frames");
  const std::vector<int64_t> cnt = read_counts(counts, T, op);
  at::Tensor out = at::empty_like(frames);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, frames.scalar_type(), "average_frames_backward_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const bool crf = crf_gamma.has_value();
    const acc_t gamma = static_cast<acc_t>(crf_gamma.value_or(1.0)), inv_gamma = acc_t(1) / gamma;
    const scalar_t* src = frames.data_ptr<scalar_t>();
    const scalar_t* g = grad.data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    at::parallel_for(0, N * P, grain_for(N * P, 2 * T), [&](int64_t begin, int64_t end) {
      for (int64_t j = begin; j < end; ++j) {
        const int64_t n = j / P, i = j % P;
        const acc_t scale = acc_t(1) / static_cast<acc_t>(cnt[n]);
        acc_t gs = static_cast<acc_t>(g[j]) * scale;
        if (crf) {
          acc_t s = 0;
          for (int64_t t = 0; t < cnt[n]; ++t)
            s += std::pow(static_cast<acc_t>(src[(n * T + t) * P + i]), gamma);
          gs *= crf_forward_slope(s * scale, inv_gamma);
        }
        for (int64_t t = 0; t < T; ++t) {
          const int64_t k = (n * T + t) * P + i;
          acc_t v = 0;
          if (t < cnt[n]) {
            const acc_t xv = static_cast<acc_t>(src[k]);
            v = crf ? (xv > acc_t(0) ? gs * gamma * std::pow(xv, gamma - acc_t(1)) : acc_t(0)) : gs;
          }
          dst[k] = static_cast<scalar_t>(v);
        }
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(facedeblur_ext, CPU, m) {
  m.impl("motion_kernels", &motion_kernels_cpu);
  m.impl("gaussian_kernels", &gaussian_kernels_cpu);
  m.impl("defocus_kernels", &defocus_kernels_cpu);
  m.impl("trajectory_kernels", &trajectory_kernels_cpu);
  m.impl("blur_synthesize", &blur_synthesize_cpu);
  m.impl("blur_synthesize_backward", &blur_synthesize_backward_cpu);
  m.impl("average_frames", &average_frames_cpu);
  m.impl("average_frames_backward", &average_frames_backward_cpu);
}

}  // namespace facedeblur
