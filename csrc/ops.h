#pragma once
// Schema declarations of the facedeblur_ext ops: one define_* function per op family, each
// implemented in that family's schema file and called from library.cpp.
#include <torch/library.h>

namespace facedeblur {

void define_modulated_deform_conv(torch::Library& m);  // csrc/modulated_deform_conv.cpp
void define_separable_norm(torch::Library& m);         // csrc/separable_norm.cpp
void define_blur(torch::Library& m);                   // csrc/blur.cpp

}  // namespace facedeblur
