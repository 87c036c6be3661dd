"""Atomic checkpoint files and random-number-generator state capture.

Checkpoints hold only tensors and plain Python values, so they load with
``torch.load(..., weights_only=True)`` (no arbitrary unpickling of a file someone sent you).
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

__all__ = ["DiskFullError", "atomic_torch_save", "capture_rng_state", "disk_full_error",
           "export_inference_checkpoint", "load_checkpoint", "recover_interrupted_saves",
           "restore_rng_state"]

#: errno values of a full disk (or a full quota).
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


class DiskFullError(OSError):
    """A full disk (or quota), with a message that says what was being written."""


def disk_full_error(exc: BaseException, path) -> DiskFullError | None:
    """A :class:`DiskFullError` naming ``path`` when ``exc`` (or an exception it was raised
    from, as torch.save's ``RuntimeError`` is from the failed write) reports a full disk, else
    None. ``exc`` itself when it is one already (it names the file).

    A failed write to an open file reports no file name (``[Errno 28] No space left on
    device``): this is the message that says which file, and so which disk."""
    seen = exc
    while seen is not None:
        if isinstance(seen, DiskFullError):
            return seen
        if isinstance(seen, OSError) and seen.errno in DISK_FULL:
            return DiskFullError(seen.errno, f"{os.strerror(seen.errno)} (writing {path})")
        seen = seen.__cause__ or seen.__context__
    return None


def atomic_torch_save(obj, path) -> Path:
    """``torch.save`` to a temporary file in the target folder, fsync, then rename over
    ``path``: a crash leaves either the old file or the new one, never a torn one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        from facedeblur_ext.data.io import current_umask

        os.fchmod(fd, 0o666 & ~current_umask())  # as any new file, not mkstemp's 0600
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        full = disk_full_error(exc, path)
        if full is not None:
            raise full from exc
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass
    return path


def recover_interrupted_saves(folder) -> list[str]:
    """Deal with the temporary files that a killed :func:`atomic_torch_save` left in
    ``folder``; call it only while holding the run folder's lock (no save in progress).

    A temporary file that loads as a checkpoint with a larger step than the file it was going
    to replace (or replaces a missing one) was complete, only its rename was lost: it is
    renamed into place. Every other one (empty, truncated, not newer) is deleted.

    Returns:
        One line per file, saying what was done.
    """
    from .lock import orphan_temp_files, temp_target

    actions = []
    for tmp in orphan_temp_files(folder, recursive=False):
        target = temp_target(tmp)
        step, newer = None, False
        if target.suffix == ".pt":
            with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                step = int(load_checkpoint(tmp)["step"])  # None: empty or truncated
        if step is not None:
            try:
                newer = step > int(load_checkpoint(target)["step"])
            except (OSError, ValueError, KeyError, TypeError):
                newer = True  # no target, or an unreadable one: the complete file is better
        if newer:
            os.replace(tmp, target)
            actions.append(f"{tmp.name}: a complete checkpoint (step {step}) whose rename "
                           f"was interrupted, now {target.name}")
        else:
            tmp.unlink(missing_ok=True)
            actions.append(f"{tmp.name}: removed (incomplete or not newer than {target.name})")
    for line in actions:
        print(f"[recover] {folder}: {line}", file=sys.stderr)
    return actions


def load_checkpoint(path, map_location="cpu") -> dict:
    """Load a training checkpoint (weights-only unpickling).

    Raises:
        OSError: the file is missing or cannot be read.
        ValueError: the file is not a checkpoint torch can load (empty, truncated, another
            format, or objects other than tensors and plain values).
    """
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except OSError:
        raise
    except Exception as exc:  # noqa: BLE001 - torch reports a damaged file in many types
        # (EOFError when empty, RuntimeError when truncated, UnpicklingError, KeyError, ...)
        # The first sentence: torch's own advice on corrupted files runs on for lines.
        detail = str(exc).strip().split("\n")[0].split(". ")[0]
        raise ValueError(f"{path} is not a readable checkpoint (truncated, or not a "
                         f"weights-only torch file; {type(exc).__name__}"
                         f"{': ' + detail if detail else ''})") from exc


def export_inference_checkpoint(source, destination, models=("generator",), *,
                                dtype: torch.dtype | None = torch.float16, prefer_ema: bool = True,
                                info: dict | None = None) -> Path:
    """Write the inference part of a training checkpoint: the chosen models' weights.

    Optimizer, scheduler, scaler and RNG states and the other models (a GAN's discriminator)
    are dropped; the task, config, step and epoch are kept, so the file loads with the same
    loaders (e.g. :func:`facedeblur_ext.models.cfmd.load_generator`), which cast the weights
    back to the model's dtype. The config's ``inference`` table (what the model learned, see
    :mod:`facedeblur_ext.inference`) is checked and stored at the top level as ``inference``.

    Args:
        source: a checkpoint written by the trainer.
        destination: the file to write (atomically).
        models: names of the models to keep.
        dtype: floating-point storage dtype (float16 halves the file; None keeps it).
        prefer_ema: store a model's EMA weights when the checkpoint has them.
        info: extra plain values to store under ``"info"`` (how it was trained).

    Raises:
        KeyError: a model in ``models`` is not in the checkpoint.
        ValueError: the config's ``inference`` table is malformed (nothing is written).
    """
    state = load_checkpoint(source)
    table = (state.get("config") or {}).get("inference")
    settings = None
    if table is not None:
        from ..inference import inference_settings

        settings = inference_settings(table, source=f"{source} (config)")
    ema = state.get("ema") or {}
    kept = {}
    for name in models:
        if name not in state.get("models", {}):
            raise KeyError(f"{source} has no model {name!r}; it has "
                           f"{sorted(state.get('models', {}))}")
        weights = ema[name] if prefer_ema and ema.get(name) else state["models"][name]
        kept[name] = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v)
                      for k, v in weights.items()}
    out = {key: state[key] for key in ("format", "task", "config", "step", "epoch")
           if key in state}
    out["models"] = kept
    if settings is not None:
        out["inference"] = settings.as_dict()
    out["info"] = {"exported_from": str(source), "storage_dtype": str(dtype).replace("torch.", "")
                   if dtype is not None else "unchanged", **(info or {})}
    return atomic_torch_save(out, destination)


def capture_rng_state() -> dict:
    """The state of Python's, NumPy's and torch's (CPU and every CUDA device) generators."""
    version, words, gauss = random.getstate()
    # The legacy global NumPy generator is what user code and augmentation libraries often
    # draw from, so its state is part of an exact resume.
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()  # noqa: NPY002
    state = {
        "python": {"version": version, "state": list(words), "gauss": gauss},
        "numpy": {"name": np_name, "keys": torch.from_numpy(np_keys.astype(np.int64)),
                  "pos": int(np_pos), "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    """Inverse of ``capture_rng_state``."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    npst = state["numpy"]
    np.random.set_state((npst["name"], npst["keys"].numpy().astype(np.uint32),  # noqa: NPY002
                         npst["pos"], npst["has_gauss"], npst["gauss"]))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        states = state["cuda"]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([s.cpu() for s in states])
