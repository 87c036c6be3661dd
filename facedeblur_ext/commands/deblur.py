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

Inputs are read by :func:`facedeblur_ext.data.load_rgb` in every mode: EXIF orientation is
applied, grayscale images (8 or 16 bit) are expanded to RGB and an alpha channel is dropped.
``<name>`` is the input's file name without its extension; where two inputs share it
(``face.png``, ``face.jpg``) the extension is kept in both (``face_png``, ``face_jpg``). The
command refuses, before any work, an OUT where an output would replace an input file (e.g.
``-o`` the input folder with ``--frames 1``). A rerun replaces the outputs of the same inputs;
frame files of an earlier run with another ``--frames`` are removed from ``<name>/``. An input
that cannot be read is reported and skipped; the others are still written and the command then
exits with status 1.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from facedeblur_ext.commands import checkpoint_to_run, resolve_device

if TYPE_CHECKING:
    import numpy as np

MODELS = ("cfmd", "snadnet", "baseline_ae", "baseline_gan")


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a number above 0 (``nan`` refused)."""
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
    return value


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", help="an image file or a folder of images")
    parser.add_argument("-o", "--output", required=True, help="output folder")
    parser.add_argument("--model", choices=MODELS, default="cfmd", help="model family")
    parser.add_argument("--checkpoint", default=None,
                        help="checkpoint (.pt) from `facedeblur train` or `facedeblur export`; "
                             "default for --model cfmd: the bundled cfmd_default.pt")
    parser.add_argument("--frames", type=positive_int, default=7,
                        help="cfmd: moments to restore (u evenly in [0, 1]; 1 gives u = 0.5)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--backend", default="facedeblur_ext.ops",
                        help="provider of the fused op (deformable conv for cfmd, separable "
                             "norm for snadnet) as an import path; default the fused op")
    parser.add_argument("--no-ema", action="store_true",
                        help="use the raw generator weights even if the checkpoint has EMA ones")
    parser.add_argument("--save-parsing", action="store_true",
                        help="snadnet: also write the parsing map as <name>_parsing.png")
    parser.add_argument("--fps", type=positive_float, default=8.0, help="GIF frame rate")
    parser.add_argument("--bounce", action="store_true",
                        help="GIF plays forward then backward")
    from facedeblur_ext.commands import deblur_full_photo

    deblur_full_photo.add_arguments(parser)


def list_inputs(path: Path) -> list[Path]:
    """The images of the folder ``path`` (not recursive), or the file ``path`` itself."""
    from facedeblur_ext.data.io import list_images

    if path.is_dir():
        files = list_images(path, recursive=False)
        if not files:
            raise FileNotFoundError(f"no images in {path}")
        return files
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    return [path]


def output_names(inputs: list[Path]) -> list[str]:
    """The ``<name>`` of each input's outputs: its stem, or ``<stem>_<extension>`` where
    inputs share a stem (``face.png`` and ``face.jpg`` would otherwise write one file)."""
    stem_counts = Counter(p.stem for p in inputs)
    return [f"{p.stem}_{p.suffix.lstrip('.').lower()}" if stem_counts[p.stem] > 1 else p.stem
            for p in inputs]


def check_outputs(inputs: list[Path], outputs: list[list[Path]]) -> None:
    """Refuse, before any work, outputs that would replace an input or another input's output.

    Args:
        inputs: the input files.
        outputs: per input, the files written for it.

    Raises:
        ValueError: an output path is an input file, or two inputs write the same path.
    """
    input_by_path = {p.resolve(): p for p in inputs}
    writer_by_path: dict[Path, Path] = {}
    for source, files in zip(inputs, outputs):
        for file in files:
            key = file.resolve()
            if key in input_by_path:
                raise ValueError(f"the output {file} would replace the input "
                                 f"{input_by_path[key]}; choose another --output folder")
            writer = writer_by_path.setdefault(key, source)
            if writer != source:
                raise ValueError(f"{writer} and {source} would both be written to {file}; "
                                 "rename one of them")


def frame_file_name(index: int, u: float) -> str:
    """File name of the restored moment ``index`` (control factor ``u``) in ``<name>/``."""
    return f"frame_{index:03d}_u{u:.3f}.png"


def planned_outputs(args: argparse.Namespace, out_dir: Path, name: str,
                    controls: list[float]) -> list[Path]:
    """The files written for the input named ``name`` (layout in the module docstring)."""
    if args.full_photo or args.model != "cfmd" or len(controls) == 1:
        files = [out_dir / f"{name}.png"]
        if args.model == "snadnet" and args.save_parsing and not args.full_photo:
            files.append(out_dir / f"{name}_parsing.png")
        return files
    frame_dir = out_dir / name
    return [out_dir / f"{name}.gif",
            *(frame_dir / frame_file_name(j, u) for j, u in enumerate(controls))]


def read_image(path: Path) -> np.ndarray:
    """An input image as uint8 RGB ``[H, W, 3]``, read the same way in every mode: EXIF
    orientation applied, grayscale expanded to RGB, alpha dropped, any size.

    Raises:
        BadImageError: the file cannot be decoded.
    """
    from facedeblur_ext.data import load_rgb

    return load_rgb(path, min_size=1, allow_grayscale=True, allow_alpha=True)


def readable_images(inputs: list[Path], names: list[str], failures: list[Path], *,
                    desc: str) -> Iterator[tuple[Path, str, np.ndarray]]:
    """``(path, name, image)`` for each input that can be read, with a progress bar.

    An unreadable input is reported on stderr and appended to ``failures`` instead, so that
    one bad file does not stop a batch.
    """
    from tqdm.auto import tqdm

    from facedeblur_ext.data import BadImageError

    for path, name in tqdm(list(zip(inputs, names)), desc=desc, disable=len(inputs) < 2):
        try:
            image = read_image(path)
        except BadImageError as exc:
            tqdm.write(f"facedeblur deblur: skipped {path}: {exc.reason}", file=sys.stderr)
            failures.append(path)
            continue
        yield path, name, image


def finish(written: str, failures: list[Path], num_inputs: int) -> int:
    """Print the summary line; exit status 1 when some inputs could not be read."""
    print(written)
    if failures:
        print(f"facedeblur deblur: {len(failures)} of {num_inputs} input(s) could not be read "
              "and were skipped (see above)", file=sys.stderr)
        return 1
    return 0


def _save_png(array, path: Path) -> None:
    from PIL import Image

    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(array).save(tmp, format="PNG")
    os.replace(tmp, path)


def gif_frame_ms(fps: float) -> int:
    """Frame time for ``fps``: GIF stores centiseconds, and players stretch frames under 20 ms."""
    if not fps > 0:
        raise ValueError(f"the GIF frame rate must be above 0, got {fps}")
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


def _to_batch(image: np.ndarray, device):
    """uint8 ``[H, W, 3]`` -> [1, 3, H, W] float32 in [0, 1] on ``device``."""
    import torch

    return torch.tensor(image, device=device).permute(2, 0, 1).unsqueeze(0).float().div_(255.0)


def _to_uint8(image_chw):
    return image_chw.mul(255).round().byte().permute(1, 2, 0).cpu().numpy()


def run(args: argparse.Namespace) -> int:

    from facedeblur_ext.models.cfmd import control_sweep, load_generator
    from facedeblur_ext.nn import resolve_backend

    device = resolve_device(args.device)
    out_dir = Path(args.output)
    inputs = list_inputs(Path(args.input))
    names = output_names(inputs)
    args.checkpoint = str(checkpoint_to_run(args.model, args.checkpoint))
    controls = control_sweep(args.frames)
    check_outputs(inputs, [planned_outputs(args, out_dir, name, controls) for name in names])
    if args.full_photo:
        from facedeblur_ext.commands import deblur_full_photo

        return deblur_full_photo.run(args, inputs, names)
    backend = resolve_backend(args.backend)
    if args.model != "cfmd":
        return _run_single_output(args, inputs, names, out_dir, device, backend)

    generator = load_generator(args.checkpoint, device, backend, prefer_ema=not args.no_ema)
    out_dir.mkdir(parents=True, exist_ok=True)
    failures: list[Path] = []
    written = 0
    for _path, name, image in readable_images(inputs, names, failures, desc="deblur"):
        blurry = _to_batch(image, device)
        frames = []
        for u in controls:
            frames.append(_to_uint8(generator.restore(blurry, u)[0]))
        if len(frames) == 1:
            _save_png(frames[0], out_dir / f"{name}.png")
        else:
            frame_dir = out_dir / name
            frame_dir.mkdir(exist_ok=True)
            frame_paths = [frame_dir / frame_file_name(j, u) for j, u in enumerate(controls)]
            for frame, frame_path in zip(frames, frame_paths):
                _save_png(frame, frame_path)
            # Frames of an earlier run with another --frames would mix with this sweep.
            for stale in set(frame_dir.glob("frame_*_u*.png")) - set(frame_paths):
                stale.unlink()
            _save_gif(frames, out_dir / f"{name}.gif", args.fps, args.bounce)
        written += 1
    return finish(f"wrote {written} image(s) x {len(controls)} frame(s) to {out_dir}",
                  failures, len(inputs))


def _run_single_output(args, inputs: list[Path], names: list[str], out_dir: Path, device,
                       backend) -> int:
    """SNADNet and the baselines: one restored image per input."""
    import torch

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
    failures: list[Path] = []
    written = 0
    with torch.no_grad():
        for _path, name, image in readable_images(inputs, names, failures, desc="deblur"):
            blurry = _to_batch(image, device)
            if args.model == "snadnet":
                restored, parsing = model.restore(blurry, return_parsing=True)
            else:
                restored = model.restore(blurry)
            _save_png(_to_uint8(restored[0]), out_dir / f"{name}.png")
            if save_parsing:
                _save_png(_to_uint8(colorize_regions(parsing)[0]),
                          out_dir / f"{name}_parsing.png")
            written += 1
    return finish(f"wrote {written} image(s) to {out_dir}", failures, len(inputs))
