"""The CUDA device code on the CPU: build and drive the emulator (csrc/cuda_emulator).

``build_emulator()`` compiles, with the host C++ compiler and FACEDEBLUR_CUDA_EMULATOR defined,
the device code (``csrc/cuda/*_kernels.cu``) against the emulator, the emulator itself, and the
real ATen-side CUDA launchers (``csrc/cuda/*_cuda.cpp``, whose c10 CUDA pieces come from
``csrc/cuda/host_runtime.h``) into one library linked with torch, cached under
``build/cuda-emulator/`` by a hash of every source it reads (so a changed copy of the sources is
what gets tested) and of the flags. Loaded, it registers the test-only op library
``torch.ops.facedeblur_emu``: the facedeblur_ext schemas, implemented for CPU tensors by the
CUDA launchers, so a call runs the whole CUDA op (checks, tiling, workspaces, dtype dispatch,
GEMMs on the CPU) with every kernel in the emulator. ``CudaEmulator`` calls those ops and
drives the emulator's controls (schedule, SM count, launch log) through ctypes.

Environment:
    FACEDEBLUR_EMULATOR_CSRC: the ``csrc`` folder to build from (default: this checkout's);
        scripts/emulator_mutations.sh points it at mutated copies.
    FACEDEBLUR_EMULATOR_SANITIZE=1: build with AddressSanitizer and UBSan (the process must
        have libasan preloaded; scripts/emulator_asan.sh does that).
    CXX: the compiler (default g++).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch.utils import cpp_extension
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

REPO = Path(__file__).resolve().parents[1]
CSRC_ENV = "FACEDEBLUR_EMULATOR_CSRC"
SANITIZE_ENV = "FACEDEBLUR_EMULATOR_SANITIZE"
TILE_ENV = "FACEDEBLUR_DEFORM_TILE_ELEMENTS"

TRANSLATION_UNITS = (
    "cuda/blur_kernels.cu",
    "cuda/separable_norm_kernels.cu",
    "cuda/modulated_deform_conv_kernels.cu",
    "cuda_emulator/cuda_emulator.cpp",
    "cuda_emulator/emulator_selftest.cpp",
    # The ATen-side launchers, registered for CPU tensors under torch.ops.facedeblur_emu
    # (csrc/cuda/host_runtime.h), with the host code they share with the CPU ops.
    "cuda/blur_cuda.cpp",
    "cuda/separable_norm_cuda.cpp",
    "cuda/modulated_deform_conv_cuda.cpp",
    "cuda_emulator/emulated_library.cpp",
    "separable_norm.cpp",
)
#: Translation units that include ATen (compiled against torch's headers).
ATEN_UNITS = frozenset(TRANSLATION_UNITS[5:])
HASHED_DIRS = ("cuda", "common", "cuda_emulator")
HASHED_FILES = ("separable_norm.cpp", "modulated_deform_conv_args.h", "ops.h")

# Small grid caps and split sizes so that grid-stride loops, plane loops and split reductions
# run on test-sized inputs (launch.cuh, separable_norm_kernels.cu).
SMALL_CAPS = (
    "-DFACEDEBLUR_GRID_YZ_CAP=3",
    "-DFACEDEBLUR_GRID_STRIDE_BLOCKS_CAP=2",
    "-DFACEDEBLUR_SNORM_MIN_SPLIT_PIXELS_NCHW=16",
    "-DFACEDEBLUR_SNORM_MIN_SPLIT_PIXELS_NHWC=8",
    "-DFACEDEBLUR_SNORM_MIN_SPLIT_CHANNELS=4",
)

SCHEDULES = {"forward": 0, "reverse": 1, "random": 2, "warp_ahead": 3}

# ctypes signatures of the C entry points: p pointer, q int64, i int, d double.
_SIGNATURES = {
    "emu_selftest": ("i", "ip"),
    "facedeblur_emulator_set_schedule": ("i", "iQ"),
    "facedeblur_emulator_set_sm_count": (None, "i"),
    "facedeblur_emulator_reset": (None, ""),
    "facedeblur_emulator_message": ("s", ""),
    "facedeblur_emulator_launch_log": ("s", ""),
}
_CTYPES = {"p": ctypes.c_void_p, "q": ctypes.c_int64, "Q": ctypes.c_uint64, "i": ctypes.c_int,
           "d": ctypes.c_double, "s": ctypes.c_char_p, None: None}


class EmulatedLaunchError(RuntimeError):
    """A launcher returned a CUDA error (the emulator's message says why)."""


def csrc_dir() -> Path:
    return Path(os.environ.get(CSRC_ENV, REPO / "csrc")).resolve()


def sanitized() -> bool:
    return os.environ.get(SANITIZE_ENV, "") not in ("", "0")


def _flags(sanitize: bool) -> list[str]:
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    flags = ["-std=c++20", "-fPIC", "-DFACEDEBLUR_CUDA_EMULATOR", *SMALL_CAPS,
             f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
             "-Wall", "-Wno-unknown-pragmas"]
    if sanitize:
        flags += ["-O1", "-g", "-fno-omit-frame-pointer", "-fsanitize=address,undefined",
                  "-fno-sanitize-recover=undefined"]
    else:
        flags += ["-O1"]
    return flags


def _digest(root: Path, compiler: str, flags: list[str], unit: str | None) -> str:
    """Hash of the compiler, the flags and the sources: every file, or (unit given) that
    translation unit and the headers, so that a change to one .cu recompiles only it."""
    digest = hashlib.sha256()
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    digest.update(version.encode())
    digest.update(" ".join(flags).encode())
    digest.update(torch.__version__.encode())
    paths = [p for sub in HASHED_DIRS for p in sorted((root / sub).rglob("*"))]
    for path in [*paths, *(root / name for name in HASHED_FILES)]:
        rel = str(path.relative_to(root))
        if path.is_file() and (unit is None or rel == unit or rel not in TRANSLATION_UNITS):
            digest.update(rel.encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:20]


def build_emulator(cache: Path | None = None) -> Path:
    """Compiles (or finds in the cache) the emulator library; returns its path. Objects are
    cached per translation unit and the library per source set, both by content hash.

    Raises:
        RuntimeError: a source did not compile (the compiler's output is in the message).
    """
    root = csrc_dir()
    compiler = os.environ.get("CXX", "g++")
    sanitize = sanitized()
    flags = _flags(sanitize)
    prefix = "sanitized-" if sanitize else ""
    cache = cache or REPO / "build" / "cuda-emulator"
    target = (cache / f"{prefix}{_digest(root, compiler, flags, None)}"
              / "libfacedeblur_cuda_emulator.so")
    if target.exists():
        return target
    objects_dir = cache / "objects"
    objects_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="build-", dir=cache))
    try:
        includes = [f"-I{root / 'cuda_emulator' / 'include'}", f"-I{root}"]
        torch_includes = [f"-isystem{d}" for d in cpp_extension.include_paths()]

        def compile_one(unit: str) -> Path:
            key = _digest(root, compiler, flags, unit)
            obj = objects_dir / f"{prefix}{Path(unit).name}-{key}.o"
            if obj.exists():
                return obj
            tmp = work / obj.name
            extra = torch_includes if unit in ATEN_UNITS else []
            cmd = [compiler, *flags, *includes, *extra, "-x", "c++", "-c", str(root / unit),
                   "-o", str(tmp)]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"emulator build failed: {unit}\n{done.stderr[-6000:]}")
            tmp.replace(obj)
            return obj

        workers = max(1, min(len(TRANSLATION_UNITS), os.cpu_count() or 1))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            objects = list(pool.map(compile_one, TRANSLATION_UNITS))
        lib = work / target.name
        torch_libs = cpp_extension.library_paths()
        link = [compiler, "-shared", *flags, *map(str, objects), "-o", str(lib),
                *(f"-L{d}" for d in torch_libs), *(f"-Wl,-rpath,{d}" for d in torch_libs),
                "-ltorch_cpu", "-lc10"]
        done = subprocess.run(link, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"emulator link failed\n{done.stderr[-6000:]}")
        lib_dir = work / "lib"
        lib_dir.mkdir()
        lib.rename(lib_dir / lib.name)
        try:
            lib_dir.rename(target.parent)
        except OSError:  # built meanwhile by another process
            pass
        return target
    finally:
        shutil.rmtree(work, ignore_errors=True)


class CudaEmulator:
    """The emulated launchers, called the way csrc/cuda/*_cuda.cpp calls them."""

    def __init__(self, library: Path):
        import facedeblur_ext  # noqa: F401  (the emulated library copies its op schemas)

        torch.ops.load_library(str(library))
        self.ops = torch.ops.facedeblur_emu
        self.lib = ctypes.CDLL(str(library))
        for name, (restype, args) in _SIGNATURES.items():
            fn = getattr(self.lib, name)
            fn.restype = _CTYPES[restype]
            fn.argtypes = [_CTYPES[a] for a in args]

    # ---- control ----
    def set_schedule(self, mode: str, seed: int = 0) -> None:
        if self.lib.facedeblur_emulator_set_schedule(SCHEDULES[mode], seed) != 0:
            raise ValueError(mode)

    def set_sm_count(self, count: int) -> None:
        self.lib.facedeblur_emulator_set_sm_count(count)

    def reset(self) -> None:
        self.lib.facedeblur_emulator_reset()

    def launch_log(self) -> list[str]:
        return self.lib.facedeblur_emulator_launch_log().decode().splitlines()

    def message(self) -> str:
        return self.lib.facedeblur_emulator_message().decode()

    def selftest(self, which: int, out: torch.Tensor) -> int:
        return self.lib.emu_selftest(which, out.data_ptr())

    # ---- the ops: the real launchers of csrc/cuda/*_cuda.cpp (torch.ops.facedeblur_emu) ----
    def _op(self, name: str, *args):
        self.reset()
        try:
            return getattr(self.ops, name)(*args)
        except RuntimeError as error:
            if "CUDA kernel launch failed" not in str(error):
                raise
            raise EmulatedLaunchError(str(error)) from None

    def motion_kernels(self, length, angle, size, dtype):
        return self._op("motion_kernels", length, angle, size, dtype)

    def gaussian_kernels(self, sigma, size, dtype):
        return self._op("gaussian_kernels", sigma, size, dtype)

    def defocus_kernels(self, radius, size, dtype):
        return self._op("defocus_kernels", radius, size, dtype)

    def trajectory_kernels(self, params, step_uniform, step_normal, size, centering, dtype):
        return self._op("trajectory_kernels", params, step_uniform, step_normal, size,
                        centering, dtype)

    def blur_synthesize(self, images, kernels, weights, mask, noise, noise_sigma, crf_gamma,
                        quantize, border):
        return self._op("blur_synthesize", images, kernels, weights, mask, noise, noise_sigma,
                        crf_gamma, quantize, border)

    def blur_synthesize_backward(self, grad, images, kernels, weights, mask, crf_gamma, border,
                                 output_mask):
        return self._op("blur_synthesize_backward", grad, images, kernels, weights, mask,
                        crf_gamma, border, output_mask)

    def average_frames(self, frames, counts, crf_gamma):
        return self._op("average_frames", frames, counts, crf_gamma)

    def average_frames_backward(self, grad, frames, counts, crf_gamma):
        return self._op("average_frames_backward", grad, frames, counts, crf_gamma)

    def _with_tiles(self, tile_elements: int | None, name: str, *args):
        """The DCN launcher with its column-tile budget set (FACEDEBLUR_DEFORM_TILE_ELEMENTS,
        read on every call), so that small problems run in several tiles."""
        before = os.environ.get(TILE_ENV)
        if tile_elements is not None:
            os.environ[TILE_ENV] = str(int(tile_elements))
        try:
            return self._op(name, *args)
        finally:
            if before is None:
                os.environ.pop(TILE_ENV, None)
            else:
                os.environ[TILE_ENV] = before

    def modulated_deform_conv2d(self, input, offset, weight, bias, mask, stride, padding,
                                dilation, tile_elements=None):
        return self._with_tiles(tile_elements, "modulated_deform_conv2d", input, offset, weight,
                                bias, mask, stride, padding, dilation)

    def modulated_deform_conv2d_backward(self, grad_output, input, offset, weight, mask, stride,
                                         padding, dilation, output_mask, deterministic,
                                         tile_elements=None):
        """Gradients (input, offset, mask, weight, bias)."""
        return self._with_tiles(tile_elements, "modulated_deform_conv2d_backward", grad_output,
                                input, offset, weight, mask, stride, padding, dilation,
                                output_mask, deterministic)

    def separable_norm_forward(self, x, masks, gamma, beta, eps):
        return self._op("separable_norm_forward", x, masks, gamma, beta, eps)

    def separable_norm_backward(self, grad_out, x, masks, gamma, beta, mean, rstd, eps,
                                output_mask):
        """Gradients (x, masks, gamma, beta)."""
        return self._op("separable_norm_backward", grad_out, x, masks, gamma, beta, mean, rstd,
                        eps, output_mask)


class EmulatedCudaOps(TorchDispatchMode):
    """While active, every ``torch.ops.facedeblur_ext`` call runs its CUDA launcher in the
    emulator instead of the CPU kernel: the call goes to its ``facedeblur_emu`` twin (the
    dispatch mode sits below autograd, so the Python autograd formulas still run and reach the
    emulated backward ops). ``calls`` counts the redirected calls per op.

    The existing device tests use it as their ``cuda_emulated`` device (tests/conftest.py):
    tensors on the CPU, the ops through the CUDA code path.
    """

    def __init__(self, emulator: CudaEmulator):
        super().__init__()
        self.emulator = emulator
        self.calls: dict[str, int] = {}
        self.redirecting = True

    @contextlib.contextmanager
    def cpu_kernels(self):
        """The CPU kernels again inside (the CPU side of a CUDA-vs-CPU comparison)."""
        before, self.redirecting = self.redirecting, False
        try:
            yield
        finally:
            self.redirecting = before

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if not self.redirecting or func.namespace != "facedeblur_ext" or any(
                type(t) not in (torch.Tensor, torch.nn.Parameter) or t.device.type != "cpu"
                for t in tensors):
            # Other ops, and fake or meta tensors (opcheck, torch.compile), as without the mode.
            return func(*args, **(kwargs or {}))
        name = func._schema.name.split("::", 1)[1]
        self.calls[name] = self.calls.get(name, 0) + 1
        twin = getattr(getattr(self.emulator.ops, name), func._overloadname)
        self.emulator.reset()
        return twin(*args, **(kwargs or {}))


_EMULATOR: CudaEmulator | None = None


def shared_emulator() -> CudaEmulator:
    """One emulator per process (the library is loaded once); callers set its schedule and SM
    count."""
    global _EMULATOR
    if _EMULATOR is None:
        _EMULATOR = CudaEmulator(build_emulator())
    return _EMULATOR
