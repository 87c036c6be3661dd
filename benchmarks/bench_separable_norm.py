"""Benchmark: fused separable normalization + adaptive denormalization vs the reference.

Shapes are SNADNet's decoder maps (N = 8; C = 64 at 128x128, 128 at 64x64, 256 at 32x32) with
R = 2 (face / background, as the paper) and R = 4 regions, per-pixel gamma and beta (the paper's
AD), hard masks from a label map. Three implementations:

* ``fused``: ``facedeblur_ext.ops.separable_norm``;
* ``reference``: ``facedeblur_ref.separable_norm``, the PyTorch composition;
* ``instance_norm``: ``F.instance_norm(x) * gamma + beta``, the bandwidth yardstick: the same
  denormalization after a plain (one-region) normalization done by PyTorch's native kernel.

Modes: ``forward`` and ``forward+backward`` (gradients for x, gamma and beta; the masks come
from labels and need none). Achieved bandwidth counts the bytes the op must move at least:
forward reads x, gamma, beta and the masks and writes out; the backward reads grad_out, x,
gamma and the masks and writes grad_x, grad_gamma and grad_beta.

Script mode writes a results file (the lead's numbers come from here):

    python benchmarks/bench_separable_norm.py --device cpu \
        --out benchmarks/results/cpu_separable_norm.json
    python benchmarks/bench_separable_norm.py --device cuda --dtype float16 \
        --out benchmarks/results/cuda_separable_norm.json

pytest-benchmark mode (one test per implementation, mode and shape):

    pytest benchmarks/bench_separable_norm.py --benchmark-only
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import facedeblur_ref
import pytest
import torch
import torch.nn.functional as F
from benchutil import sync, write_json_atomic

import facedeblur_ext
from facedeblur_ext import ops

SHAPES = [(8, 64, 128, 128), (8, 128, 64, 64), (8, 256, 32, 32)]
REGIONS = [2, 4]
IMPLS = ["fused", "reference", "instance_norm"]
MODES = ["forward", "forward+backward"]


def make_inputs(shape, regions, device, dtype, requires_grad):
    n, c, h, w = shape
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
    labels = torch.randint(0, regions, (n, h, w), generator=gen).to(device)
    masks = ops.labels_to_masks(labels, regions, dtype=dtype)
    gamma = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
    beta = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
    for t in (x, gamma, beta):
        t.requires_grad_(requires_grad)
    return x, masks, gamma, beta


def forward_fn(impl):
    if impl == "fused":
        return lambda x, m, g, b: ops.separable_norm(x, m, g, b)
    if impl == "reference":
        return lambda x, m, g, b: facedeblur_ref.separable_norm(x, m, g, b)
    if impl == "instance_norm":
        return lambda x, m, g, b: F.instance_norm(x, eps=1e-5) * g + b
    raise ValueError(impl)


def make_step(impl, mode, inputs):
    fwd = forward_fn(impl)
    x, masks, gamma, beta = inputs
    if mode == "forward":
        def step():
            with torch.no_grad():
                return fwd(x, masks, gamma, beta)
        return step
    grad_out = torch.randn_like(x)

    def step():
        out = fwd(x, masks, gamma, beta)
        return torch.autograd.grad(out, (x, gamma, beta), grad_out)
    return step


def min_bytes(shape, regions, mode, dtype):
    n, c, h, w = shape
    elem = torch.tensor([], dtype=dtype).element_size()
    ncp, nrp = n * c * h * w, n * regions * h * w
    forward = 4 * ncp + nrp
    backward = 7 * ncp + nrp
    return elem * (forward if mode == "forward" else forward + backward)



def time_step(step, device, repeats, warmup=1):
    for _ in range(warmup):
        step()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - start)
    return times


def run(device, dtype, repeats, impls, progress=True):
    results = []
    cases = [(s, r, m) for s in SHAPES for r in REGIONS for m in MODES]
    for shape, regions, mode in cases:
        inputs = make_inputs(shape, regions, device, dtype, mode != "forward")
        row = {"shape": list(shape), "regions": regions, "mode": mode, "impls": {}}
        for impl in impls:
            times = time_step(make_step(impl, mode, inputs), device, repeats)
            median = statistics.median(times)
            row["impls"][impl] = {
                "median_ms": median * 1e3,
                "min_ms": min(times) * 1e3,
                "repeats": len(times),
                "gb_per_s": min_bytes(shape, regions, mode, dtype) / median / 1e9,
            }
        fused = row["impls"].get("fused", {}).get("median_ms")
        if fused:
            for other in ("reference", "instance_norm"):
                if other in row["impls"]:
                    row[f"speedup_vs_{other}"] = row["impls"][other]["median_ms"] / fused
        results.append(row)
        if progress:
            line = ", ".join(f"{k} {v['median_ms']:.2f} ms ({v['gb_per_s']:.1f} GB/s)"
                             for k, v in row["impls"].items())
            print(f"{shape} R={regions} {mode}: {line}", file=sys.stderr, flush=True)
        del inputs
    return results


def summary(results):
    out = {}
    for mode in MODES:
        rows = [r for r in results if r["mode"] == mode]
        for key in ("speedup_vs_reference", "speedup_vs_instance_norm"):
            vals = [r[key] for r in rows if key in r]
            if vals:
                out[f"{mode}: min {key}"] = min(vals)
                out[f"{mode}: geomean {key}"] = statistics.geometric_mean(vals)
    return out


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32",
                        choices=["float32", "float64", "float16", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--impl", action="append", choices=IMPLS,
                        help="implementation to run (repeatable; default: all)")
    parser.add_argument("--out", type=Path, help="write the results JSON here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    results = run(device, dtype, args.repeats, args.impl or IMPLS)
    report = {
        "benchmark": "separable_norm",
        "command": " ".join(["python", *map(shlex.quote, sys.argv)]),
        "device": (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else f"{cpu_model()} ({os.cpu_count()} cpus visible)"),
        "device_type": device.type,
        "torch_threads": torch.get_num_threads() if device.type == "cpu" else None,
        "dtype": args.dtype,
        "torch_version": torch.__version__,
        "build_info": facedeblur_ext.build_info(),
        "bytes_model": "forward 4*N*C*H*W + N*R*H*W elements; backward adds "
                       "7*N*C*H*W + N*R*H*W (x, gamma, beta, masks, out / grads)",
        "results": results,
        "summary": summary(results),
    }
    if args.out:
        write_json_atomic(args.out, report)
    print(json.dumps(report["summary"], indent=2))
    return 0


# ---- pytest-benchmark ------------------------------------------------------------------------

def _bench_devices():
    devices = ["cpu"]
    if torch.cuda.is_available() and facedeblur_ext.build_info()["with_cuda"]:
        devices.append("cuda")
    return devices


@pytest.mark.parametrize("device", _bench_devices())
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("regions", REGIONS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("impl", IMPLS)
def test_separable_norm(benchmark, impl, shape, regions, mode, device):
    device = torch.device(device)
    inputs = make_inputs(shape, regions, device, torch.float32, mode != "forward")
    step = make_step(impl, mode, inputs)

    def timed():
        step()
        sync(device)

    benchmark.group = f"{mode} {shape} R={regions} {device.type}"
    benchmark.extra_info["gb_per_s_numerator_bytes"] = min_bytes(shape, regions, mode,
                                                                torch.float32)
    benchmark.pedantic(timed, rounds=3, warmup_rounds=1)


if __name__ == "__main__":
    sys.exit(main())
