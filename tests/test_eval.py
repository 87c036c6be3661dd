"""Evaluation (baselines, protocols, tables, `facedeblur eval`), `facedeblur demo` and
`facedeblur deblur --full-photo`.

Models are a tiny randomly initialised CFMD-GAN saved as a checkpoint: the tests check files,
tables and pixel bookkeeping, not restoration quality.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT
from PIL import Image

from facedeblur_ext import cli, ops
from facedeblur_ext.evaluation import (
    IdentityMethod,
    auto_nsr,
    load_model,
    unsharp_mask,
    wiener_deconvolve,
)
from facedeblur_ext.evaluation.baselines import MIN_AUTO_NSR
from facedeblur_ext.evaluation.methods import Method
from facedeblur_ext.evaluation.protocols import (
    LINEAR_LENGTHS,
    EvalSettings,
    run_frames_protocol,
    run_kernel_protocol,
    run_moments_protocol,
    run_sweep_protocol,
    run_video_protocol,
)
from facedeblur_ext.evaluation.scoring import MetricSuite

FACES = REPO_ROOT / "facedeblur_ext" / "assets" / "faces"
FRAMES = REPO_ROOT / "tests" / "data" / "frames_vd001"
TINY_G = dict(widths=(8, 16, 32), blocks_per_stage=1, control_channels=16,
              attention_reduction=4)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A CFMD-GAN checkpoint in the trainer's format, randomly initialised."""
    from facedeblur_ext.models.cfmd import CFMDGenerator

    torch.manual_seed(0)
    generator = CFMDGenerator(**TINY_G)
    path = tmp_path_factory.mktemp("ckpt") / "tiny_cfmd.pt"
    torch.save({"task": "cfmd", "config": {"model": {"generator": TINY_G}},
                "models": {"generator": generator.state_dict()}}, path)
    return path


@pytest.fixture(scope="module")
def face_dir(tmp_path_factory):
    """Three bundled CelebA faces in their own folder."""
    folder = tmp_path_factory.mktemp("faces")
    for name in ("celeba_201418.png", "celeba_201421.png", "celeba_201422.png"):
        (folder / name).write_bytes((FACES / name).read_bytes())
    return folder


def load_faces(names, size=None):
    images = []
    for name in names:
        img = Image.open(FACES / name).convert("RGB")
        if size:
            img = img.resize((size, size), Image.BICUBIC)
        images.append(torch.from_numpy(np.array(img)).permute(2, 0, 1))
    return torch.stack(images).float() / 255


def psnr(a, b):
    return 10 * torch.log10(1 / (a - b).square().flatten(1).mean(1))


# ----------------------------------------------------------------------------- baselines


def test_wiener_with_the_true_kernel_undoes_noiseless_blur():
    sharp = load_faces(["celeba_201418.png", "celeba_201423.png"])
    kernels = ops.trajectory_kernels(2, 19, generator=torch.Generator().manual_seed(3))
    blurry = ops.blur_synthesize(sharp, kernels)
    restored = wiener_deconvolve(blurry, kernels)
    gain = psnr(restored, sharp) - psnr(blurry, sharp)
    assert bool((gain > 5).all()), gain
    # A wrong kernel (mirrored: the correlation instead of the convolution) does not help.
    wrong = wiener_deconvolve(blurry, kernels.flip(-1, -2))
    assert bool((psnr(wrong, sharp) < psnr(restored, sharp) - 3).all())


def test_wiener_is_exact_for_a_periodic_blur_without_noise():
    """With a circular blur, no padding and a tiny NSR, the filter inverts the blur: checks
    the kernel's origin and orientation in the transfer function."""
    sharp = load_faces(["celeba_201425.png"], size=64).double()
    gen = torch.Generator().manual_seed(0)
    kernel = torch.rand(5, 7, generator=gen, dtype=torch.float64)
    kernel[2, 3] += 6  # a strong centre tap: no zeros in the spectrum
    kernel /= kernel.sum()
    blurry = ops.blur_synthesize(sharp, kernel, border="circular")
    restored = wiener_deconvolve(blurry, kernel, 1e-9, pad=0)
    torch.testing.assert_close(restored, sharp.clamp(0, 1), atol=1e-5, rtol=0)


def test_auto_nsr_follows_the_noise_level_with_a_floor():
    blurry = torch.rand(3, 3, 16, 16)
    values = auto_nsr(blurry, torch.tensor([0.0, 0.01, 0.03]))
    assert values[0] == pytest.approx(MIN_AUTO_NSR)
    assert MIN_AUTO_NSR < values[1] < values[2]
    assert values[2] == pytest.approx((0.03**2 + (1 / 255) ** 2 / 12) / 0.0056, rel=1e-6)


def test_unsharp_mask_sharpens_edges_and_keeps_flat_images():
    sharp = load_faces(["celeba_201426.png"])
    out = unsharp_mask(sharp)
    assert not torch.equal(out, sharp)
    grad = lambda x: (x[..., 1:] - x[..., :-1]).abs().mean()
    assert grad(out) > 1.2 * grad(sharp)
    flat = torch.full((1, 3, 20, 20), 0.4)
    torch.testing.assert_close(unsharp_mask(flat), flat)


# ----------------------------------------------------------------------------- protocols


def test_kernel_protocol_is_seeded_and_rows_see_the_same_inputs(face_dir):
    suite = MetricSuite("cpu", ["psnr"])

    def blurry_psnr(seed):
        settings = EvalSettings(seed=seed, limit=2, progress=False, examples=1)
        methods = [IdentityMethod(), IdentityMethod(name="identity again")]
        result = run_kernel_protocol(face_dir, methods, suite, settings)
        cells = result["tables"][0]["cells"]["all"]
        assert cells["blurry input"]["psnr"] == cells["identity again"]["psnr"]
        assert result["examples"][0]["blurry"].dtype == np.uint8
        return cells["blurry input"]["psnr"]

    first = blurry_psnr(0)
    assert blurry_psnr(0) == first
    assert blurry_psnr(1) != first


def test_frames_protocol_tables(tiny_checkpoint):
    method = load_model("cfmd", tiny_checkpoint, label="tiny")
    settings = EvalSettings(limit=1, progress=False, examples=2)
    result = run_frames_protocol(FRAMES, [IdentityMethod(), method], MetricSuite("cpu", ["psnr"]),
                                 settings, frame_counts=(5, 7), size=48)
    tables = {t["name"]: t for t in result["tables"]}
    per_n = tables["per_frame_count"]
    assert per_n["groups"] == ["5", "7", "all"]
    # every sharp frame of the window is a pair: 5 + 7 frames
    assert per_n["cells"]["5"]["tiny"]["images"] == 5
    assert per_n["cells"]["all"]["blurry input"]["images"] == 12
    s2s = tables["single_to_single"]["cells"]["all"]
    assert s2s["tiny"]["images"] == 2 and math.isfinite(s2s["tiny"]["psnr"])
    # CFMD restores N moments plus the centre one per window
    assert [r["ms_per_image"] is not None for r in result["rows"]] == [True, True]


@dataclass
class MomentSpy(Method):
    """A continuous method that returns its input and records the ``u`` it is asked for."""

    name: str = "spy"
    continuous: bool = True
    moments: bool = True
    calls: list = field(default_factory=list)

    def __call__(self, blurry, *, u=None, kernels=None, mask=None, noise_sigma=0.0):
        self.calls.append(u)
        count = 1 if u is None or isinstance(u, float) else len(u)
        return blurry.expand(count, -1, -1, -1)


def test_moments_protocol_restores_each_moment_at_its_u(face_dir):
    from facedeblur_ext.data import control_factors

    learned, single = MomentSpy(name="learned"), MomentSpy(name="single", moments=False)
    settings = EvalSettings(limit=2, progress=False, examples=1)
    result = run_moments_protocol(face_dir, [IdentityMethod(), learned, single],
                                  MetricSuite("cpu", ["psnr"]), settings, moment_counts=(3, 5))
    # 2 faces per N: the learned-moments row is asked for every u = (i - 1) / N in one batch,
    # the other one once per face (u = None: its centre output stands for every moment)
    asked = [[round(v, 6) for v in u] for u in learned.calls]
    expected = [[round(float(v), 6) for v in control_factors(n)] for n in (3, 3, 5, 5)]
    assert asked == expected
    assert single.calls == [None] * 4
    tables = {t["name"]: t for t in result["tables"]}
    by_count = tables["by_count"]
    assert by_count["layout"] == "stacked" and by_count["groups"] == ["3", "5", "all"]
    assert by_count["cells"]["3"]["learned"]["images"] == 6        # 2 faces x 3 moments
    assert by_count["cells"]["all"]["single"]["images"] == 16
    # both spies return the blurry image: the same scores as the blurry row, per moment too
    for name in ("learned", "single"):
        assert by_count["cells"]["all"][name]["psnr"] == pytest.approx(
            by_count["cells"]["all"]["blurry input"]["psnr"])
    per5 = tables["per_moment_n5"]
    assert per5["groups"] == ["0.000", "0.200", "0.400", "0.600", "0.800"]
    assert all(per5["cells"][g]["learned"]["images"] == 2 for g in per5["groups"])
    ends = tables["end_moments"]["cells"]
    assert [c["blurry input"]["images"] for c in ends.values()] == [4, 4]
    # the moments differ: the middle one is closer to the blurry average than the ends
    middle = per5["cells"]["0.400"]["blurry input"]["psnr"]
    assert middle > per5["cells"]["0.000"]["blurry input"]["psnr"]
    assert middle > per5["cells"]["0.800"]["blurry input"]["psnr"]
    assert [ex["caption"] for ex in result["examples"]] == ["N=3 u=0.00", "N=3 u=0.67"]
    rows = {r["name"]: r for r in result["rows"]}
    assert rows["learned"]["ms_per_image"] is not None


def test_linear_protocol_draws_lines_of_7_to_15_px_at_noise_001(face_dir):
    from facedeblur_ext.evaluation import WienerMethod

    settings = EvalSettings(limit=3, progress=False, examples=0)
    result = run_kernel_protocol(face_dir, [IdentityMethod(), WienerMethod()],
                                 MetricSuite("cpu", ["psnr"]), settings, blur="linear")
    assert result["protocol"] == "linear" and result["settings"]["noise_sigma"] == 0.01
    by_length = result["tables"][1]
    assert by_length["name"] == "by_length"
    low, high = LINEAR_LENGTHS
    for group in by_length["groups"]:
        start, end = (int(v) for v in group.split("-"))
        assert low <= start < end <= high and end - start == 2
    cells = result["tables"][0]["cells"]["all"]
    # the true kernel undoes a short line at low noise
    assert cells["Wiener (true kernel)"]["psnr"] > cells["blurry input"]["psnr"] + 1


def test_video_protocol_aligns_pairs_to_the_test_face_scale(tmp_path):
    import cv2

    from facedeblur_ext.data import FaceAnalyzer
    from facedeblur_ext.data.face import FacePrior
    from facedeblur_ext.evaluation.protocols import _aligned_face_transform

    root = tmp_path / "pairs"
    for seq, names in (("a", ["00001.png", "00002.png"]), ("b", ["00003.png"])):
        for kind in ("blurry", "sharp"):
            (root / seq / kind).mkdir(parents=True)
        for name in names:
            sharp = np.array(Image.open(FRAMES / name).convert("RGB"))
            Image.fromarray(sharp).save(root / seq / "sharp" / name)
            Image.fromarray(cv2.GaussianBlur(sharp, (0, 0), 2.0)).save(root / seq / "blurry" / name)
    (root / "b" / "blurry" / "unpaired.png").write_bytes((FRAMES / "00004.png").read_bytes())

    frame = np.array(Image.open(FRAMES / "00001.png").convert("RGB"))
    analysis = FaceAnalyzer(warn=False).analyze(frame)
    assert analysis.found
    transform, scale = _aligned_face_transform(analysis, 128)
    eyes = transform.apply_points(analysis.eyes)
    prior = FacePrior()
    # the eye midpoint and the interocular distance of the CelebA test faces (within rounding;
    # this face sits left of centre and the crop, kept inside the frame, stops 1 px short)
    assert transform.offset[1] == 0
    assert eyes[:, 0].mean() == pytest.approx(64, abs=1.5)
    assert eyes[:, 1].mean() == pytest.approx(prior.left_eye[1] * 128, abs=0.75)
    assert np.linalg.norm(eyes[1] - eyes[0]) == pytest.approx(
        (prior.left_eye[0] - prior.right_eye[0]) * 128, abs=0.5)
    assert 0.3 < scale < 0.9  # the frames' faces are about twice the test faces' size

    settings = EvalSettings(progress=False, examples=1)
    result = run_video_protocol(root, [IdentityMethod()], MetricSuite("cpu", ["psnr"]),
                                settings)
    assert result["settings"]["pairs_per_sequence"] == {"a": 2, "b": 1}
    tables = {t["name"]: t for t in result["tables"]}
    assert tables["all"]["cells"]["all"]["blurry input"]["images"] == 3
    assert tables["by_sequence"]["groups"] == ["a", "b"]
    assert result["examples"][0]["sharp"].shape == (128, 128, 3)
    assert 20 < tables["all"]["cells"]["all"]["blurry input"]["psnr"] < 45


def test_sweep_protocol_pictures_and_report(tmp_path, face_dir, tiny_checkpoint):
    from facedeblur_ext.evaluation.report import write_report

    method = load_model("cfmd", tiny_checkpoint, label="tiny")
    settings = EvalSettings(progress=False)
    real = tmp_path / "real"
    real.mkdir()
    (real / "blurred.png").write_bytes((FACES / "realblur_shen_1.png").read_bytes())
    result = run_sweep_protocol(face_dir, real, [IdentityMethod(), method], settings,
                                frames=3, faces=1, real_faces=1)
    names = [p["name"] for p in result["pictures"]]
    assert names == ["test_celeba_201418", "real_blurred"]
    test, real_pic = result["pictures"]
    assert len(test["gif"]) == 3 and test["gif"][0].shape == (112, 3 * 112, 3)
    assert real_pic["gif"][0].shape == (128, 2 * 128, 3)
    assert test["grid"].shape[0] > 2 * 112 and test["grid"].shape[1] > 4 * 112
    spread = result["settings"]["first_to_last_moment_mean_abs_difference_grey_levels"]
    assert set(spread) == set(names) and spread["real_blurred"]["tiny"] >= 0
    suite = MetricSuite("cpu", ["psnr"])
    written = write_report([result], {"command": "test", "device": "cpu", "torch": "x",
                                      "seed": 0, "metrics": suite.describe()}, tmp_path / "out")
    files = sorted(p.name for p in written["figures"])
    assert files == ["sweep_real_blurred.gif", "sweep_real_blurred.png",
                     "sweep_test_celeba_201418.gif", "sweep_test_celeba_201418.png"]
    with Image.open(tmp_path / "out" / "sweep_test_celeba_201418.gif") as gif:
        assert gif.n_frames == 4  # 3 moments, played forward and back
    assert "![sweep_real_blurred.gif]" in (tmp_path / "out" / "results.md").read_text()
    payload = json.loads((tmp_path / "out" / "results.json").read_text())
    assert payload["results"][0]["pictures"][0] == {"name": "test_celeba_201418", "fps": 4.0}


def test_model_rows_follow_the_checkpoints_inference_record(tmp_path, tiny_checkpoint):
    plain = load_model("cfmd", tiny_checkpoint)
    assert not plain.moments and plain.u_range == (0.5, 0.5)
    assert "no learned moments" in plain.description
    ckpt = torch.load(tiny_checkpoint, weights_only=True)
    for where in ("top", "config"):
        record = {"moments": True, "u_range": [0.0, 0.9231]}
        variant = dict(ckpt, inference=record) if where == "top" else dict(
            ckpt, config={**ckpt["config"], "inference": record})
        path = tmp_path / f"{where}.pt"
        torch.save(variant, path)
        method = load_model("cfmd", path)
        assert method.moments and method.u_range == (0.0, 0.9231)
        assert "learned moments" in method.description
        two = method(load_faces(["celeba_201418.png"], size=32), u=[0.0, 0.5])
        assert two.shape == (2, 3, 32, 32)


# ----------------------------------------------------------------------------- CLI


def test_eval_cli_end_to_end(tmp_path, face_dir, tiny_checkpoint, capsys):
    out = tmp_path / "eval"
    argv = ["eval", "--protocol", "kernel", "face-region", "--data", str(face_dir),
            "--limit", "2", "--model", "cfmd", "--checkpoint", str(tiny_checkpoint),
            "--label", "tiny cfmd", "--device", "cpu", "--examples", "2", "--no-progress",
            "-o", str(out)]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "| Wiener (true kernel) |" in printed and "| tiny cfmd |" in printed

    payload = json.loads((out / "results.json").read_text())
    assert [r["protocol"] for r in payload["results"]] == ["kernel", "face_region"]
    names = ["blurry input", "unsharp mask", "Wiener (true kernel)", "tiny cfmd"]
    for result in payload["results"]:
        assert [r["name"] for r in result["rows"]] == names
        assert all(r["ms_per_image"] > 0 for r in result["rows"])
        for table in result["tables"]:
            for group in table["groups"]:
                for name in names:
                    cell = table["cells"][group][name]
                    assert cell["images"] >= 1
                    assert 5 < cell["psnr"] < 60 and 0 < cell["ssim"] <= 1
    kernel = payload["results"][0]
    assert kernel["settings"]["noise_sigma"] == 0.03 and kernel["settings"]["images"] == 2
    by_size = kernel["tables"][1]
    assert by_size["group_label"] == "kernel size"
    assert all(13 <= int(g) <= 29 for g in by_size["groups"])
    # n/a columns say why; available ones were computed
    for name, info in payload["meta"]["metrics"].items():
        if name in ("psnr", "ssim", "l1", "lpips", "identity", "detection"):
            assert info["available"] or info["reason"]

    markdown = (out / "results.md").read_text()
    assert markdown.count("| Method | PSNR (dB) | SSIM |") >= 3
    assert "## Kernel blur" in markdown and "## Whole-image vs face-only" in markdown
    for row in markdown.splitlines():
        if row.startswith("| Method"):
            width = row.count("|")
        elif row.startswith("| ") and not row.startswith("| Method"):
            assert row.count("|") == width, row
    for png in ("kernel_bars.png", "kernel_examples.png", "face_region_bars.png",
                "face_region_examples.png"):
        with Image.open(out / png) as img:
            assert img.format == "PNG" and img.size[0] > 100


def test_eval_checks_its_output_device_and_checkpoints_before_computing(tmp_path, face_dir,
                                                                        tiny_checkpoint, cli_error):
    common = ["eval", "--protocol", "kernel", "--data", str(face_dir), "--limit", "1"]
    occupied = tmp_path / "report.txt"
    occupied.write_text("keep")
    err = cli_error([*common, "-o", str(occupied)])
    assert "exists and is not a folder" in err
    out = str(tmp_path / "out")
    err = cli_error([*common, "--device", "bogus", "-o", out])
    assert "--device bogus: expected auto, cpu, cuda" in err
    if not torch.cuda.is_available():
        err = cli_error([*common, "--device", "cuda", "-o", out])
        assert "no CUDA device is available" in err
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    err = cli_error(
        [*common, "--model", "cfmd", "--checkpoint", str(empty), "--device", "cpu", "-o", out])
    assert f"--checkpoint {empty}: cannot load it: EOFError" in err
    err = cli_error(
        [*common, "--model", "cfmd", "--checkpoint", str(tiny_checkpoint), "--backend",
        "no_such.module", "--device", "cpu", "-o", out])
    assert "--backend no_such.module: No module named 'no_such'" in err
    assert occupied.read_text() == "keep"


def test_eval_cli_moments_with_chosen_baselines(tmp_path, face_dir, tiny_checkpoint, cli_error):
    out = tmp_path / "eval"
    assert cli.main(["eval", "--protocol", "moments", "--data", str(face_dir), "--limit", "1",
                     "--moment-counts", "3", "--baselines", "blurry", "--metrics", "psnr",
                     "--model", "cfmd", "--checkpoint", str(tiny_checkpoint), "--label", "tiny",
                     "--device", "cpu", "--no-progress", "-o", str(out)]) == 0
    payload = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in payload["results"][0]["rows"]] == ["blurry input", "tiny"]
    markdown = (out / "results.md").read_text()
    assert "| Method | # of GT | # of pairs | PSNR (dB) |" in markdown
    assert "| tiny | 3 | 3 |" in markdown
    err = cli_error(["eval", "--protocol", "sweep", "--data", str(face_dir), "-o", str(out)])
    assert "--protocol sweep needs a --model cfmd row" in err


def test_eval_missing_data_is_a_clear_error(tmp_path, cli_error):
    err = cli_error(
        ["eval", "--protocol", "kernel", "--data", str(tmp_path / "nowhere"), "-o",
        str(tmp_path / "out")])
    assert "does not exist. Pass --data" in err
    err = cli_error(
        ["eval", "--protocol", "frames", "--videos", str(tmp_path / "none.mp4"), "-o",
        str(tmp_path / "out")])
    assert "video source not found" in err
    err = cli_error(
        ["eval", "--protocol", "video", "--video-pairs", str(tmp_path / "none"), "-o",
        str(tmp_path / "out")])
    assert "video pairs not found" in err


# ----------------------------------------------------------------------------- demo


def test_demo_with_a_tiny_checkpoint(tmp_path, tiny_checkpoint, capsys):
    # A model that learned moments (facedeblur_ext.inference): the GIF sweeps its u range.
    moments = tmp_path / "moments.pt"
    torch.save({**torch.load(tiny_checkpoint, weights_only=True),
                "inference": {"moments": True, "u_range": [0.0, 0.8]}}, moments)
    out = tmp_path / "demo"
    assert cli.main(["demo", "--checkpoint", str(moments), "-o", str(out), "--faces", "2",
                     "--frames", "3", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    for row in ("| blurry input |", "| unsharp mask |", "| Wiener (true kernel) |",
                "| cfmd (restored) |"):
        assert row in printed
    with Image.open(out / "demo_grid.png") as grid:
        assert grid.size[0] > 3 * 128 and grid.size[1] > 2 * 128
    with Image.open(out / "u_sweep.gif") as gif:
        assert gif.size == (3 * 128, 128)
    payload = json.loads((out / "metrics.json").read_text())
    assert payload["faces"] == ["celeba_201418.png", "celeba_201421.png"]
    assert payload["u_sweep"] == pytest.approx([0.0, 0.4, 0.8])
    assert math.isfinite(payload["cells"]["cfmd (restored)"]["psnr"])
    assert "| cfmd (restored) |" in (out / "metrics.md").read_text()

    # Without moments (no inference table): one moment, no GIF of copies, and a note.
    still = tmp_path / "still"
    assert cli.main(["demo", "--checkpoint", str(tiny_checkpoint), "-o", str(still), "--faces",
                     "1", "--device", "cpu"]) == 0
    assert "records no moments" in capsys.readouterr().err
    assert sorted(p.name for p in still.iterdir()) == ["demo_grid.png", "metrics.json",
                                                       "metrics.md"]
    from facedeblur_ext.data.io import current_umask

    # The files follow the umask (not mkstemp's 0600).
    assert {oct(p.stat().st_mode & 0o777) for p in still.iterdir()} == {
        oct(0o666 & ~current_umask())}


def test_demo_with_the_default_checkpoint_restores_the_bundled_faces(tmp_path, capsys, cli_error):
    """The shipped model (facedeblur_ext/assets/checkpoints/README.md) on the demo's seeded
    trajectory blur: clearly sharper than the input by every full-reference metric."""
    from facedeblur_ext.commands import BUNDLED_CHECKPOINTS

    assert BUNDLED_CHECKPOINTS["cfmd"].is_file(), "the default checkpoint must ship with it"
    out = tmp_path / "demo"
    assert cli.main(["demo", "-o", str(out), "--frames", "3", "--device", "cpu"]) == 0
    payload = json.loads((out / "metrics.json").read_text())
    assert payload["size"] == 128 and len(payload["faces"]) == 4
    blurry, restored = payload["cells"]["blurry input"], payload["cells"]["cfmd (restored)"]
    # Measured when the moments model shipped: PSNR 23.67 -> 25.46 dB, SSIM 0.522 -> 0.709,
    # LPIPS 0.286 -> 0.245, SFace distance 0.396 -> 0.336; the bounds leave room for other BLAS
    # builds.
    assert restored["psnr"] >= blurry["psnr"] + 1.5
    assert restored["ssim"] > blurry["ssim"] + 0.15
    assert restored["lpips"] < blurry["lpips"] - 0.025
    if restored.get("identity") is not None:
        assert restored["identity"] < blurry["identity"]

    # `deblur` uses the same model when no --checkpoint is given (cfmd only).
    face = REPO_ROOT / "facedeblur_ext" / "assets" / "faces" / "realblur_shen_1.png"
    assert cli.main(["deblur", str(face), "-o", str(tmp_path / "one"), "--frames", "1",
                     "--device", "cpu"]) == 0
    assert (tmp_path / "one" / "realblur_shen_1.png").is_file()
    err = cli_error(["deblur", str(face), "-o", str(tmp_path / "two"), "--model", "snadnet"])
    assert "only cfmd has a bundled default" in err
    err = cli_error(["demo", "-o", str(tmp_path / "three"), "--model", "snadnet"])
    assert "only cfmd has a bundled default" in err


def test_demo_without_the_default_checkpoint_says_so(tmp_path, monkeypatch, cli_error):
    from facedeblur_ext import commands

    monkeypatch.setitem(commands.BUNDLED_CHECKPOINTS, "cfmd", tmp_path / "cfmd_default.pt")
    err = cli_error(["demo", "-o", str(tmp_path / "out")])
    assert re.search("not part of this installation.*--checkpoint", err)


# ----------------------------------------------------------------------------- full photo


def _composed_photo(tmp_path):
    """A bundled face pasted into a larger, blurred canvas."""
    import cv2

    face = np.array(Image.open(FACES / "celeba_201418.png").convert("RGB"))
    background = np.array(Image.open(FACES / "ffhq_00001.png").convert("RGB"))
    canvas = cv2.GaussianBlur(cv2.resize(background, (400, 320)), (0, 0), 6)
    canvas[100:228, 200:328] = face
    path = tmp_path / "photo.png"
    Image.fromarray(canvas).save(path)
    return canvas, path


def test_full_photo_crop_geometry():
    from facedeblur_ext.full_photo import PhotoFace, crop_matrix, feather_mask

    face = PhotoFace(np.array([100.0, 50.0, 180.0, 130.0]),
                     np.array([[120.0, 80.0], [160.0, 90.0]]), 0.9)
    m = crop_matrix(face, 64)
    eyes = np.c_[face.eyes, np.ones(2)] @ m.T
    assert eyes[0, 1] == pytest.approx(eyes[1, 1])          # eye line horizontal
    assert eyes[0, 0] < eyes[1, 0]                          # subject's right eye on the left
    centre = np.array([140.0, 90.0, 1.0]) @ m.T
    np.testing.assert_allclose(centre, [0.5 * 64, 0.52 * 64], atol=1e-9)
    mask = feather_mask(64)
    assert mask[32, 32] == 1 and mask[0, 0] < 0.01 and mask.min() >= 0


def test_full_photo_cli_pastes_back_and_keeps_the_rest(tmp_path, tiny_checkpoint):
    import cv2

    from facedeblur_ext.data import FaceAnalyzer
    from facedeblur_ext.full_photo import crop_matrix, detect_photo_faces, feather_mask

    canvas, path = _composed_photo(tmp_path)
    out = tmp_path / "out"
    assert cli.main(["deblur", "--full-photo", str(path), "-o", str(out), "--checkpoint",
                     str(tiny_checkpoint), "--device", "cpu", "--face-size", "64"]) == 0
    restored = np.array(Image.open(out / "photo.png"))
    assert restored.shape == canvas.shape

    faces = detect_photo_faces(canvas, FaceAnalyzer(warn=False))
    assert len(faces) == 1
    x0, y0, x1, y1 = faces[0].box
    assert 190 < (x0 + x1) / 2 < 340 and 90 < (y0 + y1) / 2 < 240  # the pasted face
    inverse = cv2.invertAffineTransform(crop_matrix(faces[0], 64))
    reach = cv2.warpAffine(feather_mask(64), inverse, (400, 320), flags=cv2.INTER_LINEAR,
                           borderMode=cv2.BORDER_CONSTANT, borderValue=0) > 0
    changed = np.any(restored != canvas, axis=2)
    assert changed.any()
    assert not (changed & ~reach).any()           # outside the feathered crop: bit-identical
    assert reach.sum() < 0.35 * reach.size        # and the crop is local


@pytest.mark.parametrize("family", ["snadnet", "baseline_ae"])
def test_other_model_families_load_as_rows(tmp_path, family):
    if family == "snadnet":
        from facedeblur_ext.models.snadnet import build_snadnet

        model_cfg = {"parser": {"width": 8, "context_channels": 16, "fusion_channels": 16},
                     "generator": {"width": 8, "num_stages": 4, "ad_hidden": 16}}
        state = build_snadnet(model_cfg).state_dict()
        config = {"stage": "deblur", "model": model_cfg}
    else:
        from facedeblur_ext.models.baselines import build_baseline

        model_cfg = {"generator": {"widths": [8, 16, 32, 64]}}
        state = build_baseline(family, model_cfg["generator"]).state_dict()
        config = {"model": model_cfg}
    path = tmp_path / f"{family}.pt"
    torch.save({"task": family, "config": config, "models": {"generator": state}}, path)
    method = load_model(family, path)
    assert not method.continuous and method.name == f"{family} ({family}.pt)"
    blurry = load_faces(["celeba_201427.png"], size=72)
    out = method(blurry)
    assert out.shape == blurry.shape and 0 <= float(out.min()) and float(out.max()) <= 1
    with pytest.raises(ValueError, match="not a"):
        load_model("cfmd", path)


def test_set_metrics_fid_and_kid(face_dir):
    from facedeblur_ext.evaluation.scoring import SHARP_ROW, Accumulator

    acc = Accumulator()
    feats = torch.randn(6, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    acc.add_features(SHARP_ROW, ("all",), feats)
    acc.add_features("same", ("all",), feats)
    acc.add_features("shifted", ("all",), feats + 3)
    assert acc.summary("same", "all")["fid"] == pytest.approx(0, abs=1e-9)
    assert acc.summary("shifted", "all")["fid"] == pytest.approx(16 * 9, rel=1e-6)
    assert acc.summary("shifted", "all")["fid_count"] == 6

    suite = MetricSuite("cpu", ["psnr", "fid", "kid"])
    if not suite.available["fid"]:
        pytest.skip(f"FID weights not installed: {suite.reasons['fid']}")
    settings = EvalSettings(limit=2, progress=False, examples=0)
    result = run_kernel_protocol(face_dir, [IdentityMethod()], suite, settings)
    cell = result["tables"][0]["cells"]["all"]["blurry input"]
    assert cell["fid"] > 0 and math.isfinite(cell["kid"]) and cell["fid_count"] == 2
