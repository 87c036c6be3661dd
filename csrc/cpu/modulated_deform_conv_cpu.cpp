// CPU kernels of the modulated deformable convolution (DCNv2), forward and backward.
//
// Layout of the computation. The output pixels of one image are cut into tiles of `tile`
// pixels. For a tile the kernel
//   1. computes, per (pixel, offset group, tap), the sampling point: its four neighbours in
//      the image and the bilinear fractions ("samples"), reading offset and mask in place;
//   2. gathers the bilinearly sampled, modulated input into a column tile
//      col[pixel][group][tap][channel] (channels innermost, so that the gather reads whole
//      channel vectors of a channels_last copy of the image and vectorizes);
//   3. multiplies it with the weight, reordered to [C_out][tap][channel], by one GEMM per
//      group (ATen's matmul, i.e. MKL or OpenBLAS), straight into the output tensor.
// The column tile holds tile * C * kh * kw elements (about kTileElements), so memory does not
// grow with the image: there is no C * kh * kw * H * W im2col buffer.
//
// Backward, per tile: grad_col = W^T grad_out (GEMM); one fused pass over the samples that,
// for each channel, scatters grad_col into the input gradient (four bilinear neighbours),
// accumulates the four dot products <grad_col, neighbour> from which the offset and mask
// gradients follow in closed form, and rebuilds the column tile; then
// grad_W += grad_out col (GEMM) into a per-chunk accumulator.
//
// Threads. With at least as many images as threads, each thread owns whole images (it alone
// writes their input gradient: no races, no atomics). With fewer images than threads, the
// tiles of one image are split between threads, each accumulating its input gradient in a
// private buffer; the buffers are summed in a fixed order afterwards. Either way the result is
// deterministic for a given thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <vector>

#include "common/checks.h"
#include "modulated_deform_conv_args.h"

// Hot loops are compiled twice, for x86-64-v3 (AVX2+FMA) and for the baseline ISA, and picked
// at load time by CPU features (GCC function multiversioning; "arch=haswell" would not do:
// GCC dispatches named CPUs by model, so AMD processors would get the baseline). Clang gets an
// AVX2 clone, other compilers the baseline only.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
#define FACEDEBLUR_SIMD_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#elif defined(__x86_64__) && defined(__clang__)
#define FACEDEBLUR_SIMD_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define FACEDEBLUR_SIMD_CLONES
#endif

namespace facedeblur {
namespace {

constexpr const char* kOp = "modulated_deform_conv2d";

// Column tile budget in elements (512 KiB in float32): large enough for efficient GEMMs,
// small enough to stay in L2 next to the sampled image rows.
constexpr int64_t kTileElements = int64_t{1} << 17;

// One sampling point: (output pixel, offset group, tap).
template <typename T>
struct Sample {
  int64_t row[4];  // neighbours (y0,x0) (y0,x0+1) (y0+1,x0) (y0+1,x0+1) as y*W+x; -1 = outside
  T ly, lx;        // fractional position inside the 2x2 cell (0 outside; NaN for a NaN coordinate)
  T m;             // modulation (1 for DCNv1)
};

// Channels [c0, c1) of one offset group that fall in one convolution group; channel c at tap
// k lives at column col_base + k * in_per_group + c of the tile row.
struct ChannelRun {
  int64_t c0, c1, col_base;
};

// Layout of a 4-D tensor addressed as [image][channel][pixel] with the pixel flattened; valid
// for tensors that are contiguous in the given memory format.
struct PixelLayout {
  int64_t image, channel, pixel;
};

PixelLayout pixel_layout(int64_t channels, int64_t pixels, bool channels_last) {
  if (channels_last) return {pixels * channels, 1, channels};
  return {channels * pixels, pixels, 1};
}

template <typename T>
struct Problem {
  DeformConvGeometry g;
  const T* offset = nullptr;
  int64_t off_stride[4] = {0, 0, 0, 0};
  const T* mask = nullptr;
  int64_t mask_stride[4] = {0, 0, 0, 0};
  std::vector<std::vector<ChannelRun>> runs;  // per offset group
  int64_t tile = 1;                           // output pixels per tile
  int64_t tiles = 1;                          // tiles per image
};

template <typename T>
Problem<T> make_problem(const DeformConvGeometry& g, const at::Tensor& offset,
                        const c10::optional<at::Tensor>& mask) {
  Problem<T> p;
  p.g = g;
  p.offset = offset.data_ptr<T>();
  for (int d = 0; d < 4; ++d) p.off_stride[d] = offset.stride(d);
  if (mask.has_value()) {
    p.mask = mask->data_ptr<T>();
    for (int d = 0; d < 4; ++d) p.mask_stride[d] = mask->stride(d);
  }
  const int64_t cg = g.in_per_group(), cog = g.in_per_offset_group(), taps = g.taps();
  p.runs.resize(g.offset_groups);
  for (int64_t og = 0; og < g.offset_groups; ++og) {
    for (int64_t grp = 0; grp < g.groups; ++grp) {
      const int64_t c0 = std::max(og * cog, grp * cg);
      const int64_t c1 = std::min((og + 1) * cog, (grp + 1) * cg);
      if (c0 < c1) p.runs[og].push_back({c0, c1, grp * taps * cg - grp * cg});
    }
  }
  const int64_t per_pixel = std::max<int64_t>(1, g.in_channels * taps);
  const int64_t budget = deform_tile_elements(kTileElements);
  int64_t tile = std::max<int64_t>(1, budget / per_pixel);
  if (budget >= 16 * per_pixel) tile = tile / 16 * 16;  // whole SIMD/GEMM blocks
  p.tile = std::min(tile, g.out_pixels());
  p.tiles = (g.out_pixels() + p.tile - 1) / p.tile;
  return p;
}

// Sampling points of output pixels [p0, p0 + count) of image n, ordered [pixel][og][tap].
template <typename T>
void compute_samples(const Problem<T>& p, int64_t n, int64_t p0, int64_t count,
                     Sample<T>* out) {
  const DeformConvGeometry& g = p.g;
  const int64_t taps = g.taps();
  const T height = static_cast<T>(g.height), width = static_cast<T>(g.width);
  for (int64_t t = 0; t < count; ++t) {
    const int64_t pix = p0 + t;
    const int64_t ho = pix / g.out_w, wo = pix % g.out_w;
    const int64_t base_y = ho * g.stride_h - g.pad_h, base_x = wo * g.stride_w - g.pad_w;
    const T* off = p.offset + n * p.off_stride[0] + ho * p.off_stride[2] + wo * p.off_stride[3];
    const T* msk = p.mask ? p.mask + n * p.mask_stride[0] + ho * p.mask_stride[2] +
                                wo * p.mask_stride[3]
                          : nullptr;
    for (int64_t og = 0; og < g.offset_groups; ++og) {
      for (int64_t k = 0; k < taps; ++k) {
        const int64_t ky = k / g.kernel_w, kx = k % g.kernel_w;
        const int64_t ch = og * taps + k;
        const T y = static_cast<T>(base_y + ky * g.dil_h) + off[(2 * ch) * p.off_stride[1]];
        const T x = static_cast<T>(base_x + kx * g.dil_w) + off[(2 * ch + 1) * p.off_stride[1]];
        Sample<T>& s = out[(t * g.offset_groups + og) * taps + k];
        s.m = msk ? msk[ch * p.mask_stride[1]] : T(1);
        // Zero outside the open box (-1, H) x (-1, W), torchvision's rule. A NaN coordinate
        // lands here too and keeps its NaN fraction, so that (as in torchvision) the bilinear
        // formula over four zero neighbours gives a NaN sample, and NaN gradients for the
        // mask, the weight and the offsets the fraction enters; none reach the input.
        if (!(y > T(-1) && y < height && x > T(-1) && x < width)) {
          s.row[0] = s.row[1] = s.row[2] = s.row[3] = -1;
          s.ly = std::isnan(y) ? y : T(0);
          s.lx = std::isnan(x) ? x : T(0);
          continue;
        }
        const T yf = std::floor(y), xf = std::floor(x);
        const int64_t y0 = static_cast<int64_t>(yf), x0 = static_cast<int64_t>(xf);
        s.ly = y - yf;
        s.lx = x - xf;
        const bool top = y0 >= 0, bottom = y0 + 1 < g.height;
        const bool left = x0 >= 0, right = x0 + 1 < g.width;
        s.row[0] = (top && left) ? y0 * g.width + x0 : -1;
        s.row[1] = (top && right) ? y0 * g.width + x0 + 1 : -1;
        s.row[2] = (bottom && left) ? (y0 + 1) * g.width + x0 : -1;
        s.row[3] = (bottom && right) ? (y0 + 1) * g.width + x0 + 1 : -1;
      }
    }
  }
}

// col[t][grp][k][c] = m * bilinear(image, sample) for the tile's samples. image is [H*W][C].
template <typename T>
FACEDEBLUR_SIMD_CLONES void gather_columns(const Problem<T>& p, const Sample<T>* samples,
                                           int64_t count, const T* image, const T* zero_row,
                                           T* col) {
  const DeformConvGeometry& g = p.g;
  const int64_t taps = g.taps(), channels = g.in_channels, cg = g.in_per_group();
  const int64_t row_len = channels * taps;
  for (int64_t t = 0; t < count; ++t) {
    for (int64_t og = 0; og < g.offset_groups; ++og) {
      for (int64_t k = 0; k < taps; ++k) {
        const Sample<T>& s = samples[(t * g.offset_groups + og) * taps + k];
        const T hy = T(1) - s.ly, hx = T(1) - s.lx;
        const T w0 = s.m * hy * hx, w1 = s.m * hy * s.lx, w2 = s.m * s.ly * hx,
                w3 = s.m * s.ly * s.lx;
        const T* v0 = s.row[0] >= 0 ? image + s.row[0] * channels : zero_row;
        const T* v1 = s.row[1] >= 0 ? image + s.row[1] * channels : zero_row;
        const T* v2 = s.row[2] >= 0 ? image + s.row[2] * channels : zero_row;
        const T* v3 = s.row[3] >= 0 ? image + s.row[3] * channels : zero_row;
        for (const ChannelRun& run : p.runs[og]) {
          T* dst = col + t * row_len + run.col_base + k * cg;
#pragma omp simd
          for (int64_t c = run.c0; c < run.c1; ++c) {
            dst[c] = w0 * v0[c] + w1 * v1[c] + w2 * v2[c] + w3 * v3[c];
          }
        }
      }
    }
  }
}

// Gradient outputs of one image for the fused backward pass; null pointers are not computed.
template <typename T>
struct BackwardTargets {
  T* grad_image = nullptr;  // [H*W][C] accumulator of the input gradient
  T* sink_row = nullptr;    // [C] scratch receiving contributions of outside neighbours
  T* grad_offset = nullptr;
  int64_t goff_stride[4] = {0, 0, 0, 0};
  T* grad_mask = nullptr;
  int64_t gmask_stride[4] = {0, 0, 0, 0};
  T* col = nullptr;  // column tile to rebuild (for the weight gradient)
};

// The fused backward pass over the samples of one tile (see the file comment). gcol has the
// layout of the column tile.
template <typename T, bool kDots, bool kScatter, bool kColumns>
FACEDEBLUR_SIMD_CLONES void backward_samples(const Problem<T>& p, int64_t n, int64_t p0,
                                             const Sample<T>* samples, int64_t count,
                                             const T* image, const T* zero_row, const T* gcol,
                                             const BackwardTargets<T>& out) {
  const DeformConvGeometry& g = p.g;
  const int64_t taps = g.taps(), channels = g.in_channels, cg = g.in_per_group();
  const int64_t row_len = channels * taps;
  for (int64_t t = 0; t < count; ++t) {
    const int64_t pix = p0 + t;
    const int64_t ho = pix / g.out_w, wo = pix % g.out_w;
    for (int64_t og = 0; og < g.offset_groups; ++og) {
      for (int64_t k = 0; k < taps; ++k) {
        const Sample<T>& s = samples[(t * g.offset_groups + og) * taps + k];
        const T hy = T(1) - s.ly, hx = T(1) - s.lx;
        const T cw0 = hy * hx, cw1 = hy * s.lx, cw2 = s.ly * hx, cw3 = s.ly * s.lx;
        const T w0 = s.m * cw0, w1 = s.m * cw1, w2 = s.m * cw2, w3 = s.m * cw3;
        const T* v0 = s.row[0] >= 0 ? image + s.row[0] * channels : zero_row;
        const T* v1 = s.row[1] >= 0 ? image + s.row[1] * channels : zero_row;
        const T* v2 = s.row[2] >= 0 ? image + s.row[2] * channels : zero_row;
        const T* v3 = s.row[3] >= 0 ? image + s.row[3] * channels : zero_row;
        T* q0 = nullptr;
        T* q1 = nullptr;
        T* q2 = nullptr;
        T* q3 = nullptr;
        if constexpr (kScatter) {
          q0 = s.row[0] >= 0 ? out.grad_image + s.row[0] * channels : out.sink_row;
          q1 = s.row[1] >= 0 ? out.grad_image + s.row[1] * channels : out.sink_row;
          q2 = s.row[2] >= 0 ? out.grad_image + s.row[2] * channels : out.sink_row;
          q3 = s.row[3] >= 0 ? out.grad_image + s.row[3] * channels : out.sink_row;
        }
        // a_j = sum_c grad_col[c] * neighbour_j[c]
        T a0 = 0, a1 = 0, a2 = 0, a3 = 0;
        const bool outside = s.row[0] < 0 && s.row[1] < 0 && s.row[2] < 0 && s.row[3] < 0;
        for (const ChannelRun& run : p.runs[og]) {
          const int64_t base = t * row_len + run.col_base + k * cg;
          const T* gsrc = gcol + base;
          if constexpr (kColumns) {
            T* dst = out.col + base;
#pragma omp simd
            for (int64_t c = run.c0; c < run.c1; ++c) {
              dst[c] = w0 * v0[c] + w1 * v1[c] + w2 * v2[c] + w3 * v3[c];
            }
          }
          if (outside) continue;
          if constexpr (kDots) {
#pragma omp simd reduction(+ : a0, a1, a2, a3)
            for (int64_t c = run.c0; c < run.c1; ++c) {
              const T gv = gsrc[c];
              a0 += gv * v0[c];
              a1 += gv * v1[c];
              a2 += gv * v2[c];
              a3 += gv * v3[c];
            }
          }
          if constexpr (kScatter) {
            // The four rows are distinct pixels (or the shared sink, whose content is
            // discarded), so the iterations are independent.
#pragma omp simd
            for (int64_t c = run.c0; c < run.c1; ++c) {
              const T gv = gsrc[c];
              q0[c] += w0 * gv;
              q1[c] += w1 * gv;
              q2[c] += w2 * gv;
              q3[c] += w3 * gv;
            }
          }
        }
        if constexpr (kDots) {
          const int64_t ch = og * taps + k;
          if (out.grad_offset) {
            // d(bilinear)/dy and d/dx written through the neighbours' dot products.
            const T gy = s.m * (hx * (a2 - a0) + s.lx * (a3 - a1));
            const T gx = s.m * (hy * (a1 - a0) + s.ly * (a3 - a2));
            T* go = out.grad_offset + n * out.goff_stride[0] + ho * out.goff_stride[2] +
                    wo * out.goff_stride[3];
            // Outside the image the dot products are 0: gy = gx = 0 unless the mask or a
            // fraction is not finite (then NaN, as in torchvision).
            go[(2 * ch) * out.goff_stride[1]] = gy;
            go[(2 * ch + 1) * out.goff_stride[1]] = gx;
          }
          if (out.grad_mask) {
            const T gm = cw0 * a0 + cw1 * a1 + cw2 * a2 + cw3 * a3;
            out.grad_mask[n * out.gmask_stride[0] + ch * out.gmask_stride[1] +
                          ho * out.gmask_stride[2] + wo * out.gmask_stride[3]] = gm;
          }
        }
      }
    }
  }
}

template <typename T>
using BackwardPass = void (*)(const Problem<T>&, int64_t, int64_t, const Sample<T>*, int64_t,
                              const T*, const T*, const T*, const BackwardTargets<T>&);

template <typename T>
BackwardPass<T> pick_backward_pass(bool dots, bool scatter, bool columns) {
  const int code = (dots ? 4 : 0) | (scatter ? 2 : 0) | (columns ? 1 : 0);
  switch (code) {
    case 1: return backward_samples<T, false, false, true>;
    case 2: return backward_samples<T, false, true, false>;
    case 3: return backward_samples<T, false, true, true>;
    case 4: return backward_samples<T, true, false, false>;
    case 5: return backward_samples<T, true, false, true>;
    case 6: return backward_samples<T, true, true, false>;
    case 7: return backward_samples<T, true, true, true>;
    default: return nullptr;
  }
}

// A matrix view of raw memory for ATen's GEMM (no copy, no ownership).
template <typename T>
at::Tensor matrix(const T* data, int64_t rows, int64_t cols, int64_t row_stride,
                  int64_t col_stride) {
  return at::from_blob(const_cast<T*>(data), {rows, cols}, {row_stride, col_stride},
                       at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
}

// Carves per-chunk scratch buffers out of one allocation made on the calling thread (so that
// memory profilers see it), 64-byte aligned.
class Arena {
 public:
  Arena(int64_t chunks, int64_t bytes_per_chunk)
      : per_chunk_(round_up(bytes_per_chunk)),
        storage_(at::empty({std::max<int64_t>(1, chunks * per_chunk_ + 64)},
                           at::TensorOptions().dtype(at::kByte))) {}

  // Usage: Arena::Layout l; l.add(n0); l.add(n1) -> offsets; then at(chunk, offset).
  static int64_t round_up(int64_t bytes) { return (bytes + 63) / 64 * 64; }

  uint8_t* chunk(int64_t i) const {
    auto base = reinterpret_cast<uintptr_t>(storage_.data_ptr<uint8_t>());
    base = (base + 63) / 64 * 64;
    return reinterpret_cast<uint8_t*>(base) + i * per_chunk_;
  }

 private:
  int64_t per_chunk_;
  at::Tensor storage_;
};

// Byte offsets of named scratch buffers inside one chunk.
struct ScratchLayout {
  int64_t bytes = 0;
  int64_t add(int64_t size_bytes) {
    const int64_t at_offset = bytes;
    bytes += Arena::round_up(size_bytes);
    return at_offset;
  }
};

// How the work is split between threads (see the file comment).
struct Split {
  bool per_image;   // true: chunks own whole images; false: one image at a time, tiles split
  int64_t chunks;
};

// Below this many sampled elements (N * H_out * W_out * C * kh * kw) one thread does it all:
// waking a thread team costs more than the work.
constexpr int64_t kMinParallelWork = int64_t{1} << 16;

Split choose_split(const DeformConvGeometry& g, int64_t tiles, int64_t max_tile_chunks) {
  const int64_t batch = g.batch;
  const int64_t work = batch * g.out_pixels() * g.in_channels * g.taps();
  const int64_t threads =
      work < kMinParallelWork ? 1 : std::max<int64_t>(1, at::get_num_threads());
  if (batch >= threads || tiles < 2 || threads == 1) {
    return {true, std::min(batch, threads)};
  }
  return {false, std::max<int64_t>(1, std::min({threads, tiles, max_tile_chunks}))};
}

// [H*W][C] copy of image n (or a pointer into the input when it is channels_last already).
template <typename T>
const T* image_rows(const at::Tensor& input, bool input_is_cl, int64_t n, T* buffer) {
  if (input_is_cl) return input.data_ptr<T>() + n * input.stride(0);
  const int64_t c = input.size(1), h = input.size(2), w = input.size(3);
  at::Tensor dst = at::from_blob(buffer, {h, w, c}, input.options().device(at::kCPU));
  dst.copy_(input[n].permute({1, 2, 0}));
  return buffer;
}

// ----------------------------------------------------------------------------------------
// Forward
// ----------------------------------------------------------------------------------------

template <typename T>
void forward_tiles(const Problem<T>& p, int64_t n, const T* image, int64_t tile_begin,
                   int64_t tile_end, const at::Tensor& weight_t,
                   const c10::optional<at::Tensor>& bias, T* out, const PixelLayout& ol,
                   Sample<T>* samples, T* col, const T* zero_row) {
  const DeformConvGeometry& g = p.g;
  const int64_t taps = g.taps(), cg = g.in_per_group(), cout_g = g.out_per_group();
  const int64_t row_len = g.in_channels * taps;
  for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
    const int64_t p0 = tile * p.tile;
    const int64_t count = std::min(p.tile, g.out_pixels() - p0);
    compute_samples(p, n, p0, count, samples);
    gather_columns(p, samples, count, image, zero_row, col);
    for (int64_t grp = 0; grp < g.groups; ++grp) {
      at::Tensor cols = matrix(col + grp * taps * cg, count, taps * cg, row_len, 1);
      at::Tensor dst = matrix(out + n * ol.image + grp * cout_g * ol.channel + p0 * ol.pixel,
                              cout_g, count, ol.channel, ol.pixel);
      at::Tensor w = weight_t.narrow(0, grp * cout_g, cout_g);
      if (bias.has_value()) {
        at::addmm_out(dst, bias->narrow(0, grp * cout_g, cout_g).unsqueeze(1), w, cols.t());
      } else {
        at::mm_out(dst, w, cols.t());
      }
    }
  }
}

template <typename T>
void forward_impl(const DeformConvGeometry& g, const at::Tensor& input, const at::Tensor& offset,
                  const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                  const c10::optional<at::Tensor>& mask, at::Tensor& out, bool out_cl) {
  Problem<T> p = make_problem<T>(g, offset, mask);
  const int64_t taps = g.taps(), channels = g.in_channels;
  // [C_out][tap][C_in/groups]: the column tile's order, so each group's GEMM is one call.
  at::Tensor weight_t = weight.permute({0, 2, 3, 1}).contiguous().view({g.out_channels, -1});
  const bool input_cl = input.is_contiguous(at::MemoryFormat::ChannelsLast);
  const PixelLayout ol = pixel_layout(g.out_channels, g.out_pixels(), out_cl);
  T* out_ptr = out.data_ptr<T>();

  const Split split = choose_split(g, p.tiles, p.tiles);
  ScratchLayout layout;
  const int64_t at_samples = layout.add(p.tile * g.offset_groups * taps * sizeof(Sample<T>));
  const int64_t at_col = layout.add(p.tile * channels * taps * sizeof(T));
  const int64_t at_zero = layout.add(channels * sizeof(T));
  const int64_t image_bytes = g.height * g.width * channels * sizeof(T);
  const int64_t at_image = (split.per_image && !input_cl) ? layout.add(image_bytes) : -1;
  Arena arena(split.chunks, layout.bytes);
  at::Tensor shared_image;
  if (!split.per_image && !input_cl) {
    shared_image = at::empty({g.height, g.width, channels}, input.options());
  }
  for (int64_t i = 0; i < split.chunks; ++i) {
    std::memset(arena.chunk(i) + at_zero, 0, channels * sizeof(T));
  }
  auto scratch = [&](int64_t chunk, int64_t at) {
    return reinterpret_cast<T*>(arena.chunk(chunk) + at);
  };
  auto samples_of = [&](int64_t chunk) {
    return reinterpret_cast<Sample<T>*>(arena.chunk(chunk) + at_samples);
  };

  if (split.per_image) {
    at::parallel_for(0, split.chunks, 1, [&](int64_t begin, int64_t end) {
      // Worker threads do not inherit the caller's dispatch-key exclusions.
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      for (int64_t chunk = begin; chunk < end; ++chunk) {
        for (int64_t n = chunk * g.batch / split.chunks;
             n < (chunk + 1) * g.batch / split.chunks; ++n) {
          const T* image = image_rows<T>(input, input_cl, n,
                                         at_image >= 0 ? scratch(chunk, at_image) : nullptr);
          forward_tiles(p, n, image, 0, p.tiles, weight_t, bias, out_ptr, ol, samples_of(chunk),
                        scratch(chunk, at_col), scratch(chunk, at_zero));
        }
      }
    });
  } else {
    for (int64_t n = 0; n < g.batch; ++n) {
      const T* image = image_rows<T>(input, input_cl, n,
                                     input_cl ? nullptr : shared_image.data_ptr<T>());
      at::parallel_for(0, split.chunks, 1, [&](int64_t begin, int64_t end) {
      // Worker threads do not inherit the caller's dispatch-key exclusions.
      at::AutoDispatchBelowADInplaceOrView below_autograd;
        for (int64_t chunk = begin; chunk < end; ++chunk) {
          forward_tiles(p, n, image, chunk * p.tiles / split.chunks,
                        (chunk + 1) * p.tiles / split.chunks, weight_t, bias, out_ptr, ol,
                        samples_of(chunk), scratch(chunk, at_col), scratch(chunk, at_zero));
        }
      });
    }
  }
}

void check_cpu_args(const at::Tensor& input) {
  TORCH_CHECK(input.device().is_cpu(), kOp, ": expected CPU tensors, got ", input.device());
  check_dtype_in(input, {at::kFloat, at::kDouble}, kOp, "input");
}

at::Tensor forward_cpu(const at::Tensor& input, const at::Tensor& offset,
                       const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                       const c10::optional<at::Tensor>& mask, c10::IntArrayRef stride,
                       c10::IntArrayRef padding, c10::IntArrayRef dilation) {
  const DeformConvGeometry g = check_modulated_deform_conv_args(
      kOp, input, offset, weight, bias, mask, stride, padding, dilation);
  check_cpu_args(input);
  // The ATen calls below (GEMMs, copies) are internals of this kernel: keep them off the
  // autograd graph even when the caller's tensors require grad.
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const bool out_cl = prefers_channels_last(input);
  at::Tensor out = at::empty(
      {g.batch, g.out_channels, g.out_h, g.out_w},
      input.options().memory_format(out_cl ? at::MemoryFormat::ChannelsLast
                                           : at::MemoryFormat::Contiguous));
  if (g.batch == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "modulated_deform_conv2d_cpu", [&] {
    forward_impl<scalar_t>(g, input, offset, weight, bias, mask, out, out_cl);
  });
  return out;
}

// ----------------------------------------------------------------------------------------
// Backward
// ----------------------------------------------------------------------------------------

template <typename T>
struct BackwardContext {
  const Problem<T>* p;
  const at::Tensor* gout;  // contiguous in the output's memory format
  PixelLayout gl;
  const at::Tensor* weight_t;
  GradRequest want;
  BackwardPass<T> pass;
  T* grad_offset;
  int64_t goff_stride[4];
  T* grad_mask;
  int64_t gmask_stride[4];
};

// Runs tiles [tile_begin, tile_end) of image n. grad_image ([H*W][C], zero-initialized by the
// caller) receives the input gradient; grad_w ([C_out][tap * C_in/groups]) accumulates.
template <typename T>
void backward_tiles(const BackwardContext<T>& ctx, int64_t n, const T* image,
                    int64_t tile_begin, int64_t tile_end, T* grad_image, T* grad_w,
                    Sample<T>* samples, T* col, T* gcol, const T* zero_row, T* sink_row) {
  const Problem<T>& p = *ctx.p;
  const DeformConvGeometry& g = p.g;
  const int64_t taps = g.taps(), cg = g.in_per_group(), cout_g = g.out_per_group();
  const int64_t row_len = g.in_channels * taps;
  const T* gout = ctx.gout->template data_ptr<T>();
  const bool need_gcol = ctx.want.input || ctx.want.offset || ctx.want.mask;
  BackwardTargets<T> targets;
  targets.grad_image = grad_image;
  targets.sink_row = sink_row;
  targets.grad_offset = ctx.grad_offset;
  targets.grad_mask = ctx.grad_mask;
  for (int d = 0; d < 4; ++d) {
    targets.goff_stride[d] = ctx.goff_stride[d];
    targets.gmask_stride[d] = ctx.gmask_stride[d];
  }
  targets.col = ctx.want.weight ? col : nullptr;
  for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
    const int64_t p0 = tile * p.tile;
    const int64_t count = std::min(p.tile, g.out_pixels() - p0);
    compute_samples(p, n, p0, count, samples);
    auto gout_block = [&](int64_t grp) {
      return matrix(gout + n * ctx.gl.image + grp * cout_g * ctx.gl.channel +
                        p0 * ctx.gl.pixel,
                    cout_g, count, ctx.gl.channel, ctx.gl.pixel);
    };
    if (need_gcol) {
      for (int64_t grp = 0; grp < g.groups; ++grp) {
        at::Tensor dst = matrix(gcol + grp * taps * cg, count, taps * cg, row_len, 1);
        at::mm_out(dst, gout_block(grp).t(), ctx.weight_t->narrow(0, grp * cout_g, cout_g));
      }
      ctx.pass(p, n, p0, samples, count, image, zero_row, gcol, targets);
    } else {
      gather_columns(p, samples, count, image, zero_row, col);
    }
    if (ctx.want.weight) {
      for (int64_t grp = 0; grp < g.groups; ++grp) {
        at::Tensor acc = matrix(grad_w + grp * cout_g * taps * cg, cout_g, taps * cg,
                                taps * cg, 1);
        acc.addmm_(gout_block(grp),
                   matrix(col + grp * taps * cg, count, taps * cg, row_len, 1));
      }
    }
  }
}

template <typename T>
void backward_impl(const DeformConvGeometry& g, const at::Tensor& gout, bool cl,
                   const at::Tensor& input, const at::Tensor& offset, const at::Tensor& weight,
                   const c10::optional<at::Tensor>& mask, const GradRequest& want,
                   at::Tensor& grad_input, at::Tensor& grad_offset, at::Tensor& grad_mask,
                   at::Tensor& grad_weight) {
  Problem<T> p = make_problem<T>(g, offset, mask);
  const int64_t taps = g.taps(), channels = g.in_channels;
  at::Tensor weight_t = weight.permute({0, 2, 3, 1}).contiguous().view({g.out_channels, -1});
  const bool input_cl = input.is_contiguous(at::MemoryFormat::ChannelsLast);

  BackwardContext<T> ctx;
  ctx.p = &p;
  ctx.gout = &gout;
  ctx.gl = pixel_layout(g.out_channels, g.out_pixels(), cl);
  ctx.weight_t = &weight_t;
  ctx.want = want;
  ctx.pass = pick_backward_pass<T>(want.offset || want.mask, want.input, want.weight);
  ctx.grad_offset = want.offset ? grad_offset.data_ptr<T>() : nullptr;
  ctx.grad_mask = want.mask ? grad_mask.data_ptr<T>() : nullptr;
  for (int d = 0; d < 4; ++d) {
    ctx.goff_stride[d] = want.offset ? grad_offset.stride(d) : 0;
    ctx.gmask_stride[d] = want.mask ? grad_mask.stride(d) : 0;
  }

  // Private input-gradient images per chunk when tiles of one image are split: at most
  // max(2, taps) of them, so they never exceed one image's im2col buffer.
  const Split split =
      choose_split(g, p.tiles, want.input ? std::max<int64_t>(2, taps) : p.tiles);
  const int64_t image_elems = g.height * g.width * channels;
  // The input gradient goes straight into grad_input when one chunk owns the image and
  // grad_input is channels_last; otherwise into a per-chunk [H*W][C] buffer.
  const bool direct_grad = want.input && split.per_image && cl;
  const bool private_grad = want.input && !direct_grad;
  const bool need_gcol = want.input || want.offset || want.mask;
  ScratchLayout layout;
  const int64_t at_samples = layout.add(p.tile * g.offset_groups * taps * sizeof(Sample<T>));
  const int64_t at_col = layout.add(p.tile * channels * taps * sizeof(T));
  const int64_t at_gcol = need_gcol ? layout.add(p.tile * channels * taps * sizeof(T)) : -1;
  const int64_t at_zero = layout.add(channels * sizeof(T));
  const int64_t at_sink = layout.add(channels * sizeof(T));
  const int64_t at_image =
      (split.per_image && !input_cl) ? layout.add(image_elems * sizeof(T)) : -1;
  const int64_t at_grad_image = private_grad ? layout.add(image_elems * sizeof(T)) : -1;
  const int64_t wsize = g.out_channels * taps * g.in_per_group();
  const int64_t at_grad_w = want.weight ? layout.add(wsize * sizeof(T)) : -1;
  Arena arena(split.chunks, layout.bytes);
  at::Tensor shared_image;
  if (!split.per_image && !input_cl) {
    shared_image = at::empty({g.height, g.width, channels}, input.options());
  }
  auto scratch = [&](int64_t chunk, int64_t at) -> T* {
    return at < 0 ? nullptr : reinterpret_cast<T*>(arena.chunk(chunk) + at);
  };
  for (int64_t i = 0; i < split.chunks; ++i) {
    std::memset(scratch(i, at_zero), 0, channels * sizeof(T));
    if (at_grad_w >= 0) std::memset(scratch(i, at_grad_w), 0, wsize * sizeof(T));
  }
  auto run_tiles = [&](int64_t chunk, int64_t n, const T* image, int64_t tb, int64_t te,
                       T* grad_image) {
    backward_tiles(ctx, n, image, tb, te, grad_image, scratch(chunk, at_grad_w),
                   reinterpret_cast<Sample<T>*>(arena.chunk(chunk) + at_samples),
                   scratch(chunk, at_col), scratch(chunk, at_gcol), scratch(chunk, at_zero),
                   scratch(chunk, at_sink));
  };
  // grad_input[n] (any layout) <- [H*W][C] buffer.
  auto store_grad_image = [&](int64_t n, T* buffer) {
    at::Tensor src = at::from_blob(buffer, {g.height, g.width, channels}, input.options());
    grad_input[n].permute({1, 2, 0}).copy_(src);
  };

  if (split.per_image) {
    at::parallel_for(0, split.chunks, 1, [&](int64_t begin, int64_t end) {
      // Worker threads do not inherit the caller's dispatch-key exclusions.
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      for (int64_t chunk = begin; chunk < end; ++chunk) {
        for (int64_t n = chunk * g.batch / split.chunks;
             n < (chunk + 1) * g.batch / split.chunks; ++n) {
          const T* image = image_rows<T>(input, input_cl, n, scratch(chunk, at_image));
          T* grad_image = nullptr;
          if (direct_grad) {
            grad_image = grad_input.data_ptr<T>() + n * image_elems;
          } else if (private_grad) {
            grad_image = scratch(chunk, at_grad_image);
          }
          if (grad_image) std::memset(grad_image, 0, image_elems * sizeof(T));
          run_tiles(chunk, n, image, 0, p.tiles, grad_image);
          if (private_grad) store_grad_image(n, grad_image);
        }
      }
    });
  } else {
    for (int64_t n = 0; n < g.batch; ++n) {
      const T* image = image_rows<T>(input, input_cl, n,
                                     input_cl ? nullptr : shared_image.data_ptr<T>());
      at::parallel_for(0, split.chunks, 1, [&](int64_t begin, int64_t end) {
      // Worker threads do not inherit the caller's dispatch-key exclusions.
      at::AutoDispatchBelowADInplaceOrView below_autograd;
        for (int64_t chunk = begin; chunk < end; ++chunk) {
          T* grad_image = scratch(chunk, at_grad_image);
          if (grad_image) std::memset(grad_image, 0, image_elems * sizeof(T));
          run_tiles(chunk, n, image, chunk * p.tiles / split.chunks,
                    (chunk + 1) * p.tiles / split.chunks, grad_image);
        }
      });
      if (private_grad) {
        // Fixed summation order over chunks: deterministic.
        at::Tensor total = at::from_blob(scratch(0, at_grad_image), {image_elems},
                                         input.options());
        for (int64_t i = 1; i < split.chunks; ++i) {
          total.add_(at::from_blob(scratch(i, at_grad_image), {image_elems}, input.options()));
        }
        store_grad_image(n, scratch(0, at_grad_image));
      }
    }
  }

  if (want.weight) {
    at::Tensor total = at::from_blob(scratch(0, at_grad_w), {wsize}, input.options());
    for (int64_t i = 1; i < split.chunks; ++i) {
      total.add_(at::from_blob(scratch(i, at_grad_w), {wsize}, input.options()));
    }
    grad_weight.copy_(
        total.view({g.out_channels, g.kernel_h, g.kernel_w, g.in_per_group()})
            .permute({0, 3, 1, 2}));
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& offset,
    const at::Tensor& weight, const c10::optional<at::Tensor>& mask, c10::IntArrayRef stride,
    c10::IntArrayRef padding, c10::IntArrayRef dilation, std::array<bool, 5> output_mask,
    bool deterministic) {
  (void)deterministic;  // every CPU path is deterministic for a given thread count
  const char* op = "modulated_deform_conv2d_backward";
  const DeformConvGeometry g = check_modulated_deform_conv_args(
      op, input, offset, weight, c10::nullopt, mask, stride, padding, dilation);
  check_cpu_args(input);
  const GradRequest want =
      check_modulated_deform_conv_backward_args(op, g, grad_output, input, mask, output_mask);
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const bool cl = prefers_channels_last(input);
  const auto fmt = cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  const auto opts = input.options();
  // Unrequested gradients are distinct empty tensors (outputs of an op must not alias).
  auto empty = [&] { return at::empty({0}, opts); };
  at::Tensor grad_input =
      want.input ? at::empty(input.sizes(), opts.memory_format(fmt)) : empty();
  at::Tensor grad_offset = want.offset ? at::empty(offset.sizes(), opts) : empty();
  at::Tensor grad_mask = want.mask ? at::empty(mask->sizes(), opts) : empty();
  at::Tensor grad_weight = want.weight ? at::empty(weight.sizes(), opts) : empty();
  at::Tensor grad_bias = want.bias ? grad_output.sum({0, 2, 3}) : empty();
  if (g.batch == 0) {
    if (want.weight) grad_weight.zero_();
    return {grad_input, grad_offset, grad_mask, grad_weight, grad_bias};
  }
  if (!(want.input || want.offset || want.mask || want.weight)) {
    return {grad_input, grad_offset, grad_mask, grad_weight, grad_bias};
  }
  at::Tensor gout = grad_output.contiguous(fmt);
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "modulated_deform_conv2d_backward_cpu", [&] {
    backward_impl<scalar_t>(g, gout, cl, input, offset, weight, mask, want, grad_input,
                            grad_offset, grad_mask, grad_weight);
  });
  return {grad_input, grad_offset, grad_mask, grad_weight, grad_bias};
}

}  // namespace
}  // namespace facedeblur

TORCH_LIBRARY_IMPL(facedeblur_ext, CPU, m) {
  m.impl("modulated_deform_conv2d", facedeblur::forward_cpu);
  m.impl("modulated_deform_conv2d_backward", facedeblur::backward_cpu);
}
