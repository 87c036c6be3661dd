"""``facedeblur deblur --full-photo``: deblur every face of whole photos.

Each input photo goes through :func:`facedeblur_ext.full_photo.restore_photo`: MediaPipe face
detection, an eye-aligned square crop with margin per face kept at the photo's resolution (or
resampled to ``--face-size``), the model (CFMD-GAN at the centre ``u`` of the checkpoint's
range) in tiles, a band-by-band fusion with the input so that no detail is lost, and the change
pasted back with a feathered mask. Writes ``<name>.png`` (the whole photo) per input (``<name>``
as in :mod:`facedeblur_ext.commands.deblur`, which also checks inputs and outputs before this
module runs). MediaPipe's log lines are hidden unless ``--verbose``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from facedeblur_ext.commands.deblur_common import (
    TileRunsBar,
    finish,
    native_stderr_hidden,
    positive_float,
    positive_int,
    progress_bar,
    readable_images,
    save_png,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``--full-photo`` options of ``facedeblur deblur``."""
    from facedeblur_ext.full_photo import DEFAULT_FACE_MARGIN, DEFAULT_FEATHER

    group = parser.add_argument_group("whole photos (--full-photo)")
    group.add_argument("--full-photo", action="store_true",
                       help="inputs are whole photos: detect the faces, deblur each at the "
                            "photo's resolution and paste it back with a feathered mask")
    group.add_argument("--face-size", type=positive_int, default=None,
                       help="resample face crops to this side for the model and scale only "
                            "its change back (faster, less restored detail; default: the "
                            "face's own resolution)")
    group.add_argument("--face-margin", type=positive_float, default=DEFAULT_FACE_MARGIN,
                       help="crop side over the face box side (default %(default)s)")
    group.add_argument("--feather", type=float, default=DEFAULT_FEATHER,
                       help="blend fall-off width as a fraction of the crop (default "
                            "%(default)s)")
    group.add_argument("--min-face-score", type=float, default=0.5,
                       help="face detection confidence threshold (default %(default)s)")
    group.add_argument("--no-detail-fusion", action="store_true",
                       help="paste the model's crop as it is instead of fusing it with the "
                            "input band by band (which keeps the input's detail where the model "
                            "has less)")


def run(args: argparse.Namespace, inputs: list[Path], names: list[str], device) -> int:
    """Deblur the faces of each photo in ``inputs`` into ``<output>/<name>.png``.

    Args:
        args: the parsed ``facedeblur deblur`` options.
        inputs: the photo files (their outputs checked and the output folder made).
        names: per input, the output name.
        device: where the model runs.

    Returns:
        0, or 1 when some photos could not be read (they are reported and skipped).
    """
    from facedeblur_ext.data import FaceAnalyzer
    from facedeblur_ext.evaluation.methods import load_model
    from facedeblur_ext.full_photo import detect_photo_faces, restore_photo
    from facedeblur_ext.inference import global_average_pools, read_inference_settings
    from facedeblur_ext.nn import resolve_backend

    method = load_model(args.model, args.checkpoint, device, resolve_backend(args.backend),
                        prefer_ema=not args.no_ema)
    u_centre = (sum(read_inference_settings(args.checkpoint).u_range) / 2
                if args.model == "cfmd" else None)

    def restore(crop):
        return method(crop, u=u_centre)

    pools = global_average_pools(method.model)

    size = args.face_size
    if size is not None and method.multiple > 1 and size % method.multiple:
        size += method.multiple - size % method.multiple
    with native_stderr_hidden(args.verbose):
        analyzer = FaceAnalyzer(warn=False)
        out_dir = Path(args.output)
        failures: list[Path] = []
        written = total = 0
        for path, name, photo in readable_images(inputs, names, failures, desc="deblur photos"):
            faces = detect_photo_faces(photo, analyzer, min_score=args.min_face_score)
            if not faces:
                print(f"{path.name}: no face found; written unchanged")
            with progress_bar(total=len(faces), desc=f"{path.name} faces", unit="face",
                              leave=False) as bar:
                restored = photo
                for face in faces:  # one at a time: a bar step per face, and one over its tiles
                    tile_runs = TileRunsBar()
                    try:
                        restored, _ = restore_photo(restored, restore, size=size,
                                                    margin=args.face_margin,
                                                    feather=args.feather, faces=[face],
                                                    device=device, tile=args.tile,
                                                    overlap=args.tile_overlap,
                                                    detail=not args.no_detail_fusion,
                                                    global_pools=pools, progress=tile_runs)
                    finally:
                        tile_runs.close()
                    bar.update()
            total += len(faces)
            save_png(restored, out_dir / f"{name}.png")
            written += 1
    return finish(f"wrote {written} photo(s) with {total} restored face(s) to {out_dir}",
                  failures, len(inputs))
