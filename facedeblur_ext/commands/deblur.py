"""``facedeblur deblur``: restore blurry face images with a trained model.

INPUT is one image or a folder of images; any size works (inputs are padded to what the
network needs and the results cropped back).

With CFMD-GAN (``--model cfmd``), ``--frames N`` sweeps the control factor ``u`` evenly over
[0, 1] and writes the N sharp moments hidden in the blur plus an animated GIF of them;
``--frames 1`` writes the centre moment (``u = 0.5``) alone. Output layout in OUT:
``<name>.png`` for one frame; otherwise ``<name>/frame_000_u0.000.png`` ... and ``<name>.gif``.

With SNADNet (``--model snadnet``), the checkpoint is stage II's
(``<run>/deblur/checkpoints/last.pt``): it holds the stage-I parser, which computes the parsing
map of each input, and the generator. Output: ``<name>.png``, plus ``<name>_parsing.png`` (the
parsing map in colour) with ``--save-parsing``. The thesis baselines (``--model baseline_ae``,
``baseline_gan``) write ``<name>.png``.

``--full-photo`` takes whole photos instead of face crops: every detected face is deblurred
(CFMD-GAN at ``u = 0.5``) and pasted back (see :mod:`facedeblur_ext.commands.deblur_full_photo`).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from facedeblur_ext.commands import checkpoint_to_run

_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
MODELS = ("cfmd", "snadnet", "baseline_ae", "baseline_gan")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", help="an image file or a folder of images")
    parser.add_argument("-o", "--output", required=True, help="output folder")
    parser.add_argument("--model", choices=MODELS, default="cfmd", help="model family")
    parser.add_argument("--checkpoint", default=None,
                        help="checkpoint (.pt) from `facedeblur train` or `facedeblur export`; "
                             "default for --model cfmd: the bundled cfmd_default.pt")
    parser.add_argument("--frames", type=int, default=7,
                        help="cfmd: moments to restore (u evenly in [0, 1]; 1 gives u = 0.5)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--backend", default="facedeblur_ext.ops",
                        help="provider of the fused op (deformable conv for cfmd, separable "
                             "norm for snadnet) as an import path; default the fused op")
    parser.add_argument("--no-ema", action="store_true",
                        help="use the raw generator weights even if the checkpoint has EMA ones")
    parser.add_argument("--save-parsing", action="store_true",
                        help="snadnet: also write the parsing map as <name>_parsing.png")
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


def _load_rgb(path: Path, device):
    """[1, 3, H, W] float32 in [0, 1] on ``device``."""
    import numpy as np
    import torch
    from PIL import Image

    with Image.open(path) as img:
        array = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0).to(device)


def _to_uint8(image_chw):
    return image_chw.mul(255).round().byte().permute(1, 2, 0).cpu().numpy()


def run(args: argparse.Namespace) -> int:
    import torch
    from tqdm.auto import tqdm

    from facedeblur_ext.nn import resolve_backend

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    out_dir = Path(args.output)
    inputs = list_inputs(Path(args.input))
    args.checkpoint = str(checkpoint_to_run(args.model, args.checkpoint))
    if args.full_photo:
        from facedeblur_ext.commands import deblur_full_photo

        return deblur_full_photo.run(args, inputs)
    backend = resolve_backend(args.backend)
    if args.model != "cfmd":
        return _run_single_output(args, inputs, out_dir, device, backend)

    from facedeblur_ext.models.cfmd import control_sweep, load_generator

    if args.frames < 1:
        raise SystemExit("--frames must be at least 1")
    generator = load_generator(args.checkpoint, device, backend, prefer_ema=not args.no_ema)
    controls = control_sweep(args.frames)
    out_dir.mkdir(parents=True, exist_ok=True)
    for path in tqdm(inputs, desc="deblur", disable=len(inputs) < 2):
        blurry = _load_rgb(path, device)
        frames = []
        for u in controls:
            frames.append(_to_uint8(generator.restore(blurry, u)[0]))
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


def _run_single_output(args, inputs: list[Path], out_dir: Path, device, backend) -> int:
    """SNADNet and the baselines: one restored image per input."""
    import torch
    from tqdm.auto import tqdm

    from facedeblur_ext.models.face_parsing import colorize_regions

    if args.model == "snadnet":
        from facedeblur_ext.models.snadnet import load_snadnet

        model = load_snadnet(args.checkpoint, device, backend, prefer_ema=not args.no_ema)
    else:
        from facedeblur_ext.models.baselines import load_baseline

        model = load_baseline(args.checkpoint, device, prefer_ema=not args.no_ema,
                              task=args.model)
    save_parsing = args.save_parsing and args.model == "snadnet"
    out_dir.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        for path in tqdm(inputs, desc="deblur", disable=len(inputs) < 2):
            blurry = _load_rgb(path, device)
            if args.model == "snadnet":
                restored, parsing = model.restore(blurry, return_parsing=True)
            else:
                restored = model.restore(blurry)
            _save_png(_to_uint8(restored[0]), out_dir / f"{path.stem}.png")
            if save_parsing:
                _save_png(_to_uint8(colorize_regions(parsing)[0]),
                          out_dir / f"{path.stem}_parsing.png")
    print(f"wrote {len(inputs)} image(s) to {out_dir}")
    return 0
