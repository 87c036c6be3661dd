"""The shared training loop (CFMD-GAN, SNADNet, any ``Task``).

Features: single process or ``torchrun`` DDP (NCCL on CUDA, gloo on CPU); AMP on CUDA (bf16,
or fp16 with a GradScaler per optimizer); gradient clipping; optional EMA of chosen models;
learning rates decayed by a constant factor per epoch, or a per-step cosine schedule with
linear warmup; tqdm progress; CSV (and TensorBoard)
logs; periodic validation with PSNR/SSIM (plus the task's own metrics) and a preview grid;
atomic checkpoints with exact resume (models, EMA, optimizers, schedulers, scalers, every
rank's RNG states and the position within the epoch); SIGINT/SIGTERM finish the current step,
save a checkpoint and stop.

One writer per run folder: rank 0 holds the folder's lock (``training.lock``) from setup to the
end of :meth:`Trainer.fit`, so a second run into the folder is refused, and under it removes the
temporary files of a killed run (a complete checkpoint whose rename was lost is kept, see
``checkpoint.recover_interrupted_saves``).

Configuration keys used here (the task reads ``model``, ``loss``, ``data``)::

    seed, output_dir, device (auto|cpu|cuda[:N])
    distributed: {backend: auto, check_replicas_every: 0}
    optim: {lr, betas, lr_decay_per_epoch, grad_clip_norm,
            cosine_steps (replaces lr_decay_per_epoch), warmup_steps, min_lr_ratio}
    train: {epochs, max_steps, batch_size (per process), num_workers, num_threads, shuffle, amp
            (auto|off|bf16|fp16), ema: {enabled, decay}, log_every, checkpoint_every,
            keep_checkpoints, tensorboard}
    val: {every_steps, every_epochs, at_end, batch_size, max_batches, preview: {...}}

``config.KNOWN_KEYS`` lists the keys of these tables (with the optimizer keys the tasks read:
momentum, weight_decay, per_model); an override adding any other key to them is refused.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import shutil
import signal
import threading
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from . import _quality
from .checkpoint import (
    atomic_torch_save,
    capture_rng_state,
    disk_full_error,
    load_checkpoint,
    recover_interrupted_saves,
    restore_rng_state,
)
from .distributed import DistInfo, all_reduce_max, barrier, init_distributed
from .ema import ModelEMA
from .lock import FolderLock
from .run_log import RunLog
from .sampler import ResumableDistributedSampler
from .task import StepContext, Task, batch_to, get_task

__all__ = ["Trainer", "model_digest", "resolve_amp_dtype"]

CHECKPOINT_FORMAT = 1


def resolve_amp_dtype(mode, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``train.amp`` on ``device`` (None: full precision)."""
    if mode in (None, False, "off", "none", "fp32"):
        return None
    if mode in (True, "auto"):
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if mode == "bf16":
        return torch.bfloat16
    if mode == "fp16":
        if device.type != "cuda":
            raise ValueError("train.amp=fp16 needs CUDA; use bf16 or off on the CPU")
        return torch.float16
    raise ValueError(f"train.amp must be auto, off, bf16 or fp16; got {mode!r}")


def build_scheduler(optimizer: torch.optim.Optimizer, optim: dict
                    ) -> torch.optim.lr_scheduler.LRScheduler:
    """The learning-rate schedule of an ``optim`` table.

    With ``cosine_steps`` set: linear warmup over ``warmup_steps`` (default 0), then a cosine
    from ``lr`` down to ``min_lr_ratio * lr`` (default 0.01) at step ``cosine_steps``, constant
    after; stepped once per training step. Otherwise the learning rate is multiplied by
    ``lr_decay_per_epoch`` (default 1) at the end of each epoch.
    """
    total = optim.get("cosine_steps")
    if not total:
        decay = float(optim.get("lr_decay_per_epoch", 1.0))
        return torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=decay)
    total = int(total)
    warmup = int(optim.get("warmup_steps", 0) or 0)
    floor = float(optim.get("min_lr_ratio", 0.01))
    if total <= warmup:
        raise ValueError(f"optim.cosine_steps={total} must exceed optim.warmup_steps={warmup}")

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / (total - warmup))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def model_digest(model: nn.Module, buffers: bool = True) -> str:
    """SHA-256 of every parameter and (unless ``buffers=False``) buffer: names, dtypes, shapes
    and bytes."""
    h = hashlib.sha256()
    tensors = model.state_dict() if buffers else dict(model.named_parameters())
    for name, t in tensors.items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        # reshape first: a 0-d tensor (batch norm's num_batches_tracked) cannot be viewed as bytes
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class _Context(StepContext):
    def __init__(self, trainer: Trainer):
        self.trainer = trainer
        self.device = trainer.device
        self.distributed = trainer.dist.enabled
        self.step = 0
        self.epoch = 0

    def autocast(self):
        dtype = self.trainer.amp_dtype
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def optimize(self, name: str, loss: torch.Tensor) -> dict[str, float]:
        t = self.trainer
        optimizer, scaler = t.optimizers[name], t.scalers[name]
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        out = {}
        clip = t.config["optim"].get("grad_clip_norm")
        if clip:
            scaler.unscale_(optimizer)
            params = [p for g in optimizer.param_groups for p in g["params"]]
            norm = torch.nn.utils.clip_grad_norm_(params, float(clip))
            out[f"grad_norm_{name}"] = float(norm)
        scaler.step(optimizer)
        scaler.update()
        return out

    @contextlib.contextmanager
    def frozen(self, *names: str):
        if self.distributed:
            yield
            return
        params = [p for n in names for p in self.trainer.raw_models[n].parameters()
                  if p.requires_grad]
        for p in params:
            p.requires_grad_(False)
        try:
            yield
        finally:
            for p in params:
                p.requires_grad_(True)



def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: the worker leaves SIGINT and SIGTERM from a terminal or
    ``pkill`` to the main process (finish the step, save, stop; it then ends its workers
    itself). A SIGTERM from the main process (DataLoader shutdown, multiprocessing's exit) still
    ends the worker at once: SIGTERM is blocked and a thread takes it with its sender's PID."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = os.getppid()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})

    def take_sigterm() -> None:
        while True:
            if signal.sigwaitinfo({signal.SIGTERM}).si_pid == parent:
                os._exit(0)

    threading.Thread(target=take_sigterm, name="sigterm", daemon=True).start()

class Trainer:
    """Run a ``Task`` as configured.

    Args:
        config: the full configuration (see the module docstring and the task's defaults).
        task: a ``Task`` subclass; default: looked up by ``config["task"]``.
        resume: a checkpoint path, ``"auto"`` (``<output_dir>/checkpoints/last.pt`` if present)
            or None.
        step_callback: called as ``fn(trainer)`` after every optimizer step (tests, hooks).
        overwrite: when not resuming and ``output_dir`` holds an earlier run (checkpoints or
            logs), delete its checkpoints, logs and samples and start afresh; without it such
            a run is refused (see :meth:`claim_output_dir`).
    """

    def __init__(self, config: dict, task: type[Task] | None = None, resume=None,
                 step_callback=None, overwrite: bool = False):
        self.config = config
        self.task_cls = task or get_task(config["task"])
        self.resume = resume
        self.overwrite = overwrite
        self.step_callback = step_callback
        self.stop_signal: int | None = None
        self.lock: FolderLock | None = None
        self.step = 0
        self.epoch = 0
        self.epoch_step = 0

    # ------------------------------------------------------------------ setup

    def _setup(self) -> None:
        cfg = self.config
        dcfg = cfg.get("distributed", {})
        self.dist: DistInfo = init_distributed(cfg.get("device", "auto"),
                                               dcfg.get("backend", "auto"))
        self.device = self.dist.device
        tcfg = cfg["train"]
        if tcfg.get("num_threads"):
            torch.set_num_threads(int(tcfg["num_threads"]))
        self.amp_dtype = resolve_amp_dtype(tcfg.get("amp", "auto"), self.device)
        self.output_dir = Path(cfg.get("output_dir", "runs"))
        self.ckpt_dir = self.output_dir / "checkpoints"
        self._lock_output_dir()
        self.claim_output_dir()

        # Same seed on every rank: identical initial weights (DDP also broadcasts rank 0's).
        seed = int(cfg.get("seed", 0))
        torch.manual_seed(seed)
        import random

        import numpy as np

        random.seed(seed)
        np.random.seed(seed % 2**32)  # noqa: NPY002 (the legacy global generator)

        self.task = self.task_cls(cfg, self.device)
        self.raw_models = {n: m.to(self.device) for n, m in self.task.build_models().items()}
        self.optimizers = self.task.build_optimizers(self.raw_models)
        self.schedulers = {n: build_scheduler(o, cfg["optim"])
                           for n, o in self.optimizers.items()}
        self.per_step_schedule = bool(cfg["optim"].get("cosine_steps"))
        fp16 = self.amp_dtype == torch.float16
        self.scalers = {n: torch.amp.GradScaler(self.device.type, enabled=fp16)
                        for n in self.optimizers}
        ecfg = tcfg.get("ema") or {}
        self.emas = {}
        if ecfg.get("enabled"):
            self.emas = {n: ModelEMA(self.raw_models[n], float(ecfg.get("decay", 0.999)))
                         for n in self.task.ema_models}

        self.train_set, self.val_set = self.task.build_datasets()
        self.batch_size = int(tcfg["batch_size"])
        self.sampler = ResumableDistributedSampler(
            len(self.train_set), self.dist.world_size, self.dist.rank,
            shuffle=bool(tcfg.get("shuffle", True)), seed=seed, drop_last=True)
        self.steps_per_epoch = self.sampler.num_samples // self.batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(f"{len(self.train_set)} training samples over "
                             f"{self.dist.world_size} process(es) give no batch of "
                             f"{self.batch_size}")
        self.loader_generator = torch.Generator()

        resume_path = self._resume_path()
        if resume_path is not None:
            self._load(resume_path)
        if self.dist.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.models = {n: DistributedDataParallel(m, device_ids=ids)
                           for n, m in self.raw_models.items()}
        else:
            self.models = dict(self.raw_models)
        self.ctx = _Context(self)
        self.log = None
        if self.dist.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
            self.log = RunLog(self.output_dir, self.step if resume_path else None,
                              tensorboard=bool(tcfg.get("tensorboard", True)))

    def _lock_output_dir(self) -> None:
        """Take the run folder's lock (rank 0, the only rank that writes the folder, holds it
        for the whole job) and, holding it, clear what a killed writer left half-written. The
        other ranks receive rank 0's outcome, so a refusal stops every rank with its error.

        Raises:
            FolderLockedError: another process holds the folder (its PID is named).
        """
        error = None
        if self.dist.is_main:
            try:
                self.lock = FolderLock(self.output_dir, "facedeblur train").acquire()
                self._recover_interrupted_writes()
            except Exception as exc:  # noqa: BLE001 - passed to the other ranks, raised below
                error = exc
        if self.dist.enabled:
            outcome = [error]
            dist.broadcast_object_list(outcome, src=0)
            error = outcome[0]
        if error is not None:
            raise error

    def _recover_interrupted_writes(self) -> None:
        """Checkpoints: see ``recover_interrupted_saves``. Logs and preview images are
        rewritten whole through fixed temporary names, so theirs are only deleted."""
        recover_interrupted_saves(self.ckpt_dir)
        for leftover in (self.output_dir / "train.csv.tmp", self.output_dir / "val.csv.tmp",
                         *(self.output_dir / "samples").glob(".*.png.tmp")):
            leftover.unlink(missing_ok=True)

    def claim_output_dir(self) -> None:
        """Check that a fresh start (no checkpoint to resume) does not train into an earlier
        run's folder: its logs would be replaced and its step checkpoints mixed with the new
        ones (and pruned in their place). With ``overwrite`` that run's checkpoints, logs and
        samples are deleted instead.

        Raises:
            NotADirectoryError: ``output_dir`` is a file.
            FileExistsError: ``output_dir`` holds a run and ``overwrite`` is off.
        """
        if self.output_dir.exists() and not self.output_dir.is_dir():
            raise NotADirectoryError(f"output_dir {self.output_dir} is a file, not a folder")
        if self._resume_path() is not None:
            return
        last = self.ckpt_dir / "last.pt"
        found = [p for p in (last, *sorted(self.ckpt_dir.glob("step_*.pt")),
                             self.output_dir / "train.csv", self.output_dir / "val.csv")
                 if p.exists()]
        if found and not self.overwrite:
            shown = ", ".join(str(p.relative_to(self.output_dir)) for p in found[:3])
            resume = "continue it with --resume auto, " if last.exists() else ""
            raise FileExistsError(
                f"{self.output_dir} already holds a training run ({shown}); {resume}train into "
                "another folder (-o DIR), or pass --overwrite to delete its checkpoints and "
                "logs and start afresh")
        if self.overwrite:
            if found and self.dist.is_main:
                for folder in ("checkpoints", "tensorboard", "samples"):
                    shutil.rmtree(self.output_dir / folder, ignore_errors=True)
                for name in ("train.csv", "val.csv"):
                    (self.output_dir / name).unlink(missing_ok=True)
            barrier(self.dist)  # every rank, whatever it found: rank 0 may be deleting

    def _resume_path(self):
        if self.resume in (None, False, ""):
            return None
        if self.resume == "auto":
            path = self.ckpt_dir / "last.pt"
            return path if path.exists() else None
        path = Path(self.resume)
        if not path.exists():
            raise FileNotFoundError(f"checkpoint {path} does not exist")
        return path

    # ------------------------------------------------------------------ checkpoints

    def _state(self, rng_states) -> dict:
        return {
            "format": CHECKPOINT_FORMAT,
            "task": self.task.name,
            "config": self.config,
            "step": self.step,
            "epoch": self.epoch,
            "epoch_step": self.epoch_step,
            "world_size": self.dist.world_size,
            "models": {n: m.state_dict() for n, m in self.raw_models.items()},
            "ema": {n: e.module.state_dict() for n, e in self.emas.items()},
            "ema_updates": {n: e.updates for n, e in self.emas.items()},
            "optimizers": {n: o.state_dict() for n, o in self.optimizers.items()},
            "schedulers": {n: s.state_dict() for n, s in self.schedulers.items()},
            "scalers": {n: s.state_dict() for n, s in self.scalers.items()},
            "rng": rng_states,
        }

    def save_checkpoint(self, periodic: bool = False) -> Path | None:
        """Write ``checkpoints/last.pt`` (and a step-numbered copy when ``periodic``).

        Collective under DDP: every rank must call it (each contributes its RNG state).
        """
        rng = capture_rng_state()
        if self.dist.enabled:
            gathered = [None] * self.dist.world_size if self.dist.is_main else None
            dist.gather_object(rng, gathered, dst=0)
            rng = gathered
        else:
            rng = [rng]
        path = None
        if self.dist.is_main:
            state = self._state(rng)
            path = atomic_torch_save(state, self.ckpt_dir / "last.pt")
            if periodic:
                atomic_torch_save(state, self.ckpt_dir / f"step_{self.step:08d}.pt")
                keep = int(self.config["train"].get("keep_checkpoints", 3))
                old = sorted(self.ckpt_dir.glob("step_*.pt"))
                for stale in old[:-keep] if keep > 0 else old:
                    stale.unlink()
        barrier(self.dist)
        return path

    def _load(self, path) -> None:
        state = load_checkpoint(path)
        if state.get("task") != self.task.name:
            raise ValueError(f"{path} is a checkpoint of task {state.get('task')!r}, "
                             f"not {self.task.name!r}")
        if set(state["models"]) != set(self.raw_models):
            raise ValueError(f"{path} holds models {sorted(state['models'])}, this run trains "
                             f"{sorted(self.raw_models)}")
        for n, m in self.raw_models.items():
            m.load_state_dict(state["models"][n])
        for n, e in self.emas.items():
            if n in state.get("ema", {}):
                e.module.load_state_dict(state["ema"][n])
                e.updates = int(state["ema_updates"][n])
            else:  # EMA switched on at resume: start it from the current weights
                e.module.load_state_dict(self.raw_models[n].state_dict())
        for n, o in self.optimizers.items():
            o.load_state_dict(state["optimizers"][n])
        for n, s in self.schedulers.items():
            s.load_state_dict(state["schedulers"][n])
        for n, s in self.scalers.items():
            if n in state.get("scalers", {}):
                s.load_state_dict(state["scalers"][n])
        self.step = int(state["step"])
        self.epoch = int(state["epoch"])
        self.epoch_step = int(state["epoch_step"])
        rng = state.get("rng") or []
        if state.get("world_size") == self.dist.world_size and len(rng) > self.dist.rank:
            restore_rng_state(rng[self.dist.rank])
        elif self.dist.is_main:
            print(f"[resume] world size changed ({state.get('world_size')} -> "
                  f"{self.dist.world_size}): RNG states not restored, the data order of the "
                  "current epoch restarts at the same fraction")
        old_world = int(state.get("world_size") or 1)
        if old_world != self.dist.world_size:
            # Keep the fraction of the epoch already seen (the shards differ, so the order
            # within the epoch is not the one the old run would have used).
            self.epoch_step = self.epoch_step * old_world // self.dist.world_size
        if self.dist.is_main:
            print(f"[resume] {path}: step {self.step}, epoch {self.epoch}, "
                  f"batch {self.epoch_step}/{self.steps_per_epoch}")

    # ------------------------------------------------------------------ signals
    # SIGINT/SIGTERM stop the run through the main process only: a terminal's Ctrl-C and
    # `pkill -f` also reach the DataLoader workers, which ignore them (ignore_stop_signals), so
    # the main process finishes its step and saves instead of failing on a killed worker.

    def _install_signal_handlers(self):
        if threading.current_thread() is not threading.main_thread():
            return {}
        previous = {}

        def handler(signum, frame):
            if self.stop_signal is not None:  # second signal: stop now, without saving
                signal.signal(signum, previous.get(signum) or signal.SIG_DFL)
                raise KeyboardInterrupt
            self.stop_signal = signum
            if self.dist.is_main:
                print(f"\n[signal {signum}] finishing this step, saving a checkpoint, stopping")

        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, handler)
        return previous

    # ------------------------------------------------------------------ validation

    def eval_models(self) -> dict[str, nn.Module]:
        """Unwrapped models with EMA weights where kept (for validation and export)."""
        return {n: (self.emas[n].module if n in self.emas else m)
                for n, m in self.raw_models.items()}

    @torch.no_grad()
    def validate(self) -> dict | None:
        """PSNR/SSIM over the validation set and a preview grid (rank 0; others wait)."""
        if self.val_set is None:
            return None
        result = None
        if self.dist.is_main:
            vcfg = self.config.get("val", {})
            models = self.eval_models()
            modes = {n: m.training for n, m in models.items()}
            for m in models.values():
                m.eval()
            loader = DataLoader(self.val_set, batch_size=int(vcfg.get("batch_size", 4)),
                                shuffle=False, collate_fn=self.task.collate_fn(),
                                num_workers=int(self.config["train"].get("num_workers", 0)),
                                worker_init_fn=ignore_stop_signals)
            max_batches = vcfg.get("max_batches")
            psnrs, ssims = [], []
            with self.ctx.autocast():
                for i, batch in enumerate(loader):
                    if max_batches is not None and i >= int(max_batches):
                        break
                    batch = batch_to(batch, self.device)
                    for pred, target in self.task.validation_pairs(models, batch):
                        pred = pred.float().clamp(0, 1)
                        psnrs.append(_quality.psnr(pred, target.float()).cpu())
                        ssims.append(_quality.ssim(pred, target.float()).cpu())
                    self.task.validation_step(models, batch)
                grid = self.task.preview(models, self.val_set)
            for n, m in models.items():
                m.train(modes[n])
            result = {"step": self.step, "epoch": self.epoch}
            if psnrs:  # tasks without restored images (a parser) report only their own metrics
                result.update(psnr=float(torch.cat(psnrs).mean()),
                              ssim=float(torch.cat(ssims).mean()))
            result.update(self.task.validation_results())
            self.log.log_val(result)
            if grid is not None:
                path = self.output_dir / "samples" / f"step_{self.step:08d}.png"
                save_image(grid, path)
                self.log.log_image("preview", grid, self.step)
        barrier(self.dist)
        return result

    # ------------------------------------------------------------------ main loop

    def _check_replicas(self) -> dict:
        # Parameters only: buffers such as batch-norm running statistics are updated from each
        # rank's own batch and made equal again by DDP, which broadcasts rank 0's at the start
        # of every forward.
        digests = {n: model_digest(m, buffers=False) for n, m in self.raw_models.items()}
        gathered = [None] * self.dist.world_size
        dist.all_gather_object(gathered, digests)
        mismatched = sum(any(g[n] != digests[n] for g in gathered) for n in digests)
        if mismatched:
            raise RuntimeError(f"DDP replicas diverged at step {self.step}: {gathered}")
        return {"replica_mismatch": mismatched}

    def _loader(self) -> DataLoader:
        tcfg = self.config["train"]
        workers = int(tcfg.get("num_workers", 0))
        # A private generator seeded per epoch: worker seeds are reproducible and the global
        # RNG is not consumed when an iterator starts (which would break exact resume).
        self.loader_generator.manual_seed(int(self.config.get("seed", 0)) * 7919 + self.epoch)
        return DataLoader(self.train_set, batch_size=self.batch_size, sampler=self.sampler,
                          num_workers=workers, drop_last=True,
                          collate_fn=self.task.collate_fn(),
                          pin_memory=self.device.type == "cuda",
                          generator=self.loader_generator,
                          worker_init_fn=ignore_stop_signals,
                          persistent_workers=False)

    def fit(self) -> dict:
        """Train until ``train.epochs`` or ``train.max_steps``, or a stop signal.

        Returns:
            ``{"step", "epoch", "stopped_by_signal", "checkpoint", "last_val"}``.

        Raises:
            FolderLockedError: another process is writing ``output_dir``.
            DiskFullError: naming the checkpoint, or else the run folder (logs, previews).
        """
        try:
            self._setup()
            return self._train()
        except Exception as exc:
            full = disk_full_error(exc, Path(self.config.get("output_dir", "runs")))
            if full is None or full is exc:
                raise
            raise full from exc
        finally:
            if self.lock is not None:
                self.lock.release()

    def _train(self) -> dict:
        cfg, tcfg, vcfg = self.config, self.config["train"], self.config.get("val", {})
        epochs = int(tcfg.get("epochs", 1))
        max_steps = tcfg.get("max_steps")
        max_steps = None if max_steps is None else int(max_steps)
        log_every = max(1, int(tcfg.get("log_every", 50)))
        ckpt_every = int(tcfg.get("checkpoint_every", 0) or 0)
        val_every = int(vcfg.get("every_steps", 0) or 0)
        val_every_epochs = int(vcfg.get("every_epochs", 0) or 0)
        check_every = int(cfg.get("distributed", {}).get("check_replicas_every", 0) or 0)
        previous_handlers = self._install_signal_handlers()
        start_step = self.step  # > 0 when resumed
        last_val, last_val_step = None, -1
        running: dict[str, float] = {}
        running_n = 0
        progress = None
        if self.dist.is_main:
            from tqdm.auto import tqdm

            total = epochs * self.steps_per_epoch
            if max_steps is not None:
                total = min(total, max_steps)
            progress = tqdm(total=total, initial=self.step, desc=f"train {self.task.name}",
                            dynamic_ncols=True, disable=not tcfg.get("progress", True))
        for m in self.raw_models.values():
            m.train()
        tick = time.perf_counter()

        def done() -> bool:
            return self.epoch >= epochs or (max_steps is not None and self.step >= max_steps)

        try:
            while not done() and self.stop_signal is None:
                self.sampler.set_epoch(self.epoch)
                self.sampler.set_start(self.epoch_step * self.batch_size)
                if hasattr(self.train_set, "set_epoch"):
                    self.train_set.set_epoch(self.epoch)
                for batch in self._loader():
                    self.ctx.step, self.ctx.epoch = self.step, self.epoch
                    logs = self.task.training_step(self.models, batch_to(batch, self.device),
                                                   self.ctx)
                    self.step += 1
                    self.epoch_step += 1
                    for n, e in self.emas.items():
                        e.update(self.raw_models[n])
                    if check_every and self.dist.enabled and self.step % check_every == 0:
                        logs = {**logs, **self._check_replicas()}
                    for k, v in logs.items():
                        running[k] = running.get(k, 0.0) + float(v)
                    running_n += 1
                    if self.dist.is_main:
                        progress.update(1)
                        if self.step % log_every == 0 or self.step == 1:
                            now = time.perf_counter()
                            row = {"step": self.step, "epoch": self.epoch,
                                   **{f"lr_{n}": o.param_groups[0]["lr"]
                                      for n, o in self.optimizers.items()},
                                   **{k: v / running_n for k, v in running.items()},
                                   "sec_per_step": (now - tick) / running_n}
                            self.log.log_train(row)
                            progress.set_postfix({k: f"{float(v):.4g}" for k, v in logs.items()
                                                  if k.endswith("total")})
                            running, running_n, tick = {}, 0, now
                    if self.per_step_schedule:  # after logging: rows show the step's own LR
                        with warnings.catch_warnings():
                            # An optimizer the task did not use this step (a GAN's D during
                            # generator-only training) keeps to the same schedule.
                            warnings.filterwarnings("ignore", "Detected call of `lr_scheduler")
                            for s in self.schedulers.values():
                                s.step()
                    if self.step_callback is not None:
                        self.step_callback(self)
                    if self.epoch_step == self.steps_per_epoch:
                        self.epoch += 1
                        self.epoch_step = 0
                        if not self.per_step_schedule:
                            for s in self.schedulers.values():
                                s.step()
                        if val_every_epochs and self.epoch % val_every_epochs == 0:
                            last_val, last_val_step = self.validate(), self.step
                    if val_every and self.step % val_every == 0 and last_val_step != self.step:
                        last_val, last_val_step = self.validate(), self.step
                    if ckpt_every and self.step % ckpt_every == 0:
                        self.save_checkpoint(periodic=True)
                    stop = self.stop_signal is not None
                    if self.dist.enabled:
                        stop = all_reduce_max(float(stop), self.dist) > 0
                        if stop and self.stop_signal is None:
                            self.stop_signal = -1  # another rank was signalled
                    if stop or done():
                        break
                    if self.epoch_step == 0:
                        break  # epoch finished: new sampler order and loader
            # No step in this call (a finished run resumed): its end was validated already.
            if (self.stop_signal is None and vcfg.get("at_end", True)
                    and last_val_step != self.step and self.step > start_step):
                last_val = self.validate()
            path = self.save_checkpoint()
        finally:
            for sig, prev in previous_handlers.items():
                signal.signal(sig, prev)
            if progress is not None:
                progress.close()
            if self.log is not None:
                self.log.close()
        return {"step": self.step, "epoch": self.epoch,
                "stopped_by_signal": self.stop_signal, "checkpoint": path, "last_val": last_val}


def save_image(image_chw: torch.Tensor, path) -> Path:
    """Write a [3, H, W] tensor in [0, 1] as an 8-bit PNG (atomically)."""
    import os

    import numpy as np
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    array = (image_chw.detach().float().clamp(0, 1).mul(255).round().byte()
             .permute(1, 2, 0).cpu().numpy())
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(np.ascontiguousarray(array)).save(tmp, format="PNG")
    os.replace(tmp, path)
    return path
