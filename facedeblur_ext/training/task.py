"""What a model plugs into the shared trainer: the ``Task`` interface and the task registry.

The trainer owns the mechanics (devices, DDP, AMP, optimizer steps, clipping, EMA,
schedules, checkpoints, logs, validation loop, signals); a task owns the model-specific parts:
which networks exist, how they are optimised, what one training step computes, and how a
restored image is produced for validation. CFMD-GAN is ``facedeblur_ext.training.cfmd_task``,
SNADNet (two stages, two trainer runs: see ``Task.runs``) ``facedeblur_ext.training.snadnet_task``.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterable, Iterator

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

__all__ = ["TASKS", "StepContext", "Task", "get_task", "instantiate", "register_task"]

#: task name -> "module:Class" (imported on first use)
TASKS: dict[str, str] = {
    "cfmd": "facedeblur_ext.training.cfmd_task:CFMDTask",
    "snadnet": "facedeblur_ext.training.snadnet_task:SNADNetTask",
    "baseline_ae": "facedeblur_ext.training.baseline_tasks:AutoencoderTask",
    "baseline_gan": "facedeblur_ext.training.baseline_tasks:GANBaselineTask",
}


def register_task(name: str, target: str | type) -> None:
    """Make ``facedeblur train <name>`` use ``target`` (a Task subclass or "module:Class")."""
    TASKS[name] = target


def _import(target: str):
    module_name, _, attr = target.partition(":")
    if not attr:
        raise ValueError(f"{target!r} is not of the form 'package.module:Name'")
    return getattr(importlib.import_module(module_name), attr)


def get_task(name: str) -> type[Task]:
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; known: {', '.join(sorted(TASKS))}")
    target = TASKS[name]
    return _import(target) if isinstance(target, str) else target


def instantiate(spec: dict, **extra):
    """Build ``{"class": "module:Class", "args": {...}}`` (for datasets and similar)."""
    if not isinstance(spec, dict) or "class" not in spec:
        raise ValueError(f"expected a table with 'class' and 'args', got {spec!r}")
    return _import(spec["class"])(**{**(spec.get("args") or {}), **extra})


class StepContext:
    """The trainer's services available inside ``Task.training_step``.

    Attributes:
        step: optimizer steps done before this one; epoch: the current epoch.
        device: the training device; distributed: whether DDP is active.
    """

    step: int
    epoch: int
    device: torch.device
    distributed: bool

    def autocast(self) -> contextlib.AbstractContextManager:
        """Mixed-precision region as configured (a no-op when AMP is off)."""
        raise NotImplementedError

    def optimize(self, name: str, loss: Tensor) -> dict[str, float]:
        """Backward ``loss`` and step optimizer ``name`` (scaling, unscaling, clipping and
        zeroing included). Returns ``{"grad_norm_<name>": ...}`` when clipping is on."""
        raise NotImplementedError

    def frozen(self, *names: str) -> contextlib.AbstractContextManager:
        """Within this context, the parameters of models ``names`` get no gradients (skipped
        under DDP, where every parameter must join each backward; the gradients are then
        discarded by the next ``optimize`` of that model)."""
        raise NotImplementedError


class Task:
    """Base class of a trainable model family.

    Args:
        config: the full run configuration (dict).
        device: the training device.
    """

    #: registry name, also stored in checkpoints
    name: str = ""
    #: models of which the trainer keeps an EMA when ``train.ema.enabled``
    ema_models: tuple[str, ...] = ()

    def __init__(self, config: dict, device: torch.device):
        self.config = config
        self.device = device

    @classmethod
    def runs(cls, config: dict, resume=None) -> list[tuple[dict, object]]:
        """The trainer runs that ``facedeblur train`` makes of ``config``, in order, as
        ``(run_config, resume)`` pairs: one by default; a model trained in stages returns one
        per stage (each with its own ``output_dir``)."""
        return [(config, resume)]

    def build_models(self) -> dict[str, nn.Module]:
        """The trainable networks by name (unwrapped; the trainer moves and wraps them)."""
        raise NotImplementedError

    def build_optimizers(self, models: dict[str, nn.Module]) -> dict[str, torch.optim.Optimizer]:
        """One optimizer per model by default: Adam with ``optim.lr`` and ``optim.betas``,
        overridable per model under ``optim.per_model.<name>``.

        ``optim.lr_multipliers`` maps ``<model>.<submodule>`` prefixes to learning-rate
        factors (e.g. ``{generator.mapping: 10}``): those parameters get their own parameter
        group at ``lr * factor`` (the schedulers scale every group alike).
        """
        optim = self.config.get("optim", {})
        multipliers = {str(k): float(v) for k, v in (optim.get("lr_multipliers") or {}).items()}
        unused = set(multipliers)
        out = {}
        for name, model in models.items():
            args = {**optim, **(optim.get("per_model", {}).get(name) or {})}
            lr = float(args.get("lr", 1e-4))
            groups: dict[float, list] = {}
            for pname, param in model.named_parameters():
                if not param.requires_grad:
                    continue
                factor = 1.0
                for prefix, value in multipliers.items():
                    full = f"{name}.{pname}"
                    if full == prefix or full.startswith(prefix + "."):
                        factor = value
                        unused.discard(prefix)
                groups.setdefault(factor, []).append(param)
            out[name] = torch.optim.Adam(
                # the plain group first: the logs report param_groups[0]'s learning rate
                [{"params": groups[f], "lr": lr * f} for f in sorted(groups, key=lambda f: f != 1)],
                lr=lr,
                betas=tuple(float(b) for b in args.get("betas", (0.9, 0.999))),
                weight_decay=float(args.get("weight_decay", 0.0)),
            )
        if unused:
            raise ValueError(f"optim.lr_multipliers names no parameters: {sorted(unused)} "
                             f"(use <model>.<submodule>, e.g. generator.mapping)")
        return out

    def build_datasets(self) -> tuple[Dataset, Dataset | None]:
        """Training and (optional) validation datasets; default from ``data.train``/``data.val``
        tables of the form ``{class: "module:Class", args: {...}}``."""
        data = self.config.get("data", {})
        train = instantiate(data["train"])
        val = instantiate(data["val"]) if data.get("val") else None
        return train, val

    def collate_fn(self):
        """The DataLoader collate function: ``data.collate`` ("module:function") or None (torch's
        default)."""
        target = self.config.get("data", {}).get("collate")
        return _import(target) if target else None

    def training_step(self, models: dict[str, nn.Module], batch: dict,
                      ctx: StepContext) -> dict[str, float]:
        """One iteration: forward, losses, and ``ctx.optimize`` for each optimizer.

        ``models`` are the (possibly DDP-wrapped) training models. Returns scalars to log.
        """
        raise NotImplementedError

    def validation_pairs(self, models: dict[str, nn.Module], batch: dict
                         ) -> Iterable[tuple[Tensor, Tensor]]:
        """(restored, target) image batches in [0, 1] for PSNR/SSIM; ``models`` are unwrapped
        eval models (EMA weights where kept)."""
        raise NotImplementedError

    def validation_step(self, models: dict[str, nn.Module], batch: dict) -> None:
        """Accumulate validation metrics other than PSNR/SSIM over one batch (same models as
        ``validation_pairs``); reported by ``validation_results``. Default: none."""

    def validation_results(self) -> dict[str, float]:
        """The metrics accumulated by ``validation_step`` since the last call, which resets
        them; merged into the validation results and ``val.csv``."""
        return {}

    def preview(self, models: dict[str, nn.Module], dataset: Dataset) -> Tensor | None:
        """An image grid [3, H, W] in [0, 1] to save at validation time, or None."""
        return None


def batch_to(batch: dict, device: torch.device) -> dict:
    """Move the tensors of a collated batch dict to ``device`` (others unchanged)."""
    non_blocking = device.type == "cuda"
    return {k: (v.to(device, non_blocking=non_blocking) if isinstance(v, Tensor) else v)
            for k, v in batch.items()}


def iterate_models(models: dict[str, nn.Module]) -> Iterator[tuple[str, nn.Module]]:
    """(name, unwrapped module) pairs, looking through DDP wrappers."""
    for name, model in models.items():
        yield name, getattr(model, "module", model)
