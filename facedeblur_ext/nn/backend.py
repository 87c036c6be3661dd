"""Which implementation of the fused ops a layer runs (the "backend").

Every layer built on a fused op takes ``backend=None``: an object (module or namespace) that
provides the op functions under their ``facedeblur_ext.ops`` names. ``None`` means
``facedeblur_ext.ops``, looked up at call time, so a model can be built before the native
library is loaded; tests and benchmarks pass the pure-PyTorch reference package instead to
compare both in one run. ``set_backend`` switches a whole built model.
"""

from __future__ import annotations

import importlib
import types

from torch import nn

__all__ = ["BackendRef", "resolve_backend", "set_backend"]


class BackendRef:
    """Holds the object that provides the fused op functions (``None``: ``facedeblur_ext.ops``).

    Layers keep their backend behind this small holder so that ``copy.deepcopy`` (used for EMA
    copies of a model) shares it instead of trying to copy a Python module, and so that a
    pickled layer refers to a module backend by its import name.
    """

    __slots__ = ("target",)

    def __init__(self, target=None):
        self.target = target.target if isinstance(target, BackendRef) else target

    def get(self, op_name: str):
        """Return the function ``op_name`` of the backend, resolving ``None`` lazily."""
        target = self.target
        if target is None:
            from facedeblur_ext import ops as target
        fn = getattr(target, op_name, None)
        if fn is None:
            where = getattr(target, "__name__", type(target).__name__)
            raise RuntimeError(
                f"backend {where!r} provides no {op_name}(); the fused op is missing from this "
                "build of facedeblur_ext (rebuild the extension), or pass a backend object that "
                "has it (for example the reference package facedeblur_ref)."
            )
        return fn

    def __deepcopy__(self, memo):
        return self

    def __reduce__(self):
        if self.target is None or isinstance(self.target, types.ModuleType):
            name = None if self.target is None else self.target.__name__
            return (_backend_ref_from_name, (name,))
        return (BackendRef, (self.target,))

    def __repr__(self) -> str:
        if self.target is None:
            return "facedeblur_ext.ops"
        return getattr(self.target, "__name__", repr(self.target))


def _backend_ref_from_name(name: str | None) -> BackendRef:
    return BackendRef(None if name is None else importlib.import_module(name))


def resolve_backend(spec):
    """Turn a backend given by name or object into what layers accept.

    Args:
        spec: ``None``, ``"facedeblur_ext.ops"`` or ``"ext"`` (the fused ops), another import
            path (a module providing the same functions, e.g. a reference implementation), or
            an object with the op functions as attributes.

    Returns:
        ``None`` for the fused ops, else the backend object.
    """
    if spec is None or spec in ("ext", "facedeblur_ext.ops", "fused"):
        return None
    if isinstance(spec, str):
        return importlib.import_module(spec)
    return spec


def set_backend(module: nn.Module, backend) -> nn.Module:
    """Switch every layer under ``module`` that runs a fused op to ``backend`` (see above)."""
    backend = resolve_backend(backend)
    for sub in module.modules():
        if isinstance(getattr(sub, "_backend", None), BackendRef):
            sub._backend = BackendRef(backend)
    return module
