"""DataLoader throughput of the face data pipeline (samples/s at 256x256, 2 workers).

For each dataset mode the same samples are loaded twice: a *cold* pass with an empty face
analysis cache (MediaPipe runs on every new image or frame) and a *warm* pass that reads the
cached analyses, which is the steady state of training from the second epoch on. The ratio
warm / cold is what the cache buys.

Modes: ``kernel`` (whole-image kernel blur), ``face-only`` (thesis 002), ``snadnet`` (kernel blur
plus regions and parsing labels), ``frames`` (CRF frame averaging + FMR, N = 5..13),
``motion`` (continuous motion from each still face, ``MotionBlurMixDataset`` with only motion
samples: 48 warped sub-frames averaged, N = 5..13 moments, one target) and ``motion-mix`` (the
same dataset as the default model's recipe draws it: half motion, half kernel blur, then the
noise/JPEG mix). Each mode's warm throughput is also given relative to ``kernel`` measured in
the same run (``warm_vs_kernel``): ratios from one run hold on a loaded machine where the
absolute numbers do not.

The kernel modes use ``facedeblur_ext.nn.BlurSynthesizer`` when it exists, otherwise a stand-in
(a random 21x21 line kernel applied with a grouped ``conv2d``, roughly the cost of a
straightforward synthesizer); the results say which.

Run (writes benchmarks/results/cpu_data.json)::

    PYTHONPATH=$PWD:$PWD/python python benchmarks/bench_data.py
    PYTHONPATH=$PWD:$PWD/python python -m pytest benchmarks/bench_data.py   # pytest-benchmark

Data: the shared data set when present (FFHQ and CelebA-HQ crops, HDTF talking-head videos),
else the faces and frames bundled in the repository.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parent.parent


def _shared_data() -> Path:
    """$FACEDEBLUR_SHARED_DATA, else ../shared/data next to the checkout (or next to the
    folder of worktrees holding it)."""
    env = os.environ.get("FACEDEBLUR_SHARED_DATA")
    if env:
        return Path(env)
    for base in (REPO_ROOT.parent, REPO_ROOT.parent.parent):
        if (base / "shared" / "data").is_dir():
            return base / "shared" / "data"
    return REPO_ROOT.parent / "shared" / "data"


SHARED = _shared_data()
RESULTS = REPO_ROOT / "benchmarks" / "results" / "cpu_data.json"
MODES = ("kernel", "face-only", "snadnet", "frames", "motion", "motion-mix")
CROP = 256
#: Motion modes: the still's short side is brought to this, so a 256 crop has room for the
#: motion inside it (the data set shrinks motions that do not fit).
MOTION_BASE = CROP + 32
WORKERS = 2
BATCH = 8


class StandInSynthesizer(torch.nn.Module):
    """Random linear motion kernels (21x21) applied per sample with a grouped conv2d."""

    def __init__(self, size: int = 21):
        super().__init__()
        self.size = size
        self.generator = None

    def forward(self, images, mask=None, return_info=False):
        n, c, h, w = images.shape
        k = self.size
        length = 3 + (k - 3) * torch.rand(n, generator=self.generator)
        angle = torch.pi * torch.rand(n, generator=self.generator)
        t = torch.linspace(-0.5, 0.5, 4 * k)
        xs = (k // 2) + t[None] * length[:, None] * torch.cos(angle)[:, None]
        ys = (k // 2) + t[None] * length[:, None] * torch.sin(angle)[:, None]
        kernels = torch.zeros(n, k * k)
        idx = (ys.round().clamp(0, k - 1) * k + xs.round().clamp(0, k - 1)).long()
        kernels.scatter_add_(1, idx, torch.ones_like(xs))
        kernels = (kernels / kernels.sum(1, keepdim=True)).view(n, k, k)
        pad = k // 2
        x = F.pad(images, (pad,) * 4, mode="reflect").reshape(1, n * c, h + 2 * pad,
                                                                w + 2 * pad)
        weight = kernels.flip(-1, -2).repeat_interleave(c, 0)[:, None]
        out = F.conv2d(x, weight, groups=n * c).view(n, c, h, w)
        if mask is not None:
            out = mask * out + (1 - mask) * images
        out = (out + 0.01 * torch.randn(out.shape, generator=self.generator)).clamp(0, 1)
        return (out, {"kernels": kernels, "length": length, "angle": angle}) if return_info \
            else out


def synthesizer():
    try:
        from facedeblur_ext.nn import BlurSynthesizer

        try:
            return BlurSynthesizer(), "facedeblur_ext.nn.BlurSynthesizer (default config)"
        except TypeError:
            return BlurSynthesizer(None), "facedeblur_ext.nn.BlurSynthesizer (default config)"
    except ImportError:
        return StandInSynthesizer(), "stand-in: 21x21 random line kernel, grouped conv2d"


def image_inputs() -> tuple[list[Path], str]:
    ffhq = sorted((SHARED / "faces" / "ffhq_samples").glob("*.png"))
    hq = sorted((SHARED / "faces" / "celeba_hq_stargan_v2").glob("*.jpg"))
    if ffhq and hq:
        return ffhq + hq[:30], ("shared: faces/ffhq_samples (256) + 30 of "
                                "celeba_hq_stargan_v2 (1024)")
    assets = sorted((REPO_ROOT / "facedeblur_ext" / "assets" / "faces").glob("*.png"))
    return assets, "repo: facedeblur_ext/assets/faces"


def frame_inputs() -> tuple[list[Path], str]:
    videos = sorted((SHARED / "face_video" / "hdtf_via_sadtalker").glob("*.mp4"))
    if videos:
        return videos, "shared: face_video/hdtf_via_sadtalker (4 x 200 frames, 512x512 mp4)"
    return [REPO_ROOT / "tests" / "data" / "frames_vd001"], "repo: tests/data/frames_vd001"


def make_dataset(mode: str, cache_dir: Path):
    from facedeblur_ext.data import (
        FaceAnalyzer,
        FrameStackDataset,
        KernelBlurDataset,
        SNADNetDataset,
    )

    analyzer = FaceAnalyzer(cache_dir=cache_dir, warn=False)
    if mode == "frames":
        sources, what = frame_inputs()
        # (the 7 bundled frames cannot hold 13: fall back to 5..7 there)
        num_frames = (5, 13) if sources[0].suffix else (5, 7)
        ds = FrameStackDataset(sources, num_frames=num_frames, analyzer=analyzer,
                               crop_size=CROP, seed=0)
        return ds, what, None
    images, what = image_inputs()
    if mode in ("motion", "motion-mix"):
        from facedeblur_ext.data import MotionBlurMixDataset

        ds = MotionBlurMixDataset(images, analyzer=analyzer, crop_size=CROP,
                                  base_size=MOTION_BASE, seed=0,
                                  motion_prob=1.0 if mode == "motion" else 0.5,
                                  num_targets=(5, 13),
                                  degradation={"second_order_prob": 0.1})
        return ds, what, None
    synth, synth_name = synthesizer()
    if mode == "snadnet":
        ds = SNADNetDataset(images, synth, analyzer=analyzer, crop_size=CROP, seed=0)
    else:
        ds = KernelBlurDataset(images, synth, analyzer=analyzer, crop_size=CROP, seed=0,
                               blur_region="face" if mode == "face-only" else "whole")
    return ds, what, synth_name


def _pass(ds, indices, collate) -> float:
    from torch.utils.data import DataLoader, Subset

    loader = DataLoader(Subset(ds, indices), batch_size=BATCH, num_workers=WORKERS,
                        collate_fn=collate, persistent_workers=False)
    t0 = time.perf_counter()
    count = 0
    for batch in loader:
        count += int(batch["index"].shape[0])
    return count / (time.perf_counter() - t0)


def measure(mode: str, samples: int) -> dict:
    from facedeblur_ext.data import collate_frame_stacks

    with tempfile.TemporaryDirectory(prefix="bench_data_cache_") as tmp:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds, inputs, synth_name = make_dataset(mode, Path(tmp))
            n = min(samples, len(ds))
            indices = list(range(n))
            collate = collate_frame_stacks if mode == "frames" else None
            cold = _pass(ds, indices, collate)
            warm = _pass(ds, indices, collate)
        shutil.rmtree(tmp, ignore_errors=True)
    result = {"samples": n, "batch_size": BATCH, "num_workers": WORKERS, "crop": CROP,
              "cold_cache_samples_per_s": round(cold, 2),
              "warm_cache_samples_per_s": round(warm, 2),
              "warm_over_cold": round(warm / cold, 2), "inputs": inputs}
    if synth_name:
        result["synthesizer"] = synth_name
    if mode == "frames":
        lo, hi = ds.num_frames
        result["num_frames"] = f"{lo}..{hi} per sample, CRF gamma 2.2, FMR"
    if mode in ("motion", "motion-mix"):
        result["motion"] = (f"{ds.motion.subframes} sub-frames, N = {ds.num_targets[0]}.."
                            f"{ds.num_targets[1]} moments (one target), motion share "
                            f"{ds.motion_prob:g}, base size {MOTION_BASE}")
    return result


# ---- pytest-benchmark entry points -----------------------------------------------------------

try:
    import pytest

    @pytest.mark.slow
    @pytest.mark.parametrize("mode", MODES)
    def test_dataloader_throughput(benchmark, mode):
        pytest.importorskip("mediapipe")
        result = benchmark.pedantic(measure, args=(mode, 32), rounds=1, iterations=1)
        benchmark.extra_info.update(result)
        assert result["warm_cache_samples_per_s"] > 0
except ImportError:  # running as a script without pytest
    pass


# ---- script ----------------------------------------------------------------------------------

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=64, help="samples per mode and pass")
    parser.add_argument("--modes", nargs="*", default=list(MODES), choices=MODES)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    load_before = os.getloadavg()[0]
    results = {}
    for mode in args.modes:
        results[mode] = measure(mode, args.samples)
        print(f"{mode:10s} cold {results[mode]['cold_cache_samples_per_s']:7.1f} samples/s   "
              f"warm {results[mode]['warm_cache_samples_per_s']:7.1f} samples/s", flush=True)
    if "kernel" in results:
        kernel_warm = results["kernel"]["warm_cache_samples_per_s"]
        for result in results.values():
            result["warm_vs_kernel"] = round(result["warm_cache_samples_per_s"] / kernel_warm, 2)
    try:
        from importlib.metadata import version

        mediapipe_version = version("mediapipe")
    except Exception:
        mediapipe_version = None
    import cv2

    report = {
        "benchmark": "DataLoader throughput of facedeblur_ext.data datasets",
        "device": {"type": "cpu", "name": platform.processor() or platform.machine(),
                   "logical_cpus": os.cpu_count()},
        "torch": torch.__version__, "numpy": np.__version__, "opencv": cv2.__version__,
        "mediapipe": mediapipe_version, "python": platform.python_version(),
        "command": "PYTHONPATH=$PWD:$PWD/python python benchmarks/bench_data.py "
                   + " ".join(sys.argv[1:] if argv is None else argv),
        "note": "cold = empty face-analysis cache (MediaPipe per image/frame); warm = cached",
        # A busy machine slows every number: compare runs only at similar load.
        "load_average_1min": {"before": round(load_before, 2),
                              "after": round(os.getloadavg()[0], 2)},
        "results": results,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
