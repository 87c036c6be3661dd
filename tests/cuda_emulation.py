"""The CUDA device code on the CPU: build and drive the emulator (csrc/cuda_emulator).

``build_emulator()`` compiles ``csrc/cuda/*_kernels.cu`` with the host C++ compiler against the
emulator, plus the emulator and its C entry points, into one shared library, cached under
``build/cuda-emulator/`` by a hash of every source it reads (so a changed copy of the sources is
what gets tested) and of the flags. ``CudaEmulator`` loads it with ctypes and mirrors what the
ATen launchers (``csrc/cuda/*_cuda.cpp``) do around the raw-pointer ``launch_*`` entry points:
outputs, scratch, tiling and the GEMMs run here on CPU tensors, the kernels in the emulator.

Environment:
    FACEDEBLUR_EMULATOR_CSRC: the ``csrc`` folder to build from (default: this checkout's);
        scripts/emulator_mutations.sh points it at mutated copies.
    FACEDEBLUR_EMULATOR_SANITIZE=1: build with AddressSanitizer and UBSan (the process must
        have libasan preloaded; scripts/emulator_asan.sh does that).
    CXX: the compiler (default g++).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
CSRC_ENV = "FACEDEBLUR_EMULATOR_CSRC"
SANITIZE_ENV = "FACEDEBLUR_EMULATOR_SANITIZE"

TRANSLATION_UNITS = (
    "cuda/blur_kernels.cu",
    "cuda/separable_norm_kernels.cu",
    "cuda/modulated_deform_conv_kernels.cu",
    "cuda_emulator/cuda_emulator.cpp",
    "cuda_emulator/launcher_bindings.cpp",
    "cuda_emulator/emulator_selftest.cpp",
)
HASHED_DIRS = ("cuda", "common", "cuda_emulator")

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

_BLUR_DTYPES = {torch.uint8: 0, torch.float16: 1, torch.bfloat16: 2, torch.float32: 3,
                torch.float64: 4}
_MDC_DTYPES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
_SNORM_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}
_BORDERS = {"reflect": 0, "replicate": 1, "zeros": 2, "circular": 3}

# ctypes signatures of the C entry points: p pointer, q int64, i int, d double.
_SIGNATURES = {
    "emu_motion_kernels": ("i", "ppqipi"),
    "emu_gaussian_kernels": ("i", "pqipi"),
    "emu_defocus_kernels": ("i", "pqipi"),
    "emu_trajectory_kernels": ("i", "pppiqqiippi"),
    "emu_blur_tap_bytes": ("q", "pi"),
    "emu_blur_tile_smem_bytes": ("q", "pi"),
    "emu_device_smem_limit": ("i", "p"),
    "emu_blur_forward": ("i", "pippipppppidipp"),
    "emu_blur_backward": ("i", "pippipppidpppppppppp"),
    "emu_average_frames": ("i", "ppqqqiidp"),
    "emu_average_frames_backward": ("i", "pppqqqiidp"),
    "emu_mdc_gather_columns": ("i", "ipppppppp"),
    "emu_mdc_backward_samples": ("i", "i" + "p" * 14 + "i"),
    "emu_mdc_entry_count": ("q", "pp"),
    "emu_mdc_key_count": ("q", "pp"),
    "emu_mdc_scatter_keys": ("i", "i" + "p" * 9),
    "emu_mdc_segment_starts": ("i", "pqqp"),
    "emu_mdc_gather_input_grad": ("i", "ippppppp"),
    "emu_snorm_forward_workspace_bytes": ("q", "pi"),
    "emu_snorm_backward_workspace_bytes": ("q", "pii"),
    "emu_snorm_forward": ("i", "pippppppdpppp"),
    "emu_snorm_backward": ("i", "pipppppppdppppppp"),
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
    flags = ["-std=c++20", "-fPIC", "-DFACEDEBLUR_CUDA_EMULATOR", *SMALL_CAPS,
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
    for sub in HASHED_DIRS:
        for path in sorted((root / sub).rglob("*")):
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

        def compile_one(unit: str) -> Path:
            key = _digest(root, compiler, flags, unit)
            obj = objects_dir / f"{prefix}{Path(unit).name}-{key}.o"
            if obj.exists():
                return obj
            tmp = work / obj.name
            cmd = [compiler, *flags, *includes, "-x", "c++", "-c", str(root / unit), "-o", str(tmp)]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"emulator build failed: {unit}\n{done.stderr[-6000:]}")
            tmp.replace(obj)
            return obj

        workers = max(1, min(len(TRANSLATION_UNITS), os.cpu_count() or 1))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            objects = list(pool.map(compile_one, TRANSLATION_UNITS))
        lib = work / target.name
        link = [compiler, "-shared", *flags, *map(str, objects), "-o", str(lib)]
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


def _int64s(values) -> ctypes.Array:
    values = [int(v) for v in values]
    return (ctypes.c_int64 * len(values))(*values)


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


class CudaEmulator:
    """The emulated launchers, called the way csrc/cuda/*_cuda.cpp calls them."""

    def __init__(self, library: Path):
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

    def _call(self, name: str, *args) -> None:
        err = getattr(self.lib, name)(*args)
        if err != 0:
            raise EmulatedLaunchError(f"{name}: CUDA error {err}: {self.message()}")

    def selftest(self, which: int, out: torch.Tensor) -> int:
        return self.lib.emu_selftest(which, out.data_ptr())

    # ---- blur family (blur_cuda.cpp) ----
    def _generator(self, name: str, out_size: tuple[int, int], dtype, *values) -> torch.Tensor:
        self.reset()
        vals = [v.to(torch.float64).contiguous() for v in values]
        n = vals[0].shape[0]
        out = torch.empty((n, *out_size), dtype=dtype)
        self._call(name, *[v.data_ptr() for v in vals], n, out_size[0], out.data_ptr(),
                   _BLUR_DTYPES[dtype])
        return out

    def motion_kernels(self, length, angle, size, dtype):
        return self._generator("emu_motion_kernels", (size, size), dtype, length, angle)

    def gaussian_kernels(self, sigma, size, dtype):
        return self._generator("emu_gaussian_kernels", (size, size), dtype, sigma)

    def defocus_kernels(self, radius, size, dtype):
        return self._generator("emu_defocus_kernels", (size, size), dtype, radius)

    def trajectory_kernels(self, params, step_uniform, step_normal, size, centering, dtype):
        self.reset()
        p, u, g = params.contiguous(), step_uniform.contiguous(), step_normal.contiguous()
        n, steps = p.shape[0], u.shape[1] + 1
        out = torch.empty((n, size, size), dtype=dtype)
        positions = torch.empty((max(n, 1), 2, steps), dtype=torch.float64)
        self._call("emu_trajectory_kernels", p.data_ptr(), u.data_ptr(), g.data_ptr(),
                   int(u.dtype == torch.float64), n, steps, size, centering,
                   positions.data_ptr(), out.data_ptr(), _BLUR_DTYPES[dtype])
        return out

    def _blur_shape(self, images, kernels):
        n, c, h, w = images.shape
        return _int64s((n, c, h, w, kernels.shape[1], kernels.shape[2], kernels.shape[3]))

    def _check_tile_fits(self, shape, dtype) -> None:
        need = self.lib.emu_blur_tile_smem_bytes(shape, _BLUR_DTYPES[dtype])
        limit = ctypes.c_int64()
        self._call("emu_device_smem_limit", ctypes.addressof(limit))
        if need > limit.value:
            raise ValueError(f"blur: the kernel needs {need} bytes of shared memory, "
                             f"above the limit of {limit.value}")

    def _taps(self, shape, kernels):
        nbytes = self.lib.emu_blur_tap_bytes(shape, int(kernels.dtype == torch.float64))
        n, r = shape[0], shape[4]
        return torch.empty(nbytes, dtype=torch.uint8), torch.empty(n * r, dtype=torch.int32)

    def blur_synthesize(self, images, kernels, weights, mask, noise, noise_sigma, crf_gamma,
                        quantize, border):
        self.reset()
        images, kernels = images.contiguous(), kernels.contiguous()
        weights, mask, noise, noise_sigma = (None if t is None else t.contiguous()
                                             for t in (weights, mask, noise, noise_sigma))
        out = torch.empty_like(images, memory_format=torch.contiguous_format)
        shape = self._blur_shape(images, kernels)
        self._check_tile_fits(shape, images.dtype)
        taps, counts = self._taps(shape, kernels)
        self._call("emu_blur_forward", shape, _BORDERS[border], images.data_ptr(),
                   out.data_ptr(), _BLUR_DTYPES[images.dtype], kernels.data_ptr(),
                   _ptr(weights), _ptr(mask), _ptr(noise), _ptr(noise_sigma),
                   int(crf_gamma is not None), crf_gamma or 1.0, int(quantize),
                   taps.data_ptr(), counts.data_ptr())
        return out

    def blur_synthesize_backward(self, grad, images, kernels, weights, mask, crf_gamma, border,
                                 need):
        self.reset()
        grad, images, kernels = grad.contiguous(), images.contiguous(), kernels.contiguous()
        weights = None if weights is None else weights.contiguous()
        mask = None if mask is None else mask.contiguous()
        shape = self._blur_shape(images, kernels)
        self._check_tile_fits(shape, images.dtype)
        n, c, h, w, r, kh, kw = (shape[i] for i in range(7))
        opts = {"dtype": kernels.dtype}
        none = torch.empty(0, **opts)
        grad_images = torch.empty_like(images) if need[0] else torch.empty(0, dtype=images.dtype)
        grad_kernels = torch.empty_like(kernels) if need[1] else none
        grad_weights = torch.zeros((n, r, h, w), **opts) if need[2] else none
        grad_mask = torch.zeros((n, 1, h, w), **opts) if need[3] else none
        taps, counts = self._taps(shape, kernels)
        lin = torch.empty((n, c, h, w), **opts) if need[1] else none
        hw = torch.empty((n, r, c, h, w), **opts) if need[0] or need[1] else none
        direct = torch.empty((n, c, h, w), **opts) if need[0] and mask is not None else none
        grad_padded = torch.empty((n, c, h + kh - 1, w + kw - 1), **opts) if need[0] else none

        def opt(t, wanted=True):
            return t.data_ptr() if wanted and t.numel() else None

        self._call("emu_blur_backward", shape, _BORDERS[border], grad.data_ptr(),
                   images.data_ptr(), _BLUR_DTYPES[images.dtype], kernels.data_ptr(),
                   _ptr(weights), _ptr(mask), int(crf_gamma is not None), crf_gamma or 1.0,
                   opt(grad_images, need[0]), opt(grad_kernels, need[1]),
                   opt(grad_weights, need[2]), opt(grad_mask, need[3]), taps.data_ptr(),
                   counts.data_ptr(), opt(lin), opt(hw), opt(direct), opt(grad_padded))
        return grad_images, grad_kernels, grad_weights, grad_mask

    def average_frames(self, frames, counts, crf_gamma):
        self.reset()
        frames, counts = frames.contiguous(), counts.contiguous()
        n, t = frames.shape[:2]
        out = torch.empty((n, *frames.shape[2:]), dtype=frames.dtype)
        self._call("emu_average_frames", frames.data_ptr(), counts.data_ptr(), n, t,
                   out[0].numel() if n else 0, _BLUR_DTYPES[frames.dtype],
                   int(crf_gamma is not None), crf_gamma or 1.0, out.data_ptr())
        return out

    def average_frames_backward(self, grad, frames, counts, crf_gamma):
        self.reset()
        grad, frames, counts = grad.contiguous(), frames.contiguous(), counts.contiguous()
        n, t = frames.shape[:2]
        out = torch.empty_like(frames)
        self._call("emu_average_frames_backward", grad.data_ptr(), frames.data_ptr(),
                   counts.data_ptr(), n, t, frames[0, 0].numel() if n else 0,
                   _BLUR_DTYPES[frames.dtype], int(crf_gamma is not None), crf_gamma or 1.0,
                   out.data_ptr())
        return out

    # ---- modulated deformable convolution (modulated_deform_conv_cuda.cpp) ----
    @staticmethod
    def _mdc_geometry(input, offset, weight, stride, padding, dilation):
        n, c, h, w = input.shape
        cout, _, kh, kw = weight.shape
        out_h = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
        out_w = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
        offset_groups = offset.shape[1] // (2 * kh * kw)
        shape = (c, h, w, kh, kw, offset_groups, stride[0], stride[1], padding[0], padding[1],
                 dilation[0], dilation[1], out_h, out_w)
        return n, cout, out_h, out_w, shape

    @staticmethod
    def _mdc_plan(n, c, taps, pixels, offset_groups, tile_elements):
        per_pixel = c * taps
        if per_pixel * pixels <= tile_elements:
            images, tile_pixels = min(n, max(1, tile_elements // (per_pixel * pixels))), pixels
        else:
            images, tile_pixels = 1, max(1, tile_elements // per_pixel)
        return min(images, 65535 // offset_groups), tile_pixels

    @staticmethod
    def _as_pixels(t, channels_last):
        n, c = t.shape[:2]
        if channels_last:
            return t.permute(0, 2, 3, 1).reshape(n, -1, c).transpose(1, 2)
        return t.view(n, c, -1)

    @staticmethod
    def _prefers_channels_last(t):
        return (t.dim() == 4 and not t.is_contiguous()
                and t.is_contiguous(memory_format=torch.channels_last))

    def _mdc_inputs(self, x, offset, mask):
        ostr = _int64s(offset.stride())
        mstr = _int64s(mask.stride() if mask is not None else (0, 0, 0, 0))
        return x.data_ptr(), offset.data_ptr(), ostr, _ptr(mask), mstr

    def modulated_deform_conv2d(self, input, offset, weight, bias, mask, stride, padding,
                                dilation, groups, tile_elements=1 << 23):
        self.reset()
        n, cout, out_h, out_w, geo = self._mdc_geometry(input, offset, weight, stride, padding,
                                                        dilation)
        out_cl = self._prefers_channels_last(input)
        out = torch.empty((n, cout, out_h, out_w), dtype=input.dtype,
                          memory_format=torch.channels_last if out_cl else torch.contiguous_format)
        if n == 0:
            return out
        x = input.contiguous()
        shape = _int64s(geo)
        ins = self._mdc_inputs(x, offset, mask)
        dt = _MDC_DTYPES[input.dtype]
        c, taps, pixels = geo[0], geo[3] * geo[4], out_h * out_w
        images_per_tile, pixels_per_tile = self._mdc_plan(n, c, taps, pixels, geo[5],
                                                          tile_elements)
        cout_g, rows = cout // groups, c * taps
        rows_g = rows // groups
        w3 = weight.reshape(groups, cout_g, rows_g)
        bias3 = None if bias is None else bias.reshape(groups, cout_g, 1)
        out3 = self._as_pixels(out, out_cl)
        columns = torch.empty(images_per_tile * rows * pixels_per_tile, dtype=input.dtype)
        for n0 in range(0, n, images_per_tile):
            images = min(images_per_tile, n - n0)
            for p0 in range(0, pixels, pixels_per_tile):
                count = min(pixels_per_tile, pixels - p0)
                tile = _int64s((n0, images, p0, count))
                self._call("emu_mdc_gather_columns", dt, shape, *ins, tile, columns.data_ptr())
                col4 = columns[: images * rows * count].view(images, groups, rows_g, count)
                for b in range(images):
                    dst = out3[n0 + b].narrow(1, p0, count).view(groups, cout_g, count)
                    if bias3 is not None:
                        torch.baddbmm(bias3, w3, col4[b], out=dst)
                    else:
                        torch.bmm(w3, col4[b], out=dst)
        return out

    def modulated_deform_conv2d_backward(self, grad_output, input, offset, weight, mask,
                                         stride, padding, dilation, groups, want,
                                         deterministic, tile_elements=1 << 23):
        """Gradients (input, offset, mask, weight, bias); want: five bools."""
        self.reset()
        n, cout, out_h, out_w, geo = self._mdc_geometry(input, offset, weight, stride, padding,
                                                        dilation)
        cl = self._prefers_channels_last(input)
        fmt = torch.channels_last if cl else torch.contiguous_format
        acc = torch.float64 if input.dtype == torch.float64 else torch.float32
        dtype = input.dtype
        empty = torch.empty(0, dtype=dtype)
        grad_input = torch.empty(input.shape, dtype=dtype, memory_format=fmt) if want[0] else empty
        grad_offset = torch.empty(offset.shape, dtype=dtype) if want[1] else empty
        grad_mask = torch.empty(mask.shape, dtype=dtype) if want[2] else empty
        grad_weight = torch.empty(weight.shape, dtype=dtype) if want[3] else empty
        grad_bias = (grad_output.sum((0, 2, 3), dtype=acc).to(dtype) if want[4] else empty)
        need_gcol = want[0] or want[1] or want[2]
        if n == 0 or not (need_gcol or want[3]):
            if want[3]:
                grad_weight.zero_()
            return grad_input, grad_offset, grad_mask, grad_weight, grad_bias
        x = input.contiguous()
        shape = _int64s(geo)
        ins = self._mdc_inputs(x, offset, mask)
        dt = _MDC_DTYPES[dtype]
        c, h, w = geo[0], geo[1], geo[2]
        taps, pixels = geo[3] * geo[4], out_h * out_w
        images_per_tile, pixels_per_tile = self._mdc_plan(n, c, taps, pixels, geo[5],
                                                          tile_elements)
        cout_g, rows = cout // groups, c * taps
        rows_g = rows // groups
        w3 = weight.reshape(groups, cout_g, rows_g)
        gout3 = self._as_pixels(grad_output.contiguous(memory_format=fmt), cl)
        tile_elems = images_per_tile * rows * pixels_per_tile
        columns = torch.empty(tile_elems, dtype=dtype) if want[3] else None
        grad_columns = torch.empty(tile_elems, dtype=dtype) if need_gcol else None
        direct_acc = want[0] and not cl and dtype == acc
        acc_images = None
        if want[0] and not direct_acc:
            acc_images = torch.empty((images_per_tile, c, h, w), dtype=acc)
        if direct_acc:
            grad_input.zero_()
        grad_w3 = torch.zeros((groups, cout_g, rows_g), dtype=acc) if want[3] else None
        goff_ptr = grad_offset.data_ptr() if want[1] else None
        gmask_ptr = grad_mask.data_ptr() if want[2] else None
        goff_str = _int64s(grad_offset.stride() if want[1] else (0,) * 4)
        gmask_str = _int64s(grad_mask.stride() if want[2] else (0,) * 4)
        for n0 in range(0, n, images_per_tile):
            images = min(images_per_tile, n - n0)
            acc_ptr = None
            if want[0]:
                if direct_acc:
                    acc_ptr = grad_input[n0].data_ptr()
                else:
                    acc_images.zero_()
                    acc_ptr = acc_images.data_ptr()
            for p0 in range(0, pixels, pixels_per_tile):
                count = min(pixels_per_tile, pixels - p0)
                tile = _int64s((n0, images, p0, count))

                def gout_block(b, p0=p0, count=count, n0=n0):
                    return gout3[n0 + b].narrow(1, p0, count).view(groups, cout_g, count)

                if need_gcol:
                    gcol4 = grad_columns[: images * rows * count].view(images, groups, rows_g,
                                                                       count)
                    for b in range(images):
                        torch.bmm(w3.transpose(1, 2), gout_block(b), out=gcol4[b])
                    self._call("emu_mdc_backward_samples", dt, shape, *ins, tile,
                               grad_columns.data_ptr(), acc_ptr, goff_ptr, goff_str, gmask_ptr,
                               gmask_str, _ptr(columns), int(not deterministic))
                else:
                    self._call("emu_mdc_gather_columns", dt, shape, *ins, tile,
                               columns.data_ptr())
                if want[0] and deterministic:
                    entries = self.lib.emu_mdc_entry_count(shape, tile)
                    key_count = self.lib.emu_mdc_key_count(shape, tile)
                    keys = torch.empty(entries, dtype=torch.int64)
                    weights = torch.empty(entries, dtype=acc)
                    self._call("emu_mdc_scatter_keys", dt, shape, *ins, tile, keys.data_ptr(),
                               weights.data_ptr())
                    sorted_keys, permutation = torch.sort(keys, stable=True)
                    starts = torch.empty(key_count + 1, dtype=torch.int64)
                    self._call("emu_mdc_segment_starts", sorted_keys.data_ptr(), entries,
                               key_count, starts.data_ptr())
                    self._call("emu_mdc_gather_input_grad", dt, shape, tile, starts.data_ptr(),
                               permutation.data_ptr(), weights.data_ptr(),
                               grad_columns.data_ptr(), acc_ptr)
                if want[3]:
                    col4 = columns[: images * rows * count].view(images, groups, rows_g, count)
                    for b in range(images):
                        grad_w3 += torch.bmm(gout_block(b).to(acc),
                                             col4[b].transpose(1, 2).to(acc))
            if want[0] and not direct_acc:
                grad_input[n0:n0 + images].copy_(acc_images[:images])
        if want[3]:
            grad_weight.copy_(grad_w3.view(weight.shape))
        return grad_input, grad_offset, grad_mask, grad_weight, grad_bias

    # ---- separable normalization (separable_norm_cuda.cpp) ----
    @staticmethod
    def _snorm_prepare(x, masks):
        """x in the layout the kernels take, masks, the launchers' shape, dtype code, memory
        format and accumulation dtype."""
        channels_last = (not x.is_contiguous()
                         and x.is_contiguous(memory_format=torch.channels_last))
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        n, c, h, w = x.shape
        shape = _int64s((n, c, masks.shape[1], h * w, int(channels_last)))
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        return (x.contiguous(memory_format=fmt), masks.to(x.dtype).contiguous(), shape,
                _SNORM_DTYPES[x.dtype], fmt, acc)

    @staticmethod
    def _affine(value, x):
        """(tensor, strides n/c/p, plane_shaped) of gamma or beta broadcast onto x."""
        if value is None:
            return None, _int64s((0, 0, 0)), False
        e = value.expand(x.shape)
        sn, sc, sh, sw = e.stride()
        w = x.shape[3]
        if sh == sw == 0:
            sp = 0
        elif sh == w * sw:
            sp = sw
        else:  # H and W do not collapse into one pixel stride: copy
            e = e.contiguous()
            sn, sc, _, sp = e.stride()
        return e, _int64s((sn, sc, sp)), sp == 0

    def separable_norm_forward(self, x, masks, gamma, beta, eps):
        self.reset()
        xc, masks, shape, dt, _, acc = self._snorm_prepare(x, masks)
        n, c, r = shape[0], shape[1], shape[2]
        g, gs, _ = self._affine(gamma, xc)
        b, bs, _ = self._affine(beta, xc)
        out = torch.empty_like(xc)
        mean = torch.empty((n, c, r), dtype=acc)
        rstd = torch.empty((n, c, r), dtype=acc)
        ws = torch.empty(max(1, self.lib.emu_snorm_forward_workspace_bytes(shape, dt)),
                         dtype=torch.uint8)
        self._call("emu_snorm_forward", shape, dt, xc.data_ptr(), masks.data_ptr(), _ptr(g), gs,
                   _ptr(b), bs, eps, out.data_ptr(), mean.data_ptr(), rstd.data_ptr(),
                   ws.data_ptr())
        return out, mean, rstd

    def separable_norm_backward(self, grad_out, x, masks, gamma, beta, mean, rstd, eps, want):
        """Gradients (x, masks, gamma, beta); want: four bools."""
        self.reset()
        xc, masks, shape, dt, fmt, acc = self._snorm_prepare(x, masks)
        n, c = shape[0], shape[1]
        g = grad_out.contiguous(memory_format=fmt)
        gam, gs, gamma_plane = self._affine(gamma, xc)
        bet, _, beta_plane = self._affine(beta, xc)
        want_dgamma = want[2] and gamma is not None
        want_dbeta = want[3] and beta is not None
        dx = torch.empty_like(xc) if want[0] else None
        dmask = torch.empty_like(masks) if want[1] else None
        dgamma_px = torch.empty_like(xc) if want_dgamma and not gamma_plane else None
        dgamma_sums = torch.empty((n, c), dtype=acc) if want_dgamma and gamma_plane else None
        dbeta_px = torch.empty_like(xc) if want_dbeta and not beta_plane else None
        dbeta_sums = torch.empty((n, c), dtype=acc) if want_dbeta and beta_plane else None
        ws = torch.empty(max(1, self.lib.emu_snorm_backward_workspace_bytes(shape, dt,
                                                                           int(want[1]))),
                         dtype=torch.uint8)
        self._call("emu_snorm_backward", shape, dt, g.data_ptr(), xc.data_ptr(),
                   masks.data_ptr(), _ptr(gam), gs, mean.contiguous().data_ptr(),
                   rstd.contiguous().data_ptr(), eps, _ptr(dx), _ptr(dmask), _ptr(dgamma_px),
                   _ptr(dbeta_px), _ptr(dgamma_sums), _ptr(dbeta_sums), ws.data_ptr())

        def reduce(full, sums, value):
            if full is not None:
                return full.to(acc).sum_to_size(value.shape).to(x.dtype)
            return sums.view(n, c, 1, 1).sum_to_size(value.shape).to(x.dtype)

        grad_gamma = reduce(dgamma_px, dgamma_sums, gamma) if want_dgamma else None
        grad_beta = reduce(dbeta_px, dbeta_sums, beta) if want_dbeta else None
        return dx, dmask, grad_gamma, grad_beta
