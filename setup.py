"""Build facedeblur_ext._C by driving CMakeLists.txt with the Ninja generator.

Everything about sources and flags lives in CMakeLists.txt; this file only picks the build
directory, passes the choices below to CMake and runs it.

Environment:
    FACEDEBLUR_WITH_CUDA   "1" forces the CUDA build, "0" disables it; unset: on when the
                           installed torch has CUDA and nvcc is found.
    TORCH_CUDA_ARCH_LIST   e.g. "9.0" or "8.0;9.0+PTX" (torch's convention).
    FACEDEBLUR_BUILD_TYPE  CMake build type (default Release).
    MAX_JOBS               parallel compile jobs (default: ninja's choice).
    FACEDEBLUR_CMAKE_ARGS  extra CMake arguments, split like a shell command line, e.g.
                           "-DCUDA_nvrtc_LIBRARY=/opt/lib/libnvrtc.so.13 --log-level=DEBUG".
"""

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _read_version() -> str:
    text = (ROOT / "facedeblur_ext" / "_version.py").read_text()
    return re.search(r'__version__ = "([^"]+)"', text).group(1)


def _nvcc_path() -> str | None:
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if cuda_home and (Path(cuda_home) / "bin" / "nvcc").exists():
        return str(Path(cuda_home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def _want_cuda(torch) -> bool:
    forced = os.environ.get("FACEDEBLUR_WITH_CUDA")
    if forced is not None and forced.strip() != "":
        return forced.strip() not in ("0", "false", "False", "OFF", "off")
    return torch.version.cuda is not None and _nvcc_path() is not None


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        import torch

        with_cuda = _want_cuda(torch)
        if with_cuda and torch.version.cuda is None:
            raise RuntimeError(
                "FACEDEBLUR_WITH_CUDA=1 but the installed torch "
                f"{torch.__version__} has no CUDA support."
            )
        out_dir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        torch_tag = torch.__version__.replace("+", "_")
        py_tag = f"py{sys.version_info.major}{sys.version_info.minor}"
        # A fixed build directory (not setuptools' temp dir) keeps ninja's state between
        # builds, so a rebuild with no change is a no-op.
        flavour = "cuda" if with_cuda else "cpu"
        build_dir = ROOT / "build" / f"cmake-{py_tag}-torch{torch_tag}-{flavour}"
        build_dir.mkdir(parents=True, exist_ok=True)
        build_type = os.environ.get("FACEDEBLUR_BUILD_TYPE", "Release")

        configure = [
            "cmake",
            "-S", str(ROOT),
            "-B", str(build_dir),
            "-G", "Ninja",
            f"-DCMAKE_BUILD_TYPE={build_type}",
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DFACEDEBLUR_OUTPUT_DIR={out_dir}",
            f"-DFACEDEBLUR_MODULE_SUFFIX={Path(self.get_ext_filename('x')).name[1:]}",
            f"-DFACEDEBLUR_VERSION={_read_version()}",
            f"-DFACEDEBLUR_TORCH_VERSION={torch.__version__}",
            f"-DFACEDEBLUR_WITH_CUDA={'ON' if with_cuda else 'OFF'}",
        ]
        if with_cuda:
            nvcc = _nvcc_path()
            if nvcc:  # without one, CMake looks for nvcc itself and says so when it fails
                configure.append(f"-DCMAKE_CUDA_COMPILER={nvcc}")
            arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST")
            if arch_list:
                configure.append(f"-DFACEDEBLUR_CUDA_ARCH_LIST={arch_list}")
        configure += shlex.split(os.environ.get("FACEDEBLUR_CMAKE_ARGS", ""))
        ninja = shutil.which("ninja")
        if ninja:
            configure.append(f"-DCMAKE_MAKE_PROGRAM={ninja}")
        # Reconfigure only when CMake has not run here yet or its inputs changed; ninja
        # reruns CMake by itself when CMakeLists.txt changes.
        stamp = build_dir / "configure-args.txt"
        args_text = "\n".join(configure)
        configured = (build_dir / "build.ninja").exists() and stamp.exists()
        if not configured or stamp.read_text() != args_text:
            subprocess.run(configure, check=True)
            stamp.write_text(args_text)

        build = ["cmake", "--build", str(build_dir)]
        jobs = os.environ.get("MAX_JOBS")
        if jobs:
            build += ["--parallel", jobs]
        subprocess.run(build, check=True)


setup(
    version=_read_version(),
    ext_modules=[CMakeExtension("facedeblur_ext._C")],
    cmdclass={"build_ext": CMakeBuild},
)
