"""Thesis baselines (paper 002, Sec. 4.4): skip autoencoder and the 9-block GAN."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from face_batches import load_faces, make_batch

from facedeblur_ext.losses.baselines import (
    autoencoder_loss,
    gan_discriminator_loss,
    gan_generator_loss,
    ssim,
)
from facedeblur_ext.models.baselines import (
    BNDiscriminator,
    ResnetDeblurGenerator,
    SkipAutoencoder,
    VGG19Perceptual,
)
from facedeblur_ext.training.baseline_tasks import AutoencoderBaselineTask, GANBaselineTask


@pytest.fixture(scope="module", autouse=True)
def _single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny networks; see test_snadnet.py
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def faces64():
    return load_faces(64)


@pytest.mark.parametrize("size", [(32, 32), (48, 80)])
def test_baseline_shapes_and_ranges(size):
    x = torch.rand(2, 3, *size)
    ae = SkipAutoencoder((8, 16, 32, 64))
    gen = ResnetDeblurGenerator(width=4)
    disc = BNDiscriminator(width=4)
    for model in (ae, gen):
        with torch.no_grad():
            y = model(x)
        assert y.shape == x.shape
        assert 0.0 <= float(y.min()) and float(y.max()) <= 1.0
    assert disc(x).shape == (2,)
    assert len([m for m in gen.modules() if m.__class__.__name__ == "_ResnetBlock"]) == 9
    assert isinstance(gen.net[-1], torch.nn.Tanh)


def test_baselines_reject_unsupported_sizes():
    with pytest.raises(ValueError, match="multiples of 16"):
        SkipAutoencoder((4, 4, 4, 4))(torch.rand(1, 3, 40, 40))
    with pytest.raises(ValueError, match="multiples of 4"):
        ResnetDeblurGenerator(width=4, num_blocks=1)(torch.rand(1, 3, 30, 32))


def test_ssim_matches_known_values():
    x = torch.rand(1, 3, 32, 32)
    assert float(ssim(x, x)) == pytest.approx(1.0, abs=1e-6)
    # SSIM of an image and a constant shift c: only the luminance term changes, and over a
    # window l = (2 mu (mu + c) + C1) / (mu^2 + (mu + c)^2 + C1) < 1.
    assert float(ssim(x, x + 0.2)) < float(ssim(x, x + 0.05)) < 1.0
    assert float(ssim(x, 1 - x)) < 0.0  # anti-correlated structure


def test_baseline_losses():
    pred, target = torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16)
    total, terms = autoencoder_loss(pred, target)
    torch.testing.assert_close(total, F.mse_loss(pred, target))
    assert float(terms["perceptual"]) == 0.0
    total, terms = autoencoder_loss(pred, target, perceptual=lambda a, b: torch.tensor(5.0))
    torch.testing.assert_close(total, F.mse_loss(pred, target) + 0.005)
    d = torch.zeros(2)
    total, terms = gan_generator_loss(d, pred, target)
    expected = math.log(2) + 100 * F.mse_loss(pred, target) + (1 - ssim(pred, target))
    torch.testing.assert_close(total, expected)
    assert float(gan_discriminator_loss(d, d)) == pytest.approx(math.log(2))


def test_vgg19_perceptual_loads_a_local_torchvision_style_state_dict(tmp_path):
    # Random weights in torchvision's key layout (features.N.*, classifier.* ignored).
    state = {}
    c = 3
    index = 0
    for item in [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512]:
        if item == "M":
            index += 1
            continue
        state[f"features.{index}.weight"] = torch.randn(item, c, 3, 3) * 0.01
        state[f"features.{index}.bias"] = torch.zeros(item)
        c = item
        index += 2
    state["classifier.0.weight"] = torch.zeros(1)
    path = tmp_path / "vgg19.pth"
    torch.save(state, path)
    loss = VGG19Perceptual(path)
    assert len(loss.features) == 22  # up to and including conv4_2
    torch.testing.assert_close(loss.features[21].weight, state["features.21.weight"])
    x = torch.rand(1, 3, 32, 32, requires_grad=True)
    value = loss(x, torch.rand(1, 3, 32, 32))
    value.backward()
    assert float(value.detach()) > 0 and x.grad is not None
    assert all(not p.requires_grad for p in loss.parameters())
    del state["features.21.weight"]
    torch.save(state, path)
    with pytest.raises(RuntimeError, match="Missing key"):
        VGG19Perceptual(path)


def test_autoencoder_steps_reduce_the_loss(faces64):
    torch.manual_seed(0)
    task = AutoencoderBaselineTask(widths=(8, 16, 32, 64))
    batch = make_batch(faces64[:4])
    losses = [task.train_step(batch)["mse"] for _ in range(40)]
    assert losses[-1] < 0.7 * losses[0], losses


def test_gan_baseline_steps_reduce_the_content_loss_and_round_trip(faces64):
    torch.manual_seed(0)
    task = GANBaselineTask(gen_width=4, num_blocks=9, disc_width=4)
    batch = make_batch(faces64[:4])
    logs = [task.train_step(batch) for _ in range(8)]
    content = [log["content"] for log in logs]
    assert content[-1] < 0.8 * content[0], content
    assert all(math.isfinite(v) for log in logs for v in log.values())
    other = GANBaselineTask(gen_width=4, num_blocks=9, disc_width=4)
    other.load_state_dict(task.state_dict())
    torch.testing.assert_close(other.deblur(batch["blurry"]), task.deblur(batch["blurry"]))
