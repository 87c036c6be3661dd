"""Training data from a folder of sharp faces blurred on the fly (SNADNet, thesis baselines).

The ``data`` table of a config::

    root: DIR            # sharp face images, searched recursively (`--data-root DIR`)
    pattern: GLOB        # optional file-name filter, e.g. "*.jpg"
    val_root: DIR        # validation faces; null: the last `val_count` usable images of root
    val_count: N         # (sorted by path) are held out for validation
    analyzer: {...}      # facedeblur_ext.data.FaceAnalyzer arguments (e.g. cache_dir)
    blur: {class: module:Class, args: {...}}     # the blur synthesizer
    train: {class: module:Dataset, args: {...}}  # e.g. facedeblur_ext.data:SNADNetDataset
    val: {class: ..., args: {...}}

``blur`` names any class with the interface of ``facedeblur_ext.nn.BlurSynthesizer``:
``Synth(config, generator=None)`` (``args`` are its keyword arguments) and
``forward(images [N, C, H, W] in [0, 1], mask=None, return_info=False)``. The datasets are
built as ``Dataset(images=[files], synthesizer=..., analyzer=..., seed=<config seed>, **args)``
(``images`` and ``seed`` only where ``args`` leave them out), so any dataset class of
:mod:`facedeblur_ext.data` taking those arguments fits (``KernelBlurDataset``,
``SNADNetDataset``).
"""

from __future__ import annotations

import copy
import fnmatch
import warnings
from pathlib import Path

from .task import _import, instantiate

__all__ = ["build_face_datasets", "split_image_folder"]


def split_image_folder(data: dict) -> tuple[list[Path], list[Path]]:
    """(training, validation) image files of a ``data`` table (see the module docstring).

    Unusable files (unreadable, grayscale, with alpha, smaller than the training dataset's
    ``min_size``: the datasets' own header check, skipped like theirs with ``validate: false``)
    are dropped, with one warning, before the validation images are held out, so that they
    neither shrink the validation set nor leave it empty.
    """
    from ..data.io import DEFAULT_MIN_SIZE, list_images, probe_image

    train_args = (data.get("train") or {}).get("args") or {}
    min_size = int(train_args.get("min_size", DEFAULT_MIN_SIZE))
    validate = bool(train_args.get("validate", True))

    def images(folder) -> list[Path]:
        folder = Path(folder)
        if not folder.exists():
            raise FileNotFoundError(f"image folder {folder} does not exist")
        files = list_images(folder)
        pattern = data.get("pattern")
        if pattern:
            files = [p for p in files if fnmatch.fnmatch(p.name, pattern)]
        if not files:
            raise ValueError(f"no images in {folder}" + (f" matching {pattern!r}" if pattern
                                                         else ""))
        rejected = [(p, reason) for p in files if validate
                    and (reason := probe_image(p, min_size=min_size)) is not None]
        if rejected:
            shown = "; ".join(f"{p.name}: {reason}" for p, reason in rejected[:5])
            more = f" (and {len(rejected) - 5} more)" if len(rejected) > 5 else ""
            if len(rejected) == len(files):
                raise ValueError(f"no usable images in {folder}: {shown}{more}")
            warnings.warn(f"skipping {len(rejected)} of {len(files)} images in {folder}: "
                          f"{shown}{more}", UserWarning, stacklevel=3)
            unusable = {p for p, _ in rejected}
            files = [p for p in files if p not in unusable]
        return files

    if not data.get("root"):
        raise ValueError("data.root is not set: give a folder of sharp face images with "
                         "--data-root DIR (or the override data.root=DIR)")
    files = images(data["root"])
    if data.get("val_root"):
        return files, images(data["val_root"])
    count = int(data.get("val_count") or 0)
    if count >= len(files):
        raise ValueError(f"data.val_count={count} leaves no training image of the "
                         f"{len(files)} usable ones in {data['root']}")
    return (files[:-count], files[-count:]) if count > 0 else (files, [])


def build_face_datasets(config: dict):
    """(training dataset, validation dataset or None) of a config's ``data`` table, sharing one
    blur synthesizer and one face analyzer."""
    from ..data import FaceAnalyzer

    data = config.get("data") or {}
    # Checked before any file is read: a dataset that blurs with its own mix needs no table.
    train_class = (data.get("train") or {}).get("class")
    needs_blur = train_class is None or getattr(_import(train_class), "uses_synthesizer", True)
    if not data.get("blur") and needs_blur:
        raise ValueError("data.blur is not set: training needs a blur synthesizer, a "
                         "{class, args} table such as facedeblur_ext.nn:BlurSynthesizer")
    synthesizer = instantiate(data["blur"]) if data.get("blur") else None
    analyzer = FaceAnalyzer(**(data.get("analyzer") or {}))
    train_files, val_files = split_image_folder(data)
    seed = int(config.get("seed", 0))

    def dataset(spec: dict, files: list[Path]):
        spec = copy.deepcopy(spec)
        args = spec.get("args") or {}
        args.setdefault("images", [str(p) for p in files])
        args.setdefault("seed", seed)
        spec["args"] = args
        return instantiate(spec, synthesizer=synthesizer, analyzer=analyzer)

    train = dataset(data["train"], train_files)
    val = dataset(data["val"], val_files) if data.get("val") and val_files else None
    return train, val
