"""``facedeblur eval``: the papers' evaluation protocols on our data, as tables and plots.

Protocols (``--protocol``, default all; see :mod:`facedeblur_ext.evaluation.protocols`):

* ``kernel``: trajectory kernels 13-29 plus noise 0.03 on the CelebA test split (SNADNet);
* ``frames``: frame-averaged blur (5..13 frames) from face videos, single-to-single and per
  frame count (CFMD-GAN);
* ``face-region``: whole-image vs face-only motion blur (thesis);
* ``moments``: motion from the still test faces, every sharp moment (N = 5, 7, 9) against
  the output for its ``u`` (paper 003 Table 4's layout);
* ``linear``: linear motion 7-15 px at any angle plus noise 0.01 on the test faces;
* ``video``: real blurry/sharp face video pairs, aligned to the test faces' scale;
* ``sweep``: u-sweep grids and GIFs of each CFMD-GAN row on test faces and real blurred faces.

Rows: the blurry input, unsharp masking, Wiener deconvolution with the true kernel (the
``--baselines`` kept), and every ``--model FAMILY --checkpoint PATH`` pair. Columns: PSNR,
SSIM, L1 %, LPIPS, SFace identity distance, face detection rate (``n/a`` with the reason where
a metric's weights are missing), with ``--fid`` also FID and KID, and time per image.

Examples::

    facedeblur eval --data ../shared/data/faces/celeba_dic_test128 --protocol kernel \\
        --model cfmd --checkpoint runs/cfmd/checkpoints/last.pt -o eval/cfmd
    facedeblur eval --protocol frames --videos ../shared/data/face_video/hdtf_via_sadtalker \\
        --limit 20 --model cfmd --checkpoint cfmd.pt
    facedeblur eval --protocol moments --limit 100 --baselines blurry --metrics psnr ssim lpips \\
        --model cfmd --checkpoint old.pt --label previous \\
        --model cfmd --checkpoint new.pt --label new -o eval/moments
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

PROTOCOLS = ("kernel", "frames", "face-region", "moments", "linear", "video", "sweep")
#: ``--baselines`` names -> the rows of ``baseline_methods``
BASELINES = {"blurry": "blurry input", "unsharp": "unsharp mask", "wiener": "Wiener (true kernel)"}


def default_shared_data() -> Path:
    """``$FACEDEBLUR_SHARED_DATA``, else the first ``../shared/data`` found next to the current
    folder or next to the repository holding this package (or its parent folder)."""
    env = os.environ.get("FACEDEBLUR_SHARED_DATA")
    if env:
        return Path(env)
    repo = Path(__file__).resolve().parents[2]
    for base in (Path.cwd().parent, repo.parent, repo.parent.parent):
        candidate = base / "shared" / "data"
        if candidate.is_dir():
            return candidate
    return Path("..") / "shared" / "data"


def configure(parser: argparse.ArgumentParser) -> None:
    from facedeblur_ext.evaluation.baselines import DEFAULT_UNSHARP_AMOUNT, DEFAULT_UNSHARP_SIGMA
    from facedeblur_ext.evaluation.methods import MODEL_FAMILIES
    from facedeblur_ext.evaluation.protocols import (
        FRAME_COUNTS,
        KERNEL_SIZES,
        MOMENT_COUNTS,
        VIDEO_FACE_SIZE,
    )
    from facedeblur_ext.evaluation.scoring import DEFAULT_METRICS, METRICS

    shared = default_shared_data()
    parser.add_argument("--protocol", nargs="+", default=["all"],
                        choices=[*PROTOCOLS, "all"], help="which protocols to run (default all)")
    parser.add_argument("--data", default=str(shared / "faces" / "celeba_dic_test128"),
                        help="folder of sharp test faces for the kernel and face-region "
                             "protocols (default: the 1000-image CelebA test split, %(default)s)")
    parser.add_argument("--videos", nargs="+",
                        default=[str(shared / "face_video" / "hdtf_via_sadtalker")],
                        help="videos or frame folders for the frames protocol "
                             "(default %(default)s)")
    parser.add_argument("--video-pairs",
                        default=str(shared / "face_video" / "ren_iccv2019_facevideo"),
                        help="folder of sequences with blurry/ and sharp/ frames for the video "
                             "protocol (default %(default)s)")
    parser.add_argument("--real-blur", default=str(shared / "real_blur" / "shen_cvpr2018"),
                        help="real blurred faces for the sweep protocol (default %(default)s)")
    parser.add_argument("--limit", type=int, default=None,
                        help="evaluate only the first N images (frames: N windows per count; "
                             "moments: N faces per count; video: N pairs per sequence)")
    parser.add_argument("--baselines", nargs="*", default=list(BASELINES),
                        choices=list(BASELINES),
                        help="baseline rows (default all: %(default)s; none: give the option "
                             "alone)")
    parser.add_argument("--model", action="append", default=[], choices=sorted(MODEL_FAMILIES),
                        help="a trained model row (repeatable; pair each with --checkpoint)")
    parser.add_argument("--checkpoint", action="append", default=[],
                        help="checkpoint of the --model at the same position")
    parser.add_argument("--label", action="append", default=[],
                        help="row name of the --model at the same position")
    parser.add_argument("--backend", default="facedeblur_ext.ops",
                        help="provider of the fused ops the models use (import path)")
    parser.add_argument("--no-ema", action="store_true", help="use raw (not EMA) weights")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--seed", type=int, default=0, help="seed of the degradations")
    parser.add_argument("-o", "--output", default="eval_results", help="output folder")
    parser.add_argument("--size", type=int, default=None,
                        help="resize + centre-crop still images to this square size "
                             "(default: native, 128 for the CelebA split)")
    parser.add_argument("--video-size", type=int, default=256,
                        help="square size of the video frames (short side resized, centre crop)")
    parser.add_argument("--blur", choices=("trajectory", "motion45"), default="trajectory",
                        help="kernel protocol: trajectory 13-29 (CelebA) or motion 25 px at 45 "
                             "degrees (CelebA-HQ)")
    parser.add_argument("--kernel-sizes", type=int, nargs="+", default=list(KERNEL_SIZES),
                        help="trajectory kernel sizes (default 13 15 ... 29)")
    parser.add_argument("--noise", type=float, default=None,
                        help="kernel protocol noise sigma (default 0.03 trajectory, 0 motion45)")
    parser.add_argument("--frame-counts", type=int, nargs="+", default=list(FRAME_COUNTS),
                        help="frames averaged per blurry image (default 5 7 9 11 13)")
    parser.add_argument("--moment-counts", type=int, nargs="+", default=list(MOMENT_COUNTS),
                        help="moments protocol: sharp moments per blurry face (default 5 7 9)")
    parser.add_argument("--video-face-size", type=int, default=VIDEO_FACE_SIZE,
                        help="video protocol: side of the aligned face crop (default "
                             "%(default)s, the CelebA test faces' scale)")
    parser.add_argument("--sweep-frames", type=int, default=7,
                        help="sweep protocol: moments per sweep, u = (i - 1) / N (default 7)")
    parser.add_argument("--sweep-faces", type=int, nargs=2, default=[2, 4],
                        metavar=("TEST", "REAL"),
                        help="sweep protocol: how many test faces and real blurred faces "
                             "(default 2 4)")
    parser.add_argument("--wiener-nsr", default="auto",
                        help="Wiener noise-to-signal ratio at the gradient scale (sigma_n^2 / "
                             "gradient energy): a number or 'auto' ((sigma_n^2 + q^2/12) / "
                             "0.0056, at least 1e-2); see evaluation/baselines.py")
    parser.add_argument("--unsharp-sigma", type=float, default=DEFAULT_UNSHARP_SIGMA)
    parser.add_argument("--unsharp-amount", type=float, default=DEFAULT_UNSHARP_AMOUNT)
    parser.add_argument("--metrics", nargs="+", default=list(DEFAULT_METRICS),
                        choices=list(METRICS),
                        help="metric columns (default: all but the set metrics fid and kid)")
    parser.add_argument("--fid", action="store_true",
                        help="add FID and KID (an Inception-v3 pass per image)")
    parser.add_argument("--y-channel", action="store_true",
                        help="PSNR and SSIM on the BT.601 luma instead of RGB")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers")
    parser.add_argument("--examples", type=int, default=4, help="inputs in the example grids")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def build_methods(args: argparse.Namespace, device) -> list:
    """Baseline rows plus one row per ``--model``/``--checkpoint`` pair."""
    from facedeblur_ext.cli import USER_ERRORS, describe_error
    from facedeblur_ext.evaluation.methods import baseline_methods, load_model
    from facedeblur_ext.nn import resolve_backend

    if len(args.model) != len(args.checkpoint):
        raise ValueError(f"give one --checkpoint per --model ({len(args.model)} models, "
                         f"{len(args.checkpoint)} checkpoints)")
    if args.label and len(args.label) != len(args.model):
        raise ValueError("give one --label per --model, or none")
    nsr = args.wiener_nsr
    if nsr != "auto":
        try:
            nsr = float(nsr)
        except ValueError:
            raise ValueError(f"--wiener-nsr must be a number or 'auto', got {nsr!r}") from None
    kept = {BASELINES[b] for b in args.baselines}
    methods = [m for m in baseline_methods(wiener_nsr=nsr, unsharp_sigma=args.unsharp_sigma,
                                           unsharp_amount=args.unsharp_amount)
               if m.name in kept]
    try:
        backend = resolve_backend(args.backend) if args.model else None
    except ImportError as exc:
        raise ValueError(f"--backend {args.backend}: {exc}") from None
    for i, (family, ckpt) in enumerate(zip(args.model, args.checkpoint)):
        label = args.label[i] if args.label else None
        try:
            methods.append(load_model(family, ckpt, device, backend,
                                      prefer_ema=not args.no_ema, label=label))
        except USER_ERRORS as exc:  # missing, truncated or foreign checkpoint files
            raise ValueError(f"--model {family} --checkpoint {ckpt}: cannot load it: "
                             f"{describe_error(exc)}") from None
    names = [m.name for m in methods]
    if len(set(names)) != len(names):
        raise ValueError(f"row names must differ, got {names}; use --label")
    return methods


def run(args: argparse.Namespace) -> int:
    import torch

    from facedeblur_ext.commands import resolve_device
    from facedeblur_ext.evaluation.protocols import (
        EvalSettings,
        run_face_region_protocol,
        run_frames_protocol,
        run_kernel_protocol,
        run_moments_protocol,
        run_sweep_protocol,
        run_video_protocol,
    )
    from facedeblur_ext.evaluation.report import format_table, write_report
    from facedeblur_ext.evaluation.scoring import MetricSuite

    protocols = PROTOCOLS if "all" in args.protocol else tuple(
        p for p in PROTOCOLS if p in args.protocol)
    if "all" in args.protocol and "cfmd" not in args.model:
        protocols = tuple(p for p in protocols if p != "sweep")  # (it sweeps CFMD-GAN rows)
    if args.limit is not None and args.limit < 1:
        raise ValueError("--limit must be at least 1")
    # Fail on missing inputs before loading anything heavy.
    if {"kernel", "face-region", "moments", "linear", "sweep"} & set(protocols) \
            and not Path(args.data).exists():
        raise FileNotFoundError(
            f"test images not found: {args.data} does not exist. Pass --data DIR, a folder of "
            "sharp face images (the 1000-image CelebA test split is "
            "<shared data>/faces/celeba_dic_test128)")
    if "frames" in protocols:
        missing = [v for v in args.videos if not Path(v).exists()]
        if missing:
            raise FileNotFoundError(
                f"video source not found: {', '.join(missing)}. Pass --videos with video files "
                "or frame folders (e.g. <shared data>/face_video/hdtf_via_sadtalker)")
    if "video" in protocols and not Path(args.video_pairs).is_dir():
        raise FileNotFoundError(
            f"video pairs not found: {args.video_pairs} is not a folder. Pass --video-pairs "
            "DIR, a folder of sequences with blurry/ and sharp/ frames (<shared data>/"
            "face_video/ren_iccv2019_facevideo)")
    if "sweep" in protocols and "cfmd" not in args.model:
        raise ValueError("--protocol sweep needs a --model cfmd row")
    output = Path(args.output)
    if output.exists() and not output.is_dir():
        raise ValueError(f"-o {output}: exists and is not a folder")
    device = resolve_device(args.device)
    methods = build_methods(args, device)
    wanted = list(args.metrics) + (["fid", "kid"] if args.fid else [])
    suite = MetricSuite(device, wanted, y_channel=args.y_channel)
    for name, reason in suite.reasons.items():
        if name in suite.wanted:
            print(f"note: {name} column is n/a: {reason}", file=sys.stderr)

    from facedeblur_ext.data import FaceAnalyzer

    settings = EvalSettings(device=device, seed=args.seed, limit=args.limit, size=args.size,
                            workers=args.workers, examples=args.examples,
                            progress=not args.no_progress,
                            analyzer=FaceAnalyzer(warn=False))
    output.mkdir(parents=True, exist_ok=True)  # before the work: an unwritable place fails now
    results = []
    if "kernel" in protocols:
        results.append(run_kernel_protocol(args.data, methods, suite, settings,
                                           blur=args.blur, kernel_sizes=args.kernel_sizes,
                                           noise_sigma=args.noise))
    if "frames" in protocols:
        results.append(run_frames_protocol(args.videos, methods, suite, settings,
                                           frame_counts=args.frame_counts,
                                           size=args.video_size))
    if "face-region" in protocols:
        results.append(run_face_region_protocol(args.data, methods, suite, settings,
                                                kernel_sizes=args.kernel_sizes))
    if "moments" in protocols:
        results.append(run_moments_protocol(args.data, methods, suite, settings,
                                            moment_counts=args.moment_counts))
    if "linear" in protocols:
        results.append(run_kernel_protocol(args.data, methods, suite, settings, blur="linear"))
    if "video" in protocols:
        results.append(run_video_protocol(args.video_pairs, methods, suite, settings,
                                          size=args.video_face_size))
    if "sweep" in protocols:
        real = args.real_blur if Path(args.real_blur).is_dir() else None
        results.append(run_sweep_protocol(args.data, real, methods, settings,
                                          frames=args.sweep_frames,
                                          faces=args.sweep_faces[0],
                                          real_faces=args.sweep_faces[1]))

    meta = {
        "command": "facedeblur eval " + " ".join(shlex.quote(a) for a in sys.argv[2:])
        if len(sys.argv) > 1 and sys.argv[1] == "eval" else "facedeblur eval (API call)",
        "device": (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else f"cpu ({torch.get_num_threads()} threads)"),
        "torch": torch.__version__,
        "seed": args.seed,
        "metrics": suite.describe(),
        "models": [{"family": m.family, "checkpoint": m.checkpoint, "name": m.name}
                   for m in methods if getattr(m, "family", "")],
    }
    written = write_report(results, meta, output)
    available = {m: suite.available[m] for m in suite.available}
    for result in results:
        if not result["tables"]:
            continue
        table = result["tables"][0]
        print(f"\n{result['title']} ({table['title']})")
        for group in table["groups"]:
            if table["group_label"]:
                print(f"{table['group_label']}: {group}")
            print(format_table(result["rows"], table["cells"].get(group, {}), available,
                               columns=suite.wanted))
    print(f"\nwrote {written['markdown']}, {written['json']} and {len(written['figures'])} "
          f"figure(s) to {output}")
    return 0
