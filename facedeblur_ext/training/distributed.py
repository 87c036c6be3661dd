"""Process-group setup for ``torchrun`` (DDP on NCCL for CUDA, gloo for CPU).

Exit: a process that joined a group leaves it with :func:`shutdown_distributed` (``facedeblur
train`` does on every path; an ``atexit`` hook does it for other callers). A gloo group left
for the interpreter's teardown to destroy still has worker threads holding finished work with
its tensors; freeing those while the interpreter is torn down can abort the process
("terminate called without an active exception", SIGABRT) after its work is done, and torchrun
then reports a failure (pytorch/pytorch#190489; #179291 proposed the same atexit hook).

Orphans: torchrun starts each worker in its own session, so killing only the launcher (SIGKILL)
would leave the workers training; a worker asks the kernel for a signal when its launcher dies
(``PR_SET_PDEATHSIG``) and turns it into one SIGTERM, which the trainer handles like any
SIGTERM (finish the step, save a checkpoint, stop).
"""

from __future__ import annotations

import atexit
import ctypes
import os
import signal
import sys
import threading
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["DistInfo", "all_reduce_max", "barrier", "init_distributed", "shutdown_distributed",
           "stop_with_launcher"]


@dataclass
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _pick_device(device: str, local_rank: int) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device cuda requested but no CUDA device is available")
        if dev.index is None:
            dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    return dev


def init_distributed(device: str = "auto", backend: str = "auto") -> DistInfo:
    """Join the process group that ``torchrun`` describes in the environment, if any.

    Args:
        device: ``auto`` (CUDA if available), ``cpu``, ``cuda`` or ``cuda:N``; under torchrun a
            bare ``cuda`` becomes ``cuda:LOCAL_RANK``.
        backend: ``auto`` (NCCL for CUDA, gloo for CPU) or a torch.distributed backend name.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if LAUNCHER_ENV in os.environ:
        stop_with_launcher()
    dev = _pick_device(device, local_rank)
    if world > 1 and not dist.is_initialized():
        if backend == "auto":
            backend = "nccl" if dev.type == "cuda" else "gloo"
        kwargs = {"device_id": dev} if dev.type == "cuda" else {}
        dist.init_process_group(backend=backend, **kwargs)
        atexit.register(shutdown_distributed, wait=False)
    return DistInfo(rank, local_rank, world, dev)


#: Set by torchrun in its workers' environment.
LAUNCHER_ENV = "TORCHELASTIC_RUN_ID"
#: What the kernel sends when the launcher dies (see :func:`stop_with_launcher`).
LAUNCHER_GONE_SIGNAL = signal.SIGUSR2
_PR_SET_PDEATHSIG = 1


def stop_with_launcher() -> bool:
    """Receive one SIGTERM when this process's parent (torchrun) dies.

    The kernel sends the parent-death signal each time the parent *thread* that started this
    process exits, and the process is handed to the launcher's next thread until none is
    left: a killed launcher signals several times, and a launcher thread that merely ends
    signals once. A second SIGTERM would stop the trainer at once, without a checkpoint, so the
    kernel sends ``LAUNCHER_GONE_SIGNAL`` and its handler sends SIGTERM once, and only when the
    parent process has changed (the launcher is gone, not one of its threads).

    Returns:
        False where this is not possible (not Linux, or not the main thread).
    """
    if (not sys.platform.startswith("linux")
            or threading.current_thread() is not threading.main_thread()):
        return False
    fired = []
    launcher = os.getppid()

    def launcher_gone(signum, frame):
        # A launcher thread that exits while the launcher lives signals too: then this process
        # is handed to another of its threads and its parent process is unchanged.
        if os.getppid() == launcher:
            return
        if not fired:
            fired.append(signum)
            os.kill(os.getpid(), signal.SIGTERM)

    signal.signal(LAUNCHER_GONE_SIGNAL, launcher_gone)
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.prctl(_PR_SET_PDEATHSIG, int(LAUNCHER_GONE_SIGNAL), 0, 0, 0) == 0


def shutdown_distributed(wait: bool = True) -> None:
    """Leave the process group, if this process joined one.

    Args:
        wait: first wait at a barrier for every rank to get here, so that no rank tears down
            its connections while another still uses them: the normal end of a job. Pass False
            on an error path, where another rank may never get here.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    try:
        if wait and dist.get_world_size() > 1:
            dist.barrier()
    finally:
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def all_reduce_max(value: float, info: DistInfo) -> float:
    """The maximum of ``value`` over all ranks (the value itself without DDP)."""
    if not info.enabled:
        return value
    backend = dist.get_backend()
    dev = info.device if backend == "nccl" else torch.device("cpu")
    t = torch.tensor([float(value)], dtype=torch.float64, device=dev)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())
