"""``facedeblur selfcheck``: load the native library and check every op against torch.

Each op module registers a check in ``facedeblur_ext.ops.SELF_CHECKS`` that runs the op on a
small input whose answer torch itself can give (for example a deformable convolution with
zero offsets equals ``F.conv2d``). The command runs them on the CPU and, when present, CUDA.
"""

from __future__ import annotations

import argparse
import time


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", action="append", default=None,
                        help="device to check (repeatable); default: cpu and cuda if present")


def run(args: argparse.Namespace) -> int:
    import torch

    import facedeblur_ext
    from facedeblur_ext.ops import SELF_CHECKS

    info = facedeblur_ext.build_info()
    print(f"facedeblur_ext {info['version']} built against torch {info['torch_version']} "
          f"(running {torch.__version__}), cuda={info['with_cuda']}, openmp={info['openmp']}")
    devices = args.device or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    failures = 0
    for device in devices:
        if device.startswith("cuda") and not info["with_cuda"]:
            print(f"[skip] {device}: extension built without CUDA")
            continue
        for name, check in SELF_CHECKS.items():
            start = time.perf_counter()
            try:
                check(torch.device(device))
            except Exception as exc:  # report every failing check, not just the first
                failures += 1
                print(f"[FAIL] {name} on {device}: {type(exc).__name__}: {exc}")
            else:
                print(f"[ ok ] {name} on {device} ({(time.perf_counter() - start) * 1e3:.0f} ms)")
    if not SELF_CHECKS:
        print("no op checks registered")
    print("selfcheck " + ("passed" if failures == 0 else f"FAILED ({failures})"))
    return 0 if failures == 0 else 1
