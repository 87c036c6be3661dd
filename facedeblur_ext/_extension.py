"""Loading of the native library and the check that it matches the running torch."""

from __future__ import annotations

import importlib

import torch

_REBUILD_HINT = (
    "Rebuild the extension against the installed torch: from the repository root run "
    "`pip install --no-build-isolation -e .` (or `python setup.py build_ext --inplace`)."
)

_native = None


def _base_version(version: str) -> str:
    """'2.13.0+cpu' -> '2.13.0' (the local build tag does not change the C++ ABI)."""
    return version.split("+", 1)[0]


def check_torch_match(built_against: str, running: str) -> None:
    """Raise ImportError when the extension was compiled for another torch release.

    Args:
        built_against: ``torch.__version__`` recorded when ``_C`` was compiled.
        running: ``torch.__version__`` of the interpreter importing it.
    """
    if _base_version(built_against) != _base_version(running):
        raise ImportError(
            f"facedeblur_ext._C was built against torch {built_against} but torch {running} "
            f"is installed. {_REBUILD_HINT}"
        )


def load_extension():
    """Import ``facedeblur_ext._C`` (registering the ops) and verify its torch version."""
    global _native
    if _native is not None:
        return _native
    try:
        native = importlib.import_module("facedeblur_ext._C")
    except ImportError as exc:
        raise ImportError(
            f"Could not load the native library facedeblur_ext._C ({exc}). {_REBUILD_HINT}"
        ) from exc
    check_torch_match(native.build_info()["torch_version"], torch.__version__)
    _native = native
    return native


def build_info() -> dict:
    """How the native library was built.

    Returns:
        dict with ``version`` (package), ``torch_version`` (torch it was compiled against),
        ``with_cuda``, ``cuda_version`` and ``cuda_archs`` (None without CUDA), ``openmp``,
        ``compiler`` and ``cxx_abi``.
    """
    return dict(load_extension().build_info())
