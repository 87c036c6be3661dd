"""Blur synthesis: fused ops against the reference compositions and OpenCV.

Measured per device (pytest-benchmark, median of the rounds):

- ``trajectory``: camera-shake kernels (31 x 31, 2000-step walk), time per kernel, fused
  ``ops.trajectory_kernels`` vs the plain-Python random walk ``facedeblur_ref``
  (target: >= 100x on CPU). Both include drawing their random numbers.
- ``blur``: ``blur_synthesize`` on a 16 x 3 x 256 x 256 float32 batch with per-sample 31 x 31
  motion kernels (length 5..30 px, any angle) and a face-mask blend, vs the grouped
  ``F.conv2d`` composition (reflect pad, conv, blend; target >= 3x on CPU, >= 5x on CUDA) and,
  on CPU, vs a per-image ``cv2.filter2D`` pipeline (must be faster). Also without the mask,
  on uint8, with noise and with a CRF, for the record.
- ``synthesizer``: a ``BlurSynthesizer`` batch (default config, 16 x 3 x 256 x 256).

A summary with the ratios and the targets goes to ``$FACEDEBLUR_BENCH_OUT`` (default
``benchmarks/results``) as ``<device>_blur.json``. BLUR_BENCH_ROUNDS sets the rounds,
BLUR_BENCH_THREADS torch's CPU threads.

Run: ``PYTHONPATH=$PWD:$PWD/python python -m pytest benchmarks/bench_blur.py``
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

import facedeblur_ref as ref
import pytest
import torch
from benchutil import DEVICES, sync, write_json_atomic

from facedeblur_ext import ops
from facedeblur_ext.nn import BlurConfig, BlurSynthesizer

REPO_ROOT = Path(__file__).resolve().parent.parent
ROUNDS = int(os.environ.get("BLUR_BENCH_ROUNDS", 7))
if "BLUR_BENCH_THREADS" in os.environ:
    torch.set_num_threads(int(os.environ["BLUR_BENCH_THREADS"]))

BATCH, CHANNELS, SIZE, KSIZE = 16, 3, 256, 31
TARGETS = {
    "cpu": {"trajectory_vs_python": 100.0, "blur_vs_grouped_conv": 3.0, "blur_vs_cv2": 1.0},
    "cuda": {"blur_vs_grouped_conv": 5.0},
}
_RESULTS: dict[str, dict[str, dict]] = {}






def _record(benchmark, device: str, name: str, per_item: int = 1, **extra) -> None:
    stats = benchmark.stats.stats
    _RESULTS.setdefault(device, {})[name] = {
        "median_s": stats.median / per_item,
        "min_s": stats.min / per_item,
        "rounds": stats.rounds,
        **({"per": f"1 of {per_item}"} if per_item > 1 else {}),
        **extra,
    }


def _batch(device: str):
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(BATCH, CHANNELS, SIZE, SIZE, generator=gen)
    lengths = 5 + 25 * torch.rand(BATCH, generator=gen)
    angles = 360 * torch.rand(BATCH, generator=gen)
    # a soft elliptic "face" mask
    c = (torch.arange(SIZE) + 0.5) / SIZE
    yy, xx = torch.meshgrid(c, c, indexing="ij")
    r = ((yy - 0.55) / 0.35) ** 2 + ((xx - 0.5) / 0.28) ** 2
    mask = torch.clamp((1.2 - r) / 0.4, 0, 1).expand(BATCH, 1, SIZE, SIZE).contiguous()
    kernels = ops.motion_kernels(lengths, angles, KSIZE)
    return images.to(device), kernels.to(device), mask.to(device)


# --------------------------------------------------------------------------------------
# Trajectory kernels
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["fused", "python"])
def test_trajectory_kernels(benchmark, device, impl):
    if impl == "python" and device == "cuda":
        pytest.skip("the Python walk runs on the CPU")
    n = 256 if impl == "fused" else 2
    gen = torch.Generator(device).manual_seed(0)
    fn = ops.trajectory_kernels if impl == "fused" else ref.trajectory_kernels

    def run():
        out = fn(n, KSIZE, generator=gen, device=device)
        sync(device)
        return out

    benchmark.extra_info.update(kernels_per_round=n, size=KSIZE, num_steps=2000)
    benchmark.pedantic(run, rounds=ROUNDS if impl == "fused" else 3, warmup_rounds=1)
    _record(benchmark, device, f"trajectory_{impl}", per_item=n)


# --------------------------------------------------------------------------------------
# blur_synthesize
# --------------------------------------------------------------------------------------


def _cv2_pipeline(images, kernels, mask):
    """The usual per-image OpenCV loop: to HWC numpy, filter2D with the flipped kernel
    (BORDER_REFLECT_101 is its default), blend with the mask, back to a tensor."""
    import cv2
    import numpy as np

    x = images.permute(0, 2, 3, 1).numpy()
    k = kernels.flip(-1, -2).numpy()
    m = mask[:, 0, :, :, None].numpy()
    out = np.empty_like(x)
    for i in range(x.shape[0]):
        blurred = cv2.filter2D(x[i], -1, k[i], borderType=cv2.BORDER_REFLECT_101)
        out[i] = m[i] * blurred + (1 - m[i]) * x[i]
    return torch.from_numpy(out).permute(0, 3, 1, 2)


BLUR_CASES = {
    "fused": lambda x, k, m: ops.blur_synthesize(x, k, mask=m),
    "grouped_conv": lambda x, k, m: ref.blur_synthesize(x, k, mask=m),
    "cv2": _cv2_pipeline,
    "fused_nomask": lambda x, k, m: ops.blur_synthesize(x, k),
    "fused_uint8": lambda x, k, m: ops.blur_synthesize((x * 255).to(torch.uint8), k, mask=m),
    "fused_noise": lambda x, k, m: ops.blur_synthesize(x, k, mask=m, noise_sigma=0.02),
    "fused_crf": lambda x, k, m: ops.blur_synthesize(x, k, mask=m, crf_gamma=2.2),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", list(BLUR_CASES))
def test_blur_synthesize(benchmark, device, impl):
    if impl == "cv2":
        if device == "cuda":
            pytest.skip("OpenCV runs on the CPU")
        pytest.importorskip("cv2")
    images, kernels, mask = _batch(device)
    if impl == "fused_uint8":  # time the blur, not the conversion
        images = (images * 255).to(torch.uint8)
        fn = lambda: ops.blur_synthesize(images, kernels, mask=mask)  # noqa: E731
    else:
        fn = lambda: BLUR_CASES[impl](images, kernels, mask)  # noqa: E731

    def run():
        out = fn()
        sync(device)
        return out

    benchmark.extra_info.update(batch=list(images.shape), kernel=KSIZE,
                                taps_mean=float((kernels > 0).sum(dim=(1, 2)).float().mean()))
    benchmark.pedantic(run, rounds=ROUNDS if impl != "grouped_conv" else max(3, ROUNDS // 2),
                       warmup_rounds=1)
    _record(benchmark, device, f"blur_{impl}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["fused", "reference"])
def test_blur_synthesizer(benchmark, device, impl):
    images, _, mask = _batch(device)
    synth = BlurSynthesizer(BlurConfig(), torch.Generator(device).manual_seed(0),
                            backend=None if impl == "fused" else ref)

    def run():
        out = synth(images, mask=mask)
        sync(device)
        return out

    benchmark.pedantic(run, rounds=ROUNDS if impl == "fused" else 3, warmup_rounds=1)
    _record(benchmark, device, f"synthesizer_{impl}")


# --------------------------------------------------------------------------------------
# Summary
# --------------------------------------------------------------------------------------


def _ratio(results: dict, slow: str, fast: str) -> float | None:
    if slow in results and fast in results:
        return results[slow]["median_s"] / results[fast]["median_s"]
    return None


@pytest.fixture(scope="module", autouse=True)
def _write_summary():
    yield
    out_dir = Path(os.environ.get("FACEDEBLUR_BENCH_OUT", REPO_ROOT / "benchmarks" / "results"))
    for device, results in _RESULTS.items():
        ratios = {
            "trajectory_vs_python": _ratio(results, "trajectory_python", "trajectory_fused"),
            "blur_vs_grouped_conv": _ratio(results, "blur_grouped_conv", "blur_fused"),
            "blur_vs_cv2": _ratio(results, "blur_cv2", "blur_fused"),
            "synthesizer_vs_reference": _ratio(results, "synthesizer_reference",
                                               "synthesizer_fused"),
        }
        targets = {
            name: {"target": target, "measured": ratios.get(name),
                   "met": None if ratios.get(name) is None else ratios[name] >= target}
            for name, target in TARGETS.get(device, {}).items()
        }
        summary = {
            "benchmark": "blur synthesis (fused vs grouped-conv composition, Python walk, cv2)",
            "device": torch.cuda.get_device_name(0) if device == "cuda"
            else (platform.processor() or platform.machine()),
            "device_kind": device,
            "cpu_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
            "command": " ".join(["PYTHONPATH=$PWD:$PWD/python python -m pytest"] + sys.argv[1:]),
            "setup": {"batch": [BATCH, CHANNELS, SIZE, SIZE], "kernel_size": KSIZE,
                      "motion_length_px": [5, 30], "rounds": ROUNDS},
            "ratios": ratios,
            "targets": targets,
            "results": results,
        }
        write_json_atomic(out_dir / f"{device}_blur.json", summary)
