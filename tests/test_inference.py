"""Inference plumbing: atomic writes that follow the umask, tiled restoration, the checkpoint's
inference settings (moments, u range) and the control sweep that follows them."""

from __future__ import annotations

import os
import stat

import pytest

from facedeblur_ext.data.io import atomic_write_bytes, current_umask

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_atomic_write_follows_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        assert current_umask() == umask
        atomic_write_bytes(tmp_path / "a.bin", b"x")
        atomic_write_bytes(tmp_path / "a.bin", b"yy")  # a replacement too
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.bin").stat().st_mode) == 0o666 & ~umask
    assert (tmp_path / "a.bin").read_bytes() == b"yy"
    assert [p.name for p in tmp_path.iterdir()] == ["a.bin"]  # no temporary file left
