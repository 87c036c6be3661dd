"""``facedeblur deblur --full-photo``: deblur every face of whole photos.

Each input photo goes through :func:`facedeblur_ext.full_photo.restore_photo`: MediaPipe face
detection, an eye-aligned square crop with margin per face, resampled to the model's working
size, the model (CFMD-GAN at ``u = 0.5``, the centre moment), and the restored crop pasted
back with a feathered mask. Writes ``<name>.png`` (the whole photo) per input (``<name>`` as in
:mod:`facedeblur_ext.commands.deblur`, which also reads the photos and refuses clashing outputs).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``--full-photo`` options of ``facedeblur deblur``."""
    from facedeblur_ext.commands.deblur import positive_float, positive_int
    from facedeblur_ext.full_photo import DEFAULT_FACE_MARGIN, DEFAULT_FEATHER

    group = parser.add_argument_group("whole photos (--full-photo)")
    group.add_argument("--full-photo", action="store_true",
                       help="inputs are whole photos: detect the faces, deblur each crop and "
                            "paste it back with a feathered mask (cfmd: u = 0.5)")
    group.add_argument("--face-size", type=positive_int, default=None,
                       help="model working size for face crops (default: the size the "
                            "checkpoint was validated or trained at, else 256)")
    group.add_argument("--face-margin", type=positive_float, default=DEFAULT_FACE_MARGIN,
                       help="crop side over the face box side (default %(default)s)")
    group.add_argument("--feather", type=float, default=DEFAULT_FEATHER,
                       help="blend fall-off width as a fraction of the crop (default "
                            "%(default)s)")
    group.add_argument("--min-face-score", type=float, default=0.5,
                       help="face detection confidence threshold (default %(default)s)")


def run(args: argparse.Namespace, inputs: list[Path], names: list[str]) -> int:
    """Deblur the faces of each photo in ``inputs`` into ``<output>/<name>.png``.

    Args:
        args: the parsed ``facedeblur deblur`` options.
        inputs: the photo files.
        names: per input, the output name (:func:`facedeblur_ext.commands.deblur.output_names`).

    Returns:
        0, or 1 when some photos could not be read (they are reported and skipped).
    """
    import warnings

    from facedeblur_ext.commands import resolve_device
    from facedeblur_ext.commands.deblur import _save_png, finish, readable_images
    from facedeblur_ext.data import FaceAnalyzer
    from facedeblur_ext.evaluation.methods import checkpoint_working_size, load_model
    from facedeblur_ext.full_photo import restore_photo
    from facedeblur_ext.nn import resolve_backend

    device = resolve_device(args.device)
    method = load_model(args.model, args.checkpoint, device, resolve_backend(args.backend),
                        prefer_ema=not args.no_ema)
    size = args.face_size if args.face_size is not None else checkpoint_working_size(
        args.checkpoint)
    if method.multiple > 1 and size % method.multiple:
        size += method.multiple - size % method.multiple
    analyzer = FaceAnalyzer(warn=False)
    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    failures: list[Path] = []
    written = total = 0
    for path, name, photo in readable_images(inputs, names, failures, desc="deblur photos"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # reported below instead
            restored, faces = restore_photo(photo, method, size=size, margin=args.face_margin,
                                            feather=args.feather, analyzer=analyzer,
                                            min_score=args.min_face_score, device=device)
        if not faces:
            print(f"{path.name}: no face found; written unchanged")
        total += len(faces)
        _save_png(restored, out_dir / f"{name}.png")
        written += 1
    return finish(f"wrote {written} photo(s) with {total} restored face(s) to {out_dir}",
                  failures, len(inputs))
