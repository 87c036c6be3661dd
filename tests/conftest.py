"""Shared pytest configuration: CUDA tests skip cleanly where no GPU or CUDA build exists."""

from __future__ import annotations

import contextlib
import zlib
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


class EmulatedCuda(str):
    """The device of the ``cuda_emulated`` test runs: tensors live on the CPU (the string is
    ``"cpu"``), and every facedeblur_ext op runs through its CUDA launcher with the kernels in
    the CPU emulator (tests/cuda_emulation.py, ``EmulatedCudaOps``)."""


def device_params(*, cuda: bool = True):
    """``pytest.param`` list for parametrizing over devices: the CPU; with ``cuda``, a real
    CUDA device (mark ``cuda``) and the emulated one (mark ``cuda_emulation``)."""
    params = [pytest.param("cpu", id="cpu")]
    if cuda:
        params.append(pytest.param("cuda", id="cuda", marks=pytest.mark.cuda))
        params.append(pytest.param(EmulatedCuda("cpu"), id="cuda_emulated",
                                   marks=pytest.mark.cuda_emulation))
    return params


def cuda_params():
    """``pytest.param`` list for the CUDA-only tests: a real CUDA device (mark ``cuda``) and
    the emulated one (mark ``cuda_emulation``). Their CPU side runs under :func:`cpu_kernels`."""
    return [pytest.param("cuda", id="cuda", marks=pytest.mark.cuda),
            pytest.param(EmulatedCuda("cpu"), id="cuda_emulated",
                         marks=pytest.mark.cuda_emulation)]


_EMULATION = []  # the EmulatedCudaOps of the running cuda_emulated test, if any


@contextlib.contextmanager
def cpu_kernels():
    """The facedeblur_ext CPU kernels inside, also in a ``cuda_emulated`` test (where the ops
    otherwise run through the emulated CUDA launchers): the CPU side of a CUDA-vs-CPU
    comparison. A no-op elsewhere."""
    with _EMULATION[-1].cpu_kernels() if _EMULATION else contextlib.nullcontext():
        yield


@pytest.fixture(autouse=True)
def _emulated_cuda_ops(request):
    """For a test whose ``device`` is :class:`EmulatedCuda`: the facedeblur_ext ops run
    through the emulated CUDA launchers, and the test must have called at least one."""
    callspec = getattr(request.node, "callspec", None)
    if callspec is None or not isinstance(callspec.params.get("device"), EmulatedCuda):
        yield
        return
    from cuda_emulation import EmulatedCudaOps, shared_emulator

    # A known emulator state per test (other emulator tests change it): threads between
    # barriers in a seeded random order, and an H100's 132 SMs.
    emulator = shared_emulator()
    emulator.set_schedule("random", seed=zlib.crc32(request.node.nodeid.encode()))
    emulator.set_sm_count(132)
    mode = EmulatedCudaOps(emulator)
    _EMULATION.append(mode)
    try:
        with mode:
            yield
    finally:
        _EMULATION.pop()
    if getattr(request.node, "call_passed", False):
        assert mode.calls, "the test ran no facedeblur_ext op through the emulated CUDA launchers"


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.when == "call":
        item.call_passed = report.passed  # read by _emulated_cuda_ops at teardown
    return report


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
