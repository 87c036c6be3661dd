"""What ``facedeblur deblur`` and its ``--full-photo`` mode share: option types, reading the
inputs, naming and checking the outputs before any model runs, atomic PNG/GIF writers,
progress bars, quiet third-party logs and the summary line.

Both :mod:`facedeblur_ext.commands.deblur` and :mod:`facedeblur_ext.commands.deblur_full_photo`
import this module; it imports neither.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

PROG = "facedeblur deblur"


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a number above 0 (``nan`` refused)."""
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
    return value


def list_inputs(path: Path) -> list[Path]:
    """The images of the folder ``path`` (not recursive), or the file ``path`` itself."""
    from facedeblur_ext.data.io import list_images

    if path.is_dir():
        files = list_images(path, recursive=False)
        if not files:
            raise FileNotFoundError(f"no images in {path}")
        return files
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    return [path]


def output_names(inputs: list[Path]) -> list[str]:
    """The ``<name>`` of each input's outputs: its stem, or ``<stem>_<extension>`` where
    inputs share a stem (``face.png`` and ``face.jpg`` would otherwise write one file)."""
    stem_counts = Counter(p.stem for p in inputs)
    return [f"{p.stem}_{p.suffix.lstrip('.').lower()}" if stem_counts[p.stem] > 1 else p.stem
            for p in inputs]


def check_outputs(inputs: list[Path], outputs: list[list[Path]]) -> None:
    """Refuse, before any work, outputs that would replace an input or another input's output.

    Args:
        inputs: the input files.
        outputs: per input, the files written for it.

    Raises:
        ValueError: an output path is an input file, or two inputs write the same path.
    """
    input_by_path = {p.resolve(): p for p in inputs}
    writer_by_path: dict[Path, Path] = {}
    for source, files in zip(inputs, outputs):
        for file in files:
            key = file.resolve()
            if key in input_by_path:
                raise ValueError(f"the output {file} would replace the input "
                                 f"{input_by_path[key]}; choose another --output folder")
            writer = writer_by_path.setdefault(key, source)
            if writer != source:
                raise ValueError(f"{writer} and {source} would both be written to {file}; "
                                 "rename one of them")


def read_image(path: Path) -> np.ndarray:
    """An input image as uint8 RGB ``[H, W, 3]``, read the same way in every mode: EXIF
    orientation applied, grayscale expanded to RGB, alpha dropped, any size.

    Raises:
        BadImageError: the file cannot be decoded.
    """
    from facedeblur_ext.data import load_rgb

    return load_rgb(path, min_size=1, allow_grayscale=True, allow_alpha=True)


def unreadable_reason(path: Path) -> str | None:
    """Why ``path`` cannot be decoded (a header check, no full decode), or None."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.verify()
    except Exception as exc:  # noqa: BLE001 - any failure to open means unreadable
        return f"unreadable ({type(exc).__name__}: {exc})"
    return None


def prepare_output_folder(out_dir: Path, inputs: list[Path]) -> None:
    """Check, before any model is loaded, that there is something to do and somewhere to
    put it: at least one input must open (a header check, stopping at the first that does),
    and ``out_dir`` must take a new file. The folder is created only after the first check
    passed.

    Raises:
        ValueError: no input can be read.
        OSError: ``out_dir`` cannot be created or written (the message names it).
    """
    from facedeblur_ext.data.io import check_writable_folder

    reasons = {}
    for path in inputs:
        reasons[path] = unreadable_reason(path)
        if reasons[path] is None:
            break
    else:
        details = "; ".join(f"{path.name}: {reason}" for path, reason in reasons.items())
        raise ValueError(f"none of the {len(inputs)} input(s) can be read ({details})")
    check_writable_folder(out_dir)


def readable_images(inputs: list[Path], names: list[str], failures: list[Path], *,
                    desc: str) -> Iterator[tuple[Path, str, np.ndarray]]:
    """``(path, name, image)`` for each input that can be read, with a progress bar.

    An unreadable input is reported on stderr and appended to ``failures`` instead, so that
    one bad file does not stop a batch.
    """
    from facedeblur_ext.data import BadImageError

    with progress_bar(total=len(inputs), desc=desc, unit="image") as bar:
        for path, name in zip(inputs, names):
            try:
                image = read_image(path)
            except BadImageError as exc:
                bar.write(f"{PROG}: skipped {path}: {exc.reason}", file=sys.stderr)
                failures.append(path)
            else:
                yield path, name, image
            bar.update()


def progress_bar(*, total: int, desc: str, unit: str, leave: bool = True):
    """A tqdm bar on stderr, hidden for a single step (nothing long to show)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, leave=leave, disable=total < 2,
                dynamic_ncols=True)


class TileRunsBar:
    """A progress bar over the model runs of one tiled image, made at the first report (when
    :func:`~facedeblur_ext.inference.restore_tiled` gives the total): pass it as ``progress``,
    then :meth:`close` it."""

    def __init__(self):
        self.bar = None

    def __call__(self, done: int, total: int) -> None:
        if self.bar is None:
            self.bar = progress_bar(total=total, desc="tile runs", unit="run", leave=False)
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def finish(written: str, failures: list[Path], num_inputs: int) -> int:
    """Print the summary line; exit status 1 when some inputs could not be read."""
    print(written)
    if failures:
        print(f"{PROG}: {len(failures)} of {num_inputs} input(s) could not be read "
              "and were skipped (see above)", file=sys.stderr)
        return 1
    return 0


def save_png(array: np.ndarray, path: Path) -> None:
    """Write a uint8 RGB array as PNG atomically (an interrupt leaves no partial file)."""
    from facedeblur_ext.data.io import write_png

    write_png(path, array)


@contextlib.contextmanager
def native_stderr_hidden(verbose: bool = False):
    """Hide what native libraries (MediaPipe, TFLite, absl, glog) print on file descriptor 2
    while the block runs; with ``verbose`` let it through.

    Those libraries write to the descriptor directly, around Python's ``sys.stderr``, and some
    of them from their own threads, after the call that started them has returned; so the
    descriptor points at a temporary file for the whole block. Python's own output (warnings,
    progress bars made inside the block) still shows: a ``sys.stderr`` on descriptor 2 is
    replaced, for the block, by a stream on where the descriptor pointed before. If the block
    raises an error, what the libraries wrote is shown after all.
    """
    if verbose:
        yield
        return
    try:
        python_on_descriptor_2 = sys.stderr.fileno() == 2
    except (AttributeError, OSError, ValueError):  # e.g. a capturing stream with no descriptor
        python_on_descriptor_2 = False
    sys.stderr.flush()
    python_stderr = sys.stderr
    saved = os.dup(2)
    visible = None
    failed = False
    with tempfile.TemporaryFile() as sink:
        try:
            if python_on_descriptor_2:
                visible = os.fdopen(os.dup(saved), "w", buffering=1, errors="backslashreplace")
            os.dup2(sink.fileno(), 2)
            if visible is not None:
                sys.stderr = visible
            yield
        except Exception:  # not on Ctrl-C: an interrupt needs no library logs
            failed = True
            raise
        finally:
            sys.stderr = python_stderr
            os.dup2(saved, 2)
            os.close(saved)
            if visible is not None:
                with contextlib.suppress(OSError, ValueError):
                    visible.close()
            if failed:
                with contextlib.suppress(OSError, ValueError):
                    sink.seek(0)
                    sys.stderr.flush()
                    os.write(2, sink.read())
