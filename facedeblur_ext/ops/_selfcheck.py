"""Registry of quick correctness checks run by ``facedeblur selfcheck``."""

from __future__ import annotations

from collections.abc import Callable

import torch

SELF_CHECKS: dict[str, Callable[[torch.device], None]] = {}


def register_self_check(name: str):
    """Decorator: register ``fn(device)`` that raises when the op named ``name`` is wrong."""

    def wrap(fn: Callable[[torch.device], None]) -> Callable[[torch.device], None]:
        SELF_CHECKS[name] = fn
        return fn

    return wrap
