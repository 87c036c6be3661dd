"""``facedeblur deblur``: restore blurry face images with a trained model.

With CFMD-GAN, ``--frames N`` sweeps the control factor ``u`` evenly over [0, 1] and writes
the N sharp moments hidden in the blur plus an animated GIF of them; ``--frames 1`` writes the
centre moment (``u = 0.5``) alone. INPUT is one image or a folder of images.

Output layout in OUT: ``<name>.png`` for one frame; otherwise ``<name>/frame_000_u0.000.png``
... and ``<name>.gif``.

``--full-photo`` takes whole photos instead of face crops: every detected face is deblurred
and pasted back (see :mod:`facedeblur_ext.commands.deblur_full_photo`).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
MODELS = ("cfmd",)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", help="an image file or a folder of images")
    parser.add_argument("-o", "--output", required=True, help="output folder")
    parser.add_argument("--model", choices=MODELS, default="cfmd", help="model family")
    parser.add_argument("--checkpoint", required=True, help="training checkpoint (.pt)")
    parser.add_argument("--frames", type=int, default=7,
                        help="moments to restore (u evenly in [0, 1]; 1 gives u = 0.5)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--backend", default="facedeblur_ext.ops",
                        help="deformable-conv provider (import path); default the fused op")
    parser.add_argument("--no-ema", action="store_true",
                        help="use the raw generator weights even if the checkpoint has EMA ones")
    parser.add_argument("--fps", type=float, default=8.0, help="GIF frame rate")
    parser.add_argument("--bounce", action="store_true",
                        help="GIF plays forward then backward")
    from facedeblur_ext.commands import deblur_full_photo

    deblur_full_photo.add_arguments(parser)


def list_inputs(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)
        if not files:
            raise FileNotFoundError(f"no images in {path}")
        return files
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    return [path]


def _save_png(array, path: Path) -> None:
    from PIL import Image

    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(array).save(tmp, format="PNG")
    os.replace(tmp, path)


def gif_frame_ms(fps: float) -> int:
    """Frame time for ``fps``: GIF stores centiseconds, and players stretch frames under 20 ms."""
    return max(20, round(100 / fps) * 10)


def _save_gif(arrays, path: Path, fps: float, bounce: bool) -> None:
    import numpy as np
    from PIL import Image

    # One palette for the whole animation (no colour flicker between frames).
    palette = Image.fromarray(np.concatenate(list(arrays), axis=0)).quantize(256)
    frames = [Image.fromarray(a).quantize(palette=palette) for a in arrays]
    if bounce and len(frames) > 2:
        frames = frames + frames[-2:0:-1]
    tmp = path.with_name(f".{path.name}.tmp")
    frames[0].save(tmp, format="GIF", save_all=True, append_images=frames[1:],
                   duration=gif_frame_ms(fps), loop=0, disposal=1)
    os.replace(tmp, path)


def run(args: argparse.Namespace) -> int:
    import numpy as np
    import torch
    from PIL import Image
    from tqdm.auto import tqdm

    from facedeblur_ext.models.cfmd import control_sweep, load_generator
    from facedeblur_ext.nn import resolve_backend

    if args.frames < 1:
        raise SystemExit("--frames must be at least 1")
    if args.full_photo:
        from facedeblur_ext.commands import deblur_full_photo

        return deblur_full_photo.run(args, list_inputs(Path(args.input)))
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    generator = load_generator(args.checkpoint, device, resolve_backend(args.backend),
                               prefer_ema=not args.no_ema)
    controls = control_sweep(args.frames)
    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    inputs = list_inputs(Path(args.input))
    for path in tqdm(inputs, desc="deblur", disable=len(inputs) < 2):
        with Image.open(path) as img:
            array = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
        blurry = torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0).to(device)
        frames = []
        for u in controls:
            restored = generator.restore(blurry, u)[0]
            frames.append(restored.mul(255).round().byte().permute(1, 2, 0).cpu().numpy())
        if len(frames) == 1:
            _save_png(frames[0], out_dir / f"{path.stem}.png")
            continue
        frame_dir = out_dir / path.stem
        frame_dir.mkdir(exist_ok=True)
        for j, (u, frame) in enumerate(zip(controls, frames)):
            _save_png(frame, frame_dir / f"frame_{j:03d}_u{u:.3f}.png")
        _save_gif(frames, out_dir / f"{path.stem}.gif", args.fps, args.bounce)
    print(f"wrote {len(inputs)} image(s) x {len(controls)} frame(s) to {out_dir}")
    return 0
