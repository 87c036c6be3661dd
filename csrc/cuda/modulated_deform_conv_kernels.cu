// Device kernels of the modulated deformable convolution; see the header for the layouts.
//
// Thread layout of the sampling kernels: a block is 32 consecutive output pixels (threadIdx.x)
// times S channel slices (threadIdx.y); blockIdx.y is the tap, blockIdx.z (image, offset
// group). Consecutive lanes read and write consecutive pixels of a column-tile row, and
// neighbouring pixels sample neighbouring input positions, so global accesses coalesce for
// smooth offsets. Each thread walks the channels of its offset group with stride S; the
// per-channel partial sums of the offset and mask gradients are then combined across the S
// slices through shared memory in a fixed order (deterministic, no atomics).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "modulated_deform_conv_kernels.h"
#include "cuda/device_types.cuh"
#include "cuda/launch.cuh"

namespace facedeblur::cuda {
namespace {

constexpr int kWarp = 32;

// One sampling point (image, offset group, tap, output pixel).
template <typename acc_t>
struct Tap {
  int row[4] = {-1, -1, -1, -1};  // (y0,x0) (y0,x0+1) (y0+1,x0) (y0+1,x0+1) as y*W+x; -1 = none
  acc_t ly = 0, lx = 0, m = 1;  // ly, lx: 0 outside, NaN for a NaN coordinate
  bool outside = true;  // no neighbour inside the image: value and gradients are zero, unless
                        // the mask or a fraction is NaN (then NaN, as in torchvision)
};

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ Tap<acc_t> load_tap(const MdcShape& s, const MdcInputs& in,
                                               int64_t n, int og, int k, int64_t pix) {
  const int64_t ho = pix / s.out_w, wo = pix - ho * s.out_w;
  const int taps = static_cast<int>(s.kernel_h * s.kernel_w);
  const int ky = k / static_cast<int>(s.kernel_w), kx = k - ky * static_cast<int>(s.kernel_w);
  const int64_t ch = static_cast<int64_t>(og) * taps + k;
  const scalar_t* off = static_cast<const scalar_t*>(in.offset) + n * in.offset_stride[0] +
                        ho * in.offset_stride[2] + wo * in.offset_stride[3];
  const acc_t y = static_cast<acc_t>(ho * s.stride_h - s.pad_h + ky * s.dil_h) +
                  to_acc(off[(2 * ch) * in.offset_stride[1]]);
  const acc_t x = static_cast<acc_t>(wo * s.stride_w - s.pad_w + kx * s.dil_w) +
                  to_acc(off[(2 * ch + 1) * in.offset_stride[1]]);
  Tap<acc_t> tap;
  tap.m = acc_t(1);
  if (in.mask != nullptr) {
    const scalar_t* msk = static_cast<const scalar_t*>(in.mask);
    tap.m = to_acc(msk[n * in.mask_stride[0] + ch * in.mask_stride[1] + ho * in.mask_stride[2] +
                       wo * in.mask_stride[3]]);
  }
  const acc_t height = static_cast<acc_t>(s.height), width = static_cast<acc_t>(s.width);
  // Zero outside the open box (-1, H) x (-1, W), torchvision's rule. A NaN coordinate lands
  // here too and keeps its NaN fraction, so that the bilinear formula over four zero
  // neighbours gives a NaN sample and NaN gradients (the CPU kernel's rule).
  if (!(y > acc_t(-1) && y < height && x > acc_t(-1) && x < width)) {
    tap.row[0] = tap.row[1] = tap.row[2] = tap.row[3] = -1;
    tap.ly = y != y ? y : acc_t(0);
    tap.lx = x != x ? x : acc_t(0);
    tap.outside = true;
    return tap;
  }
  const acc_t yf = floor(y), xf = floor(x);
  const int y0 = static_cast<int>(yf), x0 = static_cast<int>(xf);
  const int h = static_cast<int>(s.height), w = static_cast<int>(s.width);
  tap.ly = y - yf;
  tap.lx = x - xf;
  const bool top = y0 >= 0, bottom = y0 + 1 < h, left = x0 >= 0, right = x0 + 1 < w;
  tap.row[0] = (top && left) ? y0 * w + x0 : -1;
  tap.row[1] = (top && right) ? y0 * w + x0 + 1 : -1;
  tap.row[2] = (bottom && left) ? (y0 + 1) * w + x0 : -1;
  tap.row[3] = (bottom && right) ? (y0 + 1) * w + x0 + 1 : -1;
  tap.outside = false;
  return tap;
}

template <typename acc_t>
__device__ __forceinline__ void bilinear_weights(const Tap<acc_t>& tap, acc_t w[4]) {
  const acc_t hy = acc_t(1) - tap.ly, hx = acc_t(1) - tap.lx;
  w[0] = hy * hx;
  w[1] = hy * tap.lx;
  w[2] = tap.ly * hx;
  w[3] = tap.ly * tap.lx;
}

template <typename scalar_t>
__global__ void gather_columns_kernel(MdcShape s, MdcInputs in, MdcTile tile,
                                      scalar_t* __restrict__ columns) {
  using acc_t = typename AccType<scalar_t>::type;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kWarp + threadIdx.x;
  if (t >= tile.pixels) return;  // no barrier in this kernel
  const int k = blockIdx.y;
  const int og = static_cast<int>(blockIdx.z % s.offset_groups);
  const int64_t b = blockIdx.z / s.offset_groups;
  const int64_t n = tile.n0 + b;
  const Tap<acc_t> tap = load_tap<scalar_t, acc_t>(s, in, n, og, k, tile.p0 + t);
  acc_t w[4];
  bilinear_weights(tap, w);
  for (int j = 0; j < 4; ++j) w[j] *= tap.m;
  const int64_t hw = s.height * s.width, taps = s.kernel_h * s.kernel_w;
  const int64_t cog = s.channels / s.offset_groups;
  const scalar_t* image = static_cast<const scalar_t*>(in.input) + n * s.channels * hw;
  scalar_t* dst = columns + (b * s.channels * taps + k) * tile.pixels + t;
  for (int64_t c = og * cog + threadIdx.y; c < (og + 1) * cog; c += blockDim.y) {
    const scalar_t* plane = image + c * hw;
    acc_t v = 0;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      // The neighbour outside reads 0 and still adds w * 0: NaN for a NaN weight.
      v += w[j] * (tap.row[j] >= 0 ? to_acc(plane[tap.row[j]]) : acc_t(0));
    }
    dst[c * taps * tile.pixels] = from_acc<scalar_t>(v);
  }
}

template <typename scalar_t, bool kDots, bool kAtomicScatter, bool kColumns>
__global__ void backward_samples_kernel(MdcShape s, MdcInputs in, MdcTile tile,
                                        const scalar_t* __restrict__ grad_columns,
                                        MdcBackwardOutputs out) {
  using acc_t = typename AccType<scalar_t>::type;
  unsigned char* shared_raw = dynamic_shared_memory<unsigned char>();
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kWarp + threadIdx.x;
  const bool active = t < tile.pixels;
  const int k = blockIdx.y;
  const int og = static_cast<int>(blockIdx.z % s.offset_groups);
  const int64_t b = blockIdx.z / s.offset_groups;
  const int64_t n = tile.n0 + b;
  const int64_t hw = s.height * s.width, taps = s.kernel_h * s.kernel_w;
  const int64_t cog = s.channels / s.offset_groups;
  acc_t a[4] = {0, 0, 0, 0};  // a_j = sum_c grad_col[c] * neighbour_j[c]
  Tap<acc_t> tap;
  acc_t cw[4] = {0, 0, 0, 0};
  if (active) {
    tap = load_tap<scalar_t, acc_t>(s, in, n, og, k, tile.p0 + t);
    bilinear_weights(tap, cw);
    if (!tap.outside || kColumns) {
      const scalar_t* image = static_cast<const scalar_t*>(in.input) + n * s.channels * hw;
      const int64_t col_offset = (b * s.channels * taps + k) * tile.pixels + t;
      acc_t* grad_image = nullptr;
      if constexpr (kAtomicScatter) {
        grad_image = static_cast<acc_t*>(out.grad_input_acc) + b * s.channels * hw;
      }
      scalar_t* col = static_cast<scalar_t*>(out.columns);
      for (int64_t c = og * cog + threadIdx.y; c < (og + 1) * cog; c += blockDim.y) {
        const scalar_t* plane = image + c * hw;
        const int64_t at = col_offset + c * taps * tile.pixels;
        acc_t v[4];
#pragma unroll
        for (int j = 0; j < 4; ++j) v[j] = tap.row[j] >= 0 ? to_acc(plane[tap.row[j]]) : acc_t(0);
        if constexpr (kColumns) {
          col[at] = from_acc<scalar_t>(tap.m * (cw[0] * v[0] + cw[1] * v[1] + cw[2] * v[2] +
                                                cw[3] * v[3]));
        }
        if (tap.outside) continue;
        const acc_t g = to_acc(grad_columns[at]);
        if constexpr (kDots) {
#pragma unroll
          for (int j = 0; j < 4; ++j) a[j] += g * v[j];
        }
        if constexpr (kAtomicScatter) {
          const acc_t gm = g * tap.m;
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            if (tap.row[j] >= 0) atomicAdd(grad_image + c * hw + tap.row[j], cw[j] * gm);
          }
        }
      }
    }
  }
  if constexpr (kDots) {
    if (blockDim.y > 1) {
      // partial[j][slice][lane]; slice 0 sums the slices in order.
      acc_t* partial = reinterpret_cast<acc_t*>(shared_raw);
      const int slices = blockDim.y;
#pragma unroll
      for (int j = 0; j < 4; ++j) partial[(j * slices + threadIdx.y) * kWarp + threadIdx.x] = a[j];
      __syncthreads();
      if (threadIdx.y == 0) {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          acc_t sum = 0;
          for (int y = 0; y < slices; ++y) sum += partial[(j * slices + y) * kWarp + threadIdx.x];
          a[j] = sum;
        }
      }
    }
    if (threadIdx.y == 0 && active) {
      const int64_t pix = tile.p0 + t;
      const int64_t ho = pix / s.out_w, wo = pix - ho * s.out_w;
      const int64_t ch = static_cast<int64_t>(og) * taps + k;
      if (out.grad_offset != nullptr) {
        const acc_t hy = acc_t(1) - tap.ly, hx = acc_t(1) - tap.lx;
        // d(bilinear)/dy and d/dx written through the neighbours' dot products.
        // Outside the image the dot products are 0: gy = gx = 0 unless the mask or a
        // fraction is not finite (then NaN, as in torchvision).
        const acc_t gy = tap.m * (hx * (a[2] - a[0]) + tap.lx * (a[3] - a[1]));
        const acc_t gx = tap.m * (hy * (a[1] - a[0]) + tap.ly * (a[3] - a[2]));
        scalar_t* go = static_cast<scalar_t*>(out.grad_offset) + n * out.grad_offset_stride[0] +
                       ho * out.grad_offset_stride[2] + wo * out.grad_offset_stride[3];
        go[(2 * ch) * out.grad_offset_stride[1]] = from_acc<scalar_t>(gy);
        go[(2 * ch + 1) * out.grad_offset_stride[1]] = from_acc<scalar_t>(gx);
      }
      if (out.grad_mask != nullptr) {
        const acc_t gm = cw[0] * a[0] + cw[1] * a[1] + cw[2] * a[2] + cw[3] * a[3];
        static_cast<scalar_t*>(out.grad_mask)[n * out.grad_mask_stride[0] +
                                              ch * out.grad_mask_stride[1] +
                                              ho * out.grad_mask_stride[2] +
                                              wo * out.grad_mask_stride[3]] =
            from_acc<scalar_t>(gm);
      }
    }
  }
}

// Entry e = ((((og * images + b) * taps + k) * pixels + t) * 4 + j).
template <typename scalar_t>
__global__ void scatter_keys_kernel(MdcShape s, MdcInputs in, MdcTile tile,
                                    int64_t* __restrict__ keys,
                                    typename AccType<scalar_t>::type* __restrict__ weights) {
  using acc_t = typename AccType<scalar_t>::type;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= tile.pixels) return;
  const int k = blockIdx.y;
  const int og = static_cast<int>(blockIdx.z % s.offset_groups);
  const int64_t b = blockIdx.z / s.offset_groups;
  const Tap<acc_t> tap = load_tap<scalar_t, acc_t>(s, in, tile.n0 + b, og, k, tile.p0 + t);
  acc_t w[4];
  bilinear_weights(tap, w);
  const int64_t hw = s.height * s.width, taps = s.kernel_h * s.kernel_w;
  const int64_t key_base = og * (tile.images * hw + 1);
  const int64_t discard = key_base + tile.images * hw;  // sorts after every real pixel
  const int64_t e = (((og * tile.images + b) * taps + k) * tile.pixels + t) * 4;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const bool valid = tap.row[j] >= 0;
    keys[e + j] = valid ? key_base + b * hw + tap.row[j] : discard;
    weights[e + j] = valid ? tap.m * w[j] : acc_t(0);
  }
}

__global__ void segment_starts_kernel(const int64_t* __restrict__ sorted_keys, int64_t entries,
                                      int64_t key_count, int64_t* __restrict__ starts) {
  const int64_t key = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (key > key_count) return;
  int64_t lo = 0, hi = entries;  // first index with sorted_keys[index] >= key
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (sorted_keys[mid] < key) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  starts[key] = lo;
}

template <typename scalar_t>
__global__ void gather_input_grad_kernel(MdcShape s, MdcTile tile,
                                         const int64_t* __restrict__ starts,
                                         const int64_t* __restrict__ permutation,
                                         const typename AccType<scalar_t>::type* __restrict__ weights,
                                         const scalar_t* __restrict__ grad_columns,
                                         typename AccType<scalar_t>::type* __restrict__ grad_acc) {
  using acc_t = typename AccType<scalar_t>::type;
  const int64_t hw = s.height * s.width, taps = s.kernel_h * s.kernel_w;
  const int64_t index = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (index >= tile.images * s.channels * hw) return;
  const int64_t q = index % hw;
  const int64_t c = (index / hw) % s.channels;
  const int64_t b = index / (hw * s.channels);
  const int64_t og = c / (s.channels / s.offset_groups);
  const int64_t key = og * (tile.images * hw + 1) + b * hw + q;
  const int64_t end = starts[key + 1];
  acc_t sum = 0;
  for (int64_t i = starts[key]; i < end; ++i) {
    const int64_t e = permutation[i];
    const int64_t r = e / 4;
    const int64_t t = r % tile.pixels;
    const int64_t k = (r / tile.pixels) % taps;
    sum += weights[e] * to_acc(grad_columns[((b * s.channels + c) * taps + k) * tile.pixels + t]);
  }
  grad_acc[index] += sum;  // this thread alone writes this element
}

int slices_for(int64_t channels_per_offset_group) {
  int slices = 1;
  while (slices < 8 && slices * 16 < channels_per_offset_group) slices *= 2;
  return slices;
}

dim3 sample_grid(const MdcShape& s, const MdcTile& tile, int lanes) {
  return dim3(static_cast<unsigned>((tile.pixels + lanes - 1) / lanes),
              static_cast<unsigned>(s.kernel_h * s.kernel_w),
              static_cast<unsigned>(tile.images * s.offset_groups));
}

template <typename scalar_t>
cudaError_t gather_columns_typed(const MdcShape& s, const MdcInputs& in, const MdcTile& tile,
                                 void* columns, cudaStream_t stream) {
  const dim3 block(kWarp, slices_for(s.channels / s.offset_groups));
  launch_kernel<gather_columns_kernel<scalar_t>>(sample_grid(s, tile, kWarp), block, 0, stream, s,
      in, tile, static_cast<scalar_t*>(columns));
  return cudaGetLastError();
}

template <typename scalar_t, bool kDots, bool kAtomicScatter, bool kColumns>
cudaError_t backward_samples_variant(const MdcShape& s, const MdcInputs& in,
                                     const MdcTile& tile, const void* grad_columns,
                                     const MdcBackwardOutputs& out, cudaStream_t stream) {
  using acc_t = typename AccType<scalar_t>::type;
  const int slices = slices_for(s.channels / s.offset_groups);
  const dim3 block(kWarp, slices);
  const size_t shared = (kDots && slices > 1) ? 4 * slices * kWarp * sizeof(acc_t) : 0;
  launch_kernel<backward_samples_kernel<scalar_t, kDots, kAtomicScatter, kColumns>>(
      sample_grid(s, tile, kWarp), block, shared, stream, s, in, tile, static_cast<const scalar_t*>(grad_columns), out);
  return cudaGetLastError();
}

template <typename scalar_t>
cudaError_t backward_samples_typed(const MdcShape& s, const MdcInputs& in, const MdcTile& tile,
                                   const void* grad_columns, const MdcBackwardOutputs& out,
                                   bool atomic_input_grad, cudaStream_t stream) {
  const bool dots = out.grad_offset != nullptr || out.grad_mask != nullptr;
  const bool scatter = atomic_input_grad && out.grad_input_acc != nullptr;
  const bool columns = out.columns != nullptr;
  const int code = (dots ? 4 : 0) | (scatter ? 2 : 0) | (columns ? 1 : 0);
  switch (code) {
    case 1: return backward_samples_variant<scalar_t, false, false, true>(s, in, tile, grad_columns, out, stream);
    case 2: return backward_samples_variant<scalar_t, false, true, false>(s, in, tile, grad_columns, out, stream);
    case 3: return backward_samples_variant<scalar_t, false, true, true>(s, in, tile, grad_columns, out, stream);
    case 4: return backward_samples_variant<scalar_t, true, false, false>(s, in, tile, grad_columns, out, stream);
    case 5: return backward_samples_variant<scalar_t, true, false, true>(s, in, tile, grad_columns, out, stream);
    case 6: return backward_samples_variant<scalar_t, true, true, false>(s, in, tile, grad_columns, out, stream);
    case 7: return backward_samples_variant<scalar_t, true, true, true>(s, in, tile, grad_columns, out, stream);
    default: return cudaSuccess;  // nothing requested
  }
}

template <typename scalar_t>
cudaError_t scatter_keys_typed(const MdcShape& s, const MdcInputs& in, const MdcTile& tile,
                               int64_t* keys, void* weights, cudaStream_t stream) {
  constexpr int kThreads = 128;
  launch_kernel<scatter_keys_kernel<scalar_t>>(sample_grid(s, tile, kThreads), kThreads, 0, stream,
      s, in, tile, keys, static_cast<typename AccType<scalar_t>::type*>(weights));
  return cudaGetLastError();
}

template <typename scalar_t>
cudaError_t gather_input_grad_typed(const MdcShape& s, const MdcTile& tile,
                                    const int64_t* starts, const int64_t* permutation,
                                    const void* weights, const void* grad_columns,
                                    void* grad_input_acc, cudaStream_t stream) {
  using acc_t = typename AccType<scalar_t>::type;
  constexpr int kThreads = 256;
  const int64_t total = tile.images * s.channels * s.height * s.width;
  if (total == 0) return cudaSuccess;
  launch_kernel<gather_input_grad_kernel<scalar_t>>(
      static_cast<unsigned>((total + kThreads - 1) / kThreads), kThreads, 0, stream, s, tile, starts, permutation, static_cast<const acc_t*>(weights),
      static_cast<const scalar_t*>(grad_columns), static_cast<acc_t*>(grad_input_acc));
  return cudaGetLastError();
}

template <typename F>
cudaError_t dispatch(MdcDtype dtype, F&& f) {
  switch (dtype) {
    case MdcDtype::kFloat32: return f(float{});
    case MdcDtype::kFloat64: return f(double{});
    case MdcDtype::kFloat16: return f(__half{});
    case MdcDtype::kBFloat16: return f(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

bool empty_tile(const MdcTile& tile) { return tile.images <= 0 || tile.pixels <= 0; }

}  // namespace

cudaError_t launch_mdc_gather_columns(MdcDtype dtype, const MdcShape& shape,
                                      const MdcInputs& in, const MdcTile& tile, void* columns,
                                      cudaStream_t stream) {
  if (empty_tile(tile)) return cudaSuccess;
  return dispatch(dtype, [&](auto tag) {
    return gather_columns_typed<decltype(tag)>(shape, in, tile, columns, stream);
  });
}

cudaError_t launch_mdc_backward_samples(MdcDtype dtype, const MdcShape& shape,
                                        const MdcInputs& in, const MdcTile& tile,
                                        const void* grad_columns, const MdcBackwardOutputs& out,
                                        bool atomic_input_grad, cudaStream_t stream) {
  if (empty_tile(tile)) return cudaSuccess;
  return dispatch(dtype, [&](auto tag) {
    return backward_samples_typed<decltype(tag)>(shape, in, tile, grad_columns, out,
                                                 atomic_input_grad, stream);
  });
}

int64_t mdc_entry_count(const MdcShape& shape, const MdcTile& tile) {
  return 4 * shape.offset_groups * tile.images * shape.kernel_h * shape.kernel_w * tile.pixels;
}

int64_t mdc_key_count(const MdcShape& shape, const MdcTile& tile) {
  return shape.offset_groups * (tile.images * shape.height * shape.width + 1);
}

cudaError_t launch_mdc_scatter_keys(MdcDtype dtype, const MdcShape& shape, const MdcInputs& in,
                                    const MdcTile& tile, int64_t* keys, void* weights,
                                    cudaStream_t stream) {
  if (empty_tile(tile)) return cudaSuccess;
  return dispatch(dtype, [&](auto tag) {
    return scatter_keys_typed<decltype(tag)>(shape, in, tile, keys, weights, stream);
  });
}

cudaError_t launch_mdc_segment_starts(const int64_t* sorted_keys, int64_t entries,
                                      int64_t key_count, int64_t* starts, cudaStream_t stream) {
  constexpr int kThreads = 256;
  const int64_t total = key_count + 1;
  launch_kernel<segment_starts_kernel>(static_cast<unsigned>((total + kThreads - 1) / kThreads),
                                       kThreads, 0, stream, sorted_keys, entries, key_count,
                                       starts);
  return cudaGetLastError();
}

cudaError_t launch_mdc_gather_input_grad(MdcDtype dtype, const MdcShape& shape,
                                         const MdcTile& tile, const int64_t* starts,
                                         const int64_t* permutation, const void* weights,
                                         const void* grad_columns, void* grad_input_acc,
                                         cudaStream_t stream) {
  if (empty_tile(tile)) return cudaSuccess;
  return dispatch(dtype, [&](auto tag) {
    return gather_input_grad_typed<decltype(tag)>(shape, tile, starts, permutation, weights,
                                                  grad_columns, grad_input_acc, stream);
  });
}

}  // namespace facedeblur::cuda
