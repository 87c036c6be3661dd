"""The native library loads, reports how it was built and refuses a torch mismatch."""

from __future__ import annotations

import shutil
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


def test_every_op_has_a_cuda_kernel_exactly_in_a_cuda_build():
    """A CUDA build registers a CUDA kernel for every op that has a CPU one; a CPU build none."""
    with_cuda = facedeblur_ext.build_info()["with_cuda"]
    names = sorted(n for n in torch._C._dispatch_get_all_op_names()
                   if n.startswith("facedeblur_ext::"))
    assert names, "no facedeblur_ext ops registered"
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    assert [n for n in names if not has(n, "CPU")] == []
    assert [n for n in names if has(n, "CUDA") != with_cuda] == []


@pytest.mark.skipif(not sys.platform.startswith("linux") or shutil.which("readelf") is None,
                    reason="needs readelf (Linux)")
def test_native_library_runpath_is_relative_to_itself():
    """_C's RUNPATH names only folders relative to itself (where an installed wheel finds
    torch's libraries), never the build machine's or the Intel/Windows folders torch's CMake
    config adds."""
    from facedeblur_ext import _C

    dynamic = subprocess.run(["readelf", "-d", _C.__file__], capture_output=True, text=True,
                             check=True).stdout
    entries = [e for line in dynamic.splitlines() if "(RUNPATH)" in line or "(RPATH)" in line
               for e in line.split("[", 1)[1].rstrip("]").split(":")]
    stray = [e for e in entries if not e.startswith("$ORIGIN")]
    assert stray == [], (f"{_C.__file__} has RUNPATH entries {stray}; an old build? rebuild "
                         "with `pip install --no-build-isolation -e .`")


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
