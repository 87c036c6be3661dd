// CUDA kernels of the blur-synthesis ops. Device code only (no ATen): compiled by nvcc on its
// own (scripts/nvcc_check.sh) and launched through the raw-pointer functions of
// blur_kernels.h.
//
// blur_synthesize: each nonzero-tap list is compacted once (one block per kernel, in
// row-major order, so results are deterministic); a 256-thread block then produces a 32 x 32
// output tile of one (sample, channel) plane: it stages the linearized input tile plus halo
// in shared memory (border rule applied while loading), each thread accumulates four output
// pixels over the taps, and the tail (region weights, mask blend, noise, clamp, CRF,
// quantization, store) runs in registers. The backward recomputes the blur per tile, writes
// the per-pixel chain-rule terms, correlates them with the transposed taps over the padded
// domain, and folds padded positions back onto the pixels they were read from; the kernel
// gradient is one block-wide, fixed-order reduction per tap. No atomics anywhere: every
// result is bitwise reproducible on a given device.
//
// Kernel generators run one 32-thread block per kernel, accumulating in shared memory; the
// camera-shake walk is sequential by nature and runs on one thread of its block.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "common/blur_math.h"
#include "cuda/blur_kernels.h"
#include "cuda/launch.cuh"

namespace facedeblur::blur::cuda {
namespace {

constexpr int kTileW = 32;
constexpr int kTileH = 32;
constexpr int kBlockRows = 8;
constexpr int kRowsPerThread = kTileH / kBlockRows;
constexpr int kTileThreads = kTileW * kBlockRows;
constexpr int kWarp = 32;
constexpr int kReduceThreads = 256;
constexpr size_t kDefaultSmem = 48 * 1024;

// ---- element conversions ----
template <typename acc_t>
__device__ __forceinline__ acc_t to_acc(float v) { return static_cast<acc_t>(v); }
template <typename acc_t>
__device__ __forceinline__ acc_t to_acc(double v) { return static_cast<acc_t>(v); }
template <typename acc_t>
__device__ __forceinline__ acc_t to_acc(__half v) { return static_cast<acc_t>(__half2float(v)); }
template <typename acc_t>
__device__ __forceinline__ acc_t to_acc(__nv_bfloat16 v) {
  return static_cast<acc_t>(__bfloat162float(v));
}
template <typename acc_t>
__device__ __forceinline__ acc_t to_acc(uint8_t v) {
  return static_cast<acc_t>(v) / static_cast<acc_t>(255);
}

__device__ __forceinline__ void store_val(float* p, double v) { *p = static_cast<float>(v); }
__device__ __forceinline__ void store_val(double* p, double v) { *p = v; }
__device__ __forceinline__ void store_val(__half* p, double v) {
  *p = __float2half_rn(static_cast<float>(v));
}
__device__ __forceinline__ void store_val(__nv_bfloat16* p, double v) {
  *p = __float2bfloat16_rn(static_cast<float>(v));
}
__device__ __forceinline__ void store_val(float* p, float v) { *p = v; }
__device__ __forceinline__ void store_val(__half* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void store_val(__nv_bfloat16* p, float v) {
  *p = __float2bfloat16_rn(v);
}

__device__ __forceinline__ float pow_(float a, float b) { return powf(a, b); }
__device__ __forceinline__ double pow_(double a, double b) { return pow(a, b); }
__device__ __forceinline__ float rint_(float a) { return rintf(a); }
__device__ __forceinline__ double rint_(double a) { return rint(a); }
template <typename T>
__device__ __forceinline__ T clamp01_(T v) {
  return v < T(0) ? T(0) : (v > T(1) ? T(1) : v);
}

template <typename Kernel>
cudaError_t allow_smem(Kernel kernel, size_t bytes) {
  if (bytes <= kDefaultSmem) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                              static_cast<int>(bytes));
}

unsigned grid_z(int64_t planes) {
  return static_cast<unsigned>(planes < kGridYZCap ? planes : kGridYZCap);
}

// Blocks of 256 threads for a grid-stride loop over `total` elements.
unsigned elementwise_blocks(int64_t total) {
  const int64_t blocks = (total + 255) / 256;
  return static_cast<unsigned>(blocks < kGridStrideBlocksCap ? blocks : kGridStrideBlocksCap);
}

// ---------------------------------------------------------------------------------------
// Kernel generators
// ---------------------------------------------------------------------------------------

__device__ double warp_sum(double v) {
  for (int offset = kWarp / 2; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  return __shfl_sync(0xffffffffu, v, 0);
}

// Normalizes the K x K accumulator of this (one-warp) block to unit sum and stores it; an
// empty kernel becomes a point at the centre, as on the CPU.
template <typename out_t>
__device__ void normalize_store(double* acc, int K, out_t* out) {
  const int lane = threadIdx.x;
  const int KK = K * K;
  double s = 0.0;
  for (int i = lane; i < KK; i += kWarp) s += acc[i];
  double total = warp_sum(s);
  if (!(total > 0)) {
    __syncthreads();
    for (int i = lane; i < KK; i += kWarp) acc[i] = 0.0;
    __syncthreads();
    if (lane == 0) {
      const double c = 0.5 * (K - 1);
      splat_point(acc, K, c, c, 1.0);
    }
    __syncthreads();
    s = 0.0;
    for (int i = lane; i < KK; i += kWarp) s += acc[i];
    total = warp_sum(s);
  }
  for (int i = lane; i < KK; i += kWarp) store_val(out + i, acc[i] / total);
}

__device__ void zero_acc(double* acc, int KK) {
  for (int i = threadIdx.x; i < KK; i += kWarp) acc[i] = 0.0;
  __syncthreads();
}

template <typename out_t>
__global__ void __launch_bounds__(kWarp) motion_kernels_k(const double* length,
                                                          const double* angle, int K,
                                                          out_t* out) {
  double* acc = dynamic_shared_memory<double>();
  const int64_t n = blockIdx.x;
  zero_acc(acc, K * K);
  if (threadIdx.x == 0) rasterize_motion(acc, K, length[n], angle[n]);
  __syncthreads();
  normalize_store(acc, K, out + n * K * K);
}

template <typename out_t>
__global__ void __launch_bounds__(kWarp) gaussian_kernels_k(const double* sigma, int K,
                                                            out_t* out) {
  double* acc = dynamic_shared_memory<double>();
  const int64_t n = blockIdx.x;
  const double s = sigma[n];
  for (int i = threadIdx.x; i < K * K; i += kWarp) {
    acc[i] = s > 0 ? gaussian_tap(K, i / K, i % K, s) : 0.0;
  }
  __syncthreads();
  normalize_store(acc, K, out + n * K * K);
}

template <typename out_t>
__global__ void __launch_bounds__(kWarp) defocus_kernels_k(const double* radius, int K,
                                                           out_t* out) {
  double* acc = dynamic_shared_memory<double>();
  const int64_t n = blockIdx.x;
  const double r = radius[n];
  for (int i = threadIdx.x; i < K * K; i += kWarp) {
    acc[i] = r > 0 ? defocus_tap(K, i / K, i % K, r) : 0.0;
  }
  __syncthreads();
  normalize_store(acc, K, out + n * K * K);
}

template <typename rand_t, typename out_t>
__global__ void __launch_bounds__(kWarp) trajectory_kernels_k(const double* params,
                                                              const rand_t* step_uniform,
                                                              const rand_t* step_normal,
                                                              int64_t T, int K, int centering,
                                                              double* positions, out_t* out) {
  double* acc = dynamic_shared_memory<double>();
  const int64_t n = blockIdx.x;
  zero_acc(acc, K * K);
  if (threadIdx.x == 0) {
    const double* q = params + n * kTrajectoryParamCount;
    const TrajectoryParams p{q[0], q[1], q[2], q[3], q[4], q[5], q[6]};
    double* xs = positions + n * 2 * T;
    double* ys = xs + T;
    walk_trajectory(p, step_uniform + n * (T - 1), step_normal + n * (T - 1) * 2, T, xs, ys);
    const TrajectoryPlacement pl = place_trajectory(xs, ys, T, K, p.exposure, centering);
    rasterize_trajectory(acc, K, xs, ys, T, pl);
  }
  __syncthreads();
  normalize_store(acc, K, out + n * K * K);
}

// Launches `kernel<out_t>` for the requested output dtype.
template <template <typename> class Launch, typename... Args>
cudaError_t dispatch_out(Dtype dtype, Args... args) {
  switch (dtype) {
    case Dtype::kFloat: return Launch<float>::run(args...);
    case Dtype::kDouble: return Launch<double>::run(args...);
    case Dtype::kHalf: return Launch<__half>::run(args...);
    case Dtype::kBFloat16: return Launch<__nv_bfloat16>::run(args...);
    default: return cudaErrorInvalidValue;
  }
}

size_t generator_smem(int size) { return static_cast<size_t>(size) * size * sizeof(double); }

template <typename out_t>
struct LaunchMotion {
  static cudaError_t run(const double* length, const double* angle, int64_t n, int size,
                         void* out, cudaStream_t stream) {
    const size_t smem = generator_smem(size);
    cudaError_t err = allow_smem(motion_kernels_k<out_t>, smem);
    if (err != cudaSuccess) return err;
    launch_kernel<motion_kernels_k<out_t>>(static_cast<unsigned>(n), kWarp, smem, stream, length,
        angle, size, static_cast<out_t*>(out));
    return cudaGetLastError();
  }
};

template <typename out_t>
struct LaunchGaussian {
  static cudaError_t run(const double* sigma, int64_t n, int size, void* out,
                         cudaStream_t stream) {
    const size_t smem = generator_smem(size);
    cudaError_t err = allow_smem(gaussian_kernels_k<out_t>, smem);
    if (err != cudaSuccess) return err;
    launch_kernel<gaussian_kernels_k<out_t>>(static_cast<unsigned>(n), kWarp, smem, stream, sigma,
        size, static_cast<out_t*>(out));
    return cudaGetLastError();
  }
};

template <typename out_t>
struct LaunchDefocus {
  static cudaError_t run(const double* radius, int64_t n, int size, void* out,
                         cudaStream_t stream) {
    const size_t smem = generator_smem(size);
    cudaError_t err = allow_smem(defocus_kernels_k<out_t>, smem);
    if (err != cudaSuccess) return err;
    launch_kernel<defocus_kernels_k<out_t>>(static_cast<unsigned>(n), kWarp, smem, stream, radius,
        size, static_cast<out_t*>(out));
    return cudaGetLastError();
  }
};

template <typename out_t>
struct LaunchTrajectory {
  template <typename rand_t>
  static cudaError_t go(const double* params, const void* su, const void* sn, int64_t n,
                        int64_t T, int size, int centering, double* positions, void* out,
                        cudaStream_t stream) {
    const size_t smem = generator_smem(size);
    cudaError_t err = allow_smem(trajectory_kernels_k<rand_t, out_t>, smem);
    if (err != cudaSuccess) return err;
    launch_kernel<trajectory_kernels_k<rand_t, out_t>>(static_cast<unsigned>(n), kWarp, smem,
        stream, params, static_cast<const rand_t*>(su), static_cast<const rand_t*>(sn), T, size,
        centering, positions, static_cast<out_t*>(out));
    return cudaGetLastError();
  }
  static cudaError_t run(const double* params, const void* su, const void* sn,
                         bool rand_is_double, int64_t n, int64_t T, int size, int centering,
                         double* positions, void* out, cudaStream_t stream) {
    return rand_is_double
               ? go<double>(params, su, sn, n, T, size, centering, positions, out, stream)
               : go<float>(params, su, sn, n, T, size, centering, positions, out, stream);
  }
};

// ---------------------------------------------------------------------------------------
// blur_synthesize
// ---------------------------------------------------------------------------------------

// A nonzero tap: out(y, x) += w * in(y + dy, x + dx).
template <typename acc_t>
struct alignas(16) Tap {
  acc_t w;
  int dy;
  int dx;
};

// One block per (sample, region) kernel: the nonzero taps in row-major order and their
// count. `negate` gives the transposed kernel's offsets (for the input gradient).
template <typename acc_t>
__global__ void __launch_bounds__(kReduceThreads) compact_taps_k(const acc_t* kernels, int Kh,
                                                                 int Kw, bool negate,
                                                                 Tap<acc_t>* taps,
                                                                 int* counts) {
  FD_SHARED_ARRAY(int, warp_counts, kReduceThreads / kWarp);
  FD_SHARED_VAR(int, base);
  const int KK = Kh * Kw;
  const int64_t g = blockIdx.x;
  const acc_t* k = kernels + g * KK;
  Tap<acc_t>* out = taps + g * KK;
  const int tid = threadIdx.x, lane = tid % kWarp, warp = tid / kWarp;
  const int cy = (Kh - 1) / 2, cx = (Kw - 1) / 2;
  if (tid == 0) base = 0;
  __syncthreads();
  for (int start = 0; start < KK; start += kReduceThreads) {
    const int i = start + tid;
    const acc_t w = i < KK ? k[i] : acc_t(0);
    const bool nonzero = i < KK && w != acc_t(0);
    const unsigned ballot = __ballot_sync(0xffffffffu, nonzero);
    if (lane == 0) warp_counts[warp] = __popc(ballot);
    __syncthreads();
    int offset = base;
    for (int v = 0; v < warp; ++v) offset += warp_counts[v];
    if (nonzero) {
      const int p = i / Kw, q = i % Kw;
      Tap<acc_t> tap;
      tap.w = w;
      tap.dy = negate ? p - cy : cy - p;
      tap.dx = negate ? q - cx : cx - q;
      out[offset + __popc(ballot & ((1u << lane) - 1u))] = tap;
    }
    __syncthreads();
    if (tid == 0) {
      int total = 0;
      for (int v = 0; v < kReduceThreads / kWarp; ++v) total += warp_counts[v];
      base += total;
    }
    __syncthreads();
  }
  if (tid == 0) counts[g] = base;
}

// Input element -> linear domain: uint8 through the block's table (x / 255, CRF inverse
// applied), floating through x or x^gamma.
template <typename in_t, typename acc_t>
__device__ __forceinline__ acc_t load_linear(const in_t* p, const acc_t* lut, bool crf,
                                             acc_t gamma) {
  if constexpr (std::is_same_v<in_t, uint8_t>) {
    return lut[*p];
  } else {
    const acc_t a = to_acc<acc_t>(*p);
    return crf ? pow_(a, gamma) : a;
  }
}

template <typename in_t, typename acc_t>
__device__ void fill_lut(acc_t* lut, bool crf, acc_t gamma) {
  if constexpr (std::is_same_v<in_t, uint8_t>) {
    const int tid = threadIdx.y * blockDim.x + threadIdx.x;
    for (int v = tid; v < 256; v += blockDim.x * blockDim.y) {
      const acc_t a = static_cast<acc_t>(v) / static_cast<acc_t>(255);
      lut[v] = crf ? pow_(a, gamma) : a;
    }
    __syncthreads();
  }
}

// Stages the input tile of one plane: tile[sy][sx] = lin(img[idx(y0 + sy - off_y),
// idx(x0 + sx - off_x)]) for the (kTileH + Kh - 1) x (kTileW + Kw - 1) halo region.
template <typename in_t, typename acc_t>
__device__ void load_tile(acc_t* tile, int SH, int SW, const in_t* img, int64_t H, int64_t W,
                          int64_t oy, int64_t ox, int border, const acc_t* lut, bool crf,
                          acc_t gamma) {
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
  for (int i = tid; i < SH * SW; i += kTileThreads) {
    const int sy = i / SW, sx = i - sy * SW;
    const int64_t yy = border_index(oy + sy, H, border);
    const int64_t xx = border_index(ox + sx, W, border);
    tile[i] = (yy < 0 || xx < 0) ? acc_t(0) : load_linear(img + yy * W + xx, lut, crf, gamma);
  }
  __syncthreads();
}

// Four output pixels (rows ly, ly + 8, ...) of one kernel: a[j] += w * base[j-th row + tap].
template <typename acc_t>
__device__ __forceinline__ void accumulate_taps(const acc_t* base, int SW,
                                                const Tap<acc_t>* __restrict__ taps, int count,
                                                acc_t (&a)[kRowsPerThread]) {
#pragma unroll 4
  for (int t = 0; t < count; ++t) {
    const Tap<acc_t> tap = taps[t];
    const acc_t* p = base + tap.dy * SW + tap.dx;
#pragma unroll
    for (int j = 0; j < kRowsPerThread; ++j) a[j] += tap.w * p[j * kBlockRows * SW];
  }
}

template <typename acc_t>
struct BlurParams {
  BlurShape s;
  const Tap<acc_t>* taps;  // [N * R][Kh * Kw]
  const int* counts;       // [N * R]
  const acc_t* weights;
  const acc_t* mask;
  bool crf;
  acc_t gamma, inv_gamma;
};

// Blur of one plane's pixels owned by this thread: b[j] = sum_r w_r (k_r * lin).
template <typename acc_t>
__device__ __forceinline__ void blur_pixels(const BlurParams<acc_t>& p, const acc_t* base,
                                            int SW, int64_t n, int64_t y0, int64_t x,
                                            acc_t (&b)[kRowsPerThread]) {
  const BlurShape& s = p.s;
  const int64_t HW = s.H * s.W;
  for (int j = 0; j < kRowsPerThread; ++j) b[j] = acc_t(0);
  for (int64_t r = 0; r < s.R; ++r) {
    const int64_t g = n * s.R + r;
    acc_t a[kRowsPerThread] = {};
    accumulate_taps(base, SW, p.taps + g * s.Kh * s.Kw, p.counts[g], a);
    for (int j = 0; j < kRowsPerThread; ++j) {
      const int64_t y = y0 + j * kBlockRows;
      if (p.weights == nullptr) {
        b[j] += a[j];
      } else if (y < s.H && x < s.W) {
        b[j] += p.weights[g * HW + y * s.W + x] * a[j];
      }
    }
  }
}

template <typename in_t, typename acc_t>
__global__ void __launch_bounds__(kTileThreads) blur_forward_k(
    BlurParams<acc_t> p, const in_t* __restrict__ images, in_t* __restrict__ out,
    const acc_t* __restrict__ noise, const acc_t* __restrict__ noise_sigma, bool quantize) {
  unsigned char* smem_raw = dynamic_shared_memory<unsigned char>();
  const BlurShape s = p.s;
  const int SH = kTileH + static_cast<int>(s.Kh) - 1, SW = kTileW + static_cast<int>(s.Kw) - 1;
  acc_t* tile = reinterpret_cast<acc_t*>(smem_raw);
  acc_t* lut = tile + SH * SW;
  fill_lut<in_t>(lut, p.crf, p.gamma);
  const int cy = static_cast<int>((s.Kh - 1) / 2), cx = static_cast<int>((s.Kw - 1) / 2);
  const int pad_t = static_cast<int>(s.Kh) - 1 - cy, pad_l = static_cast<int>(s.Kw) - 1 - cx;
  const int64_t x0 = static_cast<int64_t>(blockIdx.x) * kTileW;
  const int64_t y0 = static_cast<int64_t>(blockIdx.y) * kTileH;
  const int64_t HW = s.H * s.W;
  const int lx = threadIdx.x, ly = threadIdx.y;
  const int64_t x = x0 + lx;
  const bool clamp = noise != nullptr || quantize || std::is_same_v<in_t, uint8_t>;
  for (int64_t plane = blockIdx.z; plane < s.N * s.C; plane += gridDim.z) {
    const int64_t n = plane / s.C;
    load_tile(tile, SH, SW, images + plane * HW, s.H, s.W, y0 - pad_t, x0 - pad_l, s.border,
              lut, p.crf, p.gamma);
    const acc_t* base = tile + (ly + pad_t) * SW + lx + pad_l;
    acc_t b[kRowsPerThread];
    blur_pixels(p, base, SW, n, y0 + ly, x, b);
    for (int j = 0; j < kRowsPerThread; ++j) {
      const int64_t y = y0 + ly + j * kBlockRows;
      if (y >= s.H || x >= s.W) continue;
      const int64_t pix = y * s.W + x;
      acc_t v = b[j];
      if (p.mask != nullptr) {
        const acc_t m = p.mask[n * HW + pix];
        v = m * v + (acc_t(1) - m) * base[j * kBlockRows * SW];
      }
      if (noise != nullptr) v += noise_sigma[n] * noise[plane * HW + pix];
      if (clamp) v = clamp01_(v);
      if (p.crf) v = pow_(v > acc_t(0) ? v : acc_t(0), p.inv_gamma);
      if constexpr (std::is_same_v<in_t, uint8_t>) {
        out[plane * HW + pix] = static_cast<uint8_t>(rint_(v * acc_t(255)));
      } else {
        if (quantize) v = rint_(v * acc_t(255)) / acc_t(255);
        store_val(out + plane * HW + pix, v);
      }
    }
    __syncthreads();  // the next plane overwrites the tile
  }
}

template <typename acc_t>
__device__ __forceinline__ acc_t crf_slope(acc_t c, acc_t inv_gamma) {
  return c > acc_t(0) ? inv_gamma * pow_(c, inv_gamma - acc_t(1)) : acc_t(0);
}

// Backward pass A, per tile and sample, looping over channels: recompute the blur, then
// write the per-pixel chain-rule terms (see blur_cpu.cpp for the formulas).
template <typename in_t, typename acc_t>
__global__ void __launch_bounds__(kTileThreads) blur_backward_pixels_k(
    BlurParams<acc_t> p, const in_t* __restrict__ grad, const in_t* __restrict__ images,
    acc_t* grad_weights, acc_t* grad_mask, acc_t* lin_out, acc_t* hw, acc_t* direct) {
  unsigned char* smem_raw = dynamic_shared_memory<unsigned char>();
  const BlurShape s = p.s;
  const int SH = kTileH + static_cast<int>(s.Kh) - 1, SW = kTileW + static_cast<int>(s.Kw) - 1;
  acc_t* tile = reinterpret_cast<acc_t*>(smem_raw);
  const int cy = static_cast<int>((s.Kh - 1) / 2), cx = static_cast<int>((s.Kw - 1) / 2);
  const int pad_t = static_cast<int>(s.Kh) - 1 - cy, pad_l = static_cast<int>(s.Kw) - 1 - cx;
  const int64_t x0 = static_cast<int64_t>(blockIdx.x) * kTileW;
  const int64_t y0 = static_cast<int64_t>(blockIdx.y) * kTileH;
  const int64_t HW = s.H * s.W;
  const int lx = threadIdx.x, ly = threadIdx.y;
  const int64_t x = x0 + lx;
  for (int64_t n = blockIdx.z; n < s.N; n += gridDim.z) {
    for (int64_t c = 0; c < s.C; ++c) {
      const int64_t plane = n * s.C + c;
      load_tile(tile, SH, SW, images + plane * HW, s.H, s.W, y0 - pad_t, x0 - pad_l, s.border,
                static_cast<const acc_t*>(nullptr), p.crf, p.gamma);
      const acc_t* base = tile + (ly + pad_t) * SW + lx + pad_l;
      acc_t b[kRowsPerThread];
      blur_pixels(p, base, SW, n, y0 + ly, x, b);
      acc_t h[kRowsPerThread];
      for (int j = 0; j < kRowsPerThread; ++j) {
        h[j] = acc_t(0);
        const int64_t y = y0 + ly + j * kBlockRows;
        if (y >= s.H || x >= s.W) continue;
        const int64_t pix = y * s.W + x;
        const acc_t lin = base[j * kBlockRows * SW];
        const acc_t m = p.mask != nullptr ? p.mask[n * HW + pix] : acc_t(1);
        const acc_t cpre = p.mask != nullptr ? m * b[j] + (acc_t(1) - m) * lin : b[j];
        acc_t gc = to_acc<acc_t>(grad[plane * HW + pix]);
        if (p.crf) gc *= crf_slope(cpre, p.inv_gamma);
        if (grad_mask != nullptr) grad_mask[n * HW + pix] += gc * (b[j] - lin);
        if (direct != nullptr) direct[plane * HW + pix] = (acc_t(1) - m) * gc;
        if (lin_out != nullptr) lin_out[plane * HW + pix] = lin;
        h[j] = m * gc;
        if (hw != nullptr) {
          for (int64_t r = 0; r < s.R; ++r) {
            const acc_t wr = p.weights != nullptr ? p.weights[(n * s.R + r) * HW + pix] : acc_t(1);
            hw[((n * s.R + r) * s.C + c) * HW + pix] = wr * h[j];
          }
        }
      }
      if (grad_weights != nullptr) {
        for (int64_t r = 0; r < s.R; ++r) {
          const int64_t g = n * s.R + r;
          acc_t a[kRowsPerThread] = {};
          accumulate_taps(base, SW, p.taps + g * s.Kh * s.Kw, p.counts[g], a);
          for (int j = 0; j < kRowsPerThread; ++j) {
            const int64_t y = y0 + ly + j * kBlockRows;
            if (y < s.H && x < s.W) grad_weights[g * HW + y * s.W + x] += h[j] * a[j];
          }
        }
      }
      __syncthreads();
    }
  }
}

// Backward pass B1: gradient with respect to the padded input, (Hp, Wp) = (H + Kh - 1,
// W + Kw - 1), as the correlation of hw (zero outside the image) with the transposed taps.
template <typename acc_t>
__global__ void __launch_bounds__(kTileThreads) blur_backward_padded_k(
    BlurShape s, const Tap<acc_t>* __restrict__ taps_t, const int* __restrict__ counts,
    const acc_t* __restrict__ hw, acc_t* __restrict__ grad_padded) {
  unsigned char* smem_raw = dynamic_shared_memory<unsigned char>();
  const int SH = kTileH + static_cast<int>(s.Kh) - 1, SW = kTileW + static_cast<int>(s.Kw) - 1;
  acc_t* tile = reinterpret_cast<acc_t*>(smem_raw);
  const int cy = static_cast<int>((s.Kh - 1) / 2), cx = static_cast<int>((s.Kw - 1) / 2);
  const int pad_t = static_cast<int>(s.Kh) - 1 - cy, pad_l = static_cast<int>(s.Kw) - 1 - cx;
  const int64_t Hp = s.H + s.Kh - 1, Wp = s.W + s.Kw - 1, HW = s.H * s.W;
  const int64_t U0 = static_cast<int64_t>(blockIdx.y) * kTileH;
  const int64_t V0 = static_cast<int64_t>(blockIdx.x) * kTileW;
  const int lx = threadIdx.x, ly = threadIdx.y;
  const int tid = ly * kTileW + lx;
  // padded (U, V) reads h at (U - pad_t + dy, V - pad_l + dx), dy in [-cy, Kh - 1 - cy]
  const int64_t oy = U0 - pad_t - cy, ox = V0 - pad_l - cx;
  for (int64_t plane = blockIdx.z; plane < s.N * s.C; plane += gridDim.z) {
    const int64_t n = plane / s.C, c = plane % s.C;
    acc_t a[kRowsPerThread] = {};
    for (int64_t r = 0; r < s.R; ++r) {
      const acc_t* src = hw + ((n * s.R + r) * s.C + c) * HW;
      for (int i = tid; i < SH * SW; i += kTileThreads) {
        const int sy = i / SW, sx = i - sy * SW;
        const int64_t yy = oy + sy, xx = ox + sx;
        tile[i] = (yy >= 0 && yy < s.H && xx >= 0 && xx < s.W) ? src[yy * s.W + xx] : acc_t(0);
      }
      __syncthreads();
      const int64_t g = n * s.R + r;
      accumulate_taps(tile + (ly + cy) * SW + lx + cx, SW, taps_t + g * s.Kh * s.Kw, counts[g], a);
      __syncthreads();
    }
    for (int j = 0; j < kRowsPerThread; ++j) {
      const int64_t U = U0 + ly + j * kBlockRows, V = V0 + lx;
      if (U < Hp && V < Wp) grad_padded[(plane * Hp + U) * Wp + V] = a[j];
    }
  }
}

// Backward pass B2, one thread per input pixel: add up every padded position that read it
// (itself, plus mirrors or wraps near the border), the direct term, and chain through the
// CRF inverse.
template <typename in_t, typename acc_t>
__global__ void blur_backward_fold_k(BlurShape s, const acc_t* __restrict__ grad_padded,
                                     const acc_t* __restrict__ direct,
                                     const in_t* __restrict__ images, bool crf, acc_t gamma,
                                     in_t* __restrict__ grad_images) {
  const int64_t cy = (s.Kh - 1) / 2, cx = (s.Kw - 1) / 2;
  const int64_t pad_t = s.Kh - 1 - cy, pad_l = s.Kw - 1 - cx;
  const int64_t Hp = s.H + s.Kh - 1, Wp = s.W + s.Kw - 1, HW = s.H * s.W;
  const int64_t far_y = (pad_t > cy ? pad_t : cy) + 1, far_x = (pad_l > cx ? pad_l : cx) + 1;
  const int64_t total = s.N * s.C * HW;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t plane = idx / HW, pix = idx % HW, y = pix / s.W, x = pix % s.W;
    // only pixels this close to an edge can be read from the pad region
    const bool edge_y = y <= far_y || y + far_y + 1 >= s.H;
    const bool edge_x = x <= far_x || x + far_x + 1 >= s.W;
    const acc_t* gp = grad_padded + plane * Hp * Wp;
    acc_t sum = 0;
    for (int64_t ky = -1; ky < (edge_y ? s.Kh - 1 : 0); ++ky) {
      int64_t U = y + pad_t;
      if (ky >= 0) {
        U = ky < pad_t ? ky : s.H + ky;  // pad rows [0, pad_t) and [pad_t + H, Hp)
        if (border_index(U - pad_t, s.H, s.border) != y) continue;
      }
      for (int64_t kx = -1; kx < (edge_x ? s.Kw - 1 : 0); ++kx) {
        int64_t V = x + pad_l;
        if (kx >= 0) {
          V = kx < pad_l ? kx : s.W + kx;
          if (border_index(V - pad_l, s.W, s.border) != x) continue;
        }
        sum += gp[U * Wp + V];
      }
    }
    acc_t g = sum + (direct != nullptr ? direct[idx] : acc_t(0));
    if (crf) {
      const acc_t xv = to_acc<acc_t>(images[idx]);
      g *= xv > acc_t(0) ? gamma * pow_(xv, gamma - acc_t(1)) : acc_t(0);
    }
    store_val(grad_images + idx, g);
  }
}

// Backward pass C: one block per (sample, region, tap), a fixed-order reduction of
// hw * shifted lin over channels and pixels.
template <typename acc_t>
__global__ void __launch_bounds__(kReduceThreads) blur_backward_kernels_k(
    BlurShape s, const acc_t* __restrict__ hw, const acc_t* __restrict__ lin,
    acc_t* __restrict__ grad_kernels) {
  FD_SHARED_ARRAY(acc_t, partial, kReduceThreads);
  const int64_t i = blockIdx.x;
  const int64_t q = i % s.Kw, p = (i / s.Kw) % s.Kh;
  const int64_t r = (i / (s.Kw * s.Kh)) % s.R, n = i / (s.Kw * s.Kh * s.R);
  const int64_t dy = (s.Kh - 1) / 2 - p, dx = (s.Kw - 1) / 2 - q;
  const int64_t HW = s.H * s.W;
  acc_t sum = 0;
  for (int64_t c = 0; c < s.C; ++c) {
    const acc_t* h = hw + ((n * s.R + r) * s.C + c) * HW;
    const acc_t* l = lin + (n * s.C + c) * HW;
    for (int64_t y = 0; y < s.H; ++y) {
      const int64_t yy = border_index(y + dy, s.H, s.border);
      if (yy < 0) continue;
      for (int64_t x = threadIdx.x; x < s.W; x += kReduceThreads) {
        const int64_t xx = border_index(x + dx, s.W, s.border);
        if (xx >= 0) sum += h[y * s.W + x] * l[yy * s.W + xx];
      }
    }
  }
  partial[threadIdx.x] = sum;
  __syncthreads();
  for (int stride = kReduceThreads / 2; stride > 0; stride >>= 1) {
    if (static_cast<int>(threadIdx.x) < stride) partial[threadIdx.x] += partial[threadIdx.x + stride];
    __syncthreads();
  }
  if (threadIdx.x == 0) grad_kernels[i] = partial[0];
}

dim3 tile_grid(int64_t H, int64_t W, int64_t planes) {
  return dim3(static_cast<unsigned>((W + kTileW - 1) / kTileW),
              static_cast<unsigned>((H + kTileH - 1) / kTileH), grid_z(planes));
}

size_t tile_smem(const BlurShape& s, size_t elem, bool lut) {
  return ((kTileH + s.Kh - 1) * (kTileW + s.Kw - 1) + (lut ? 256 : 0)) * elem;
}

template <typename acc_t>
cudaError_t compact(const BlurShape& s, const void* kernels, bool negate, void* taps,
                    int* counts, cudaStream_t stream) {
  launch_kernel<compact_taps_k<acc_t>>(static_cast<unsigned>(s.N * s.R), kReduceThreads, 0, stream,
      static_cast<const acc_t*>(kernels), static_cast<int>(s.Kh), static_cast<int>(s.Kw), negate,
      static_cast<Tap<acc_t>*>(taps), counts);
  return cudaGetLastError();
}

template <typename in_t, typename acc_t>
BlurParams<acc_t> make_params(const BlurShape& s, const void* taps, const int* counts,
                              const void* weights, const void* mask, bool crf, double gamma) {
  BlurParams<acc_t> p;
  p.s = s;
  p.taps = static_cast<const Tap<acc_t>*>(taps);
  p.counts = counts;
  p.weights = static_cast<const acc_t*>(weights);
  p.mask = static_cast<const acc_t*>(mask);
  p.crf = crf;
  p.gamma = static_cast<acc_t>(gamma);
  p.inv_gamma = static_cast<acc_t>(1.0 / gamma);
  return p;
}

template <typename in_t, typename acc_t>
cudaError_t blur_forward(const BlurShape& s, const BlurForwardArgs& a, cudaStream_t stream) {
  cudaError_t err = compact<acc_t>(s, a.kernels, false, a.taps, a.tap_counts, stream);
  if (err != cudaSuccess) return err;
  const auto p = make_params<in_t, acc_t>(s, a.taps, a.tap_counts, a.weights, a.mask, a.crf,
                                          a.gamma);
  const size_t smem = tile_smem(s, sizeof(acc_t), std::is_same_v<in_t, uint8_t>);
  err = allow_smem(blur_forward_k<in_t, acc_t>, smem);
  if (err != cudaSuccess) return err;
  launch_kernel<blur_forward_k<in_t, acc_t>>(tile_grid(s.H, s.W, s.N * s.C),
      dim3(kTileW, kBlockRows), smem, stream, p, static_cast<const in_t*>(a.images),
      static_cast<in_t*>(a.out), static_cast<const acc_t*>(a.noise),
      static_cast<const acc_t*>(a.noise_sigma), a.quantize);
  return cudaGetLastError();
}

template <typename in_t, typename acc_t>
cudaError_t blur_backward(const BlurShape& s, const BlurBackwardArgs& a, cudaStream_t stream) {
  cudaError_t err = compact<acc_t>(s, a.kernels, false, a.taps, a.tap_counts, stream);
  if (err != cudaSuccess) return err;
  const auto p = make_params<in_t, acc_t>(s, a.taps, a.tap_counts, a.weights, a.mask, a.crf,
                                          a.gamma);
  const size_t smem = tile_smem(s, sizeof(acc_t), false);
  err = allow_smem(blur_backward_pixels_k<in_t, acc_t>, smem);
  if (err != cudaSuccess) return err;
  const bool need_hw = a.grad_images != nullptr || a.grad_kernels != nullptr;
  launch_kernel<blur_backward_pixels_k<in_t, acc_t>>(tile_grid(s.H, s.W, s.N),
      dim3(kTileW, kBlockRows), smem, stream, p, static_cast<const in_t*>(a.grad),
      static_cast<const in_t*>(a.images), static_cast<acc_t*>(a.grad_weights),
      static_cast<acc_t*>(a.grad_mask),
      a.grad_kernels != nullptr ? static_cast<acc_t*>(a.lin) : nullptr,
      need_hw ? static_cast<acc_t*>(a.hw) : nullptr,
      a.grad_images != nullptr && a.mask != nullptr ? static_cast<acc_t*>(a.direct) : nullptr);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  if (a.grad_images != nullptr) {
    // the transposed taps overwrite the forward ones, which pass A no longer needs
    err = compact<acc_t>(s, a.kernels, true, a.taps, a.tap_counts, stream);
    if (err != cudaSuccess) return err;
    err = allow_smem(blur_backward_padded_k<acc_t>, smem);
    if (err != cudaSuccess) return err;
    launch_kernel<blur_backward_padded_k<acc_t>>(tile_grid(s.H + s.Kh - 1, s.W + s.Kw - 1, s.N * s.C),
        dim3(kTileW, kBlockRows), smem, stream, s, static_cast<const Tap<acc_t>*>(a.taps),
        a.tap_counts, static_cast<const acc_t*>(a.hw), static_cast<acc_t*>(a.grad_padded));
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    const int64_t total = s.N * s.C * s.H * s.W;
    launch_kernel<blur_backward_fold_k<in_t, acc_t>>(elementwise_blocks(total), 256, 0, stream, s,
        static_cast<const acc_t*>(a.grad_padded),
        a.mask != nullptr ? static_cast<const acc_t*>(a.direct) : nullptr,
        static_cast<const in_t*>(a.images), a.crf, static_cast<acc_t>(a.gamma),
        static_cast<in_t*>(a.grad_images));
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  if (a.grad_kernels != nullptr) {
    launch_kernel<blur_backward_kernels_k<acc_t>>(static_cast<unsigned>(s.N * s.R * s.Kh * s.Kw),
        kReduceThreads, 0, stream, s, static_cast<const acc_t*>(a.hw),
        static_cast<const acc_t*>(a.lin), static_cast<acc_t*>(a.grad_kernels));
    err = cudaGetLastError();
  }
  return err;
}

// ---------------------------------------------------------------------------------------
// average_frames
// ---------------------------------------------------------------------------------------

__device__ __forceinline__ int64_t clamp_count(int64_t c, int64_t T) {
  return c < 1 ? 1 : (c > T ? T : c);
}

template <typename T, typename acc_t>
__global__ void average_frames_k(const T* __restrict__ frames, const int64_t* __restrict__ counts,
                                 int64_t N, int64_t Tn, int64_t P, bool crf, acc_t gamma,
                                 T* __restrict__ out) {
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < N * P;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t n = idx / P, i = idx % P;
    const int64_t cnt = clamp_count(counts[n], Tn);
    acc_t sum = 0;
    for (int64_t t = 0; t < cnt; ++t) {
      const acc_t v = to_acc<acc_t>(frames[(n * Tn + t) * P + i]);
      sum += crf ? pow_(v, gamma) : v;
    }
    acc_t v = sum / static_cast<acc_t>(cnt);
    if (crf) v = pow_(v > acc_t(0) ? v : acc_t(0), acc_t(1) / gamma);
    if constexpr (std::is_same_v<T, uint8_t>) {
      out[idx] = static_cast<uint8_t>(rint_(clamp01_(v) * acc_t(255)));
    } else {
      store_val(out + idx, v);
    }
  }
}

template <typename T, typename acc_t>
__global__ void average_frames_backward_k(const T* __restrict__ grad,
                                          const T* __restrict__ frames,
                                          const int64_t* __restrict__ counts, int64_t N,
                                          int64_t Tn, int64_t P, bool crf, acc_t gamma,
                                          T* __restrict__ grad_frames) {
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < N * P;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t n = idx / P, i = idx % P;
    const int64_t cnt = clamp_count(counts[n], Tn);
    const acc_t scale = acc_t(1) / static_cast<acc_t>(cnt);
    acc_t gs = to_acc<acc_t>(grad[idx]) * scale;
    if (crf) {
      acc_t s = 0;
      for (int64_t t = 0; t < cnt; ++t) s += pow_(to_acc<acc_t>(frames[(n * Tn + t) * P + i]), gamma);
      gs *= crf_slope(s * scale, acc_t(1) / gamma);
    }
    for (int64_t t = 0; t < Tn; ++t) {
      const int64_t k = (n * Tn + t) * P + i;
      acc_t v = 0;
      if (t < cnt) {
        const acc_t xv = to_acc<acc_t>(frames[k]);
        v = crf ? (xv > acc_t(0) ? gs * gamma * pow_(xv, gamma - acc_t(1)) : acc_t(0)) : gs;
      }
      store_val(grad_frames + k, v);
    }
  }
}

template <typename T, typename acc_t>
cudaError_t average_frames_typed(const void* frames, const int64_t* counts, int64_t N,
                                 int64_t Tn, int64_t P, bool crf, double gamma, void* out,
                                 cudaStream_t stream) {
  launch_kernel<average_frames_k<T, acc_t>>(elementwise_blocks(N * P), 256, 0, stream,
      static_cast<const T*>(frames), counts, N, Tn, P, crf, static_cast<acc_t>(gamma),
      static_cast<T*>(out));
  return cudaGetLastError();
}

template <typename T, typename acc_t>
cudaError_t average_frames_backward_typed(const void* grad, const void* frames,
                                          const int64_t* counts, int64_t N, int64_t Tn,
                                          int64_t P, bool crf, double gamma, void* out,
                                          cudaStream_t stream) {
  launch_kernel<average_frames_backward_k<T, acc_t>>(elementwise_blocks(N * P), 256, 0, stream,
      static_cast<const T*>(grad), static_cast<const T*>(frames), counts, N, Tn, P, crf,
      static_cast<acc_t>(gamma), static_cast<T*>(out));
  return cudaGetLastError();
}

}  // namespace

// ---------------------------------------------------------------------------------------
// Launchers
// ---------------------------------------------------------------------------------------

cudaError_t launch_motion_kernels(const double* length, const double* angle, int64_t n,
                                  int size, void* out, Dtype out_dtype, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  return dispatch_out<LaunchMotion>(out_dtype, length, angle, n, size, out, stream);
}

cudaError_t launch_gaussian_kernels(const double* sigma, int64_t n, int size, void* out,
                                    Dtype out_dtype, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  return dispatch_out<LaunchGaussian>(out_dtype, sigma, n, size, out, stream);
}

cudaError_t launch_defocus_kernels(const double* radius, int64_t n, int size, void* out,
                                   Dtype out_dtype, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  return dispatch_out<LaunchDefocus>(out_dtype, radius, n, size, out, stream);
}

cudaError_t launch_trajectory_kernels(const double* params, const void* step_uniform,
                                      const void* step_normal, bool rand_is_double, int64_t n,
                                      int64_t T, int size, int centering, double* positions,
                                      void* out, Dtype out_dtype, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  return dispatch_out<LaunchTrajectory>(out_dtype, params, step_uniform, step_normal,
                                        rand_is_double, n, T, size, centering, positions, out,
                                        stream);
}

size_t blur_tap_bytes(const BlurShape& s, bool is_double) {
  const size_t taps = static_cast<size_t>(s.N * s.R * s.Kh * s.Kw);
  return taps * (is_double ? sizeof(Tap<double>) : sizeof(Tap<float>));
}

size_t blur_tile_smem_bytes(const BlurShape& s, Dtype dtype) {
  return tile_smem(s, dtype == Dtype::kDouble ? sizeof(double) : sizeof(float),
                   dtype == Dtype::kUInt8);
}

cudaError_t device_smem_limit(size_t* bytes) {
  int device = 0, limit = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  err = cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  *bytes = static_cast<size_t>(limit);
  return err;
}

cudaError_t launch_blur_forward(const BlurShape& s, const BlurForwardArgs& a,
                                cudaStream_t stream) {
  switch (a.dtype) {
    case Dtype::kUInt8: return blur_forward<uint8_t, float>(s, a, stream);
    case Dtype::kHalf: return blur_forward<__half, float>(s, a, stream);
    case Dtype::kBFloat16: return blur_forward<__nv_bfloat16, float>(s, a, stream);
    case Dtype::kFloat: return blur_forward<float, float>(s, a, stream);
    case Dtype::kDouble: return blur_forward<double, double>(s, a, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_blur_backward(const BlurShape& s, const BlurBackwardArgs& a,
                                 cudaStream_t stream) {
  switch (a.dtype) {
    case Dtype::kHalf: return blur_backward<__half, float>(s, a, stream);
    case Dtype::kBFloat16: return blur_backward<__nv_bfloat16, float>(s, a, stream);
    case Dtype::kFloat: return blur_backward<float, float>(s, a, stream);
    case Dtype::kDouble: return blur_backward<double, double>(s, a, stream);
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t launch_average_frames(const void* frames, const int64_t* counts, int64_t N,
                                  int64_t T, int64_t P, Dtype dtype, bool crf, double gamma,
                                  void* out, cudaStream_t stream) {
  if (N * P == 0) return cudaSuccess;
  switch (dtype) {
    case Dtype::kUInt8: return average_frames_typed<uint8_t, float>(frames, counts, N, T, P, crf, gamma, out, stream);
    case Dtype::kHalf: return average_frames_typed<__half, float>(frames, counts, N, T, P, crf, gamma, out, stream);
    case Dtype::kBFloat16: return average_frames_typed<__nv_bfloat16, float>(frames, counts, N, T, P, crf, gamma, out, stream);
    case Dtype::kFloat: return average_frames_typed<float, float>(frames, counts, N, T, P, crf, gamma, out, stream);
    case Dtype::kDouble: return average_frames_typed<double, double>(frames, counts, N, T, P, crf, gamma, out, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_average_frames_backward(const void* grad, const void* frames,
                                           const int64_t* counts, int64_t N, int64_t T,
                                           int64_t P, Dtype dtype, bool crf, double gamma,
                                           void* grad_frames, cudaStream_t stream) {
  if (N * P == 0) return cudaSuccess;
  switch (dtype) {
    case Dtype::kHalf: return average_frames_backward_typed<__half, float>(grad, frames, counts, N, T, P, crf, gamma, grad_frames, stream);
    case Dtype::kBFloat16: return average_frames_backward_typed<__nv_bfloat16, float>(grad, frames, counts, N, T, P, crf, gamma, grad_frames, stream);
    case Dtype::kFloat: return average_frames_backward_typed<float, float>(grad, frames, counts, N, T, P, crf, gamma, grad_frames, stream);
    case Dtype::kDouble: return average_frames_backward_typed<double, double>(grad, frames, counts, N, T, P, crf, gamma, grad_frames, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace facedeblur::blur::cuda
