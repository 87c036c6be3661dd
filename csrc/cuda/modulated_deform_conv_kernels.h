#pragma once
// Device kernels of the modulated deformable convolution (no ATen: compiled by nvcc alone).
// The ATen-side launcher (modulated_deform_conv_cuda.cpp) tiles the problem, allocates the
// buffers and runs the GEMMs with cuBLAS through ATen; these launchers do the sampling work.
//
// Tiles: images [n0, n0 + images) and, of each, the output pixels [p0, p0 + pixels). A column
// tile is [images][C * kh * kw][pixels] contiguous, row c * kh * kw + tap (the weight's
// [C_out][C_in / groups][kh][kw] order, so group g's rows form one GEMM operand).
#include <cuda_runtime_api.h>

#include <cstdint>

namespace facedeblur::cuda {

enum class MdcDtype { kFloat32, kFloat64, kFloat16, kBFloat16 };

struct MdcShape {
  int64_t channels, height, width;
  int64_t kernel_h, kernel_w, offset_groups;
  int64_t stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;
  int64_t out_h, out_w;
};

struct MdcTile {
  int64_t n0, images, p0, pixels;
};

// input: contiguous [N, C, H, W]; offset and mask: any strides; mask may be null (DCNv1).
struct MdcInputs {
  const void* input;
  const void* offset;
  int64_t offset_stride[4];
  const void* mask;
  int64_t mask_stride[4];
};

// Outputs of the fused backward pass over one tile; null members are not computed.
struct MdcBackwardOutputs {
  // [images][C][H][W] contiguous, starting at image n0; float (double for float64 inputs).
  void* grad_input_acc;
  void* grad_offset;  // input dtype, strides below
  int64_t grad_offset_stride[4];
  void* grad_mask;
  int64_t grad_mask_stride[4];
  void* columns;  // column tile to rebuild (for the weight gradient), input dtype
};

// Sampled, modulated columns of one tile.
cudaError_t launch_mdc_gather_columns(MdcDtype dtype, const MdcShape& shape,
                                      const MdcInputs& in, const MdcTile& tile, void* columns,
                                      cudaStream_t stream);

// grad_columns (input dtype, column-tile layout) -> offset and mask gradients (reduced over the
// channels in a fixed order, no atomics), the rebuilt column tile, and, when
// atomic_input_grad, the input gradient scattered with atomicAdd.
cudaError_t launch_mdc_backward_samples(MdcDtype dtype, const MdcShape& shape,
                                        const MdcInputs& in, const MdcTile& tile,
                                        const void* grad_columns, const MdcBackwardOutputs& out,
                                        bool atomic_input_grad, cudaStream_t stream);

// Deterministic input gradient (gather formulation, no atomics), in three steps around a
// stable sort done by the caller:
//   1. launch_mdc_scatter_keys: for every (offset group, image, tap, pixel, neighbour) entry e
//      (mdc_entry_count of them) its destination key and modulated bilinear weight;
//   2. the caller sorts the keys stably, giving sorted_keys and the permutation;
//   3. launch_mdc_segment_starts, then launch_mdc_gather_input_grad: each (image, channel,
//      input pixel) thread sums its entries in sorted (= entry) order and adds the sum to
//      grad_input_acc, which only it writes.
int64_t mdc_entry_count(const MdcShape& shape, const MdcTile& tile);
int64_t mdc_key_count(const MdcShape& shape, const MdcTile& tile);  // keys are in [0, this)

cudaError_t launch_mdc_scatter_keys(MdcDtype dtype, const MdcShape& shape, const MdcInputs& in,
                                    const MdcTile& tile, int64_t* keys, void* weights,
                                    cudaStream_t stream);

cudaError_t launch_mdc_segment_starts(const int64_t* sorted_keys, int64_t entries,
                                      int64_t key_count, int64_t* starts, cudaStream_t stream);

cudaError_t launch_mdc_gather_input_grad(MdcDtype dtype, const MdcShape& shape,
                                         const MdcTile& tile, const int64_t* starts,
                                         const int64_t* permutation, const void* weights,
                                         const void* grad_columns, void* grad_input_acc,
                                         cudaStream_t stream);

}  // namespace facedeblur::cuda
