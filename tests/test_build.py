"""The native library loads, reports how it was built and refuses a torch mismatch."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import facedeblur_ext
from facedeblur_ext._extension import check_torch_match


def test_build_info_fields():
    info = facedeblur_ext.build_info()
    expected = {"version", "torch_version", "with_cuda", "cuda_version", "cuda_archs", "openmp"}
    assert expected <= info.keys()
    assert info["version"] == facedeblur_ext.__version__
    assert info["torch_version"].split("+")[0] == torch.__version__.split("+")[0]
    assert isinstance(info["with_cuda"], bool)
    if info["with_cuda"]:
        assert info["cuda_version"] and info["cuda_archs"]
    else:
        assert info["cuda_version"] is None and info["cuda_archs"] is None


def test_torch_mismatch_raises_import_error_with_rebuild_hint():
    check_torch_match("2.13.0+cpu", "2.13.0")  # local tags do not matter
    with pytest.raises(ImportError, match="pip install --no-build-isolation -e"):
        check_torch_match("2.12.0", "2.13.0+cpu")


def test_cli_version_and_info():
    out = subprocess.run([sys.executable, "-m", "facedeblur_ext", "--version"],
                         capture_output=True, text=True, check=True).stdout
    assert facedeblur_ext.__version__ in out
    out = subprocess.run([sys.executable, "-m", "facedeblur_ext", "info", "--json"],
                         capture_output=True, text=True, check=True).stdout
    assert '"with_cuda"' in out and '"devices"' in out


def test_cli_unknown_command_fails():
    proc = subprocess.run([sys.executable, "-m", "facedeblur_ext", "no-such-command"],
                          capture_output=True, text=True)
    assert proc.returncode != 0
    assert "invalid choice" in proc.stderr


def test_selfcheck_passes():
    proc = subprocess.run([sys.executable, "-m", "facedeblur_ext", "selfcheck"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "selfcheck passed" in proc.stdout
