"""``facedeblur synth``: write a synthetic blur data set (PNG pairs, masks and a manifest).

Modes:

- ``kernel``: every input image blurred as a whole by ``facedeblur_ext.nn.BlurSynthesizer``.
- ``face-only``: the same kernels (same seed) applied only inside the feathered face mask,
  the background staying sharp (thesis 002).
- ``frames``: consecutive frames of videos or frame folders averaged with a gamma CRF
  (paper 003 Eq. 5); the sharp frames are written in FMR order with their control factors.
- ``motion``: each still face moved by a seeded continuous motion
  (:mod:`facedeblur_ext.data.motion`): the blurry image is the CRF average of the sub-frames,
  the N sharp moments are written in FMR order with ``u = (i - 1) / N`` (N drawn per item from
  ``--num-frames``). The crop is centred and 16 px smaller than ``--size`` (or the input's
  short side): room for the motion inside the still. ``--synth-config`` may hold ``motion``
  (``MotionConfig``) and ``degradation`` (``DegradationConfig``) tables; by default the
  blurry image is the motion blur alone, on 8-bit levels.

Layout of ``--output``::

    blurry/<item>.png            the blurred image
    sharp/<item>.png             kernel modes: the sharp image
    sharp/<item>/<rank>.png      frames and motion modes: sharp frames in FMR order, rank 00
                                 has u = 0
    masks/<item>_face.png        feathered face mask (frames mode: union over the frames)
    masks/<item>_parsing.png     kernel modes: parsing labels (ids of PARSING_CLASSES)
    kernels/<item>__<key>.npy    kernel modes: arrays from the synthesizer's info (kernels)
    records/<item>.json          per-item record, written last: its presence marks the item done
    manifest.json                settings, all records and the skipped inputs with reasons

Every file is written atomically, so an interrupted run leaves no torn files and a rerun skips
the items that have a record (resumable). The manifest is written at the start of a run too,
and a rerun whose settings differ from its ``settings`` in what decides how the items are made
(mode, seed, size, min size, and the synthesizer config or the frame settings of the mode) is
refused, since its items would be mixed with the earlier ones: pass a new ``--output`` instead
(``--input``, ``--limit`` and ``--cache-dir`` may change). Unusable inputs (unreadable,
grayscale, with alpha, too small, no face) are reported and skipped; they never stop the run.
Each item's random choices depend only on ``--seed`` and the item's name, so adding inputs
does not change the items already made, and ``kernel`` and ``face-only`` runs with one seed use
the same kernels.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import sys
import time
from pathlib import Path

import numpy as np

MODES = ("kernel", "face-only", "frames", "motion")
SYNTH_MISSING = ("--mode {mode} needs facedeblur_ext.nn.BlurSynthesizer, which this installation "
                 "does not provide yet ({error}); --mode frames works without it")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", required=True, type=Path,
                        help="image folder or file (kernel modes); video, frame folder or a tree "
                             "of them (frames mode)")
    parser.add_argument("--output", required=True, type=Path, help="output folder")
    parser.add_argument("--mode", required=True, choices=MODES)
    parser.add_argument("--seed", type=int, default=0, help="base seed (default 0)")
    parser.add_argument("--size", type=int, default=None,
                        help="resize the short side to SIZE and centre-crop SIZE x SIZE "
                             "(default: keep the input size)")
    parser.add_argument("--min-size", type=int, default=64,
                        help="skip inputs whose short side is below this (default 64)")
    parser.add_argument("--synth-config", type=Path, default=None,
                        help="YAML or JSON config for BlurSynthesizer (kernel modes), or with "
                             "'motion' and 'degradation' tables (motion mode)")
    parser.add_argument("--num-frames", default="5-13",
                        help="frames averaged per blurry image (frames mode) or sharp moments "
                             "per blurry image (motion mode): N or LO-HI (default 5-13)")
    parser.add_argument("--stride", type=int, default=None,
                        help="frames between window starts (default: the largest N)")
    parser.add_argument("--crf-gamma", type=float, default=2.2,
                        help="camera response gamma for frame averaging (frames and motion "
                             "modes; default 2.2; 1: none)")
    parser.add_argument("--fmr-grid", type=float, default=1.0,
                        help="FMR position comparison grid in pixels (default 1)")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="face analysis cache (default: $FACEDEBLUR_CACHE_DIR or "
                             "~/.cache/facedeblur)")
    parser.add_argument("--limit", type=int, default=None, help="process at most this many items")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


# ---- helpers -------------------------------------------------------------------------------

def _parse_num_frames(text: str) -> tuple[int, int]:
    parts = str(text).split("-")
    try:
        lo, hi = (int(parts[0]), int(parts[-1])) if len(parts) <= 2 else (None, None)
    except ValueError:
        lo = hi = None
    if lo is None or not 1 <= lo <= hi:
        raise ValueError(f"--num-frames must be N or LO-HI with 1 <= LO <= HI, got {text!r}")
    return lo, hi


def _item_seed(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{seed}|{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _load_config(path: Path | None):
    if path is None:
        return None
    text = path.read_text()
    if path.suffix.lower() == ".json":
        return json.loads(text)
    import yaml

    return yaml.safe_load(text)


def _make_synthesizer(config):
    """BlurSynthesizer(config), imported lazily; ImportError when it does not exist yet."""
    try:
        from facedeblur_ext.nn import BlurSynthesizer
    except ImportError as exc:
        raise ImportError(str(exc)) from exc
    if config is None:
        try:
            return BlurSynthesizer()
        except TypeError:
            return BlurSynthesizer(None)
    return BlurSynthesizer(config)


def _jsonable(value, name: str, out_dir: Path, item: str, files: dict):
    """Info values -> JSON; arrays with two or more dimensions (kernels) go to .npy files."""
    import torch

    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        if value.ndim >= 2:
            from facedeblur_ext.data.io import atomic_write_bytes

            rel = f"kernels/{item}__{name}.npy"
            buf = io.BytesIO()
            np.save(buf, value, allow_pickle=False)
            atomic_write_bytes(out_dir / rel, buf.getvalue())
            files[name] = rel
            return rel
        return value.tolist()
    if isinstance(value, dict):
        return {str(k): _jsonable(v, f"{name}.{k}", out_dir, item, files)
                for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, f"{name}.{i}", out_dir, item, files) for i, v in enumerate(value)]
    if isinstance(value, (np.generic,)):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


def _write_json(path: Path, data) -> None:
    from facedeblur_ext.data.io import atomic_write_bytes

    atomic_write_bytes(path, (json.dumps(data, indent=1, sort_keys=True) + "\n").encode())


def _settings(args, synthesizer) -> dict:
    """The run's settings as stored in the manifest."""
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                if k not in ("no_progress",)}
    settings["synth_config"] = _load_config(args.synth_config)
    if synthesizer is not None:
        settings["synthesizer"] = type(synthesizer).__module__ + "." + type(synthesizer).__name__
    return settings


def _recipe(settings: dict, mode: str) -> dict:
    """The settings that decide how the items of ``mode`` are made, in one spelling each
    (``--num-frames 7`` is 7-7, the default stride is the largest N), as JSON values."""
    recipe = {key: settings.get(key) for key in ("mode", "seed", "size", "min_size")}
    if mode == "frames":
        lo, hi = _parse_num_frames(settings.get("num_frames"))
        recipe.update(num_frames=f"{lo}-{hi}", stride=settings.get("stride") or hi,
                      crf_gamma=settings.get("crf_gamma"), fmr_grid=settings.get("fmr_grid"))
    elif mode == "motion":
        lo, hi = _parse_num_frames(settings.get("num_frames"))
        recipe.update(num_frames=f"{lo}-{hi}", crf_gamma=settings.get("crf_gamma"),
                      synth_config=settings.get("synth_config"))
    else:
        recipe.update(synth_config=settings.get("synth_config"),
                      synthesizer=settings.get("synthesizer"))
    return json.loads(json.dumps(recipe))  # (as read back from manifest.json)


def _check_same_recipe(out: Path, settings: dict) -> None:
    """Refuse to add items to ``out`` when the items already there were made otherwise.

    Raises:
        ValueError: ``out`` has item records and its manifest's settings differ from
            ``settings`` in the recipe (naming each difference), or the manifest is unreadable.
    """
    manifest_path = out / "manifest.json"
    records_dir = out / "records"
    if not manifest_path.is_file() or not any(records_dir.glob("*.json")):
        return  # nothing made yet (records without a manifest: made before it was written first)
    try:
        previous = json.loads(manifest_path.read_text())["settings"]
        before = _recipe(previous, settings["mode"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"cannot read the settings of the items in {out} from {manifest_path} "
                         f"({exc}); pass a new --output folder") from None
    now = _recipe(settings, settings["mode"])
    labels = {"synth_config": "the --synth-config content", "synthesizer": "the synthesizer"}
    changed = [f"{labels.get(key, '--' + key.replace('_', '-'))} was {before[key]!r}, "
               f"now {now[key]!r}" for key in now if before[key] != now[key]]
    if changed:
        raise ValueError(f"{out} holds items made with other settings ({'; '.join(changed)}); "
                         "rerun with those settings to add to it, or pass a new --output folder")


def _write_manifest(out: Path, settings: dict, skipped: list, counts: dict) -> int:
    """manifest.json: ``settings``, the records on disk, ``skipped`` and ``counts``.

    Returns:
        The number of records listed.

    Raises:
        OSError: the write failed; on a full disk, naming the manifest.
    """
    from facedeblur_ext.training.checkpoint import disk_full_error

    records_dir = out / "records"
    records = []
    for path in sorted(records_dir.glob("*.json")) if records_dir.is_dir() else []:
        try:
            records.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    manifest = out / "manifest.json"
    try:
        _write_json(manifest, {"settings": settings, "items": records, "skipped": skipped,
                               "counts": {"items": len(records), **counts}})
    except OSError as exc:
        full = disk_full_error(exc, manifest)
        if full is not None:
            raise full from exc
        raise
    return len(records)


def _listed_files(files) -> set[str]:
    """The relative paths in a record's ``files`` (strings, lists and tables of them)."""
    if isinstance(files, str):
        return {files}
    values = files.values() if isinstance(files, dict) else files
    return set().union(*(_listed_files(v) for v in values)) if values else set()


def _remove_partial_item(out: Path, since_ns: int) -> None:
    """Delete the files of the item that the disk filled up in: those written since it began
    (this process holds the folder: no other writer) that no record lists. That frees room
    for the manifest; a rerun writes them again."""
    listed = set()
    for path in (out / "records").glob("*.json"):
        try:
            listed |= _listed_files(json.loads(path.read_text()).get("files") or {})
        except (OSError, ValueError, AttributeError):
            continue
    for path in list(out.rglob("*")):
        rel = path.relative_to(out)
        if rel.parts[0] == "records" or len(rel.parts) == 1 or rel.as_posix() in listed:
            continue  # (records, and the top level: manifest.json and the lock)
        with contextlib.suppress(OSError):
            if path.is_file() and path.stat().st_mtime_ns >= since_ns:
                path.unlink()


def _stop_on_full_disk(full: OSError, out: Path, settings: dict, skipped: list, made: int,
                       done: int, item_started_ns: int) -> OSError:
    """The error that ends a run on a full disk, after removing the failed item's files and
    rewriting the manifest so that it lists the records on disk."""
    _remove_partial_item(out, item_started_ns)
    try:
        listed = _write_manifest(out, settings, skipped,
                                 {"made": made, "already_done": done, "skipped": len(skipped),
                                  "failed": 0, "stopped": "disk full"})
        manifest = f"manifest.json lists the {listed} items on disk"
    except OSError:
        manifest = "manifest.json is not updated (no space for it either)"
    return OSError(full.errno, f"{full.strerror}; stopped after {made} new item(s), {manifest}; "
                               "free space and rerun the same command to finish the set")


class _SkipItem(Exception):
    """An input that is reported and skipped (bad file, no face)."""


# ---- items ---------------------------------------------------------------------------------

def _kernel_items(args) -> list[tuple[str, Path]]:
    from facedeblur_ext.data.io import list_images, safe_item_name

    root = args.input
    out = args.output.resolve()
    # (an output folder inside the input folder must not feed back into the inputs)
    files = [p for p in list_images(root) if not p.resolve().is_relative_to(out)]
    base = root if root.is_dir() else root.parent
    return [(safe_item_name(p.relative_to(base).with_suffix("").parts), p) for p in files]


def _frame_items(args, skipped: list) -> list[tuple[str, tuple]]:
    from facedeblur_ext.data.io import (
        BadImageError,
        FrameReadError,
        discover_frame_sources,
        open_frame_source,
        safe_item_name,
    )

    lo, hi = _parse_num_frames(args.num_frames)
    stride = args.stride or hi
    root = args.input
    base = root if root.is_dir() else root.parent
    items = []
    out = args.output.resolve()
    for path in discover_frame_sources(root):
        if path.resolve().is_relative_to(out):
            continue
        rel = path.relative_to(base) if path != base else Path(path.name)
        if path.is_file():
            rel = rel.with_suffix("")
        stem = safe_item_name(rel.parts or (path.name,))
        try:
            source = open_frame_source(path, min_size=args.min_size)
        except (FrameReadError, BadImageError) as exc:
            skipped.append({"item": stem, "input": str(path), "reason": str(exc)})
            continue
        if len(source) < hi:
            skipped.append({"item": stem, "input": str(path),
                            "reason": f"only {len(source)} frames, fewer than {hi}"})
            continue
        for start in range(0, len(source) - hi + 1, stride):
            name = f"{stem}__f{start:06d}"
            n = lo + _item_seed(args.seed, name) % (hi - lo + 1)
            items.append((name, (source, start, int(n))))
    return items


def _transform_for(args, size_hw):
    from facedeblur_ext.data.geometry import center_transform, identity_transform

    if args.size is None:
        return identity_transform(size_hw)
    return center_transform(size_hw, args.size, base_size=args.size)


def _do_kernel_item(args, name, path, out, analyzer, synthesizer, face_only) -> dict:
    import torch

    from facedeblur_ext.data.datasets import run_synthesizer
    from facedeblur_ext.data.io import BadImageError, load_rgb, to_uint8, write_png
    from facedeblur_ext.data.masks import render_masks

    try:
        image = load_rgb(path, min_size=args.min_size)
    except BadImageError as exc:
        raise _SkipItem(exc.reason) from None
    analysis = analyzer.analyze(image, name=str(path))
    if not analysis.found:
        raise _SkipItem("no face found")
    transform = _transform_for(args, image.shape[:2])
    crop = transform.apply_image(image)
    masks = render_masks(analysis, transform, soft=True)
    seed = _item_seed(args.seed, name)
    sharp = torch.from_numpy(np.ascontiguousarray(crop.transpose(2, 0, 1))).float().div_(255)
    blend = torch.from_numpy(masks["face_soft"])[None, None] if face_only else None
    blurry, info = run_synthesizer(synthesizer, sharp[None], blend, seed, return_info=True)
    blurry_u8 = to_uint8(blurry[0].detach().cpu().numpy().transpose(1, 2, 0))

    files = {"sharp": f"sharp/{name}.png", "blurry": f"blurry/{name}.png",
             "face_mask": f"masks/{name}_face.png", "parsing": f"masks/{name}_parsing.png"}
    write_png(out / files["sharp"], crop)
    write_png(out / files["blurry"], blurry_u8)
    write_png(out / files["face_mask"], to_uint8(masks["face"]))
    write_png(out / files["parsing"], masks["parsing"])
    blur = _jsonable(info or {}, "info", out, name, files)
    return {"name": name, "mode": args.mode, "input": str(path), "size": list(crop.shape[:2]),
            "seed": seed, "face_source": analysis.source, "blur": blur, "files": files}


def _do_frames_item(args, name, spec, out, analyzer) -> dict:
    from facedeblur_ext.data.fmr import (
        control_factors,
        crf_average_uint8,
        fill_missing,
        fmr_order,
        left_eye_after_transform,
    )
    from facedeblur_ext.data.io import BadImageError, FrameReadError, to_uint8, write_png
    from facedeblur_ext.data.masks import (
        face_from_parsing,
        feather_sigma,
        render_parsing,
        soften,
    )

    source, start, n = spec
    try:
        frames = source.read(start, n)
    except (FrameReadError, BadImageError) as exc:
        raise _SkipItem(str(exc)) from None
    analyses = [analyzer.analyze(f, name=source.describe(start + k))
                for k, f in enumerate(frames)]
    found = [a.found for a in analyses]
    if not any(found):
        raise _SkipItem("no face found in any frame")
    gamma = None if args.crf_gamma == 1 else args.crf_gamma
    blurry = to_uint8(crf_average_uint8(frames, gamma))
    transform = _transform_for(args, frames[0].shape[:2])
    eyes = fill_missing(np.stack([left_eye_after_transform(a, transform) for a in analyses]),
                        found)
    order = fmr_order(eyes, args.fmr_grid)
    u = control_factors(n)

    files = {"blurry": f"blurry/{name}.png", "face_mask": f"masks/{name}_face.png",
             "sharp": [f"sharp/{name}/{rank:02d}.png" for rank in range(n)]}
    for rank, t in enumerate(order):
        write_png(out / files["sharp"][rank], transform.apply_image(frames[t]))
    write_png(out / files["blurry"], transform.apply_image(blurry))
    union = np.zeros(transform.out_size, np.float32)
    for analysis in analyses:
        np.maximum(union, face_from_parsing(render_parsing(analysis, transform)), out=union)
    union = soften(union, feather_sigma(analyses[n // 2], transform))
    write_png(out / files["face_mask"], to_uint8(union))
    return {"name": name, "mode": "frames", "input": str(source.path), "start": start,
            "num_frames": n, "frame_indices": list(range(start, start + n)),
            "fmr_order": [int(start + t) for t in order], "u": [float(v) for v in u],
            "eye_xy": eyes[order].round(3).tolist(), "crf_gamma": gamma,
            "faces_found": int(sum(found)), "face_sources": [a.source for a in analyses],
            "size": list(transform.out_size), "files": files}


def _motion_dataset(args, files: list[Path], analyzer):
    """The data set whose samples ``--mode motion`` writes (motion only, every moment)."""
    from facedeblur_ext.data import MotionBlurMixDataset
    from facedeblur_ext.evaluation.protocols import CLEAN_DEGRADATION

    config = _load_config(args.synth_config) or {}
    unknown = set(config) - {"motion", "degradation"}
    if unknown:
        raise ValueError(f"--synth-config of --mode motion takes 'motion' and 'degradation' "
                         f"tables, not {sorted(unknown)}")
    gamma = None if args.crf_gamma == 1 else args.crf_gamma
    return MotionBlurMixDataset(
        files, motion_prob=1.0, num_targets=_parse_num_frames(args.num_frames),
        return_moments=True, motion={**config.get("motion", {}), "crf_gamma": gamma},
        degradation=config.get("degradation", CLEAN_DEGRADATION), analyzer=analyzer,
        crop_size=args.size - 16 if args.size else None, base_size=args.size, augment=False,
        validate=False, min_size=args.min_size)


def _do_motion_item(args, name, path, out, dataset) -> dict:
    from facedeblur_ext.data.io import BadImageError, load_rgb, to_uint8, write_png

    try:
        image = load_rgb(path, min_size=args.min_size)
    except BadImageError as exc:
        raise _SkipItem(exc.reason) from None
    analysis = dataset.analyzer.analyze(image, name=str(path))
    if not analysis.found:
        raise _SkipItem("no face found")
    seed = _item_seed(args.seed, name)
    sample = dataset._make_sample(0, image, analysis, np.random.default_rng(seed))
    moments, u = sample["moments"], [round(float(v), 6) for v in sample["moment_u"]]
    files = {"blurry": f"blurry/{name}.png",
             "sharp": [f"sharp/{name}/{rank:02d}.png" for rank in range(len(u))]}
    for rank, moment in enumerate(moments):
        write_png(out / files["sharp"][rank], to_uint8(moment.numpy().transpose(1, 2, 0)))
    write_png(out / files["blurry"], to_uint8(sample["blurry"].numpy().transpose(1, 2, 0)))
    return {"name": name, "mode": "motion", "input": str(path), "seed": seed,
            "num_moments": len(u), "u": u, "size": list(moments.shape[-2:]),
            "face_source": analysis.source, "files": files}


# ---- command -------------------------------------------------------------------------------

def run(args: argparse.Namespace) -> int:
    """Write the data set, holding ``--output``'s lock (one writer per folder; a second one is
    refused naming the holder's PID). Under the lock, the temporary files of a killed run are
    removed first: its items without a record are made again.

    Raises:
        FolderLockedError: another process writes ``--output``.
        OSError: the disk is full (after a manifest of the items made is written, if it can be).
    """
    from facedeblur_ext.training.lock import FolderLock, remove_orphan_temp_files

    if not args.input.exists():  # before the lock, which would make the output folder
        print(f"facedeblur synth: input {args.input} does not exist", file=sys.stderr)
        return 2
    with FolderLock(args.output, "facedeblur synth"):
        remove_orphan_temp_files(args.output)
        return _write_data_set(args)


def _write_data_set(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from facedeblur_ext.data.face import FaceAnalyzer
    from facedeblur_ext.training.checkpoint import disk_full_error

    out: Path = args.output
    synthesizer = None
    if args.mode in ("kernel", "face-only"):
        try:
            synthesizer = _make_synthesizer(_load_config(args.synth_config))
        except ImportError as exc:
            print("facedeblur synth: " + SYNTH_MISSING.format(mode=args.mode, error=exc),
                  file=sys.stderr)
            return 2
    settings = _settings(args, synthesizer)
    _check_same_recipe(out, settings)

    analyzer = FaceAnalyzer(cache_dir=args.cache_dir, warn=False)
    skipped: list[dict] = []
    if args.mode == "frames":
        items = _frame_items(args, skipped)
    else:
        items = _kernel_items(args)
    if args.limit is not None:
        items = items[: args.limit]
    motion = (_motion_dataset(args, [path for _, path in items], analyzer)
              if args.mode == "motion" and items else None)
    if not items and not skipped:
        print(f"facedeblur synth: no inputs found in {args.input}", file=sys.stderr)
        return 2
    for entry in skipped:
        print(f"skipped {entry['input']}: {entry['reason']}", file=sys.stderr)
    # Written first so that the settings of an interrupted run's items are known on a rerun.
    _write_manifest(out, settings, skipped,
                    {"made": 0, "already_done": 0, "skipped": len(skipped), "failed": 0})

    records_dir = out / "records"
    done = made = failed = 0
    start_time = time.time()
    bar = tqdm(items, desc=f"synth {args.mode}", unit="item", disable=args.no_progress,
               file=sys.stderr)
    for name, spec in bar:
        record_path = records_dir / f"{name}.json"
        if record_path.is_file():
            done += 1
            continue
        source_text = str(spec[0].describe(spec[1])) if args.mode == "frames" else str(spec)
        # File times come from a coarse clock, up to a tick behind time_ns(): a second's margin
        # (files of finished items are safe: their records list them).
        item_started_ns = time.time_ns() - 1_000_000_000
        try:
            if args.mode == "frames":
                record = _do_frames_item(args, name, spec, out, analyzer)
            elif args.mode == "motion":
                record = _do_motion_item(args, name, spec, out, motion)
            else:
                record = _do_kernel_item(args, name, spec, out, analyzer, synthesizer,
                                         face_only=args.mode == "face-only")
            _write_json(record_path, record)
        except ImportError as exc:  # MediaPipe missing: every item would fail the same way
            bar.close()
            print(f"facedeblur synth: {exc}", file=sys.stderr)
            return 2
        except _SkipItem as exc:
            skipped.append({"item": name, "input": source_text, "reason": str(exc)})
            tqdm.write(f"skipped {source_text}: {exc}", file=sys.stderr)
            continue
        except Exception as exc:  # report, keep going: one bad input must not stop a long run
            full = disk_full_error(exc, f"item {name} in {out}")
            if full is not None:  # except on a full disk: every other item would fail too
                bar.close()
                raise _stop_on_full_disk(full, out, settings, skipped, made, done,
                                         item_started_ns) from exc
            failed += 1
            skipped.append({"item": name, "input": source_text,
                            "reason": f"failed: {type(exc).__name__}: {exc}"})
            tqdm.write(f"FAILED {source_text}: {type(exc).__name__}: {exc}", file=sys.stderr)
            continue
        made += 1
        bar.set_postfix(made=made, skipped=len(skipped))
    bar.close()

    _write_manifest(out, settings, skipped, {"made": made, "already_done": done,
                                             "skipped": len(skipped), "failed": failed})
    print(f"facedeblur synth: {made} made, {done} already done, {len(skipped)} skipped "
          f"({failed} failed) in {time.time() - start_time:.1f} s -> {out}", file=sys.stderr)
    return 1 if failed else 0
