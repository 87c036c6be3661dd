#pragma once
// Argument checks shared by the CPU and CUDA launchers. Messages name the op and the
// argument so that a user sees which input is wrong without reading a stack trace.
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <initializer_list>

namespace facedeblur {

inline void check_dim(const at::Tensor& t, int64_t dim, const char* op, const char* name) {
  TORCH_CHECK(t.dim() == dim, op, ": expected ", name, " to have ", dim,
              " dimensions, got shape ", t.sizes());
}

inline void check_same_device(const at::Tensor& ref, const at::Tensor& t, const char* op,
                              const char* name) {
  TORCH_CHECK(t.device() == ref.device(), op, ": expected ", name, " on ", ref.device(),
              " like the input, got ", t.device());
}

inline void check_same_dtype(const at::Tensor& ref, const at::Tensor& t, const char* op,
                             const char* name) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": expected ", name, " of dtype ",
              ref.scalar_type(), " like the input, got ", t.scalar_type());
}

inline void check_dtype_in(const at::Tensor& t, std::initializer_list<at::ScalarType> allowed,
                           const char* op, const char* name) {
  for (auto s : allowed) {
    if (t.scalar_type() == s) return;
  }
  TORCH_CHECK(false, op, ": ", name, " has unsupported dtype ", t.scalar_type(), " on ",
              t.device().type());
}

}  // namespace facedeblur
