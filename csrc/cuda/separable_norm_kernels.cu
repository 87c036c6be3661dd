// CUDA kernels of separable normalization with adaptive denormalization (SNADNet Eq. 3-9).
//
// Forward, two passes over x:
//   1. stats_kernel: per (n, c, r) weighted moments. A block owns a unit (NCHW: one plane;
//      NHWC: 32 channels of one sample) and a pixel split. Each thread keeps per-region Welford
//      state and folds in batches of pixels: the batch mean is taken around a shift (the running
//      mean), then the batch's centred second moment, merged with Chan's formula, so large
//      means cost no precision. Blocks reduce by Chan merges and write per-split partials;
//      stats_finalize_kernel merges the splits in a fixed order into mean and rstd.
//   2. forward_apply_kernel: out = (sum_r M_r (x - mean_r) rstd_r) * gamma + beta.
// Backward, two passes:
//   1. grad_sums_kernel: per (n, c, r) sums m = sum M, A = sum M gy, B = sum M gy xhat (and
//      G = sum M g xhat for a plane-shaped gamma), gy = g * gamma; per-split partials merged by
//      grad_coef_kernel into a = A / m, b = B / m, k = 1 - eps rstd^2.
//   2. grad_apply_{nchw,nhwc}_kernel: dx = sum_r M_r rstd_r (gy - a_r - b_r xhat_r),
//      dgamma = g y, dbeta = g, and the mask gradient, a sum over channels of
//      xhat_r (gy - a_r) - b_r / 2 (xhat_r^2 - k_r), written as per-channel-split partials that
//      dmask_finalize_kernel adds in a fixed order (no atomics: results are deterministic).
// Thread mapping: NCHW units put a warp along pixels (coalesced within a plane); NHWC units put
// a warp along 32 channels of one pixel (coalesced within a pixel's channel vector) and the
// block's 8 warps along pixels, so both layouts are read at full width without a transpose.
// Non-finite values follow the CPU kernels' rule (csrc/cpu/separable_norm_cpu.cpp): a batch of
// zero weight still carries a NaN (0 * inf) into m2, so a NaN or Inf in a plane makes the
// statistics of its non-empty regions NaN however pixels are batched and split; empty regions
// (rstd 0) add nothing anywhere.
#include "cuda/separable_norm_kernels.h"
#include "cuda/device_types.cuh"
#include "cuda/launch.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <limits>
#include <type_traits>

namespace facedeblur::cuda::snorm {
namespace {

constexpr int kThreads = 256;
constexpr int kWarp = 32;
constexpr int kWarps = kThreads / kWarp;
constexpr unsigned kFullMask = 0xffffffffu;

template <typename T>
struct AffineDev {
  const T* data;
  int64_t stride_n, stride_c, stride_p;
};

template <typename T>
AffineDev<T> to_dev(const Affine& a) {
  return {static_cast<const T*>(a.data), a.stride_n, a.stride_c, a.stride_p};
}

template <bool kChannelsLast>
__device__ __forceinline__ int64_t x_offset(int64_t n, int64_t c, int64_t p, int64_t C,
                                            int64_t P) {
  return kChannelsLast ? (n * P + p) * C + c : (n * C + c) * P + p;
}

// Which channel and pixels a thread of a unit block handles. NCHW unit = plane n * C + c, the
// block's threads walk its pixels; NHWC unit = n * ceil(C / 32) + tile, lane = channel in the
// tile, warp = pixel row.
template <bool kChannelsLast>
struct UnitThread {
  int64_t n, c;
  int p_first, p_step, lane_in_unit;
  bool active;
  __device__ UnitThread(int64_t unit, int64_t C) {
    if constexpr (kChannelsLast) {
      const int64_t tiles = (C + kWarp - 1) / kWarp;
      n = unit / tiles;
      lane_in_unit = threadIdx.x % kWarp;
      c = (unit % tiles) * kWarp + lane_in_unit;
      p_first = threadIdx.x / kWarp;
      p_step = kWarps;
      active = c < C;
    } else {
      n = unit / C;
      c = unit % C;
      lane_in_unit = 0;
      p_first = threadIdx.x;
      p_step = kThreads;
      active = true;
    }
  }
};

template <typename Acc>
struct Moments {
  Acc w, mean, m2;
};

// Chan et al.: fold (wb, mean_b, m2_b) into a.
template <typename Acc>
__device__ __forceinline__ void merge(Moments<Acc>& a, Acc wb, Acc mean_b, Acc m2_b) {
  if (wb == Acc(0)) {
    // Nothing to fold in, but a NaN m2_b (a non-finite x under zero weight) carries over;
    // otherwise m2_b is 0.
    a.m2 += m2_b;
    return;
  }
  const Acc total = a.w + wb;
  if (total == Acc(0)) return;
  const Acc delta = mean_b - a.mean;
  const Acc frac = wb / total;
  a.mean += delta * frac;
  a.m2 += m2_b + delta * delta * a.w * frac;
  a.w = total;
}

// Merge the moments of the threads of a block that share a channel. The result is valid in
// the leader threads: thread 0 (NCHW) or the threads of warp 0 (NHWC, one per channel).
template <typename Acc, bool kChannelsLast>
__device__ __forceinline__ bool block_merge(Moments<Acc>& m, Moments<Acc>* smem) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  if constexpr (!kChannelsLast) {
#pragma unroll
    for (int off = kWarp / 2; off > 0; off /= 2) {
      const Acc w = __shfl_xor_sync(kFullMask, m.w, off);
      const Acc mean = __shfl_xor_sync(kFullMask, m.mean, off);
      const Acc m2 = __shfl_xor_sync(kFullMask, m.m2, off);
      merge(m, w, mean, m2);
    }
    if (lane == 0) smem[warp] = m;
    __syncthreads();
    const bool leader = threadIdx.x == 0;
    if (leader) {
      for (int j = 1; j < kWarps; ++j) merge(m, smem[j].w, smem[j].mean, smem[j].m2);
    }
    __syncthreads();
    return leader;
  } else {
    smem[threadIdx.x] = m;
    __syncthreads();
    const bool leader = warp == 0;
    if (leader) {
      for (int j = 1; j < kWarps; ++j) {
        const Moments<Acc> o = smem[j * kWarp + lane];
        merge(m, o.w, o.mean, o.m2);
      }
    }
    __syncthreads();
    return leader;
  }
}

// Sum V values over the threads of a block that share a channel (leaders as in block_merge);
// the summation order is fixed.
template <typename Acc, bool kChannelsLast, int V>
__device__ __forceinline__ bool block_sum(Acc (&vals)[V], Acc* smem /* kThreads * V */) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  if constexpr (!kChannelsLast) {
#pragma unroll
    for (int v = 0; v < V; ++v) {
#pragma unroll
      for (int off = kWarp / 2; off > 0; off /= 2) {
        vals[v] += __shfl_xor_sync(kFullMask, vals[v], off);
      }
      if (lane == 0) smem[warp * V + v] = vals[v];
    }
    __syncthreads();
    const bool leader = threadIdx.x == 0;
    if (leader) {
#pragma unroll
      for (int v = 0; v < V; ++v) {
        Acc s = smem[v];
        for (int j = 1; j < kWarps; ++j) s += smem[j * V + v];
        vals[v] = s;
      }
    }
    __syncthreads();
    return leader;
  } else {
#pragma unroll
    for (int v = 0; v < V; ++v) smem[v * kThreads + threadIdx.x] = vals[v];
    __syncthreads();
    const bool leader = warp == 0;
    if (leader) {
#pragma unroll
      for (int v = 0; v < V; ++v) {
        Acc s = smem[v * kThreads + lane];
        for (int j = 1; j < kWarps; ++j) s += smem[v * kThreads + j * kWarp + lane];
        vals[v] = s;
      }
    }
    __syncthreads();
    return leader;
  }
}

// ---------------------------------------------------------------------------------------------
// Forward pass 1: per-split moments of regions [r0, r0 + kMaxR). grid = (units, splits).
template <typename T, typename Acc, bool kChannelsLast, int kMaxR>
__global__ void __launch_bounds__(kThreads)
    stats_kernel(const T* __restrict__ x, const T* __restrict__ masks, int64_t C, int64_t NC,
                 int R, int r0, int64_t P, int64_t pixels_per_split,
                 Moments<Acc>* __restrict__ partial /* [splits][NC][R] */) {
  constexpr int kBatch = 4;
  FD_SHARED_ARRAY(Moments<Acc>, smem, kThreads);
  const UnitThread<kChannelsLast> t(blockIdx.x, C);
  const int64_t p_begin = static_cast<int64_t>(blockIdx.y) * pixels_per_split;
  const int64_t p_end = min(P, p_begin + pixels_per_split);
  const T* mask_n = masks + (t.n * R + r0) * P;
  const int regions = min(kMaxR, R - r0);

  Moments<Acc> st[kMaxR];
#pragma unroll
  for (int r = 0; r < kMaxR; ++r) st[r] = {Acc(0), Acc(0), Acc(0)};

  for (int64_t p = p_begin + t.p_first; p < p_end; p += kBatch * t.p_step) {
    Acc xv[kBatch];
    bool ok[kBatch];
#pragma unroll
    for (int k = 0; k < kBatch; ++k) {
      const int64_t pk = p + static_cast<int64_t>(k) * t.p_step;
      ok[k] = t.active && pk < p_end;
      xv[k] = ok[k] ? to_acc(x[x_offset<kChannelsLast>(t.n, t.c, pk, C, P)]) : Acc(0);
    }
    const T* mask_p = mask_n + p;
#pragma unroll
    for (int r = 0; r < kMaxR; ++r) {
      if (r < regions) {
        Acc wv[kBatch];
        Acc bw = Acc(0);
#pragma unroll
        for (int k = 0; k < kBatch; ++k) {
          wv[k] = ok[k] ? to_acc(mask_p[static_cast<int64_t>(k) * t.p_step]) : Acc(0);
          bw += wv[k];
        }
        // Deviations from a shift near the mean keep the batch sum free of a large offset.
        const Acc shift = st[r].w > Acc(0) ? st[r].mean : xv[0];
        Acc bs = Acc(0);
#pragma unroll
        for (int k = 0; k < kBatch; ++k) bs += wv[k] * (xv[k] - shift);
        if (bw == Acc(0)) {
          // Zero weight, but a non-finite x made bs NaN (0 * inf): carry it into m2 (0 * a
          // finite bs adds nothing), so the result does not depend on how pixels are batched.
          st[r].m2 += bs * Acc(0);
        } else {
          const Acc bmean = shift + bs / bw;
          Acc bm2 = Acc(0);
#pragma unroll
          for (int k = 0; k < kBatch; ++k) {
            const Acc d = xv[k] - bmean;
            bm2 += wv[k] * d * d;
          }
          merge(st[r], bw, bmean, bm2);
        }
      }
      mask_p += P;
    }
  }

#pragma unroll
  for (int r = 0; r < kMaxR; ++r) {
    if (r < regions) {  // uniform over the block
      Moments<Acc> m = st[r];
      if (block_merge<Acc, kChannelsLast>(m, smem) && t.active) {
        partial[(static_cast<int64_t>(blockIdx.y) * NC + t.n * C + t.c) * R + r0 + r] = m;
      }
    }
  }
}

// Merge the splits of (n, c, r) in order; mean and rstd (0 and 0 for an empty region).
template <typename Acc>
__global__ void __launch_bounds__(kThreads)
    stats_finalize_kernel(const Moments<Acc>* __restrict__ partial, int64_t NCR, int splits,
                          Acc eps, Acc* __restrict__ mean, Acc* __restrict__ rstd) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= NCR) return;
  Moments<Acc> m = partial[i];
  for (int s = 1; s < splits; ++s) {
    const Moments<Acc> o = partial[s * NCR + i];
    merge(m, o.w, o.mean, o.m2);
  }
  if (m.w <= Acc(0)) {  // empty (a NaN mass is not: its statistics come out NaN)
    mean[i] = Acc(0);
    rstd[i] = Acc(0);
    return;
  }
  // A non-finite value met on the way leaves the mean non-finite or m2 NaN: both statistics
  // are then NaN, as on the CPU. (Not max(var, 0): CUDA's max drops a NaN operand.)
  const Acc var = m.m2 / m.w;
  if (m.mean - m.mean == Acc(0) && var == var) {
    mean[i] = m.mean;
    rstd[i] = Acc(1) / sqrt((var < Acc(0) ? Acc(0) : var) + eps);
  } else {
    mean[i] = rstd[i] = std::numeric_limits<Acc>::quiet_NaN();
  }
}

// Forward pass 2. grid = (units, pixel tiles); dynamic shared memory 2 * R * lanes Acc values.
template <typename T, typename Acc, bool kChannelsLast>
__global__ void __launch_bounds__(kThreads)
    forward_apply_kernel(const T* __restrict__ x, const T* __restrict__ masks, AffineDev<T> gamma,
                         AffineDev<T> beta, const Acc* __restrict__ mean,
                         const Acc* __restrict__ rstd, T* __restrict__ out, int64_t C, int R,
                         int64_t P, int64_t pixels_per_block) {
  constexpr int kLanes = kChannelsLast ? kWarp : 1;
  unsigned char* smem_raw = dynamic_shared_memory<unsigned char>();
  Acc* s_mean = reinterpret_cast<Acc*>(smem_raw);
  Acc* s_rstd = s_mean + R * kLanes;
  const UnitThread<kChannelsLast> t(blockIdx.x, C);
  const int64_t c0 = t.c - t.lane_in_unit;
  for (int i = threadIdx.x; i < R * kLanes; i += kThreads) {
    const int r = i / kLanes, l = i % kLanes;
    const int64_t c = c0 + l;
    const bool ok = c < C;
    s_mean[i] = ok ? mean[(t.n * C + c) * R + r] : Acc(0);
    s_rstd[i] = ok ? rstd[(t.n * C + c) * R + r] : Acc(0);
  }
  __syncthreads();
  if (!t.active) return;
  const int64_t p_begin = static_cast<int64_t>(blockIdx.y) * pixels_per_block;
  const int64_t p_end = min(P, p_begin + pixels_per_block);
  const T* mask_n = masks + t.n * R * P;
  const T* gamma_nc =
      gamma.data != nullptr ? gamma.data + t.n * gamma.stride_n + t.c * gamma.stride_c : nullptr;
  const T* beta_nc =
      beta.data != nullptr ? beta.data + t.n * beta.stride_n + t.c * beta.stride_c : nullptr;
  const Acc* my_mean = s_mean + t.lane_in_unit;
  const Acc* my_rstd = s_rstd + t.lane_in_unit;
#pragma unroll 4
  for (int64_t p = p_begin + t.p_first; p < p_end; p += t.p_step) {
    const int64_t off = x_offset<kChannelsLast>(t.n, t.c, p, C, P);
    const Acc xv = to_acc(x[off]);
    Acc y = Acc(0);
    for (int r = 0; r < R; ++r) {
      const Acc w = to_acc(mask_n[r * P + p]);
      const Acc sr = my_rstd[r * kLanes];
      // An empty region (rstd 0) adds nothing, also where x is not finite (not 0 * inf).
      if (sr != Acc(0)) y += w * ((xv - my_mean[r * kLanes]) * sr);
    }
    if (gamma_nc != nullptr) y *= to_acc(gamma_nc[p * gamma.stride_p]);
    if (beta_nc != nullptr) y += to_acc(beta_nc[p * beta.stride_p]);
    out[off] = FromAcc<T>::cvt(y);
  }
}

// ---------------------------------------------------------------------------------------------
// Backward pass 1: per-split sums (m, A, B, G) of regions [r0, r0 + kMaxR) and sum g.
// grid = (units, splits).
template <typename T, typename Acc, bool kChannelsLast, int kMaxR>
__global__ void __launch_bounds__(kThreads)
    grad_sums_kernel(const T* __restrict__ g, const T* __restrict__ x, const T* __restrict__ masks,
                     AffineDev<T> gamma, const Acc* __restrict__ mean,
                     const Acc* __restrict__ rstd, int64_t C, int64_t NC, int R, int r0, int64_t P,
                     int64_t pixels_per_split, bool want_g_xhat, bool want_sum_g,
                     Acc* __restrict__ partial /* [splits][NC][R][4] */,
                     Acc* __restrict__ partial_g /* [splits][NC] */) {
  FD_SHARED_ARRAY(Acc, smem, kThreads * 4);
  const UnitThread<kChannelsLast> t(blockIdx.x, C);
  const int64_t p_begin = static_cast<int64_t>(blockIdx.y) * pixels_per_split;
  const int64_t p_end = min(P, p_begin + pixels_per_split);
  const T* mask_n = masks + (t.n * R + r0) * P;
  const int regions = min(kMaxR, R - r0);
  const T* gamma_nc = gamma.data != nullptr && t.active
                          ? gamma.data + t.n * gamma.stride_n + t.c * gamma.stride_c
                          : nullptr;
  Acc mu[kMaxR], s[kMaxR];
#pragma unroll
  for (int r = 0; r < kMaxR; ++r) {
    const bool ok = t.active && r < regions;
    mu[r] = ok ? mean[(t.n * C + t.c) * R + r0 + r] : Acc(0);
    s[r] = ok ? rstd[(t.n * C + t.c) * R + r0 + r] : Acc(0);
  }
  Acc acc[kMaxR][4];
#pragma unroll
  for (int r = 0; r < kMaxR; ++r) {
#pragma unroll
    for (int q = 0; q < 4; ++q) acc[r][q] = Acc(0);
  }
  Acc sum_g = Acc(0);
  if (t.active) {
#pragma unroll 2
    for (int64_t p = p_begin + t.p_first; p < p_end; p += t.p_step) {
      const int64_t off = x_offset<kChannelsLast>(t.n, t.c, p, C, P);
      const Acc gv = to_acc(g[off]);
      const Acc xv = to_acc(x[off]);
      const Acc gy = gamma_nc != nullptr ? gv * to_acc(gamma_nc[p * gamma.stride_p]) : gv;
      sum_g += gv;
#pragma unroll
      for (int r = 0; r < kMaxR; ++r) {
        if (r < regions) {
          const Acc w = to_acc(mask_n[r * P + p]);
          const Acc wxh = w * ((xv - mu[r]) * s[r]);
          acc[r][0] += w;
          acc[r][1] += w * gy;
          acc[r][2] += wxh * gy;
          if (want_g_xhat) acc[r][3] += wxh * gv;
        }
      }
    }
  }
  const int64_t row = static_cast<int64_t>(blockIdx.y) * NC + t.n * C + t.c;
#pragma unroll
  for (int r = 0; r < kMaxR; ++r) {
    if (r < regions) {  // uniform over the block
      if (block_sum<Acc, kChannelsLast, 4>(acc[r], smem) && t.active) {
#pragma unroll
        for (int q = 0; q < 4; ++q) partial[(row * R + r0 + r) * 4 + q] = acc[r][q];
      }
    }
  }
  if (want_sum_g) {
    Acc v[1] = {sum_g};
    if (block_sum<Acc, kChannelsLast, 1>(v, smem) && t.active) partial_g[row] = v[0];
  }
}

// Per (n, c): coefficients a, b, k per region and the plane sums of the affine gradients.
template <typename Acc>
__global__ void __launch_bounds__(kThreads)
    grad_coef_kernel(const Acc* __restrict__ partial, const Acc* __restrict__ partial_g,
                     const Acc* __restrict__ rstd, int64_t NC, int R, int splits, Acc eps,
                     Acc* __restrict__ coef /* [NC][R][3] */, Acc* __restrict__ gamma_plane_sums,
                     Acc* __restrict__ beta_plane_sums) {
  const int64_t nc = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (nc >= NC) return;
  Acc g_y = Acc(0);
  for (int r = 0; r < R; ++r) {
    Acc sums[4] = {Acc(0), Acc(0), Acc(0), Acc(0)};
    for (int sp = 0; sp < splits; ++sp) {
      const Acc* src = partial + ((sp * NC + nc) * R + r) * 4;
#pragma unroll
      for (int q = 0; q < 4; ++q) sums[q] += src[q];
    }
    const Acc s = rstd[nc * R + r];
    const bool present = s != Acc(0) && sums[0] > Acc(0);
    Acc* dst = coef + (nc * R + r) * 3;
    dst[0] = present ? sums[1] / sums[0] : Acc(0);
    dst[1] = present ? sums[2] / sums[0] : Acc(0);
    dst[2] = Acc(1) - eps * s * s;
    if (s != Acc(0)) g_y += sums[3];  // an empty region's sums may hold 0 * inf
  }
  if (gamma_plane_sums != nullptr) gamma_plane_sums[nc] = g_y;
  if (beta_plane_sums != nullptr) {
    Acc total = Acc(0);
    for (int sp = 0; sp < splits; ++sp) total += partial_g[sp * NC + nc];
    beta_plane_sums[nc] = total;
  }
}

// Elementwise backward of one element; dm[r] receives its mask-gradient term.
template <typename Acc, int kMaxR, bool kWantDmask>
__device__ __forceinline__ void grad_element(Acc gv, Acc xv, Acc gy, const Acc (&w)[kMaxR], int R,
                                             const Acc* __restrict__ mu,
                                             const Acc* __restrict__ s,
                                             const Acc* __restrict__ cf, int stride, Acc& dx,
                                             Acc& y, Acc (&dm)[kMaxR]) {
  dx = Acc(0);
  y = Acc(0);
#pragma unroll
  for (int r = 0; r < kMaxR; ++r) {
    if (r < R) {
      const Acc sr = s[r * stride];
      if (sr == Acc(0)) {  // empty region: nothing, also where x is not finite (not 0 * inf)
        if (kWantDmask) dm[r] = Acc(0);
        continue;
      }
      const Acc a = cf[(3 * r + 0) * stride], b = cf[(3 * r + 1) * stride];
      const Acc xh = (xv - mu[r * stride]) * sr;
      dx += w[r] * sr * (gy - a - b * xh);
      y += w[r] * xh;
      if (kWantDmask) {
        const Acc k = cf[(3 * r + 2) * stride];
        dm[r] = xh * (gy - a) - Acc(0.5) * b * (xh * xh - k);
      }
    }
  }
}

// Backward pass 2, NCHW. grid = (ceil(P / 32), channel splits, N); lane = pixel, warp =
// channel group. The mask gradient of a block's pixels is summed over its channel split.
template <typename T, typename Acc, int kMaxR, bool kWantDmask>
__global__ void __launch_bounds__(kThreads)
    grad_apply_nchw_kernel(const T* __restrict__ g, const T* __restrict__ x,
                           const T* __restrict__ masks, AffineDev<T> gamma,
                           const Acc* __restrict__ mean, const Acc* __restrict__ rstd,
                           const Acc* __restrict__ coef, int64_t N, int64_t C, int R, int64_t P,
                           int64_t channels_per_split, T* __restrict__ dx,
                           T* __restrict__ dgamma_full, T* __restrict__ dbeta_full,
                           Acc* __restrict__ dmask_partial /* [splits][N][R][P] */) {
  FD_SHARED_ARRAY(Acc, s_dm, kWantDmask ? kWarps * kMaxR * kWarp : 1);
  const int lane = threadIdx.x % kWarp, grp = threadIdx.x / kWarp;
  const int64_t n = blockIdx.z;
  const int64_t p = static_cast<int64_t>(blockIdx.x) * kWarp + lane;
  const bool in = p < P;
  const int64_t c_begin = static_cast<int64_t>(blockIdx.y) * channels_per_split;
  const int64_t c_end = min(C, c_begin + channels_per_split);
  Acc w[kMaxR], dm_total[kMaxR], dm[kMaxR];
#pragma unroll
  for (int r = 0; r < kMaxR; ++r) {
    w[r] = (in && r < R) ? to_acc(masks[(n * R + r) * P + p]) : Acc(0);
    dm_total[r] = Acc(0);
    dm[r] = Acc(0);
  }
  if (in) {
    for (int64_t c = c_begin + grp; c < c_end; c += kWarps) {
      const int64_t nc = n * C + c;
      const int64_t off = nc * P + p;
      const Acc gv = to_acc(g[off]);
      const Acc xv = to_acc(x[off]);
      const Acc gy =
          gamma.data != nullptr
              ? gv * to_acc(gamma.data[n * gamma.stride_n + c * gamma.stride_c + p * gamma.stride_p])
              : gv;
      Acc dxv, y;
      grad_element<Acc, kMaxR, kWantDmask>(gv, xv, gy, w, R, mean + nc * R, rstd + nc * R,
                                           coef + nc * R * 3, 1, dxv, y, dm);
      if (kWantDmask) {
#pragma unroll
        for (int r = 0; r < kMaxR; ++r) dm_total[r] += dm[r];
      }
      if (dx != nullptr) dx[off] = FromAcc<T>::cvt(dxv);
      if (dgamma_full != nullptr) dgamma_full[off] = FromAcc<T>::cvt(gv * y);
      if (dbeta_full != nullptr) dbeta_full[off] = g[off];
    }
  }
  if constexpr (kWantDmask) {
#pragma unroll
    for (int r = 0; r < kMaxR; ++r) s_dm[(grp * kMaxR + r) * kWarp + lane] = dm_total[r];
    __syncthreads();
    if (grp == 0 && in) {
#pragma unroll
      for (int r = 0; r < kMaxR; ++r) {
        if (r < R) {
          Acc total = s_dm[r * kWarp + lane];
          for (int j = 1; j < kWarps; ++j) total += s_dm[(j * kMaxR + r) * kWarp + lane];
          dmask_partial[((static_cast<int64_t>(blockIdx.y) * N + n) * R + r) * P + p] = total;
        }
      }
    }
  }
}

// Backward pass 2, NHWC. grid = (pixel tiles, ceil(C / 32), N); lane = channel, warp = pixel
// row. The mask gradient of a pixel is summed over the tile's 32 channels with shuffles, region
// by region, so no per-region register arrays are needed. Dynamic shared memory: the tile's
// statistics and coefficients, 5 * R * 32 Acc values.
template <typename T, typename Acc, bool kWantDmask>
__global__ void __launch_bounds__(kThreads)
    grad_apply_nhwc_kernel(const T* __restrict__ g, const T* __restrict__ x,
                           const T* __restrict__ masks, AffineDev<T> gamma,
                           const Acc* __restrict__ mean, const Acc* __restrict__ rstd,
                           const Acc* __restrict__ coef, int64_t N, int64_t C, int R, int64_t P,
                           int64_t pixels_per_block, T* __restrict__ dx,
                           T* __restrict__ dgamma_full, T* __restrict__ dbeta_full,
                           Acc* __restrict__ dmask_partial /* [C tiles][N][R][P] */) {
  // Lane-minor (bank-conflict free): mean, rstd, a, b, k, each [R][32].
  unsigned char* smem_raw = dynamic_shared_memory<unsigned char>();
  Acc* s_cf = reinterpret_cast<Acc*>(smem_raw);
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int64_t n = blockIdx.z;
  const int64_t c = static_cast<int64_t>(blockIdx.y) * kWarp + lane;
  const bool active = c < C;
  for (int i = threadIdx.x; i < R * kWarp; i += kThreads) {
    const int r = i / kWarp, l = i % kWarp;
    const int64_t cc = static_cast<int64_t>(blockIdx.y) * kWarp + l;
    const bool ok = cc < C;
    const int64_t src = (n * C + cc) * R + r;
    s_cf[(0 * R + r) * kWarp + l] = ok ? mean[src] : Acc(0);
    s_cf[(1 * R + r) * kWarp + l] = ok ? rstd[src] : Acc(0);
#pragma unroll
    for (int q = 0; q < 3; ++q) s_cf[((2 + q) * R + r) * kWarp + l] = ok ? coef[src * 3 + q] : Acc(0);
  }
  __syncthreads();
  const Acc* my_mean = s_cf + lane;
  const Acc* my_rstd = s_cf + R * kWarp + lane;
  const Acc* my_a = s_cf + 2 * R * kWarp + lane;
  const Acc* my_b = s_cf + 3 * R * kWarp + lane;
  const Acc* my_k = s_cf + 4 * R * kWarp + lane;
  const T* gamma_nc = gamma.data != nullptr && active
                          ? gamma.data + n * gamma.stride_n + c * gamma.stride_c
                          : nullptr;
  const T* mask_n = masks + n * R * P;
  const int64_t p_begin = static_cast<int64_t>(blockIdx.x) * pixels_per_block;
  const int64_t p_end = min(P, p_begin + pixels_per_block);
  for (int64_t p = p_begin + warp; p < p_end; p += kWarps) {  // uniform per warp
    const int64_t off = (n * P + p) * C + c;
    const Acc gv = active ? to_acc(g[off]) : Acc(0);
    const Acc xv = active ? to_acc(x[off]) : Acc(0);
    const Acc gy = gamma_nc != nullptr ? gv * to_acc(gamma_nc[p * gamma.stride_p]) : gv;
    Acc dxv = Acc(0), y = Acc(0);
    for (int r = 0; r < R; ++r) {
      const Acc w = to_acc(mask_n[r * P + p]);  // same address across the warp: one load
      const Acc sr = my_rstd[r * kWarp];
      const Acc a = my_a[r * kWarp], b = my_b[r * kWarp];
      const Acc xh = (xv - my_mean[r * kWarp]) * sr;
      // An empty region (rstd 0) adds nothing, also where x is not finite (not 0 * inf).
      const bool contributes = sr != Acc(0);
      if (contributes) {
        dxv += w * sr * (gy - a - b * xh);
        y += w * xh;
      }
      if constexpr (kWantDmask) {
        Acc v = xh * (gy - a) - Acc(0.5) * b * (xh * xh - my_k[r * kWarp]);
        if (!active || !contributes) v = Acc(0);
#pragma unroll
        for (int o = kWarp / 2; o > 0; o /= 2) v += __shfl_xor_sync(kFullMask, v, o);
        if (lane == 0) {
          dmask_partial[((static_cast<int64_t>(blockIdx.y) * N + n) * R + r) * P + p] = v;
        }
      }
    }
    if (active) {
      if (dx != nullptr) dx[off] = FromAcc<T>::cvt(dxv);
      if (dgamma_full != nullptr) dgamma_full[off] = FromAcc<T>::cvt(gv * y);
      if (dbeta_full != nullptr) dbeta_full[off] = g[off];
    }
  }
}

// Sum the channel-split partials of the mask gradient in order.
template <typename T, typename Acc>
__global__ void __launch_bounds__(kThreads)
    dmask_finalize_kernel(const Acc* __restrict__ partial, int64_t total, int splits,
                          T* __restrict__ dmask) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= total) return;
  Acc s = partial[i];
  for (int sp = 1; sp < splits; ++sp) s += partial[sp * total + i];
  dmask[i] = FromAcc<T>::cvt(s);
}

// ---------------------------------------------------------------------------------------------
// Launch planning (shared by the workspace queries and the launchers).

int sm_count(int device) {
  int sms = 0;
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess ||
      sms <= 0) {
    (void)cudaGetLastError();
    sms = 80;
  }
  return sms;
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

constexpr int64_t kMaxGridYZ = 65535;  // CUDA's limit, for the shapes refused up front

// Smallest reduction split (pixels per block) and backward channel split; the emulator tests
// lower them at compile time so that split paths run on small inputs.
#ifndef FACEDEBLUR_SNORM_MIN_SPLIT_PIXELS_NCHW
#define FACEDEBLUR_SNORM_MIN_SPLIT_PIXELS_NCHW 2048
#endif
#ifndef FACEDEBLUR_SNORM_MIN_SPLIT_PIXELS_NHWC
#define FACEDEBLUR_SNORM_MIN_SPLIT_PIXELS_NHWC 64
#endif
#ifndef FACEDEBLUR_SNORM_MIN_SPLIT_CHANNELS
#define FACEDEBLUR_SNORM_MIN_SPLIT_CHANNELS (kWarps * 4)  // 4 channels per warp
#endif

struct Plan {
  int64_t NC = 0, units = 0, c_tiles = 0;
  // reductions (stats, grad sums)
  int64_t splits = 1, pixels_per_split = 0;
  // forward apply
  int64_t apply_tiles = 1, apply_pixels_per_block = 0;
  // backward apply
  int64_t grad_splits = 1, grad_channels_per_split = 0;  // NCHW: channel splits
  int64_t grad_tiles = 1, grad_pixels_per_block = 0;     // NHWC: pixel tiles
};

Plan make_plan(const Shape& s, int device) {
  Plan pl;
  const int64_t target_blocks = static_cast<int64_t>(sm_count(device)) * (2048 / kThreads) * 2;
  pl.NC = s.N * s.C;
  pl.c_tiles = ceil_div(s.C, kWarp);
  pl.units = s.channels_last ? s.N * pl.c_tiles : pl.NC;
  // Reductions: enough blocks to fill the GPU twice, but no block with less than ~2K elements.
  const int64_t min_pixels = s.channels_last ? FACEDEBLUR_SNORM_MIN_SPLIT_PIXELS_NHWC
                                             : FACEDEBLUR_SNORM_MIN_SPLIT_PIXELS_NCHW;
  const int64_t max_splits = std::max<int64_t>(1, std::min(kGridYZCap, s.P / min_pixels));
  pl.splits = std::clamp<int64_t>(ceil_div(target_blocks, pl.units), 1, max_splits);
  pl.pixels_per_split = ceil_div(s.P, pl.splits);
  pl.splits = ceil_div(s.P, pl.pixels_per_split);
  // Forward apply: 8 (NCHW) or 16 (NHWC) pixels per thread.
  pl.apply_pixels_per_block = s.channels_last ? kWarps * 16 : kThreads * 8;
  pl.apply_pixels_per_block =
      std::max(pl.apply_pixels_per_block, ceil_div(s.P, kGridYZCap));
  pl.apply_tiles = ceil_div(s.P, pl.apply_pixels_per_block);
  if (s.channels_last) {
    // Backward apply NHWC: pixel tiles of 32..256 pixels, as many blocks as fit the target.
    const int64_t per_tile_blocks = pl.c_tiles * s.N;
    int64_t pix = 256;
    while (pix > 32 && ceil_div(s.P, pix) * per_tile_blocks < target_blocks) pix /= 2;
    pl.grad_pixels_per_block = pix;
    pl.grad_tiles = ceil_div(s.P, pix);
    pl.grad_splits = pl.c_tiles;
    pl.grad_channels_per_split = kWarp;
  } else {
    // Backward apply NCHW: 32-pixel tiles; split channels until the GPU is filled, each split
    // keeping at least 4 channels per warp.
    pl.grad_tiles = ceil_div(s.P, kWarp);
    const int64_t base_blocks = pl.grad_tiles * s.N;
    const int64_t max_csplits = std::max<int64_t>(
        1, std::min(kGridYZCap, s.C / int64_t{FACEDEBLUR_SNORM_MIN_SPLIT_CHANNELS}));
    pl.grad_splits = std::clamp<int64_t>(ceil_div(target_blocks, base_blocks), 1, max_csplits);
    pl.grad_channels_per_split = ceil_div(s.C, pl.grad_splits);
    pl.grad_splits = ceil_div(s.C, pl.grad_channels_per_split);
  }
  return pl;
}

size_t align_up(size_t bytes) { return (bytes + 255) / 256 * 256; }

size_t acc_size(Dtype d) { return d == Dtype::kFloat64 ? sizeof(double) : sizeof(float); }

struct BackwardWorkspace {
  size_t partial = 0, partial_g = 0, coef = 0, dmask = 0;
  size_t total() const { return partial + partial_g + coef + dmask; }
};

BackwardWorkspace backward_layout(const Shape& s, Dtype d, bool want_grad_masks,
                                  const Plan& pl) {
  const size_t a = acc_size(d);
  BackwardWorkspace ws;
  ws.partial = align_up(a * pl.splits * pl.NC * s.R * 4);
  ws.partial_g = align_up(a * pl.splits * pl.NC);
  ws.coef = align_up(a * pl.NC * s.R * 3);
  ws.dmask = want_grad_masks ? align_up(a * pl.grad_splits * s.N * s.R * s.P) : 0;
  return ws;
}

// Region capacity of the reduction kernels (their per-region accumulators live in registers):
// more regions run in groups of this many, one pass over x per group.
constexpr int kReduceGroup = 4;

template <typename F>
void dispatch_reduce_regions(int regions, F&& f) {
  if (regions <= 2) {
    f(std::integral_constant<int, 2>{});
  } else {
    f(std::integral_constant<int, kReduceGroup>{});
  }
}

// Calls f(std::integral_constant<int, M>) with the smallest compiled region capacity >= R
// (R <= kMaxRegions).
template <typename F>
void dispatch_regions(int R, F&& f) {
  if (R <= 2) {
    f(std::integral_constant<int, 2>{});
  } else if (R <= 4) {
    f(std::integral_constant<int, 4>{});
  } else if (R <= 8) {
    f(std::integral_constant<int, 8>{});
  } else {
    f(std::integral_constant<int, 16>{});
  }
}

template <typename T>
cudaError_t forward_typed(const Shape& s, const ForwardArgs& a, void* workspace, int device,
                          cudaStream_t stream) {
  using Acc = typename AccType<T>::type;
  const Plan pl = make_plan(s, device);
  const int R = static_cast<int>(s.R);
  const T* x = static_cast<const T*>(a.x);
  const T* masks = static_cast<const T*>(a.masks);
  auto* partial = static_cast<Moments<Acc>*>(workspace);
  Acc* mean = static_cast<Acc*>(a.mean);
  Acc* rstd = static_cast<Acc*>(a.rstd);
  const dim3 red_grid(static_cast<unsigned>(pl.units), static_cast<unsigned>(pl.splits));
  for (int r0 = 0; r0 < R; r0 += kReduceGroup) {
    dispatch_reduce_regions(std::min(R - r0, kReduceGroup), [&](auto max_r) {
      constexpr int M = decltype(max_r)::value;
      if (s.channels_last) {
        launch_kernel<stats_kernel<T, Acc, true, M>>(red_grid, kThreads, 0, stream, x, masks, s.C,
            pl.NC, R, r0, s.P, pl.pixels_per_split, partial);
      } else {
        launch_kernel<stats_kernel<T, Acc, false, M>>(red_grid, kThreads, 0, stream, x, masks, s.C,
            pl.NC, R, r0, s.P, pl.pixels_per_split, partial);
      }
    });
  }
  const int64_t NCR = pl.NC * s.R;
  launch_kernel<stats_finalize_kernel<Acc>>(static_cast<unsigned>(ceil_div(NCR, kThreads)),
      kThreads, 0, stream, partial, NCR, static_cast<int>(pl.splits), static_cast<Acc>(a.eps), mean,
      rstd);
  const dim3 apply_grid(static_cast<unsigned>(pl.units), static_cast<unsigned>(pl.apply_tiles));
  const size_t smem = 2 * sizeof(Acc) * s.R * (s.channels_last ? kWarp : 1);
  if (s.channels_last) {
    launch_kernel<forward_apply_kernel<T, Acc, true>>(apply_grid, kThreads, smem, stream, x, masks,
        to_dev<T>(a.gamma), to_dev<T>(a.beta), mean, rstd, static_cast<T*>(a.out), s.C, R, s.P,
        pl.apply_pixels_per_block);
  } else {
    launch_kernel<forward_apply_kernel<T, Acc, false>>(apply_grid, kThreads, smem, stream, x, masks,
        to_dev<T>(a.gamma), to_dev<T>(a.beta), mean, rstd, static_cast<T*>(a.out), s.C, R, s.P,
        pl.apply_pixels_per_block);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t backward_typed(const Shape& s, const BackwardArgs& a, void* workspace, int device,
                           cudaStream_t stream) {
  using Acc = typename AccType<T>::type;
  const Plan pl = make_plan(s, device);
  const bool want_dmask = a.grad_masks != nullptr;
  const BackwardWorkspace ws = backward_layout(s, sizeof(T) == 8 ? Dtype::kFloat64
                                                                 : Dtype::kFloat32,
                                               want_dmask, pl);
  auto* base = static_cast<unsigned char*>(workspace);
  Acc* partial = reinterpret_cast<Acc*>(base);
  Acc* partial_g = reinterpret_cast<Acc*>(base + ws.partial);
  Acc* coef = reinterpret_cast<Acc*>(base + ws.partial + ws.partial_g);
  Acc* dmask_partial =
      want_dmask ? reinterpret_cast<Acc*>(base + ws.partial + ws.partial_g + ws.coef) : nullptr;
  const int R = static_cast<int>(s.R);
  const T* g = static_cast<const T*>(a.grad_out);
  const T* x = static_cast<const T*>(a.x);
  const T* masks = static_cast<const T*>(a.masks);
  const Acc* mean = static_cast<const Acc*>(a.mean);
  const Acc* rstd = static_cast<const Acc*>(a.rstd);
  const AffineDev<T> gamma = to_dev<T>(a.gamma);
  const bool want_g_xhat = a.gamma_plane_sums != nullptr;
  const bool want_sum_g = a.beta_plane_sums != nullptr;

  const dim3 red_grid(static_cast<unsigned>(pl.units), static_cast<unsigned>(pl.splits));
  for (int r0 = 0; r0 < R; r0 += kReduceGroup) {
    const bool sum_g_here = want_sum_g && r0 == 0;
    dispatch_reduce_regions(std::min(R - r0, kReduceGroup), [&](auto max_r) {
      constexpr int M = decltype(max_r)::value;
      if (s.channels_last) {
        launch_kernel<grad_sums_kernel<T, Acc, true, M>>(red_grid, kThreads, 0, stream, g, x, masks,
            gamma, mean, rstd, s.C, pl.NC, R, r0, s.P, pl.pixels_per_split, want_g_xhat, sum_g_here,
            partial, partial_g);
      } else {
        launch_kernel<grad_sums_kernel<T, Acc, false, M>>(red_grid, kThreads, 0, stream, g, x,
            masks, gamma, mean, rstd, s.C, pl.NC, R, r0, s.P, pl.pixels_per_split, want_g_xhat,
            sum_g_here, partial, partial_g);
      }
    });
  }
  launch_kernel<grad_coef_kernel<Acc>>(static_cast<unsigned>(ceil_div(pl.NC, kThreads)), kThreads,
      0, stream, partial, partial_g, rstd, pl.NC, R, static_cast<int>(pl.splits),
      static_cast<Acc>(a.eps), coef, static_cast<Acc*>(a.gamma_plane_sums),
      static_cast<Acc*>(a.beta_plane_sums));

  T* dx = static_cast<T*>(a.grad_x);
  T* dgamma = static_cast<T*>(a.grad_gamma_full);
  T* dbeta = static_cast<T*>(a.grad_beta_full);
  if ((dx != nullptr || dgamma != nullptr || dbeta != nullptr || want_dmask) &&
      s.channels_last) {
    const dim3 grid(static_cast<unsigned>(pl.grad_tiles), static_cast<unsigned>(pl.c_tiles),
                    static_cast<unsigned>(s.N));
    const size_t smem = 5 * sizeof(Acc) * s.R * kWarp;
    if (want_dmask) {
      launch_kernel<grad_apply_nhwc_kernel<T, Acc, true>>(grid, kThreads, smem, stream, g, x, masks,
          gamma, mean, rstd, coef, s.N, s.C, R, s.P, pl.grad_pixels_per_block, dx, dgamma, dbeta,
          dmask_partial);
    } else {
      launch_kernel<grad_apply_nhwc_kernel<T, Acc, false>>(grid, kThreads, smem, stream, g, x,
          masks, gamma, mean, rstd, coef, s.N, s.C, R, s.P, pl.grad_pixels_per_block, dx, dgamma,
          dbeta, nullptr);
    }
  } else if (dx != nullptr || dgamma != nullptr || dbeta != nullptr || want_dmask) {
    const dim3 grid(static_cast<unsigned>(pl.grad_tiles), static_cast<unsigned>(pl.grad_splits),
                    static_cast<unsigned>(s.N));
    dispatch_regions(R, [&](auto max_r) {
      constexpr int M = decltype(max_r)::value;
      if (want_dmask) {
        launch_kernel<grad_apply_nchw_kernel<T, Acc, M, true>>(grid, kThreads, 0, stream, g, x,
            masks, gamma, mean, rstd, coef, s.N, s.C, R, s.P, pl.grad_channels_per_split, dx,
            dgamma, dbeta, dmask_partial);
      } else {
        launch_kernel<grad_apply_nchw_kernel<T, Acc, M, false>>(grid, kThreads, 0, stream, g, x,
            masks, gamma, mean, rstd, coef, s.N, s.C, R, s.P, pl.grad_channels_per_split, dx,
            dgamma, dbeta, nullptr);
      }
    });
  }
  if (want_dmask) {
    const int64_t total = s.N * s.R * s.P;
    launch_kernel<dmask_finalize_kernel<T, Acc>>(static_cast<unsigned>(ceil_div(total, kThreads)),
        kThreads, 0, stream, dmask_partial, total, static_cast<int>(pl.grad_splits),
        static_cast<T*>(a.grad_masks));
  }
  return cudaGetLastError();
}

bool shape_supported(const Shape& s) {
  constexpr int64_t kMaxGridX = 2147483647;
  return s.R >= 1 && s.R <= kMaxRegions && s.N >= 1 && s.N <= kMaxGridYZ && s.P > 0 &&
         s.C > 0 && s.N * s.C <= kMaxGridX && ceil_div(s.C, kWarp) <= kMaxGridYZ &&
         ceil_div(s.P, kWarp) <= kMaxGridX;
}

}  // namespace

size_t forward_workspace_bytes(const Shape& shape, Dtype dtype, int device) {
  const Plan pl = make_plan(shape, device);
  return align_up(3 * acc_size(dtype) * pl.splits * pl.NC * shape.R);
}

size_t backward_workspace_bytes(const Shape& shape, Dtype dtype, bool want_grad_masks,
                                int device) {
  const Plan pl = make_plan(shape, device);
  return backward_layout(shape, dtype, want_grad_masks, pl).total();
}

cudaError_t forward(const Shape& shape, Dtype dtype, const ForwardArgs& args, void* workspace,
                    int device, cudaStream_t stream) {
  if (!shape_supported(shape)) return cudaErrorInvalidValue;
  switch (dtype) {
    case Dtype::kFloat32:
      return forward_typed<float>(shape, args, workspace, device, stream);
    case Dtype::kFloat16:
      return forward_typed<__half>(shape, args, workspace, device, stream);
    case Dtype::kBFloat16:
      return forward_typed<__nv_bfloat16>(shape, args, workspace, device, stream);
    case Dtype::kFloat64:
      return forward_typed<double>(shape, args, workspace, device, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t backward(const Shape& shape, Dtype dtype, const BackwardArgs& args, void* workspace,
                     int device, cudaStream_t stream) {
  if (!shape_supported(shape)) return cudaErrorInvalidValue;
  switch (dtype) {
    case Dtype::kFloat32:
      return backward_typed<float>(shape, args, workspace, device, stream);
    case Dtype::kFloat16:
      return backward_typed<__half>(shape, args, workspace, device, stream);
    case Dtype::kBFloat16:
      return backward_typed<__nv_bfloat16>(shape, args, workspace, device, stream);
    case Dtype::kFloat64:
      return backward_typed<double>(shape, args, workspace, device, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace facedeblur::cuda::snorm
