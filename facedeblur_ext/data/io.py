"""Image and video input, validation, content hashing and atomic file writes.

Images are handled as ``uint8`` RGB arrays of shape ``[H, W, 3]`` throughout the data package.
Loading is strict by default: the models are trained on colour photographs, so grayscale images,
images with an alpha channel and tiny images are rejected with a :class:`BadImageError` whose
message says why, instead of being silently converted.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"})
VIDEO_EXTENSIONS = frozenset({".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg"})

# PIL modes that carry an alpha channel, and single-channel modes.
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_GRAY_MODES = frozenset({"1", "L", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"})

DEFAULT_MIN_SIZE = 32
_EXIF_ORIENTATION = 0x0112


class BadImageError(ValueError):
    """An input that cannot be used: unreadable, grayscale, with alpha, too small, no face."""

    def __init__(self, reason: str, path: str | os.PathLike | None = None):
        self.reason = reason
        self.path = None if path is None else str(path)
        super().__init__(reason if path is None else f"{path}: {reason}")


# --------------------------------------------------------------------------------------------
# Still images
# --------------------------------------------------------------------------------------------

def check_rgb(image: np.ndarray, *, min_size: int = DEFAULT_MIN_SIZE,
              allow_grayscale: bool = False, path=None) -> np.ndarray:
    """Validate an RGB ``uint8`` array ``[H, W, 3]`` and return it.

    Raises:
        BadImageError: wrong shape or dtype, smaller than ``min_size`` on a side, or grayscale
            content stored as RGB (all three channels equal) unless ``allow_grayscale``.
    """
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise BadImageError(f"expected uint8 [H, W, 3], got {image.dtype} {list(image.shape)}",
                            path)
    h, w = image.shape[:2]
    if min(h, w) < min_size:
        raise BadImageError(f"too small ({w}x{h}, the minimum side is {min_size})", path)
    if not allow_grayscale and _channels_equal(image):
        raise BadImageError("grayscale (its three channels are identical)", path)
    return image


def _channels_equal(image: np.ndarray) -> bool:
    # Compare on a subsample first: colour images differ almost everywhere, so this is cheap.
    sub = image[::7, ::7]
    if not (np.array_equal(sub[..., 0], sub[..., 1]) and np.array_equal(sub[..., 1], sub[..., 2])):
        return False
    return bool(np.array_equal(image[..., 0], image[..., 1])
                and np.array_equal(image[..., 1], image[..., 2]))


def load_rgb(path: str | os.PathLike, *, min_size: int = DEFAULT_MIN_SIZE,
             allow_grayscale: bool = False, allow_alpha: bool = False) -> np.ndarray:
    """Decode an image file into a ``uint8`` RGB array ``[H, W, 3]``.

    EXIF orientation is applied. Palette and CMYK images are converted to RGB.

    Args:
        path: image file.
        min_size: smallest accepted side in pixels.
        allow_grayscale: convert grayscale images to RGB instead of rejecting them.
        allow_alpha: drop an alpha channel instead of rejecting the image.

    Raises:
        BadImageError: the file is unreadable, grayscale, has an alpha channel, or is too small.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as pil:
            pil.load()
            mode = pil.mode
            has_alpha = mode in _ALPHA_MODES or (mode == "P" and "transparency" in pil.info)
            if has_alpha and not allow_alpha:
                raise BadImageError(f"has an alpha channel (mode {mode}); RGB is required", path)
            if mode in _GRAY_MODES and not allow_grayscale:
                raise BadImageError(f"grayscale (mode {mode}); RGB is required", path)
            if pil.getexif().get(_EXIF_ORIENTATION, 1) != 1:  # (transposing copies)
                pil = ImageOps.exif_transpose(pil)
            if mode == "RGB":
                rgb = np.asarray(pil, dtype=np.uint8)
            elif mode in ("I", "I;16", "I;16L", "I;16B", "I;16N", "F"):
                # 16-bit / float gray: scale to 8 bits before conversion.
                arr = np.asarray(pil, dtype=np.float64)
                top = 65535.0 if mode.startswith("I") and arr.max() > 255 else 255.0
                gray = np.clip(np.rint(arr / top * 255.0), 0, 255).astype(np.uint8)
                rgb = np.repeat(gray[..., None], 3, axis=2)
            else:
                rgb = np.asarray(pil.convert("RGB"), dtype=np.uint8)
    except BadImageError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as exc:
        raise BadImageError(f"unreadable ({type(exc).__name__}: {exc})", path) from None
    return check_rgb(np.ascontiguousarray(rgb), min_size=min_size,
                     allow_grayscale=allow_grayscale, path=path)


def probe_image(path: str | os.PathLike, *, min_size: int = DEFAULT_MIN_SIZE) -> str | None:
    """Cheap header check (no full decode). Returns the reason it is unusable, or None."""
    from PIL import Image

    try:
        with Image.open(path) as pil:
            mode, (w, h) = pil.mode, pil.size
            transparent = mode == "P" and "transparency" in pil.info
    except Exception as exc:  # noqa: BLE001 - any failure to open means unreadable
        return f"unreadable ({type(exc).__name__})"
    if mode in _ALPHA_MODES or transparent:
        return f"has an alpha channel (mode {mode})"
    if mode in _GRAY_MODES:
        return f"grayscale (mode {mode})"
    if min(w, h) < min_size:
        return f"too small ({w}x{h}, the minimum side is {min_size})"
    return None


def list_images(root: str | os.PathLike, *, recursive: bool = True) -> list[Path]:
    """Image files under ``root`` (or ``root`` itself), sorted by path."""
    root = Path(root)
    if root.is_file():
        return [root] if root.suffix.lower() in IMAGE_EXTENSIONS else []
    pattern = "**/*" if recursive else "*"
    return sorted(p for p in root.glob(pattern)
                  if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                  and not p.name.startswith("."))


def resolve_image_list(images: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Path]:
    """A directory, a single file, or an explicit list of files -> sorted list of paths."""
    if isinstance(images, (str, os.PathLike)):
        return list_images(images)
    return [Path(p) for p in images]


# --------------------------------------------------------------------------------------------
# Hashing and atomic writes
# --------------------------------------------------------------------------------------------

def content_hash(image: np.ndarray) -> str:
    """SHA-256 of an array's pixels, shape and dtype (the same picture in two files hashes the
    same; a different crop or resize does not)."""
    arr = np.ascontiguousarray(image)
    digest = hashlib.sha256()
    digest.update(f"{arr.dtype.str}{arr.shape}".encode())
    digest.update(memoryview(arr).cast("B"))
    return digest.hexdigest()


def current_umask() -> int:
    """The process's file mode creation mask, read without changing it where the system allows
    (Linux ``/proc``; elsewhere set and restored at once)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either the old file or the whole new one.

    The bytes go to a temporary file in the same directory, are flushed to disk and then
    renamed over ``path`` (rename is atomic within a file system). Safe with concurrent writers
    of the same path (last one wins, no torn files). The file gets the mode any new file of the
    user gets (0666 less the umask), not ``mkstemp``'s private 0600. An interrupt (Ctrl-C)
    removes the temporary file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def check_writable_folder(folder: str | os.PathLike) -> Path:
    """Create ``folder`` if needed and make sure a new file can be written in it, before a long
    computation whose results would otherwise be lost.

    A real write is tried: permission bits say nothing to root, or on a read-only mount.

    Raises:
        NotADirectoryError: ``folder`` exists and is not a folder.
        OSError: it cannot be created or written (the message names it).
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"the output {folder} exists and is not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder, prefix=".write-check."):
            pass
    except OSError as exc:
        raise OSError(exc.errno, f"cannot write to the output folder {folder} "
                                 f"({exc.strerror})") from None
    return folder


def encode_png(image: np.ndarray) -> bytes:
    """PNG bytes of a ``uint8`` RGB ``[H, W, 3]`` or single-channel ``[H, W]`` array."""
    import cv2

    arr = np.ascontiguousarray(image)
    if arr.ndim == 3:
        arr = cv2.cvtColor(arr, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".png", arr)
    if not ok:
        raise OSError("PNG encoding failed")
    return buf.tobytes()


def write_png(path: str | os.PathLike, image: np.ndarray) -> None:
    """Atomically write a ``uint8`` RGB or single-channel array as PNG."""
    atomic_write_bytes(path, encode_png(image))


def gif_frame_ms(fps: float) -> int:
    """Frame time for ``fps``: GIF stores centiseconds, and players stretch frames under 20 ms."""
    if not fps > 0:
        raise ValueError(f"the GIF frame rate must be above 0, got {fps}")
    return max(20, round(100 / fps) * 10)


#: Frames sampled to build a GIF's shared palette (all of them for short sweeps).
_PALETTE_SAMPLES = 16


def write_gif(path: str | os.PathLike, arrays, fps: float, bounce: bool = False) -> None:
    """Write uint8 RGB frames as a looping GIF with one palette (no colour flicker between
    frames), atomically.

    Args:
        path: the GIF to write.
        arrays: the frames (a sequence; long sweeps may pass a lazy one, e.g. read from disk).
        fps: frames per second.
        bounce: play forward then backward.
    """
    import io

    from PIL import Image

    count = len(arrays)
    samples = min(count, _PALETTE_SAMPLES)
    picks = sorted({round(i * (count - 1) / max(1, samples - 1)) for i in range(samples)})
    palette = Image.fromarray(np.concatenate([arrays[i] for i in picks], axis=0)).quantize(256)
    order = list(range(count))
    if bounce and count > 2:
        order += order[-2:0:-1]
    frames = (Image.fromarray(arrays[i]).quantize(palette=palette) for i in order)
    first = next(frames)
    buffer = io.BytesIO()
    first.save(buffer, format="GIF", save_all=True, append_images=frames,
               duration=gif_frame_ms(fps), loop=0, disposal=1)
    atomic_write_bytes(path, buffer.getvalue())


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Float image in [0, 1] (any layout) -> ``uint8`` with rounding."""
    return np.clip(np.rint(np.asarray(image, dtype=np.float64) * 255.0), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------
# Frame sources: videos and folders of frames
# --------------------------------------------------------------------------------------------

class FrameReadError(OSError):
    """A video or frame folder could not deliver the frames asked for."""


class FrameFolder:
    """Consecutive frames stored as image files in one folder, in sorted file-name order."""

    kind = "folder"

    def __init__(self, folder: str | os.PathLike, *, min_size: int = DEFAULT_MIN_SIZE):
        self.path = Path(folder)
        self.files = list_images(self.path, recursive=False)
        self.min_size = min_size
        if not self.files:
            raise FrameReadError(f"{self.path}: no image files")

    @property
    def name(self) -> str:
        return self.path.name

    def __len__(self) -> int:
        return len(self.files)

    def read(self, start: int, count: int) -> list[np.ndarray]:
        if start < 0 or start + count > len(self.files):
            raise FrameReadError(f"{self.path}: frames {start}..{start + count - 1} out of range "
                                 f"(it has {len(self.files)})")
        frames = [load_rgb(f, min_size=self.min_size) for f in self.files[start:start + count]]
        if any(f.shape != frames[0].shape for f in frames):
            raise FrameReadError(f"{self.path}: frames {start}..{start + count - 1} differ in "
                                 f"size")
        return frames

    def describe(self, index: int) -> str:
        return str(self.files[index])

    def __getstate__(self):
        return self.__dict__.copy()


_ORPHANED_CAPTURES: list = []
_MAX_GRAB_AHEAD = 16


class VideoFrames:
    """Frames of a video file decoded with OpenCV (``cv2.VideoCapture``).

    The frame count comes from the container's metadata. One capture per process is kept open
    and re-created after a fork, so instances can be shared with DataLoader workers.
    """

    kind = "video"

    def __init__(self, path: str | os.PathLike, *, min_size: int = DEFAULT_MIN_SIZE):
        import cv2

        self.path = Path(path)
        self.min_size = min_size
        cap = cv2.VideoCapture(str(self.path))
        try:
            if not cap.isOpened():
                raise FrameReadError(f"{self.path}: OpenCV cannot open this video")
            self._count = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
            self.fps = float(cap.get(cv2.CAP_PROP_FPS) or 0.0)
            ok, frame = cap.read()
            if not ok or frame is None:
                raise FrameReadError(f"{self.path}: no decodable frame")
        finally:
            cap.release()
        if self._count <= 0:
            raise FrameReadError(f"{self.path}: the container reports no frames")
        self._cap = None
        self._cap_pid = None
        self._next = None  # index of the frame the open capture will return next

    @property
    def name(self) -> str:
        return self.path.stem

    def __len__(self) -> int:
        return self._count

    def _capture(self):
        import cv2

        if self._cap is not None and self._cap_pid != os.getpid():
            # Inherited through fork: leave the parent's decoder alone (its threads are not
            # ours) and open a new one.
            _ORPHANED_CAPTURES.append(self._cap)
            self._cap = None
        if self._cap is None:
            self._cap = cv2.VideoCapture(str(self.path))
            self._cap_pid = os.getpid()
            self._next = 0
            if not self._cap.isOpened():
                self._cap = None
                raise FrameReadError(f"{self.path}: OpenCV cannot open this video")
        return self._cap

    def read(self, start: int, count: int) -> list[np.ndarray]:
        import cv2

        if start < 0 or start + count > self._count:
            raise FrameReadError(f"{self.path}: frames {start}..{start + count - 1} out of range "
                                 f"(it has {self._count})")
        cap = self._capture()
        ahead = None if self._next is None else start - self._next
        if ahead is not None and 0 < ahead <= _MAX_GRAB_AHEAD:
            # a short way forward: skipping frames is cheaper than a seek, which decodes
            # from the previous key frame
            for _ in range(ahead):
                if not cap.grab():
                    ahead = None
                    break
        if ahead != 0 and (ahead is None or not 0 < ahead <= _MAX_GRAB_AHEAD):
            cap.set(cv2.CAP_PROP_POS_FRAMES, start)
        frames = []
        for k in range(count):
            ok, frame = cap.read()
            if not ok or frame is None:
                self._next = None
                raise FrameReadError(f"{self.path}: could not decode frame {start + k}")
            frames.append(check_rgb(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB),
                                    min_size=self.min_size, path=self.path))
        self._next = start + count
        return frames

    def describe(self, index: int) -> str:
        return f"{self.path}#{index}"

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_cap"] = None
        state["_cap_pid"] = None
        state["_next"] = None
        return state

    def __del__(self):
        cap = getattr(self, "_cap", None)
        if cap is not None and getattr(self, "_cap_pid", None) == os.getpid():
            cap.release()


def open_frame_source(path: str | os.PathLike, *, min_size: int = DEFAULT_MIN_SIZE):
    """A :class:`VideoFrames` for a video file, a :class:`FrameFolder` for a folder of frames."""
    path = Path(path)
    if path.is_dir():
        return FrameFolder(path, min_size=min_size)
    if path.suffix.lower() in VIDEO_EXTENSIONS:
        return VideoFrames(path, min_size=min_size)
    raise FrameReadError(f"{path}: neither a video file nor a folder of frames")


def discover_frame_sources(root: str | os.PathLike) -> list[Path]:
    """Videos and frame folders under ``root``.

    ``root`` may be a video file, a folder of frames, or a tree holding videos and/or folders of
    frames (every folder that directly contains images is one sequence). Sorted by path.
    """
    root = Path(root)
    if root.is_file():
        return [root]
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        here = Path(dirpath)
        names = sorted(n for n in filenames if not n.startswith("."))
        if any(Path(n).suffix.lower() in IMAGE_EXTENSIONS for n in names):
            found.append(here)
        found.extend(here / n for n in names if Path(n).suffix.lower() in VIDEO_EXTENSIONS)
    return sorted(found)


def safe_item_name(parts: Sequence[str]) -> str:
    """File-system-safe, unique-enough item name from path components."""
    text = "__".join(parts)
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in text)
