"""Shared training machinery: configs, the ``Task`` interface and the ``Trainer``.

Heavy pieces (the trainer, the tasks) are imported on first use so that importing
``facedeblur_ext.training`` stays cheap.
"""

from .config import apply_overrides, deep_merge, load_config, read_config
from .task import TASKS, StepContext, Task, get_task, instantiate, register_task

__all__ = [
    "TASKS",
    "StepContext",
    "Task",
    "Trainer",
    "apply_overrides",
    "deep_merge",
    "get_task",
    "instantiate",
    "load_config",
    "read_config",
    "register_task",
]


def __getattr__(name):
    if name == "Trainer":
        from .trainer import Trainer

        return Trainer
    raise AttributeError(name)
