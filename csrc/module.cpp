// facedeblur_ext._C: loading it registers the ops (static TORCH_LIBRARY initializers); the
// Python module itself only reports how it was built.
#include <ATen/Config.h>
#include <ATen/Parallel.h>
#include <pybind11/pybind11.h>

namespace py = pybind11;

namespace {

py::dict build_info() {
  py::dict info;
  info["version"] = FACEDEBLUR_VERSION;
  info["torch_version"] = FACEDEBLUR_TORCH_VERSION;
  info["with_cuda"] = static_cast<bool>(FACEDEBLUR_WITH_CUDA);
#if FACEDEBLUR_WITH_CUDA
  info["cuda_version"] = FACEDEBLUR_CUDA_VERSION;
  info["cuda_archs"] = FACEDEBLUR_CUDA_ARCHS;
#else
  info["cuda_version"] = py::none();
  info["cuda_archs"] = py::none();
#endif
  info["openmp"] = static_cast<bool>(AT_PARALLEL_OPENMP);
  info["compiler"] =
#if defined(__clang__)
      "clang " __clang_version__;
#elif defined(__GNUC__)
      "gcc " __VERSION__;
#else
      "unknown";
#endif
  info["cxx_abi"] = static_cast<int>(_GLIBCXX_USE_CXX11_ABI);
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "facedeblur_ext native library: op registration and build information";
  m.def("build_info", &build_info,
        "How this extension was built: package and torch versions, CUDA, OpenMP.");
}
