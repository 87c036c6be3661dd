"""One SNADNet generator training step: fused separable norm vs the reference composition.

The step is what the SNAD backend changes: generator forward (parsing map -> 8 SNAD layers),
``120 * multi-region L1 + texture L1``, backward and an Adam update. The adversarial term is
left out on purpose: the discriminator does not depend on the backend and would only dilute
the ratio.

Measured per backend and device: time (pytest-benchmark), bytes of tensors saved for backward
(autograd's saved-tensor hooks: the activation memory a fused op can save, on any device) and,
on CUDA, the peak allocated memory of one step. The fused variant is skipped when
``facedeblur_ext.ops.separable_norm`` is not registered. A summary with the fused/reference
ratios is written to ``$FACEDEBLUR_BENCH_OUT`` (default ``benchmarks/results``) as
``snadnet_<device>.json``.

Sizes: the paper's (width 64, 256 px, batch 8) on CUDA. On CPU the default is reduced
(width 16, 64 px, batch 2) so that it runs in seconds; override with the environment variables
SNADNET_BENCH_WIDTH, SNADNET_BENCH_SIZE, SNADNET_BENCH_BATCH (both devices);
SNADNET_BENCH_THREADS sets torch's CPU threads (on a shared, loaded machine 1 thread avoids
OpenMP spin-waiting, which made 2-thread timings vary 10x), SNADNET_BENCH_ROUNDS the rounds.

Run: ``PYTHONPATH=$PWD:$PWD/python python -m pytest benchmarks/bench_snadnet.py``
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

import facedeblur_ref
import pytest
import torch
import torch.nn.functional as F
from benchutil import DEVICES, write_json_atomic

import facedeblur_ext
from facedeblur_ext.losses.snadnet import multi_region_reconstruction_loss, texture_loss
from facedeblur_ext.models.snadnet import SNADNetGenerator

REPO_ROOT = Path(__file__).resolve().parent.parent
_RESULTS: dict[str, dict] = {}


def _fused_available() -> bool:
    return hasattr(facedeblur_ext.ops, "separable_norm")



def _sizes(device: str) -> dict:
    full = device == "cuda"
    return {
        "width": int(os.environ.get("SNADNET_BENCH_WIDTH", 64 if full else 16)),
        "size": int(os.environ.get("SNADNET_BENCH_SIZE", 256 if full else 64)),
        "batch": int(os.environ.get("SNADNET_BENCH_BATCH", 8 if full else 2)),
    }


def _ellipse_labels(n: int, size: int, device) -> torch.Tensor:
    """Face-like labels (parts, skin, hair, background) from nested ellipses, for timing only."""
    c = (torch.arange(size, device=device) + 0.5) / size
    yy, xx = torch.meshgrid(c, c, indexing="ij")
    r = ((yy - 0.55) / 0.38) ** 2 + ((xx - 0.5) / 0.3) ** 2
    labels = torch.full((size, size), 3, dtype=torch.long, device=device)
    labels[r < 1.6] = 2
    labels[r < 1.0] = 1
    labels[r < 0.15] = 0
    return labels.expand(n, size, size).contiguous()


def _make_step(backend, device: str):
    cfg = _sizes(device)
    torch.manual_seed(0)
    gen = SNADNetGenerator(width=cfg["width"], backend=backend).to(device)
    opt = torch.optim.Adam(gen.parameters(), lr=2e-4, betas=(0.5, 0.999))
    n, s = cfg["batch"], cfg["size"]
    sharp = torch.rand(n, 3, s, s, device=device)
    blurry = F.avg_pool2d(F.pad(sharp, (2, 2, 2, 2), mode="replicate"), 5, 1)
    labels = _ellipse_labels(n, s, device)
    masks = F.one_hot(labels, 4).permute(0, 3, 1, 2).float()
    parsing = masks  # the parser's one-hot output

    def step(count_saved: list | None = None):
        def pack(t):
            if count_saved is not None:
                count_saved[0] += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out, textures = gen(blurry, parsing, return_textures=True)
            loss = 120.0 * multi_region_reconstruction_loss(out, sharp, masks)
            loss = loss + texture_loss(textures, sharp)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device == "cuda":
            torch.cuda.synchronize()
        return loss

    return step, cfg


BACKENDS = [
    pytest.param("reference", id="reference"),
    pytest.param("fused", id="fused", marks=pytest.mark.skipif(
        not _fused_available(), reason="fused separable_norm op not registered")),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend_name", BACKENDS)
def test_generator_train_step(benchmark, backend_name, device):
    backend = facedeblur_ref if backend_name == "reference" else None
    if "SNADNET_BENCH_THREADS" in os.environ:
        torch.set_num_threads(int(os.environ["SNADNET_BENCH_THREADS"]))
    step, cfg = _make_step(backend, device)
    step()  # warm-up (allocator, kernels, Adam state)
    saved = [0]
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    step(saved)
    peak = (torch.cuda.max_memory_allocated() - base) if device == "cuda" else None
    benchmark.extra_info.update(cfg, saved_for_backward_bytes=saved[0], cuda_peak_step_bytes=peak)
    benchmark.pedantic(step, rounds=int(os.environ.get("SNADNET_BENCH_ROUNDS", 5)),
                       warmup_rounds=1, iterations=1)
    _RESULTS.setdefault(device, {})[backend_name] = {
        **cfg,
        "median_s": benchmark.stats.stats.median,
        "min_s": benchmark.stats.stats.min,
        "saved_for_backward_bytes": saved[0],
        "cuda_peak_step_bytes": peak,
    }


@pytest.fixture(scope="module", autouse=True)
def _write_summary():
    yield
    out_dir = Path(os.environ.get("FACEDEBLUR_BENCH_OUT", REPO_ROOT / "benchmarks" / "results"))
    for device, results in _RESULTS.items():
        summary = {
            "benchmark": "SNADNet generator training step (fused SNAD vs reference)",
            "device": torch.cuda.get_device_name(0) if device == "cuda" else platform.processor()
            or platform.machine(),
            "device_kind": device,
            "cpu_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "command": " ".join(["PYTHONPATH=$PWD:$PWD/python python -m pytest"] + sys.argv[1:]),
            "env": {k: v for k, v in os.environ.items() if k.startswith("SNADNET_BENCH_")},
            "results": results,
        }
        if "fused" in results and "reference" in results:
            ref, fused = results["reference"], results["fused"]
            summary["speedup_fused_over_reference"] = ref["median_s"] / fused["median_s"]
            summary["saved_bytes_ratio_fused_over_reference"] = (
                fused["saved_for_backward_bytes"] / ref["saved_for_backward_bytes"])
            if ref["cuda_peak_step_bytes"]:
                summary["cuda_peak_ratio_fused_over_reference"] = (
                    fused["cuda_peak_step_bytes"] / ref["cuda_peak_step_bytes"])
        else:
            summary["note"] = "fused op not registered in this build: reference only"
        write_json_atomic(out_dir / f"snadnet_{device}.json", summary)
