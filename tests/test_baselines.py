"""Thesis baselines (paper 002, Sec. 4.4): skip autoencoder and the 9-block GAN, as models and
as tasks of the shared trainer (``facedeblur train baseline_ae|baseline_gan``, ``facedeblur
deblur --model baseline_ae|baseline_gan``)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import REPO_ROOT
from face_batches import load_faces, make_batch
from PIL import Image
from step_context import PlainStepContext

from facedeblur_ext import cli
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
    load_baseline,
)
from facedeblur_ext.training import get_task, load_config
from facedeblur_ext.training.checkpoint import load_checkpoint

FACES = REPO_ROOT / "facedeblur_ext" / "assets" / "faces"
CONFIGS = REPO_ROOT / "tests" / "configs"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


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




def tiny_task(name):
    config = load_config(name, CONFIGS / f"{name}_tiny.yaml")
    task = get_task(name)(config, torch.device("cpu"))
    models = task.build_models()
    return task, models, PlainStepContext(task.build_optimizers(models))


def test_baseline_configs_are_the_theses():
    ae = load_config("baseline_ae")
    assert ae["optim"]["lr"] == 1e-3 and ae["train"]["batch_size"] == 16
    assert ae["loss"]["perceptual_weight"] == 0.001
    assert ae["model"]["generator"]["widths"] == [64, 128, 256, 512]
    gan = load_config("baseline_gan")
    assert (gan["optim"]["lr"], gan["optim"]["betas"]) == (2e-4, [0.5, 0.999])
    assert gan["loss"]["content_weight"] == 100.0
    assert gan["model"]["generator"]["num_blocks"] == 9
    for config in (ae, gan):
        assert config["train"]["epochs"] == 50
        assert config["data"]["blur"]["args"]["config"]["motion_prob"] == 1.0


def test_autoencoder_steps_reduce_the_loss(faces64):
    torch.manual_seed(0)
    task, models, ctx = tiny_task("baseline_ae")
    assert isinstance(ctx.optimizers["generator"], torch.optim.Adam)
    assert ctx.optimizers["generator"].defaults["lr"] == 1e-3
    batch = make_batch(faces64[:4])
    losses = [task.training_step(models, batch, ctx)["mse"] for _ in range(40)]
    assert losses[-1] < 0.7 * losses[0], losses


def test_gan_baseline_steps_reduce_the_content_loss(faces64):
    torch.manual_seed(0)
    task, models, ctx = tiny_task("baseline_gan")
    assert ctx.optimizers["discriminator"].defaults["betas"] == (0.5, 0.999)
    batch = make_batch(faces64[:4])
    logs = [task.training_step(models, batch, ctx) for _ in range(8)]
    content = [log["content"] for log in logs]
    assert content[-1] < 0.8 * content[0], content
    assert all(math.isfinite(v) for log in logs for v in log.values())


@pytest.fixture(scope="module")
def face_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("face_cache")


@pytest.mark.parametrize("name", ["baseline_ae", "baseline_gan"])
def test_cli_trains_a_baseline_and_deblurs_with_it(name, tmp_path, face_cache):
    pytest.importorskip("mediapipe")  # face masks of the data pipeline
    run_dir = tmp_path / "run"
    argv = ["train", name, "--config", str(CONFIGS / f"{name}_tiny.yaml"), "-o", str(run_dir),
            "--data-root", str(FACES), f"data.analyzer.cache_dir={face_cache}"]
    assert cli.main(argv) == 0
    ckpt_path = run_dir / "checkpoints" / "last.pt"
    ckpt = load_checkpoint(ckpt_path)
    assert ckpt["task"] == name and ckpt["step"] == 3  # 6 training faces, batch 2
    val = (run_dir / "val.csv").read_text().splitlines()
    assert val[0].startswith("step,epoch,psnr,ssim") and len(val) == 2
    assert (run_dir / "samples" / "step_00000003.png").exists()

    image = tmp_path / "real.png"
    Image.open(FACES / "realblur_shen_2.png").convert("RGB").resize((70, 53)).save(image)
    out = tmp_path / "out"
    assert cli.main(["deblur", "--model", name, "--checkpoint", str(ckpt_path), "--device",
                     "cpu", str(image), "-o", str(out)]) == 0
    restored = np.asarray(Image.open(out / "real.png"))
    assert restored.shape == (53, 70, 3)
    x = torch.from_numpy(np.asarray(Image.open(image), dtype=np.float32) / 255)
    expected = load_baseline(ckpt_path).restore(x.permute(2, 0, 1)[None])[0]
    np.testing.assert_array_equal(
        restored, expected.mul(255).round().byte().permute(1, 2, 0).numpy())
    other = "baseline_gan" if name == "baseline_ae" else "baseline_ae"
    with pytest.raises(ValueError, match=f"not a {other} checkpoint"):
        load_baseline(ckpt_path, task=other)
