"""One CFMD-GAN training iteration (D step and G step): fused deformable conv vs reference.

The iteration is ``CFMDTask.training_step`` as the trainer runs it: generator forward, the
discriminator update on real and generated pairs, then the generator update with the paper's
losses (LPIPS left out: it does not depend on the backend and needs offline weights), Adam on
both. Only the deformable convolution inside every ContAda block differs between the variants.

Measured per backend and device: time (pytest-benchmark); bytes of tensors saved for backward
(autograd saved-tensor hooks, each storage once, parameters left out: the activation memory a
fused op can save, on any device); on CUDA
the peak allocated memory of one iteration; on CPU the peak resident-memory growth of a second
iteration in a fresh process (activations and gradients: the first iteration allocates the Adam
state; the kernel's peak-RSS mark is reset in between through ``/proc/self/clear_refs``, and
glibc is told to map large blocks so that freed memory leaves the resident set). The fused
variant is skipped while ``facedeblur_ext.ops.modulated_deform_conv2d`` is not registered. A
summary with fused/reference ratios goes to ``$FACEDEBLUR_BENCH_OUT`` (default
``benchmarks/results``) as ``cfmd_<device>.json``.

Sizes: the paper's models (generator widths 32/64/128, 8 ContAda blocks per stage; U-Net
discriminator of Schonfeld et al.) at 256 x 256, batch 8 on CUDA. On CPU the default input is
REDUCED to 64 x 64, batch 2, so that an iteration takes seconds; set CFMD_BENCH_SIZE,
CFMD_BENCH_BATCH and CFMD_BENCH_BLOCKS (ContAda blocks per stage) to change either device (the
size must be a multiple of 64 for the default discriminator);
CFMD_BENCH_AMP=bf16|fp16 runs under autocast; CFMD_BENCH_THREADS sets torch's CPU threads;
CFMD_BENCH_ROUNDS the timed rounds; CFMD_BENCH_RSS=0 skips the CPU memory probe.

Run: ``PYTHONPATH=$PWD:$PWD/python python -m pytest benchmarks/bench_cfmd.py``
"""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from benchutil import DEVICES, write_json_atomic

import facedeblur_ext
from facedeblur_ext.training.cfmd_task import CFMDTask
from facedeblur_ext.training.config import load_config

REPO_ROOT = Path(__file__).resolve().parent.parent
_RESULTS: dict[str, dict] = {}
BACKEND_MODULES = {"reference": "facedeblur_ref", "fused": "facedeblur_ext.ops"}


def _fused_available() -> bool:
    return hasattr(facedeblur_ext.ops, "modulated_deform_conv2d")



def _sizes(device: str) -> dict:
    full = device == "cuda"
    return {
        "size": int(os.environ.get("CFMD_BENCH_SIZE", 256 if full else 64)),
        "batch": int(os.environ.get("CFMD_BENCH_BATCH", 8 if full else 2)),
        "blocks_per_stage": int(os.environ.get("CFMD_BENCH_BLOCKS", 8)),
        "amp": os.environ.get("CFMD_BENCH_AMP", "off"),
    }


class _Context:
    """The trainer's step services, minus DDP: autocast, Adam steps, optional GradScaler."""

    def __init__(self, optimizers, device: str, amp: str):
        self.optimizers = optimizers
        self.device = torch.device(device)
        self.distributed = False
        self.step = self.epoch = 0
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
        self.scalers = {n: torch.amp.GradScaler(device, enabled=amp == "fp16")
                        for n in optimizers}

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    @contextlib.contextmanager
    def frozen(self, *names):
        yield  # the reference and fused runs do the same work either way

    def optimize(self, name, loss):
        opt, scaler = self.optimizers[name], self.scalers[name]
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        return {}


def make_step(backend_name: str, device: str):
    cfg = _sizes(device)
    torch.manual_seed(0)
    config = load_config("cfmd", None, [
        f"model.backend={BACKEND_MODULES[backend_name]}",
        f"model.generator.blocks_per_stage={cfg['blocks_per_stage']}",
        "loss.weights.per=0", "loss.perceptual=none",
    ])
    task = CFMDTask(config, torch.device(device))
    models = {n: m.to(device) for n, m in task.build_models().items()}
    ctx = _Context(task.build_optimizers(models), device, cfg["amp"])
    n, s = cfg["batch"], cfg["size"]
    sharp = torch.rand(n, 3, s, s, device=device)
    batch = {
        "sharp": sharp,
        "blurry": torch.nn.functional.avg_pool2d(sharp, 5, 1, 2, count_include_pad=False),
        "u": torch.linspace(0, 1, n, device=device),
    }

    param_storages = {p.untyped_storage().data_ptr() for m in models.values()
                      for p in m.parameters()}

    def step(saved: list | None = None):
        seen: dict[int, object] = {}

        def pack(t):
            # Count each storage once and leave out the parameters: what autograd keeps alive.
            # The storages are held until the iteration ends so that an address freed by the D
            # step's backward and reused in the G step is not mistaken for the same storage
            # (this inflates the memory of the measuring call, which is not timed).
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if saved is not None and ptr not in seen and ptr not in param_storages:
                seen[ptr] = storage
                saved[0] += storage.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            logs = task.training_step(models, batch, ctx)
        if device == "cuda":
            torch.cuda.synchronize()
        return logs

    return step, cfg


def _rss_probe(backend_name: str) -> int:
    """Peak RSS growth (bytes) of a second CPU iteration, in a fresh process."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(REPO_ROOT), str(REPO_ROOT / "python"), os.environ.get("PYTHONPATH", "")]),
        # Blocks of 1 MiB and more come from mmap and go back to the system when freed, so a
        # transient buffer shows in the peak and not in the baseline after it was freed.
        "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
    out = subprocess.run([sys.executable, __file__, "--rss-probe", backend_name], env=env,
                         capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        raise RuntimeError(f"RSS probe for {backend_name} failed:\n{out.stderr[-2000:]}")
    return int(out.stdout.strip().splitlines()[-1])


BACKENDS = [
    pytest.param("reference", id="reference"),
    pytest.param("fused", id="fused", marks=pytest.mark.skipif(
        not _fused_available(), reason="fused modulated_deform_conv2d not registered")),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend_name", BACKENDS)
def test_cfmd_train_iteration(benchmark, backend_name, device):
    if "CFMD_BENCH_THREADS" in os.environ:
        torch.set_num_threads(int(os.environ["CFMD_BENCH_THREADS"]))
    step, cfg = make_step(backend_name, device)
    try:
        step()  # warm-up: allocator, kernels, Adam state
    except torch.OutOfMemoryError:
        # The reference composition materialises [B, C*K, H*W] sampling columns (and their
        # int64 gather indices) per layer; at the paper's size that can exceed the GPU.
        _RESULTS.setdefault(device, {})[backend_name] = {**cfg, "out_of_memory": True}
        pytest.skip(f"{backend_name} ran out of memory at {cfg}")
    saved = [0]
    step(saved)
    peak = None
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        peak = torch.cuda.max_memory_allocated() - base
    elif os.environ.get("CFMD_BENCH_RSS", "1") != "0":
        peak = _rss_probe(backend_name)
    benchmark.extra_info.update(cfg, saved_for_backward_bytes=saved[0], peak_step_bytes=peak)
    benchmark.pedantic(step, rounds=int(os.environ.get("CFMD_BENCH_ROUNDS", 3)),
                       warmup_rounds=0, iterations=1)
    _RESULTS.setdefault(device, {})[backend_name] = {
        **cfg,
        "median_s": benchmark.stats.stats.median,
        "min_s": benchmark.stats.stats.min,
        "saved_for_backward_bytes": saved[0],
        "peak_step_bytes": peak,
        "peak_kind": "cuda max_memory_allocated growth over one iteration" if device == "cuda"
        else "peak RSS growth over a second iteration in a fresh process",
    }


@pytest.fixture(scope="module", autouse=True)
def _write_summary():
    yield
    out_dir = Path(os.environ.get("FACEDEBLUR_BENCH_OUT", REPO_ROOT / "benchmarks" / "results"))
    for device, results in _RESULTS.items():
        summary = {
            "benchmark": "CFMD-GAN training iteration, D and G steps (fused vs reference "
                         "modulated deformable conv)",
            "device": torch.cuda.get_device_name(0) if device == "cuda"
            else platform.processor() or platform.machine(),
            "device_kind": device,
            "cpu_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "command": " ".join(["PYTHONPATH=$PWD:$PWD/python python -m pytest"] + sys.argv[1:]),
            "env": {k: v for k, v in os.environ.items() if k.startswith("CFMD_BENCH_")},
            "reduced_size": device == "cpu" and _sizes("cpu")["size"] < 256,
            "results": results,
        }
        usable = {k for k, v in results.items() if not v.get("out_of_memory")}
        if {"fused", "reference"} <= usable:
            ref, fused = results["reference"], results["fused"]
            summary["speedup_fused_over_reference"] = ref["median_s"] / fused["median_s"]
            summary["saved_bytes_ratio_fused_over_reference"] = (
                fused["saved_for_backward_bytes"] / ref["saved_for_backward_bytes"])
            if ref["peak_step_bytes"]:
                summary["peak_ratio_fused_over_reference"] = (
                    fused["peak_step_bytes"] / ref["peak_step_bytes"])
        elif "fused" not in results:
            summary["note"] = "fused op not registered in this build: reference only"
        else:
            summary["note"] = "a variant ran out of memory: lower CFMD_BENCH_BATCH/SIZE to compare"
        write_json_atomic(out_dir / f"cfmd_{device}.json", summary)


def _main_rss_probe(backend_name: str) -> None:
    if "CFMD_BENCH_THREADS" in os.environ:
        torch.set_num_threads(int(os.environ["CFMD_BENCH_THREADS"]))
    step, _ = make_step(backend_name, "cpu")
    step()  # allocates the Adam state and warms the allocator

    def status_bytes(key: str) -> int:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024  # kB
        raise RuntimeError(f"{key} not in /proc/self/status")

    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # reset the peak-RSS mark (VmHWM) to the current RSS (Linux >= 4.0)
    before = status_bytes("VmRSS")
    step()
    print(max(0, status_bytes("VmHWM") - before))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--rss-probe":
        _main_rss_probe(sys.argv[2])
    else:
        raise SystemExit("run with pytest (see the module docstring)")
