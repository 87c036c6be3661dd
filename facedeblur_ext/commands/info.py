"""``facedeblur info``: how the extension was built and which devices it can use."""

from __future__ import annotations

import argparse
import json
import platform


def collect() -> dict:
    import torch

    import facedeblur_ext

    devices = [{"type": "cpu", "name": platform.processor() or platform.machine(),
                "threads": torch.get_num_threads()}]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            devices.append({
                "type": "cuda", "index": i, "name": props.name,
                "capability": f"{props.major}.{props.minor}",
                "memory_gib": round(props.total_memory / 2**30, 1),
            })
    # The namespace object also carries attributes of its own (e.g. ``name``): keep the ops.
    namespace = torch.ops.facedeblur_ext
    ops = sorted(name for name in dir(namespace)
                 if isinstance(getattr(namespace, name), torch._ops.OpOverloadPacket))
    return {
        "build": facedeblur_ext.build_info(),
        "runtime": {"python": platform.python_version(), "torch": torch.__version__,
                    "torch_cuda": torch.version.cuda},
        "devices": devices,
        "ops": ops,
    }


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")


def run(args: argparse.Namespace) -> int:
    info = collect()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print("facedeblur_ext build:")
    for key, value in info["build"].items():
        print(f"  {key:14s} {value}")
    print("runtime:")
    for key, value in info["runtime"].items():
        print(f"  {key:14s} {value}")
    print("devices:")
    for dev in info["devices"]:
        print("  " + ", ".join(f"{k}={v}" for k, v in dev.items()))
    print(f"ops ({len(info['ops'])}): " + (", ".join(info["ops"]) or "none"))
    return 0
