"""``facedeblur deblur --full-photo``: deblur every face of whole photos.

Each input photo goes through :func:`facedeblur_ext.full_photo.restore_photo`: MediaPipe face
detection, an eye-aligned square crop with margin per face, resampled to the model's working
size, the model (CFMD-GAN at ``u = 0.5``, the centre moment), and the restored crop pasted
back with a feathered mask. Writes ``<name>.png`` (the whole photo) per input.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``--full-photo`` options of ``facedeblur deblur``."""
    from facedeblur_ext.full_photo import DEFAULT_FACE_MARGIN, DEFAULT_FEATHER

    group = parser.add_argument_group("whole photos (--full-photo)")
    group.add_argument("--full-photo", action="store_true",
                       help="inputs are whole photos: detect the faces, deblur each crop and "
                            "paste it back with a feathered mask (cfmd: u = 0.5)")
    group.add_argument("--face-size", type=int, default=None,
                       help="model working size for face crops (default: the size the "
                            "checkpoint was validated or trained at, else 256)")
    group.add_argument("--face-margin", type=float, default=DEFAULT_FACE_MARGIN,
                       help="crop side over the face box side (default %(default)s)")
    group.add_argument("--feather", type=float, default=DEFAULT_FEATHER,
                       help="blend fall-off width as a fraction of the crop (default "
                            "%(default)s)")
    group.add_argument("--min-face-score", type=float, default=0.5,
                       help="face detection confidence threshold (default %(default)s)")


def run(args: argparse.Namespace, inputs: list[Path]) -> int:
    import warnings

    import torch
    from tqdm.auto import tqdm

    from facedeblur_ext.commands.deblur import _save_png
    from facedeblur_ext.data import FaceAnalyzer, load_rgb
    from facedeblur_ext.evaluation.methods import checkpoint_working_size, load_model
    from facedeblur_ext.full_photo import restore_photo
    from facedeblur_ext.nn import resolve_backend

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    try:
        method = load_model(args.model, args.checkpoint, device, resolve_backend(args.backend),
                            prefer_ema=not args.no_ema)
    except (FileNotFoundError, ValueError) as exc:
        raise SystemExit(str(exc)) from None
    size = args.face_size or checkpoint_working_size(args.checkpoint)
    if method.multiple > 1 and size % method.multiple:
        size += method.multiple - size % method.multiple
    analyzer = FaceAnalyzer(warn=False)
    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    total = 0
    for path in tqdm(inputs, desc="deblur photos", disable=len(inputs) < 2):
        photo = load_rgb(path, min_size=1, allow_grayscale=True, allow_alpha=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # reported below instead
            restored, faces = restore_photo(photo, method, size=size, margin=args.face_margin,
                                            feather=args.feather, analyzer=analyzer,
                                            min_score=args.min_face_score, device=device)
        if not faces:
            print(f"{path.name}: no face found; written unchanged")
        total += len(faces)
        _save_png(restored, out_dir / f"{path.stem}.png")
    print(f"wrote {len(inputs)} photo(s) with {total} restored face(s) to {out_dir}")
    return 0
