"""``facedeblur export``: a small inference checkpoint from a training checkpoint.

Example::

    facedeblur export runs/cfmd/checkpoints/last.pt cfmd_small.pt   # generator, float16

The output keeps the chosen models' weights (EMA weights when the run kept them), the task and
the config, and loads wherever the training checkpoint does (``facedeblur deblur``, ``eval``,
``demo --checkpoint``). The training config's ``inference`` table (whether the model learned
moments, and the ``u`` range of its targets; :mod:`facedeblur_ext.inference`) is checked and
stored at the top level as ``inference``, where ``deblur`` and ``demo`` read it; a config
without one gives a checkpoint without one (one moment, ``u = 0.5``).
"""

from __future__ import annotations

import argparse


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="training checkpoint (facedeblur train ...)")
    parser.add_argument("output", help="inference checkpoint to write (a new file)")
    parser.add_argument("--force", action="store_true",
                        help="replace the output file when it exists (never the checkpoint "
                             "itself)")
    parser.add_argument("--models", nargs="+", default=["generator"],
                        help="models to keep (default: generator)")
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"],
                        help="storage dtype of the weights (default float16: half the size)")
    parser.add_argument("--no-ema", action="store_true",
                        help="store the raw weights even when the checkpoint has EMA weights")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from facedeblur_ext.training.checkpoint import export_inference_checkpoint, load_checkpoint

    source, output = Path(args.checkpoint), Path(args.output)
    if not source.is_file():
        raise FileNotFoundError(f"checkpoint {source} does not exist")
    # The export is lossy (float16, no optimizer states): never write it over its source.
    if output.exists() and output.samefile(source):
        raise ValueError(f"the output {output} is the checkpoint itself; give another file")
    if output.exists() and not args.force:
        raise ValueError(f"{output} exists; pass --force to replace it")
    try:
        path = export_inference_checkpoint(source, output, args.models,
                                           dtype=getattr(torch, args.dtype),
                                           prefer_ema=not args.no_ema)
    except KeyError as exc:
        raise ValueError(str(exc.args[0])) from None
    settings = load_checkpoint(path).get("inference")  # the small exported file
    size = path.stat().st_size / 2**20
    moments = ("" if settings is None else f", inference: moments={settings['moments']}, "
               f"u_range={settings['u_range']}")
    print(f"wrote {path} ({size:.1f} MiB, {args.dtype}, models: {', '.join(args.models)}"
          f"{moments})")
    return 0
