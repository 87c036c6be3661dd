// The one TORCH_LIBRARY block of the extension. Each op family declares its schemas in its
// schema file (csrc/<op>.cpp) through a define_* function listed in ops.h.
#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY(facedeblur_ext, m) {
  facedeblur::define_modulated_deform_conv(m);
  facedeblur::define_separable_norm(m);
  facedeblur::define_blur(m);
}
