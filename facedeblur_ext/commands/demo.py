"""``facedeblur demo``: blur real faces, deblur them, and show what changed.

On the sharp faces bundled with the package (``facedeblur_ext/assets/faces``, see
``ATTRIBUTION.md`` there) the demo synthesizes camera-shake blur (trajectory kernels 13-29 and
noise, seeded: the same blur on every run), restores the faces with the default CFMD-GAN
checkpoint (``facedeblur_ext/assets/checkpoints/cfmd_default.pt``) or ``--checkpoint``, prints
a before/after metrics table (with the unsharp-mask and true-kernel Wiener baselines for
scale) and writes to ``--output``:

* ``demo_grid.png``: blurry | restored | sharp, one face per row;
* ``u_sweep.gif``: the moments of the exposure CFMD-GAN recovers from the first face, ``u``
  swept over the range the checkpoint was trained on (``--frames`` moments; see
  :mod:`facedeblur_ext.inference`). A checkpoint without moments (the bundled one, trained on
  still faces) restores one moment: no GIF then, and a note says why;
* ``metrics.md`` and ``metrics.json``: the table.

The time per image in the table is the model alone, after one warm-up call (first-call setup
is not a per-image cost), with the thread count of :func:`facedeblur_ext.inference.
inference_threads` (``--threads``): on a loaded machine, more threads than idle CPUs made the
same restoration several times slower.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from facedeblur_ext.commands import ASSETS, BUNDLED_CHECKPOINTS, checkpoint_to_run

FACES_DIR = ASSETS / "faces"


def configure(parser: argparse.ArgumentParser) -> None:
    from facedeblur_ext.evaluation.methods import MODEL_FAMILIES

    parser.add_argument("--checkpoint", default=None,
                        help="model checkpoint (default for cfmd: the bundled "
                             f"{BUNDLED_CHECKPOINTS['cfmd'].name})")
    parser.add_argument("--model", default="cfmd", choices=sorted(MODEL_FAMILIES),
                        help="model family of the checkpoint (default cfmd)")
    parser.add_argument("-o", "--output", default="demo_output", help="output folder")
    parser.add_argument("--faces", type=int, default=4,
                        help="how many bundled sharp faces to use (default 4)")
    parser.add_argument("--size", type=int, default=None,
                        help="face size in pixels (default: the checkpoint's training crop, "
                             "else 128)")
    parser.add_argument("--frames", type=int, default=None,
                        help="moments in the u-sweep GIF (default 7 for a checkpoint trained "
                             "on moments; no GIF for one without)")
    parser.add_argument("--noise", type=float, default=0.03,
                        help="noise sigma added to the blur (SNADNet protocol: 0.03)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic blur")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--backend", default="facedeblur_ext.ops",
                        help="provider of the fused ops the model uses (import path)")
    parser.add_argument("--fps", type=float, default=6.0, help="GIF frame rate")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads (default: the CPUs other processes leave idle)")


def bundled_sharp_faces() -> list[Path]:
    """The bundled sharp faces (the real-blur photos are left out: they have no sharp
    reference), CelebA first."""
    faces = sorted(p for p in FACES_DIR.glob("*.png") if not p.name.startswith("realblur"))
    return sorted(faces, key=lambda p: (not p.name.startswith("celeba"), p.name))


def _load_faces(paths: list[Path], size: int):
    import numpy as np
    import torch

    from facedeblur_ext.data import center_transform, load_rgb

    images = []
    for path in paths:
        image = load_rgb(path)
        image = center_transform(image.shape[:2], size, size).apply_image(image)
        images.append(torch.from_numpy(np.array(image)).permute(2, 0, 1))
    return torch.stack(images).float().div_(255.0)


def run(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from facedeblur_ext.commands import resolve_device
    from facedeblur_ext.data.io import (
        atomic_write_bytes,
        check_writable_folder,
        write_gif,
        write_png,
    )
    from facedeblur_ext.evaluation.methods import (
        IdentityMethod,
        UnsharpMaskMethod,
        WienerMethod,
        checkpoint_working_size,
        load_model,
    )
    from facedeblur_ext.evaluation.protocols import KERNEL_SIZES, kernel_blur_config
    from facedeblur_ext.evaluation.report import format_table, image_grid
    from facedeblur_ext.evaluation.scoring import Accumulator, MetricSuite
    from facedeblur_ext.inference import (
        default_frames,
        inference_threads,
        moment_controls,
        read_inference_settings,
    )
    from facedeblur_ext.nn import BlurSynthesizer, resolve_backend

    started = time.perf_counter()
    checkpoint = checkpoint_to_run(args.model, args.checkpoint)
    if args.faces < 1 or (args.frames is not None and args.frames < 1):
        raise ValueError("--faces and --frames must be at least 1")
    settings = read_inference_settings(checkpoint) if args.model == "cfmd" else None
    # The GIF shows distinct moments only from a model that learned them.
    controls = (moment_controls(settings, args.frames or default_frames(settings))
                if settings is not None and settings.moments else [])
    out_dir = Path(args.output)
    check_writable_folder(out_dir)  # before the compute, whose results it must take
    threads = inference_threads(args.threads)
    torch.set_num_threads(threads)
    paths = bundled_sharp_faces()[: args.faces]
    if not paths:
        raise ValueError(f"no bundled faces found in {FACES_DIR}")
    device = resolve_device(args.device)
    size = args.size or checkpoint_working_size(checkpoint, default=128)

    try:
        model = load_model(args.model, checkpoint, device, resolve_backend(args.backend),
                           label=f"{args.model} (restored)")
    except (FileNotFoundError, ValueError) as exc:
        raise ValueError(f"cannot load {checkpoint}: {exc}") from None
    sharp = _load_faces(paths, size).to(device)

    # Blur, seeded: trajectory kernels as in the kernel protocol of `facedeblur eval`.
    config = kernel_blur_config("trajectory", KERNEL_SIZES, args.noise)
    synthesizer = BlurSynthesizer(config,
                                  generator=torch.Generator(device=device).manual_seed(args.seed))
    with torch.no_grad():
        blurry, info = synthesizer(sharp, return_info=True)
    kernels = info["kernels"]

    methods = [IdentityMethod(), UnsharpMaskMethod(), WienerMethod(), model]
    suite = MetricSuite(device)
    acc = Accumulator()
    restored_all = None
    with torch.no_grad():  # warm-up: one-time setup of the model's kernels, not timed
        model(blurry[:1])
    for m in methods:
        t0 = time.perf_counter()
        outputs = []
        with torch.no_grad():
            for i in range(len(paths)):  # one at a time, like a user's images
                extra = ({"kernels": kernels[i:i + 1], "noise_sigma": args.noise}
                         if m.needs_kernel else {})
                outputs.append(m(blurry[i:i + 1], **extra))
        out = torch.cat(outputs).float().clamp(0, 1)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        acc.add_time(m.name, time.perf_counter() - t0, len(paths))
        acc.add(m.name, ("all",), suite.score(out, sharp))
        if m is model:
            restored_all = out

    rows = [{"name": m.name, "ms_per_image": acc.ms_per_image(m.name)} for m in methods]
    cells = {m.name: acc.summary(m.name, "all") for m in methods}
    table = format_table(rows, cells, suite.available)

    def to_u8(t):
        return t.clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).cpu().numpy()

    grid = image_grid([[to_u8(blurry[i]), to_u8(restored_all[i]), to_u8(sharp[i])]
                       for i in range(len(paths))], ["blurry", "restored", "sharp"],
                      [p.stem for p in paths])
    write_png(out_dir / "demo_grid.png", grid)
    written = ["demo_grid.png"]
    if controls:
        with torch.no_grad():
            frames = [to_u8(model(blurry[:1], u=u)[0].float()) for u in controls]
        # Blurry and sharp beside each moment, so the GIF explains itself.
        tiles = [np.concatenate([to_u8(blurry[0]), f, to_u8(sharp[0])], axis=1) for f in frames]
        write_gif(out_dir / "u_sweep.gif", tiles, args.fps, bounce=True)
        written.append("u_sweep.gif")
    else:
        why = ("its checkpoint records no moments (trained on still faces)"
               if settings is not None else "the model family has no u")
        print(f"note: {args.model} restores one moment only ({why}); no u-sweep GIF",
              file=sys.stderr)

    na = [f"{m}: n/a ({r})" for m, r in suite.reasons.items() if m in suite.wanted]
    markdown = "\n".join([
        "# facedeblur demo", "",
        f"Checkpoint: `{checkpoint}`; {len(paths)} bundled faces at {size} px "
        f"({', '.join(p.name for p in paths)}); trajectory blur 13-29 px, noise "
        f"{args.noise:g}, seed {args.seed}; device {device}, {threads} thread(s); time per "
        "image: the model alone after a warm-up call.", "", table, "",
        *(["Unavailable metrics: " + "; ".join(na), ""] if na else []),
    ])
    atomic_write_bytes(out_dir / "metrics.md", markdown.encode())
    import json

    payload = {"checkpoint": str(checkpoint), "faces": [p.name for p in paths], "size": size,
               "noise_sigma": args.noise, "seed": args.seed, "device": str(device),
               "threads": threads, "u_sweep": controls,
               "rows": rows, "cells": cells, "metrics": suite.describe()}
    atomic_write_bytes(out_dir / "metrics.json", (json.dumps(payload, indent=2, default=str)
                                                  + "\n").encode())
    written += ["metrics.md", "metrics.json"]
    print(f"Blurred {len(paths)} bundled faces ({size} px, trajectory kernels, noise "
          f"{args.noise:g}) and restored them with {checkpoint.name}:\n")
    print(table)
    if na:
        print("\n" + "\n".join(na))
    print(f"\nwrote {', '.join(written)} to {out_dir} "
          f"({time.perf_counter() - started:.1f} s)")
    return 0
