"""A minimal StepContext (no AMP, no DDP) for driving a training task without the trainer."""

from __future__ import annotations

import contextlib


class PlainStepContext:
    def __init__(self, optimizers):
        self.optimizers = optimizers
        self.step = self.epoch = 0
        self.distributed = False

    def autocast(self):
        return contextlib.nullcontext()

    def frozen(self, *names):
        return contextlib.nullcontext()

    def optimize(self, name, loss):
        opt = self.optimizers[name]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return {}
