"""Autograd formulas for the native ops that have no derivative.

An op without an autograd kernel is differentiated by PyTorch with only a warning, as if its
derivative were zero: gradients through the kernel generators, and second-order gradients
through the ``*_backward`` ops (R1 or gradient penalties), would come out silently wrong.
"""

from __future__ import annotations

import torch

__all__ = ["register_no_derivative"]


def register_no_derivative(qualname: str, message: str) -> None:
    """Give op ``qualname`` an autograd formula whose backward raises ``RuntimeError(message)``.

    The op itself runs as before, also on inputs that require grad and under
    ``create_graph=True``; the error comes only when a gradient is propagated through it.

    Args:
        qualname: ``"facedeblur_ext::<op>"``.
        message: the error, naming the op (e.g. ``"<op>: double backward is not supported"``).
    """

    def backward(ctx, *grads):
        raise RuntimeError(message)

    torch.library.register_autograd(qualname, backward)
