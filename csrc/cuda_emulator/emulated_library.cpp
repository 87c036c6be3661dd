// The test-only library `facedeblur_emu`: the schemas of every facedeblur_ext op, under which
// the real ATen-side CUDA launchers (csrc/cuda/*_cuda.cpp, built with FACEDEBLUR_CUDA_EMULATOR;
// see csrc/cuda/host_runtime.h) register for CPU tensors. A call such as
// torch.ops.facedeblur_emu.blur_synthesize(...) then runs the whole CUDA op (argument checks,
// tiling, workspaces, dtype dispatch, GEMMs) with its kernels in the CPU emulator.
//
// The schemas are copied from the registered facedeblur_ext ops rather than declared again, so
// facedeblur_ext._C must be loaded first (tests/cuda_emulation.py imports it).
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <sstream>
#include <string>
#include <string_view>

TORCH_LIBRARY(facedeblur_emu, m) {
  constexpr std::string_view kSource = "facedeblur_ext::";
  auto& dispatcher = c10::Dispatcher::singleton();
  int copied = 0;
  for (const c10::OperatorName& name : dispatcher.getAllOpNames()) {
    if (std::string_view(name.name).substr(0, kSource.size()) != kSource) continue;
    const auto handle = dispatcher.findOp(name);
    if (!handle.has_value() || !handle->hasSchema()) continue;
    std::ostringstream schema;
    schema << handle->schema();
    const std::string renamed = schema.str().substr(kSource.size());
    m.def(renamed.c_str());
    ++copied;
  }
  TORCH_CHECK(copied > 0,
              "facedeblur_emu: no facedeblur_ext ops are registered; import facedeblur_ext "
              "before loading the emulated launchers");
}
