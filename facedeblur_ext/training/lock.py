"""One writer per output folder: an exclusive ``flock`` on ``<folder>/.facedeblur.lock``.

``facedeblur train`` (a fresh start, a resume, an overwrite) and ``facedeblur synth`` take the
lock of their output folder before they touch anything in it, and hold it until they exit. The
kernel releases the lock when the holder dies (even by SIGKILL), so a lock is never stale and
there is nothing to clean up; what a killed writer left half-written (its temporary files) can
then be removed safely by the next holder, since no other process can be writing it.

The holder writes its PID and command into the lock file, so a refused second writer can say
who holds the folder. Under ``torchrun`` rank 0 (the only rank that writes the folder) holds
the lock for the whole job (see :class:`facedeblur_ext.training.trainer.Trainer`).
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import sys
import time
import warnings
from pathlib import Path

__all__ = ["LOCK_NAME", "FolderLock", "FolderLockedError", "orphan_temp_files",
           "remove_orphan_temp_files", "temp_target"]

LOCK_NAME = ".facedeblur.lock"

#: Names of the temporary files of an atomic write (``tempfile.mkstemp(prefix=".<name>.",
#: suffix=".tmp")``: eight random characters between the name and the suffix).
_TEMP_NAME = re.compile(r"^\.(?P<target>.+)\.[a-z0-9_]{8}\.tmp$")


class FolderLockedError(OSError):
    """Another process holds the folder's lock (a second writer is refused)."""


class FolderLock:
    """An exclusive, non-blocking lock on a folder, held from :meth:`acquire` to
    :meth:`release` (or the end of a ``with`` block, or the process).

    Args:
        folder: the folder to lock (created if missing).
        command: what holds it, shown to a refused writer (``facedeblur train``).
    """

    def __init__(self, folder, command: str):
        self.folder = Path(folder)
        self.command = command
        self.path = self.folder / LOCK_NAME
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> FolderLock:
        """Take the lock.

        Raises:
            FolderLockedError: another process (or another ``FolderLock`` of this process)
                holds it; the message names the holder's PID and command.
            NotADirectoryError: ``folder`` is a file.
        """
        if self._fd is not None:
            return self
        if self.folder.exists() and not self.folder.is_dir():
            raise NotADirectoryError(f"{self.folder} is a file, not a folder")
        self.folder.mkdir(parents=True, exist_ok=True)
        # O_CLOEXEC: a program this process executes does not inherit the lock (forked
        # DataLoader workers do, and die with their parent).
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise FolderLockedError(
                f"{self.folder} is in use by {self._describe_holder()}; wait for it to "
                "finish or stop it (one writer per folder)") from None
        except OSError as exc:
            if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                os.close(fd)
                raise
            # (some network file systems): work on, unprotected, rather than not at all
            warnings.warn(f"{self.folder}: the file system cannot lock files ({exc.strerror}); "
                          "a second writer into this folder would not be refused",
                          stacklevel=2)
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {self.command}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        """Release the lock (the lock file stays: removing it would race with a new holder)."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)  # closing the only descriptor of this open file releases the flock

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def _describe_holder(self) -> str:
        # The holder writes its PID right after locking: a refusal in between reads an empty
        # file, so retry briefly.
        for _ in range(20):
            try:
                text = self.path.read_text().strip()
            except OSError:
                text = ""
            if text:
                pid, _, command = text.partition(" ")
                return f"{command or 'another process'} (PID {pid})"
            time.sleep(0.05)
        return "another process (PID unknown)"


def orphan_temp_files(folder, recursive: bool = True) -> list[Path]:
    """The temporary files of interrupted atomic writes in ``folder`` (``.<name>.XXXXXXXX.tmp``,
    see :func:`facedeblur_ext.data.io.atomic_write_bytes`), sorted. Only the holder of the
    folder's lock may remove them: otherwise they may belong to a write in progress."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    files = folder.rglob(".*.tmp") if recursive else folder.glob(".*.tmp")
    return sorted(p for p in files if p.is_file() and _TEMP_NAME.match(p.name))


def temp_target(path) -> Path:
    """The file that the temporary file ``path`` was going to replace."""
    path = Path(path)
    match = _TEMP_NAME.match(path.name)
    if match is None:
        raise ValueError(f"{path} is not the temporary file of an atomic write")
    return path.with_name(match["target"])


def remove_orphan_temp_files(folder, recursive: bool = True) -> list[Path]:
    """Delete :func:`orphan_temp_files` of ``folder`` (call with its lock held); returns them."""
    removed = orphan_temp_files(folder, recursive)
    for path in removed:
        path.unlink(missing_ok=True)
    if removed:
        print(f"[cleanup] removed {len(removed)} temporary file(s) of an interrupted run in "
              f"{folder}", file=sys.stderr)
    return removed
