"""``facedeblur deblur``: restore blurry face images with a trained model.

INPUT is one image or a folder of images, of any size: images larger than ``--tile`` pixels
are restored in overlapping tiles blended together (:func:`facedeblur_ext.inference.
restore_tiled`), so memory depends on the tile, not on the image (a 6000 x 4000 photo stays
under 4 GB; README), and a progress bar shows the tiles.

With CFMD-GAN (``--model cfmd``), ``--frames N`` restores N moments of the exposure. The
checkpoint says what it learned (:mod:`facedeblur_ext.inference`): a model trained on moments
records ``inference: {moments: true, u_range: [u_min, u_max]}``, and the N frames sweep
``u_k = u_min + k (u_max - u_min) / (N - 1)``, where ``u = (i - 1) / N`` is the rank of a moment
in FMR order (paper 003: the leftmost left-eye position first); the default is 7 frames. A
model without moments (the bundled one, trained on still faces) restores one frame, at the
centre of its range (``u = 0.5``), and ``--frames`` above 1 is refused. Output layout in OUT:
``<name>.png`` for one frame; otherwise ``<name>/frame_000_u0.000.png`` ... and ``<name>.gif``.

With SNADNet (``--model snadnet``), the checkpoint is stage II's
(``<run>/deblur/checkpoints/last.pt``): it holds the stage-I parser, which computes the parsing
map of each input, and the generator. Output: ``<name>.png``, plus ``<name>_parsing.png`` (the
parsing map in colour) with ``--save-parsing``. The thesis baselines (``--model baseline_ae``,
``baseline_gan``) write ``<name>.png``.

``--full-photo`` takes whole photos instead of face crops: every detected face is deblurred
at the photo's resolution (CFMD-GAN at the centre ``u``) and pasted back (see
:mod:`facedeblur_ext.commands.deblur_full_photo`).

Inputs are read by :func:`facedeblur_ext.data.load_rgb` in every mode: EXIF orientation is
applied, grayscale images (8 or 16 bit) are expanded to RGB and an alpha channel is dropped.
``<name>`` is the input's file name without its extension; where two inputs share it
(``face.png``, ``face.jpg``) the extension is kept in both (``face_png``, ``face_jpg``).

Before any model is loaded the command refuses an OUT where an output would replace an input
file (e.g. ``-o`` the input folder with ``--frames 1``), an OUT it cannot write, and a batch
of which no input can be read (then no OUT is created). Every file is written atomically
(temporary file, then rename), and frames as they are produced: Ctrl-C leaves only complete
files. A rerun skips the outputs that exist (frame by frame: an interrupted sweep resumes);
``--redo`` recomputes them, e.g. after changing the checkpoint. Frame files of an earlier run
with another ``--frames`` are removed from ``<name>/``. An input that cannot be read is
reported and skipped; the others are still written and the command then exits with status 1.
Third-party log lines (MediaPipe, TFLite) are hidden unless ``--verbose``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from facedeblur_ext.commands import checkpoint_to_run, deblur_full_photo, resolve_device
from facedeblur_ext.commands.deblur_common import (
    TileRunsBar,
    check_outputs,
    finish,
    list_inputs,
    output_names,
    positive_float,
    positive_int,
    prepare_output_folder,
    progress_bar,
    readable_images,
    save_png,
)
from facedeblur_ext.data.io import write_gif

MODELS = ("cfmd", "snadnet", "baseline_ae", "baseline_gan")


def configure(parser: argparse.ArgumentParser) -> None:
    from facedeblur_ext.inference import DEFAULT_TILE, DEFAULT_TILE_OVERLAP

    parser.add_argument("input", help="an image file or a folder of images")
    parser.add_argument("-o", "--output", required=True, help="output folder")
    parser.add_argument("--model", choices=MODELS, default="cfmd", help="model family")
    parser.add_argument("--checkpoint", default=None,
                        help="checkpoint (.pt) from `facedeblur train` or `facedeblur export`; "
                             "default for --model cfmd: the bundled cfmd_default.pt")
    parser.add_argument("--frames", type=positive_int, default=None,
                        help="cfmd: moments to restore, u evenly over the range the checkpoint "
                             "was trained on (default 7 for a model trained on moments, else 1)")
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
    parser.add_argument("--redo", action="store_true",
                        help="recompute outputs that exist (default: a rerun skips them)")
    parser.add_argument("--tile", type=positive_int, default=DEFAULT_TILE,
                        help="largest image side restored in one piece; larger images go in "
                             "overlapping tiles (memory follows the tile; default "
                             "%(default)s)")
    parser.add_argument("--tile-overlap", type=int, default=DEFAULT_TILE_OVERLAP,
                        help="pixels shared by neighbouring tiles (default %(default)s)")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="CPU threads (default: the CPUs other processes leave idle)")
    parser.add_argument("--verbose", action="store_true",
                        help="show third-party log lines (MediaPipe, TFLite)")
    deblur_full_photo.add_arguments(parser)


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


def _to_batch(image, device):
    """uint8 ``[H, W, 3]`` -> [1, 3, H, W] float32 in [0, 1] on ``device``."""
    import torch

    return torch.tensor(image, device=device).permute(2, 0, 1).unsqueeze(0).float().div_(255.0)


def _to_uint8(image_chw):
    return image_chw.mul(255).round().byte().permute(1, 2, 0).cpu().numpy()


class _FramesOnDisk:
    """The frames of a sweep as a sequence read from their files (the GIF is built from what
    was written, so a long sweep is never held in memory)."""

    def __init__(self, paths: list[Path]):
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        from facedeblur_ext.data import load_rgb

        return load_rgb(self.paths[index], min_size=1)


def _controls(args: argparse.Namespace) -> list[float]:
    """The ``u`` of each frame: from the checkpoint's inference settings for CFMD-GAN."""
    from facedeblur_ext.inference import default_frames, moment_controls, read_inference_settings

    if args.model != "cfmd":
        return [0.5]
    settings = read_inference_settings(args.checkpoint)
    frames = args.frames if args.frames is not None else default_frames(settings)
    if args.full_photo:
        frames = 1  # one photo out: the centre moment
    return moment_controls(settings, frames)


def run(args: argparse.Namespace) -> int:
    import torch

    from facedeblur_ext.inference import check_tiles, inference_threads

    check_tiles(args.tile, args.tile_overlap)
    if args.frames is not None and args.full_photo and args.frames > 1:
        raise ValueError("--full-photo writes one photo per input (the centre moment); "
                         "drop --frames")
    device = resolve_device(args.device)
    out_dir = Path(args.output)
    inputs = list_inputs(Path(args.input))
    names = output_names(inputs)
    args.checkpoint = str(checkpoint_to_run(args.model, args.checkpoint))
    controls = _controls(args)
    planned = [planned_outputs(args, out_dir, name, controls) for name in names]
    check_outputs(inputs, planned)
    # A finished input (every output there) is not read again unless --redo.
    todo = [i for i, files in enumerate(planned)
            if args.redo or not all(f.exists() for f in files)]
    if not todo:
        print(f"nothing to do: the outputs of all {len(inputs)} input(s) exist in {out_dir} "
              "(--redo recomputes them)")
        return 0
    skipped = len(inputs) - len(todo)
    if skipped:
        print(f"skipping {skipped} input(s) whose outputs exist (--redo recomputes them)",
              file=sys.stderr)
    inputs, names = [inputs[i] for i in todo], [names[i] for i in todo]
    prepare_output_folder(out_dir, inputs)
    torch.set_num_threads(inference_threads(args.threads))
    if args.full_photo:
        return deblur_full_photo.run(args, inputs, names, device)
    if args.model != "cfmd":
        return _run_single_output(args, inputs, names, out_dir, device)
    return _run_moments(args, inputs, names, out_dir, device, controls)


def _tiled(args: argparse.Namespace, restore, pools):
    """``restore`` over tiles of ``--tile`` pixels, the model's global ``pools`` at their
    whole-image values, with a progress bar when there are several tiles."""
    from facedeblur_ext.inference import restore_tiled

    def run_tiles(batch):
        bar = TileRunsBar()
        try:
            return restore_tiled(restore, batch, tile=args.tile, overlap=args.tile_overlap,
                                 global_pools=pools, progress=bar)
        finally:
            bar.close()

    return run_tiles


def _run_moments(args, inputs: list[Path], names: list[str], out_dir: Path, device,
                 controls: list[float]) -> int:
    """CFMD-GAN: the moments of each input, each frame written as soon as it is made."""
    import torch

    from facedeblur_ext.inference import global_average_pools
    from facedeblur_ext.models.cfmd import load_generator
    from facedeblur_ext.nn import resolve_backend

    generator = load_generator(args.checkpoint, device, resolve_backend(args.backend),
                               prefer_ema=not args.no_ema)
    pools = global_average_pools(generator)
    failures: list[Path] = []
    written = 0
    with torch.no_grad():
        for _path, name, image in readable_images(inputs, names, failures, desc="deblur"):
            blurry = _to_batch(image, device)
            if len(controls) == 1:
                restore = _tiled(args, lambda x: generator.restore(x, controls[0]), pools)
                save_png(_to_uint8(restore(blurry)[0]), out_dir / f"{name}.png")
                written += 1
                continue
            frame_dir = out_dir / name
            frame_paths = [frame_dir / frame_file_name(j, u) for j, u in enumerate(controls)]
            with progress_bar(total=len(controls), desc=name, unit="frame",
                              leave=False) as bar:
                for u, frame_path in zip(controls, frame_paths):
                    if args.redo or not frame_path.exists():
                        restore = _tiled(args, lambda x, u=u: generator.restore(x, u), pools)
                        save_png(_to_uint8(restore(blurry)[0]), frame_path)
                    bar.update()
            # Frames of an earlier run with another --frames would mix with this sweep.
            for stale in set(frame_dir.glob("frame_*_u*.png")) - set(frame_paths):
                stale.unlink()
            write_gif(out_dir / f"{name}.gif", _FramesOnDisk(frame_paths), args.fps,
                      args.bounce)
            written += 1
    return finish(f"wrote {written} image(s) x {len(controls)} frame(s) to {out_dir}",
                  failures, len(inputs))


def _run_single_output(args, inputs: list[Path], names: list[str], out_dir: Path,
                       device) -> int:
    """SNADNet and the baselines: one restored image per input."""
    import torch

    from facedeblur_ext.inference import global_average_pools
    from facedeblur_ext.models.face_parsing import colorize_regions
    from facedeblur_ext.nn import resolve_backend

    if args.model == "snadnet":
        from facedeblur_ext.models.snadnet import load_snadnet

        model = load_snadnet(args.checkpoint, device, resolve_backend(args.backend),
                             prefer_ema=not args.no_ema)
    else:
        from facedeblur_ext.models.baselines import load_baseline

        model = load_baseline(args.checkpoint, device, prefer_ema=not args.no_ema,
                              task=args.model)
    save_parsing = args.save_parsing and args.model == "snadnet"
    pools = global_average_pools(model)
    failures: list[Path] = []
    written = 0
    with torch.no_grad():
        for _path, name, image in readable_images(inputs, names, failures, desc="deblur"):
            blurry = _to_batch(image, device)
            if save_parsing:  # one parsing map of the whole face: not tiled
                restored, parsing = model.restore(blurry, return_parsing=True)
                save_png(_to_uint8(colorize_regions(parsing)[0]),
                         out_dir / f"{name}_parsing.png")
            else:
                restored = _tiled(args, model.restore, pools)(blurry)
            save_png(_to_uint8(restored[0]), out_dir / f"{name}.png")
            written += 1
    return finish(f"wrote {written} image(s) to {out_dir}", failures, len(inputs))
