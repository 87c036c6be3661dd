"""Motion from still faces (data/motion.py), the degradation mix (data/degradation.py) and the
dataset that combines them for CFMD-GAN training."""

from pathlib import Path

import numpy as np
import pytest
import torch

from facedeblur_ext.data.degradation import (
    DegradationConfig,
    degrade,
    jpeg,
    sample_kernel,
)
from facedeblur_ext.data.fmr import crf_average
from facedeblur_ext.data.io import load_rgb
from facedeblur_ext.data.motion import (
    MotionConfig,
    camera_shake_path,
    render_motion_sample,
)

FACES = Path(__file__).resolve().parents[1] / "facedeblur_ext" / "assets" / "faces"
STILL = MotionConfig(path_length=(0, 0), rotation_deg=(0, 0), scale_change=(0, 0))


def random_image(h=96, w=104, seed=0):
    return torch.rand(3, h, w, generator=torch.Generator().manual_seed(seed))


def dot_image(h=96, w=96, at=(40.0, 45.0)):
    """A black image with a small bright Gaussian blob at ``at`` (x, y)."""
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32),
                            torch.arange(w, dtype=torch.float32), indexing="ij")
    blob = torch.exp(-((xs - at[0]) ** 2 + (ys - at[1]) ** 2) / (2 * 1.5 ** 2))
    return blob.expand(3, h, w).clone()


def centroid(frame):
    weight = frame[0].clamp(min=0)
    ys, xs = torch.meshgrid(torch.arange(frame.shape[1], dtype=torch.float32),
                            torch.arange(frame.shape[2], dtype=torch.float32), indexing="ij")
    return torch.stack([(weight * xs).sum(), (weight * ys).sum()]) / weight.sum()


def test_zero_motion_gives_the_crop_itself():
    image = random_image()
    s = render_motion_sample(image, None, num_targets=3, crop_size=(64, 70), config=STILL,
                             rng=np.random.default_rng(0), crop_origin=(10, 12))
    crop = image[:, 12:76, 10:80]
    assert s["moments"].shape == (3, 3, 64, 70)
    torch.testing.assert_close(s["moments"], crop.expand(3, -1, -1, -1), atol=1e-5, rtol=0)
    torch.testing.assert_close(s["blurry"], crop, atol=1e-5, rtol=0)


def test_moments_follow_the_analytic_eye_and_are_in_fmr_order():
    eye = (44.0, 47.0)
    image = dot_image(at=eye)
    cfg = MotionConfig(path_length=(0.3, 0.3), rotation_deg=(6, 6), scale_change=(0.05, 0.05))
    s = render_motion_sample(image, eye, num_targets=7, crop_size=72, config=cfg,
                             rng=np.random.default_rng(3), crop_origin=(12, 12))
    order_eyes = torch.stack([centroid(m) for m in s["moments"]])
    # the blob moves where the transformed landmark says (time order -> FMR order)
    times = s["times"].numpy()
    by_time = s["eye_xy"]  # [N, 2] in time order
    slot = np.round(times * 7 - 0.5).astype(int)
    torch.testing.assert_close(order_eyes, by_time[slot], atol=0.35, rtol=0)
    # FMR: ascending x on the 1-pixel grid (ties by y, then time)
    keys = np.floor(by_time[slot].numpy())
    assert all(tuple(keys[i]) <= tuple(keys[i + 1]) for i in range(6))
    torch.testing.assert_close(s["u"], torch.arange(7, dtype=torch.float32) / 7)
    # the motion is visible: the first and last ranks are apart
    assert (order_eyes[-1] - order_eyes[0]).norm() > 2.0


def test_blurry_is_the_crf_average_of_the_motion():
    image = dot_image(at=(48.0, 48.0))
    cfg = MotionConfig(subframes=64, path_length=(0.4, 0.4), anxiety=(0, 0),
                       rotation_deg=(0, 0), scale_change=(0, 0))
    s = render_motion_sample(image, (48.0, 48.0), num_targets=64, crop_size=64, config=cfg,
                             rng=np.random.default_rng(1), crop_origin=(16, 16))
    # with as many targets as sub-frames the targets are the sub-frames themselves
    torch.testing.assert_close(s["blurry"], crf_average(s["moments"], 2.2), atol=1e-5, rtol=0)
    # a straight path (no anxiety): the blob is smeared along a line ~0.4 * 48 px long
    spread = (s["blurry"][0] > 0.05).nonzero().float()
    assert (spread.max(0).values - spread.min(0).values).max() > 12


def test_seeded_and_reproducible():
    image = random_image()
    a = render_motion_sample(image, (50, 40), num_targets=5, crop_size=64,
                             rng=np.random.default_rng(7))
    b = render_motion_sample(image, (50, 40), num_targets=5, crop_size=64,
                             rng=np.random.default_rng(7))
    c = render_motion_sample(image, (50, 40), num_targets=5, crop_size=64,
                             rng=np.random.default_rng(8))
    assert torch.equal(a["blurry"], b["blurry"]) and torch.equal(a["moments"], b["moments"])
    assert not torch.equal(a["blurry"], c["blurry"])


def test_target_index_renders_one_rank_of_the_full_set():
    image = random_image()
    full = render_motion_sample(image, (50, 40), num_targets=6, crop_size=64,
                                rng=np.random.default_rng(2))
    one = render_motion_sample(image, (50, 40), num_targets=6, crop_size=64,
                               rng=np.random.default_rng(2), target_index=4)
    torch.testing.assert_close(one["moments"][0], full["moments"][4])
    assert float(one["u"][0]) == pytest.approx(4 / 6)


def test_motion_is_shrunk_until_no_border_enters_the_crop():
    # a crop that nearly fills the source: large motions are shrunk, never sampled outside
    image = random_image(80, 80)
    cfg = MotionConfig(path_length=(1.0, 1.0), rotation_deg=(10, 10))
    s = render_motion_sample(image, None, num_targets=3, crop_size=70, config=cfg,
                             rng=np.random.default_rng(0), crop_origin=(4.5, 4.5))
    assert torch.isfinite(s["blurry"]).all()
    assert (s["eye_xy"] - s["eye_xy"].mean(0)).abs().max() < 4.5
    with pytest.raises(ValueError, match="does not fit"):
        render_motion_sample(image, None, num_targets=3, crop_size=80,
                             rng=np.random.default_rng(0))


def test_camera_shake_path_length_and_centre():
    path = camera_shake_path(np.random.default_rng(0), 64, 20.0, 0.5)
    arc = np.linalg.norm(np.diff(path, axis=0), axis=1).sum()
    assert arc == pytest.approx(20.0)
    np.testing.assert_allclose(path.mean(0), 0, atol=1e-9)


def test_bad_motion_arguments():
    with pytest.raises(ValueError, match="subframes"):
        MotionConfig(subframes=1)
    with pytest.raises(ValueError, match="unknown motion settings"):
        MotionConfig.from_dict({"sub_frames": 4})
    with pytest.raises(ValueError, match="num_targets"):
        render_motion_sample(random_image(), None, num_targets=0, crop_size=32,
                             rng=np.random.default_rng(0))


# ----------------------------------------------------------------------------- degradation

def test_sample_kernel_is_normalized_and_sized_by_the_face():
    rng = np.random.default_rng(0)
    cfg = DegradationConfig(kernel_size=(0.1, 0.2))
    families = set()
    for _ in range(40):
        kernel, info = sample_kernel(rng, 100.0, cfg)
        families.add(info["family"])
        assert kernel.shape == (info["size"], info["size"])
        assert info["size"] % 2 == 1 and 9 <= info["size"] <= 21
        assert float(kernel.sum()) == pytest.approx(1.0, abs=1e-4)
    assert families == {"trajectory", "motion", "gaussian", "defocus"}
    kernel, info = sample_kernel(rng, 300.0, cfg)
    assert info["size"] >= 29


def test_degrade_without_noise_or_jpeg_only_quantizes():
    image = random_image(32, 32)
    cfg = DegradationConfig(noise_sigma=(0, 0), poisson_prob=0, jpeg_prob=0)
    out, info = degrade(image, np.random.default_rng(0), cfg)
    torch.testing.assert_close(out, (image * 255).round() / 255)
    assert info == {"second_order": False}


def test_degrade_noise_level_and_jpeg():
    image = torch.full((3, 64, 64), 0.5)
    cfg = DegradationConfig(noise_sigma=(0.04, 0.04), poisson_prob=0, jpeg_prob=0)
    out, _ = degrade(image, np.random.default_rng(0), cfg)
    assert float((out - image).std()) == pytest.approx(0.04, rel=0.1)
    face = torch.from_numpy(load_rgb(FACES / "celeba_201418.png").copy()).permute(2, 0, 1) / 255.0
    low, high = jpeg(face, 30), jpeg(face, 95)
    assert (low - face).abs().mean() > (high - face).abs().mean() > 0


def test_poisson_gaussian_noise_grows_with_the_signal():
    cfg = DegradationConfig(noise_sigma=(0, 0), poisson_prob=1, poisson_scale=(0.01, 0.01),
                            jpeg_prob=0)
    dark, _ = degrade(torch.full((3, 64, 64), 0.1), np.random.default_rng(0), cfg)
    bright, _ = degrade(torch.full((3, 64, 64), 0.8), np.random.default_rng(0), cfg)
    assert float((bright - 0.8).std()) > 2 * float((dark - 0.1).std())


def test_second_order_round_and_determinism():
    image = random_image(48, 48)
    cfg = DegradationConfig(second_order_prob=1.0)
    a, info = degrade(image, np.random.default_rng(5), cfg)
    b, _ = degrade(image, np.random.default_rng(5), cfg)
    assert info["second_order"] and torch.equal(a, b)
    # the second round blurs: less high-frequency energy than the first round alone
    once, _ = degrade(image, np.random.default_rng(5), DegradationConfig())
    def roughness(t):
        return (t[:, :, 1:] - t[:, :, :-1]).abs().mean()

    assert roughness(a) < roughness(once)


def test_bad_degradation_settings():
    with pytest.raises(ValueError, match="jpeg_quality"):
        DegradationConfig(jpeg_quality=(0, 50))
    with pytest.raises(ValueError, match="family_probs"):
        DegradationConfig(family_probs=(0, 0, 0, 0))
    with pytest.raises(ValueError, match="unknown degradation"):
        DegradationConfig.from_dict({"jpeg": 0.5})
    with pytest.raises(ValueError, match="blurry must be"):
        degrade(torch.rand(1, 8, 8), np.random.default_rng(0))


# ----------------------------------------------------------------------------- dataset

@pytest.fixture(scope="module")
def faces():
    pytest.importorskip("mediapipe")
    return sorted(str(p) for p in FACES.glob("celeba_*.png"))[:4]


def test_mix_dataset_samples(faces, tmp_path):
    from facedeblur_ext.data import FaceAnalyzer, MotionBlurMixDataset

    analyzer = FaceAnalyzer(cache_dir=tmp_path)
    motion = MotionBlurMixDataset(faces, analyzer=analyzer, crop_size=64, base_size=None,
                                  motion_prob=1.0, num_targets=(5, 5), return_moments=True)
    kernel = MotionBlurMixDataset(faces, analyzer=analyzer, crop_size=64, base_size=None,
                                  motion_prob=0.0)
    for i in range(len(faces)):
        s = motion[i]
        assert s["is_motion"] and s["moments"].shape == (5, 3, 64, 64)
        assert min(abs(float(s["u"]) - k / 5) for k in range(5)) < 1e-6
        rank = int(torch.nonzero(s["moment_u"] == s["u"])[0, 0])
        assert torch.equal(s["sharp"], s["moments"][rank])
        k = kernel[i]
        assert not k["is_motion"] and float(k["u"]) == 0.5
        for t in (s["blurry"], k["blurry"]):
            assert t.shape == (3, 64, 64) and 0 <= t.min() and t.max() <= 1
    # samples depend on the seed, the epoch and the index only
    again = MotionBlurMixDataset(faces, analyzer=analyzer, crop_size=64, base_size=None,
                                 motion_prob=1.0, num_targets=(5, 5), return_moments=True)
    assert torch.equal(again[1]["blurry"], motion[1]["blurry"])
    motion.set_epoch(1)
    assert not torch.equal(again[1]["blurry"], motion[1]["blurry"])
    with pytest.raises(ValueError, match="face analysis"):
        MotionBlurMixDataset(faces, face_masks=False)
    with pytest.raises(ValueError, match="num_targets"):
        MotionBlurMixDataset(faces, analyzer=analyzer, num_targets=(6, 5))


def test_only_datasets_without_their_own_mix_need_a_blur_table(tmp_path):
    from facedeblur_ext.training.face_data import build_face_datasets

    missing = str(tmp_path / "missing")
    kernel = {"data": {"root": missing,
                       "train": {"class": "facedeblur_ext.data:KernelBlurDataset"}}}
    with pytest.raises(ValueError, match="data.blur is not set"):  # before any file is read
        build_face_datasets(kernel)
    mix = {"data": {"root": missing,
                    "train": {"class": "facedeblur_ext.data:MotionBlurMixDataset"}}}
    with pytest.raises(FileNotFoundError, match="does not exist"):  # past the blur check
        build_face_datasets(mix)
