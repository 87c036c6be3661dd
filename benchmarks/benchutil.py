"""Helpers shared by the benchmark files: device selection, synchronization, result files."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest
import torch

import facedeblur_ext


def cuda_usable() -> bool:
    """A CUDA device is present and the extension was built with CUDA."""
    return torch.cuda.is_available() and bool(facedeblur_ext.build_info()["with_cuda"])


DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=pytest.mark.skipif(
        not cuda_usable(), reason="no CUDA device or no CUDA build")),
]


def sync(device) -> None:
    """Wait for queued CUDA work so that a timer measures it (no-op on the CPU)."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize(device)


def write_json_atomic(path: Path, payload) -> None:
    """Write ``payload`` as JSON so that a reader never sees a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as handle:
        json.dump(payload, handle, indent=2)
        handle.write("\n")
    os.chmod(tmp, 0o644)  # mkstemp creates 0600; results are meant to be read by others
    os.replace(tmp, path)
