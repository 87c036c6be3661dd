"""Shared pytest configuration: CUDA tests skip cleanly where no GPU or CUDA build exists."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import facedeblur_ext

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


def cuda_usable() -> bool:
    return torch.cuda.is_available() and bool(facedeblur_ext.build_info()["with_cuda"])


def pytest_collection_modifyitems(config, items):
    if cuda_usable():
        return
    reason = ("no CUDA device" if not torch.cuda.is_available()
              else "facedeblur_ext was built without CUDA")
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def device_params(*, cuda: bool = True):
    """``pytest.param`` list for parametrizing over devices; the CUDA one carries the mark."""
    params = [pytest.param("cpu", id="cpu")]
    if cuda:
        params.append(pytest.param("cuda", id="cuda", marks=pytest.mark.cuda))
    return params


@pytest.fixture
def one_torch_thread():
    """One intra-op torch thread for the test (restored after): the networks in the training
    and evaluation tests are tiny, and on the shared 2-core machine extra threads only add
    OpenMP spin-waiting (10-100x slower) and make CPU results run-order dependent. Modules opt
    in with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def cli_error(capsys, monkeypatch):
    """``cli_error(argv)``: run the CLI expecting a user error (exit status 2, one line on
    stderr) and return that line without its ``facedeblur COMMAND: error:`` prefix."""
    from facedeblur_ext import cli

    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)

    def run(argv) -> str:
        capsys.readouterr()
        assert cli.main([str(a) for a in argv]) == 2
        lines = capsys.readouterr().err.splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"facedeblur {argv[0]}: error: "), lines
        return lines[0].split(": error: ", 1)[1]

    return run
