"""Modulated deformable convolution at CFMD-GAN shapes: ours vs the reference (and torchvision).

CFMD-GAN's generator runs CADC at three scales, batch 8, 3x3 kernels: C=32 at 256x256, C=64
at 128x128 and C=128 at 64x64. Each shape is timed forward (no grad) and forward+backward
(gradients for input, offset, mask, weight and bias), for our op, the pure-PyTorch reference
``facedeblur_ref`` and ``torchvision.ops.deform_conv2d`` where torchvision imports, and the
peak extra memory of one call is measured (CUDA: ``torch.cuda.max_memory_allocated``; CPU:
the peak of the live-allocation total recorded by ``torch.profiler(profile_memory=True)``).

Run (the reference is slow on a small CPU; reduce the problem there and say so)::

    FACEDEBLUR_BENCH_BATCH=1 python -m pytest benchmarks/bench_modulated_deform_conv.py

Environment:
    FACEDEBLUR_BENCH_BATCH     batch size (default 8, the paper's)
    FACEDEBLUR_BENCH_DIVISOR   divide the spatial sizes by this (default 1)
    FACEDEBLUR_BENCH_DEVICES   comma-separated, default "cpu,cuda" (cuda when available)
    FACEDEBLUR_BENCH_THREADS   torch CPU threads (default: torch's)
    FACEDEBLUR_BENCH_ROUNDS    timed rounds per case (default 3; one warm-up round before)
    FACEDEBLUR_BENCH_RESULTS_DIR  where the results file goes (default benchmarks/results;
                               on a lent GPU machine point it at $OUT to get the file back)

Results go to <results dir>/<device>_modulated_deform_conv.json (one entry per run
configuration; rerunning a configuration replaces its entry) with medians, the speedup ratios
and the peak extra memory.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import facedeblur_ref
import pytest
import torch
from benchutil import sync, write_json_atomic

import facedeblur_ext
from facedeblur_ext.ops import modulated_deform_conv2d

try:  # optional peer library
    import torchvision.ops as tv_ops
except Exception:  # noqa: BLE001 - any import failure means "not available"
    tv_ops = None

RESULTS_DIR = Path(os.environ.get("FACEDEBLUR_BENCH_RESULTS_DIR",
                                  Path(__file__).resolve().parent / "results"))
PAPER_SHAPES = [(32, 256), (64, 128), (128, 64)]  # (channels, spatial size), 3x3, batch 8

BATCH = int(os.environ.get("FACEDEBLUR_BENCH_BATCH", "8"))
DIVISOR = int(os.environ.get("FACEDEBLUR_BENCH_DIVISOR", "1"))
ROUNDS = int(os.environ.get("FACEDEBLUR_BENCH_ROUNDS", "3"))
THREADS = os.environ.get("FACEDEBLUR_BENCH_THREADS")
if THREADS:
    torch.set_num_threads(int(THREADS))


def _devices() -> list[str]:
    wanted = os.environ.get("FACEDEBLUR_BENCH_DEVICES", "cpu,cuda").split(",")
    devices = []
    for d in (w.strip() for w in wanted):
        if d == "cpu" or (d == "cuda" and torch.cuda.is_available()
                          and facedeblur_ext.build_info()["with_cuda"]):
            devices.append(d)
    return devices


def _impls(device: str) -> list[tuple[str, object, torch.dtype]]:
    impls = [("ours", modulated_deform_conv2d, torch.float32),
             ("reference", facedeblur_ref.modulated_deform_conv2d, torch.float32)]
    if tv_ops is not None:
        impls.append(("torchvision", tv_ops.deform_conv2d, torch.float32))
    if device == "cuda":
        impls.append(("ours_bf16", modulated_deform_conv2d, torch.bfloat16))
        impls.append(("ours_fp16", modulated_deform_conv2d, torch.float16))
    return impls


def make_inputs(channels: int, size: int, device: str, dtype: torch.dtype, grad: bool):
    gen = torch.Generator().manual_seed(0)
    n, k = BATCH, 3
    size = size // DIVISOR

    def t(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device, dtype).requires_grad_(grad)

    x = t(n, channels, size, size)
    offset = t(n, 2 * k * k, size, size, scale=2.0)  # a few pixels, like trained offsets
    weight = t(channels, channels, k, k, scale=(channels * k * k) ** -0.5)
    bias = t(channels, scale=0.1)
    mask = torch.sigmoid(torch.randn(n, k * k, size, size, generator=gen)).to(device, dtype)
    mask.requires_grad_(grad)
    return x, offset, weight, bias, mask



def _runner(fn, inputs, mode: str, device: str):
    x, offset, weight, bias, mask = inputs

    def forward():
        with torch.no_grad():
            fn(x, offset, weight, bias, (1, 1), (1, 1), (1, 1), mask)
        sync(device)

    def forward_backward():
        for t in inputs:
            t.grad = None
        out = fn(x, offset, weight, bias, (1, 1), (1, 1), (1, 1), mask)
        out.backward(torch.ones_like(out))
        sync(device)

    return forward if mode == "forward" else forward_backward


def peak_extra_bytes(run, device: str) -> int:
    """Peak memory allocated by one call beyond what was live before it (outputs and
    gradients included). CUDA: the caching allocator's peak. CPU: the running total of live
    allocations that torch.profiler records (its "[memory]" events, "Total Allocated")."""
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    with tempfile.TemporaryDirectory() as tmp:
        trace_path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace_path))
        events = json.loads(trace_path.read_text())["traceEvents"]
    memory = sorted((e for e in events if e.get("name") == "[memory]"), key=lambda e: e["ts"])
    if not memory:
        return 0
    before = memory[0]["args"]["Total Allocated"] - memory[0]["args"]["Bytes"]
    return max(e["args"]["Total Allocated"] for e in memory) - before


RESULTS: dict[str, dict] = {}


def _case_id(device, channels, size, mode, impl):
    return f"{device}/C{channels}_{size // DIVISOR}px/{mode}/{impl}"


CASES = [
    pytest.param(device, channels, size, mode, impl_name,
                 id=_case_id(device, channels, size, mode, impl_name))
    for device in _devices()
    for channels, size in PAPER_SHAPES
    for mode in ("forward", "forward_backward")
    for impl_name, _, _ in _impls(device)
]


@pytest.mark.parametrize("device, channels, size, mode, impl_name", CASES)
def test_modulated_deform_conv(benchmark, device, channels, size, mode, impl_name):
    fn, dtype = next((f, d) for name, f, d in _impls(device) if name == impl_name)
    inputs = make_inputs(channels, size, device, dtype, grad=(mode == "forward_backward"))
    run = _runner(fn, inputs, mode, device)
    run()  # warm-up (and lazy initialization) outside the timed rounds
    peak = peak_extra_bytes(run, device)
    benchmark.group = f"{device} C={channels} {size // DIVISOR}px {mode}"
    benchmark.extra_info["peak_extra_bytes"] = peak
    benchmark.pedantic(run, rounds=ROUNDS, iterations=1, warmup_rounds=0)
    RESULTS[_case_id(device, channels, size, mode, impl_name)] = {
        "device": device, "channels": channels, "size": size // DIVISOR, "batch": BATCH,
        "mode": mode, "impl": impl_name, "dtype": str(dtype).replace("torch.", ""),
        "median_s": benchmark.stats.stats.median, "min_s": benchmark.stats.stats.min,
        "peak_extra_bytes": peak,
    }


def _ratios(cases: dict[str, dict]) -> list[dict]:
    out = []
    keys = {(c["device"], c["channels"], c["size"], c["mode"]) for c in cases.values()}
    for device, channels, size, mode in sorted(keys):
        def find(impl, device=device, channels=channels, size=size, mode=mode):
            return cases.get(_case_id(device, channels, size * DIVISOR, mode, impl))

        ours = find("ours")
        if ours is None:
            continue
        row = {"device": device, "channels": channels, "size": size, "mode": mode}
        for peer in ("reference", "torchvision"):
            other = find(peer)
            if other is not None:
                row[f"speedup_vs_{peer}"] = other["median_s"] / ours["median_s"]
                if ours["peak_extra_bytes"] and other["peak_extra_bytes"]:
                    row[f"memory_ratio_vs_{peer}"] = (ours["peak_extra_bytes"]
                                                      / other["peak_extra_bytes"])
        for half in ("ours_bf16", "ours_fp16"):
            other = find(half)
            if other is not None:
                row[f"{half}_speedup_vs_ours_fp32"] = ours["median_s"] / other["median_s"]
        out.append(row)
    return out


def _command() -> str:
    env = [f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("FACEDEBLUR_")]
    return " ".join([*env, "python -m pytest", *sys.argv[1:]])


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _write_results() -> None:
    by_device: dict[str, dict] = {}
    for key, case in RESULTS.items():
        by_device.setdefault(case["device"], {})[key] = case
    for device, cases in by_device.items():
        path = RESULTS_DIR / f"{device}_modulated_deform_conv.json"
        config = {"batch": BATCH, "spatial_divisor": DIVISOR, "rounds": ROUNDS,
                  "threads": torch.get_num_threads() if device == "cpu" else None}
        run = {
            "config": config,
            "reduced_problem": BATCH != 8 or DIVISOR != 1,
            "command": _command(),
            "torch_version": torch.__version__,
            "facedeblur_ext": facedeblur_ext.build_info(),
            "torchvision": None if tv_ops is None else __import__("torchvision").__version__,
            "device_name": (torch.cuda.get_device_name() if device == "cuda"
                            else _cpu_name()),
            "cpu_count": os.cpu_count(),
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "cases": sorted(cases.values(), key=lambda c: (c["channels"], c["mode"], c["impl"])),
            "ratios": _ratios(cases),
        }
        existing = {"benchmark": "modulated_deform_conv2d", "runs": []}
        if path.exists():
            existing = json.loads(path.read_text())
        existing["runs"] = [r for r in existing["runs"] if r["config"] != config] + [run]
        write_json_atomic(path, existing)


@pytest.fixture(scope="module", autouse=True)
def _results_file():
    yield
    if RESULTS:
        _write_results()
