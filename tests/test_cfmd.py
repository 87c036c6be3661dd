"""CFMD-GAN: ContAda block, generator, discriminator, losses, trainer, CLI and DDP.

Models are built small through the config (the defaults stay the paper's sizes); the
deformable convolution runs on the reference backend unless the fused op is registered.
"""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys

import facedeblur_ref
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import REPO_ROOT, device_params
from PIL import Image
from step_context import PlainStepContext

import facedeblur_ext
from facedeblur_ext import cli
from facedeblur_ext.data.io import gif_frame_ms
from facedeblur_ext.evaluation.methods import checkpoint_working_size
from facedeblur_ext.losses import (
    CFMDObjective,
    build_perceptual_loss,
    charbonnier_loss,
    discriminator_loss,
    generator_adversarial_loss,
    multiscale_charbonnier_loss,
)
from facedeblur_ext.models.cfmd import (
    CFMDGenerator,
    UNetDiscriminator,
    image_pyramid,
    load_generator,
)
from facedeblur_ext.nn import ControlAdaptiveBlock, resolve_backend, set_backend
from facedeblur_ext.training import apply_overrides, load_config
from facedeblur_ext.training._quality import psnr, ssim
from facedeblur_ext.training.cfmd_task import CFMDTask
from facedeblur_ext.training.checkpoint import load_checkpoint
from facedeblur_ext.training.datasets import FrameAveragingDataset
from facedeblur_ext.training.sampler import ResumableDistributedSampler
from facedeblur_ext.training.trainer import Trainer, model_digest

FRAMES = REPO_ROOT / "tests" / "data" / "frames_vd001"
TINY_CONFIG = REPO_ROOT / "tests" / "configs" / "cfmd_tiny.yaml"
HAS_FUSED = hasattr(facedeblur_ext.ops, "modulated_deform_conv2d")
# What the CLI and trainer use for the deformable conv in these tests.
BACKEND_NAME = "facedeblur_ext.ops" if HAS_FUSED else "facedeblur_ref"

TINY_G = dict(widths=(8, 16, 32), blocks_per_stage=1, control_channels=16,
              attention_reduction=4)
TINY_D = dict(base_channels=8, channel_multipliers=(1, 2, 4))


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_config(tmp_path, *overrides):
    roots = f"data.train.args.roots=[{FRAMES}]"
    val_roots = f"data.val.args.roots=[{FRAMES}]"
    return load_config("cfmd", TINY_CONFIG, [roots, val_roots, f"output_dir={tmp_path}",
                                             f"model.backend={BACKEND_NAME}", *overrides])


def real_batch(n=2, size=32, device="cpu"):
    ds = FrameAveragingDataset([str(FRAMES)], 5, crop=size, scale=(0.15, 0.2), augment=False)
    samples = [ds[i] for i in (0, 4, 7, 11)[:n]]
    return {k: torch.stack([s[k] for s in samples]).to(device) for k in ("blurry", "sharp", "u")}


# ----------------------------------------------------------------------------- layers


def test_contada_block_starts_as_half_masked_plain_conv():
    """At init offsets are 0 and masks 0.5, so CADC(F_u) = 0.5 * conv(F_u) + bias."""
    block = ControlAdaptiveBlock(8, control_channels=4, attention_reduction=2,
                                 backend=facedeblur_ref)
    x = torch.randn(2, 8, 12, 10)
    control = torch.randn(2, 4, 1, 1)
    fused = block.fused_features(x, control)
    offset, mask = block.deform.offsets_and_mask(fused)
    assert offset.shape == (2, 18, 12, 10) and mask.shape == (2, 9, 12, 10)
    assert torch.all(offset == 0) and torch.all(mask == 0.5)
    expected_dc = 0.5 * F.conv2d(fused, block.deform.deform.weight, padding=1) + \
        block.deform.deform.bias.view(1, -1, 1, 1)
    expected = x + expected_dc * block.attention(fused)
    torch.testing.assert_close(block(x, control), expected, atol=1e-5, rtol=1e-5)


def test_contada_constant_control_equals_expanded_and_resized_maps():
    block = ControlAdaptiveBlock(8, control_channels=4, attention_reduction=2,
                                 backend=facedeblur_ref)
    with torch.no_grad():  # give the offsets something to do
        block.deform.offset_conv.weight.normal_(0, 0.1)
    x = torch.randn(1, 8, 8, 8)
    control = torch.randn(1, 4, 1, 1)
    out_small = block(x, control)
    torch.testing.assert_close(block(x, control.expand(1, 4, 8, 8)), out_small)
    torch.testing.assert_close(block(x, control.expand(1, 4, 16, 16)), out_small)


def test_backend_switch_and_deepcopy():
    gen = CFMDGenerator(**TINY_G, backend=facedeblur_ref)
    clone = copy.deepcopy(gen)  # EMA copies: the backend is shared, not copied
    assert clone.encoders[0].blocks[0].backend is facedeblur_ref
    set_backend(clone, None)
    assert clone.encoders[0].blocks[0].backend is None
    assert gen.encoders[0].blocks[0].backend is facedeblur_ref


@pytest.mark.skipif(HAS_FUSED, reason="the fused op is registered")
def test_missing_fused_op_gives_a_clear_error():
    gen = CFMDGenerator(**TINY_G)  # backend None: facedeblur_ext.ops
    with pytest.raises(RuntimeError, match="modulated_deform_conv2d"):
        gen(torch.rand(1, 3, 16, 16), 0.5)


# ----------------------------------------------------------------------------- models


@pytest.mark.parametrize("size", [(32, 32), (48, 64), (36, 20)])
def test_generator_shapes(size):
    h, w = size
    gen = CFMDGenerator(**TINY_G, backend=facedeblur_ref)
    x = torch.rand(2, 3, h, w)
    for u in (0.3, torch.tensor([0.0, 1.0]), torch.rand(2, 1, h, w)):
        outs = gen(x, u)
        assert [tuple(o.shape) for o in outs] == [(2, 3, h // 4, w // 4),
                                                  (2, 3, h // 2, w // 2), (2, 3, h, w)]
        assert all(torch.isfinite(o).all() for o in outs)
    with pytest.raises(ValueError, match="multiples of 4"):
        gen(torch.rand(1, 3, h + 2, w), 0.5)
    restored = gen.restore(torch.rand(1, 3, h + 3, w + 1), 0.5)
    assert restored.shape == (1, 3, h + 3, w + 1)
    assert restored.min() >= 0 and restored.max() <= 1


def test_generator_output_depends_on_u_and_defaults_are_the_papers():
    gen = CFMDGenerator(**TINY_G, backend=facedeblur_ref)
    x = torch.rand(1, 3, 16, 16)
    assert not torch.allclose(gen(x, 0.0)[-1], gen(x, 1.0)[-1])
    paper = CFMDGenerator(backend=facedeblur_ref)
    assert paper.widths == (32, 64, 128)
    assert all(len(stage.blocks) == 8 for stage in [*paper.encoders, *paper.decoders])
    convs = [m for m in paper.mapping.layers if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 8 and all(c.kernel_size == (1, 1) for c in convs)
    assert convs[-1].out_channels == 64


def test_discriminator_shapes():
    disc = UNetDiscriminator(**TINY_D)
    out = disc(torch.rand(3, 3, 32, 40), torch.rand(3, 3, 32, 40))
    assert out.global_logits.shape == (3,)
    assert out.pixel_logits.shape == (3, 1, 32, 40)
    assert out.control_map.shape == (3, 1, 32, 40)
    assert out.control_map.min() >= 0 and out.control_map.max() <= 1
    with pytest.raises(ValueError, match="multiples of 8"):
        disc(torch.rand(1, 3, 36, 32), torch.rand(1, 3, 36, 32))


def test_every_parameter_receives_a_gradient():
    torch.manual_seed(1)
    gen = CFMDGenerator(**TINY_G, backend=facedeblur_ref)
    disc = UNetDiscriminator(**TINY_D)
    batch = real_batch()
    outs = gen(batch["blurry"], batch["u"])
    d_out = disc(batch["blurry"], outs[-1])
    u_map = CFMDTask.control_map(batch)
    objective = CFMDObjective({"per": 0.0})
    g = objective.generator_terms(outs, image_pyramid(batch["sharp"]), d_out, u_map)["g_total"]
    g.backward()
    missing = [n for n, p in gen.named_parameters() if p.grad is None or not p.grad.any()]
    assert not missing, missing
    d_out = disc(batch["blurry"], batch["sharp"])
    d_fake = disc(batch["blurry"], outs[-1].detach())
    for p in disc.parameters():
        p.grad = None
    objective.discriminator_terms(d_out, d_fake, u_map)["d_total"].backward()
    missing = [n for n, p in disc.named_parameters() if p.grad is None or not p.grad.any()]
    assert not missing, missing


# ----------------------------------------------------------------------------- losses


def test_losses_match_their_definitions():
    a, b = torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8)
    expected = torch.sqrt((a - b) ** 2 + 1e-6).mean()
    torch.testing.assert_close(charbonnier_loss(a, b), expected)
    torch.testing.assert_close(
        multiscale_charbonnier_loss(image_pyramid(a), image_pyramid(b)),
        sum(charbonnier_loss(p, q) for p, q in zip(image_pyramid(a), image_pyramid(b))))
    real, fake = torch.randn(5), torch.randn(5)
    bce = F.binary_cross_entropy_with_logits
    torch.testing.assert_close(discriminator_loss(real, fake),
                               bce(real, torch.ones(5)) + bce(fake, torch.zeros(5)))
    torch.testing.assert_close(generator_adversarial_loss(fake), bce(fake, torch.ones(5)))
    torch.testing.assert_close(discriminator_loss(real, fake, "hinge"),
                               F.relu(1 - real).mean() + F.relu(1 + fake).mean())


def test_objective_weights_are_the_papers():
    objective = CFMDObjective({"per": 0.0})
    assert objective.weights == {"q": 0.05, "ar": 0.05, "adv": 0.1, "pix": 1.0, "per": 0.0}
    from facedeblur_ext.models.cfmd import DiscriminatorOutput

    b, h, w = 2, 8, 8
    u_map = torch.full((b, 1, h, w), 0.25)
    real = DiscriminatorOutput(torch.randn(b), torch.randn(b, 1, h, w), torch.rand(b, 1, h, w))
    fake = DiscriminatorOutput(torch.randn(b), torch.randn(b, 1, h, w), torch.rand(b, 1, h, w))
    d = objective.discriminator_terms(real, fake, u_map)
    torch.testing.assert_close(d["d_total"], d["d_enc"] + d["d_dec"] + 0.05 * d["d_q"])
    torch.testing.assert_close(d["d_q"], ((real.control_map - 0.25) ** 2).mean()
                               + ((fake.control_map - 0.25) ** 2).mean())
    outs = [torch.rand(b, 3, 2, 2), torch.rand(b, 3, 4, 4), torch.rand(b, 3, 8, 8)]
    tgts = [torch.rand_like(o) for o in outs]
    g = objective.generator_terms(outs, tgts, fake, u_map)
    torch.testing.assert_close(g["g_total"],
                               0.05 * g["g_ar"] + 0.1 * g["g_adv"] + g["g_pix"])


def test_perceptual_loss_is_pluggable_and_missing_lpips_is_explained():
    class L1(torch.nn.Module):
        def forward(self, pred, target):
            return (pred - target).abs().mean()

    module = build_perceptual_loss("test_cfmd:_StandInPerceptual")
    assert isinstance(module, _StandInPerceptual) and not module.training
    objective = CFMDObjective({"per": 0.5}, perceptual=L1())
    assert objective.perceptual is not None
    try:
        from facedeblur_ext.losses.perceptual import LPIPSLoss  # noqa: F401
    except ImportError:
        with pytest.raises(RuntimeError, match="per=0"):
            build_perceptual_loss("lpips")
    with pytest.raises(RuntimeError, match="per=0"):
        CFMDObjective({"per": 0.01}, perceptual=None)


class _StandInPerceptual(torch.nn.Module):
    """A stand-in perceptual loss with a frozen parameter (for the pluggability test)."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))

    def forward(self, pred, target):
        return self.scale * (pred - target).abs().mean()


def test_validation_metrics_match_scikit_image():
    metrics = pytest.importorskip("skimage.metrics")
    rng = np.random.default_rng(0)
    a = rng.random((24, 20, 3))
    b = np.clip(a + rng.normal(0, 0.05, a.shape), 0, 1)
    ta, tb = (torch.from_numpy(x).permute(2, 0, 1)[None] for x in (a, b))
    assert psnr(ta, tb).item() == pytest.approx(
        metrics.peak_signal_noise_ratio(b, a, data_range=1.0), abs=1e-4)
    assert ssim(ta, tb).item() == pytest.approx(
        metrics.structural_similarity(a, b, channel_axis=2, data_range=1.0), abs=1e-5)


# ----------------------------------------------------------------------------- data, config


def test_frame_averaging_dataset_on_real_frames():
    ds = FrameAveragingDataset([str(FRAMES)], 5, crop=None)
    assert len(ds) == 3 * 5  # 3 windows of 5 frames in 7, 5 moments each
    sample = ds[7]  # window 1, moment 2
    frames = [np.asarray(Image.open(FRAMES / f"{i:05d}.png"), dtype=np.float64) / 255
              for i in range(2, 7)]
    blurry = np.mean([f ** 2.2 for f in frames], axis=0) ** (1 / 2.2)
    h, w = sample["blurry"].shape[-2:]
    np.testing.assert_allclose(sample["blurry"].permute(1, 2, 0).numpy(), blurry[:h, :w],
                               atol=1e-5)
    np.testing.assert_allclose(sample["sharp"].permute(1, 2, 0).numpy(), frames[2][:h, :w],
                               atol=1e-6)
    assert sample["u"].item() == pytest.approx(2 / 5)
    aug = FrameAveragingDataset([str(FRAMES)], 5, crop=64, seed=3)
    first = aug[4]["blurry"]
    assert torch.equal(first, aug[4]["blurry"])  # seeded by (seed, epoch, index)
    aug.set_epoch(1)
    assert not torch.equal(first, aug[4]["blurry"])


def test_sampler_shards_and_resumes():
    full = [ResumableDistributedSampler(10, 2, r, seed=1) for r in (0, 1)]
    for s in full:
        s.set_epoch(3)
    shards = [s.indices() for s in full]
    assert sorted(shards[0] + shards[1]) == list(range(10))
    full[0].set_start(2)
    assert list(full[0]) == shards[0][2:]
    other = ResumableDistributedSampler(10, 2, 0, seed=1)
    other.set_epoch(4)
    assert other.indices() != shards[0]


def test_config_overrides():
    cfg = apply_overrides({"a": {"b": 1}}, ["a.b=2e-4", "a.c=[1, 2]", "d.e=true", "f=text"])
    assert cfg == {"a": {"b": 2e-4, "c": [1, 2]}, "d": {"e": True}, "f": "text"}
    paper = load_config("cfmd")
    assert paper["optim"]["lr"] == 1e-4 and paper["optim"]["betas"] == [0.9, 0.999]
    assert paper["optim"]["lr_decay_per_epoch"] == 0.99
    assert paper["train"]["batch_size"] == 8 and paper["train"]["epochs"] == 200
    assert paper["loss"]["weights"] == {"q": 0.05, "ar": 0.05, "adv": 0.1, "pix": 1.0,
                                        "per": 0.01}
    assert paper["model"]["generator"]["blocks_per_stage"] == 8
    assert paper["data"]["train"]["class"] == "facedeblur_ext.data:FrameStackDataset"
    # The tiny config swaps the dataset class: its table replaces the default one whole.
    tiny = load_config("cfmd", TINY_CONFIG)
    assert "num_frames" not in tiny["data"]["train"]["args"]
    assert tiny["model"]["discriminator"]["spectral_norm"] is True  # other tables merge


def test_model_digest_sees_one_changed_value():
    model = torch.nn.Linear(3, 2)
    before = model_digest(model)
    with torch.no_grad():
        model.weight[0, 0] = torch.nextafter(model.weight[0, 0], torch.tensor(10.0))
    assert model_digest(model) != before


# ----------------------------------------------------------------------------- training




def test_training_steps_on_real_frames_reduce_the_loss():
    torch.manual_seed(0)
    cfg = load_config("cfmd", TINY_CONFIG, [f"model.backend={BACKEND_NAME}", "optim.lr=1e-3"])
    task = CFMDTask(cfg, torch.device("cpu"))
    models = task.build_models()
    ctx = PlainStepContext(task.build_optimizers(models))
    batch = real_batch(n=2)
    identity = multiscale_charbonnier_loss(image_pyramid(batch["blurry"]),
                                           image_pyramid(batch["sharp"])).item()
    losses = [task.training_step(models, batch, ctx)["g_pix"] for _ in range(25)]
    assert np.mean(losses[-3:]) < 0.6 * np.mean(losses[:3]), losses
    # ... and ends below the blurry input's own distance to the sharp frame: past learning to
    # copy the input, it starts to deblur.
    assert np.mean(losses[-3:]) < identity, (losses, identity)


def test_trains_on_the_data_pipelines_fmr_frame_stacks(tmp_path):
    """The trainer consumes facedeblur_ext.data.FrameStackDataset batches (target, target_u)."""
    pytest.importorskip("mediapipe")
    seen = []
    cfg = tiny_config(
        tmp_path, "data.collate=facedeblur_ext.data:collate_frame_stacks",
        "data.train={class: 'facedeblur_ext.data:FrameStackDataset', args: {sources: ["
        f"'{FRAMES}'], num_frames: 5, stride: 1, crop_size: 32, flip_prob: 0.0, "
        "return_stack: false, return_masks: false}}",
        "data.val=null", "train.max_steps=2")
    trainer = Trainer(cfg, step_callback=lambda t: seen.append(t.step))
    result = trainer.fit()
    assert result["step"] == 2 and seen == [1, 2]
    rows = (tmp_path / "train.csv").read_text().splitlines()
    assert len(rows) == 3 and all(np.isfinite(float(v)) for v in rows[-1].split(",")[2:])


def _final_state(trainer):
    return {
        "models": {n: m.state_dict() for n, m in trainer.raw_models.items()},
        "ema": trainer.emas["generator"].module.state_dict(),
        "opt": {n: o.state_dict()["state"] for n, o in trainer.optimizers.items()},
        "lr": {n: s.get_last_lr() for n, s in trainer.schedulers.items()},
        "step": trainer.step, "epoch": trainer.epoch,
    }


def _assert_same(a, b, path=""):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), path
    else:
        assert a == b, path


def test_checkpoint_round_trip_and_exact_resume(tmp_path):
    k = 5  # 7 batches per epoch: the resume is mid-epoch and the run crosses an epoch
    common = ["train.ema.enabled=true", "train.ema.decay=0.9", "optim.grad_clip_norm=1.0",
              "val.at_end=false"]
    straight = Trainer(tiny_config(tmp_path / "straight", f"train.max_steps={2 * k}", *common))
    straight.fit()
    first = Trainer(tiny_config(tmp_path / "split", f"train.max_steps={k}", *common))
    result = first.fit()
    assert result["step"] == k
    ckpt_path = tmp_path / "split" / "checkpoints" / "last.pt"

    # Round trip: the stored generator (EMA weights) reproduces the live one.
    ckpt = load_checkpoint(ckpt_path)
    expected_keys = {"models", "ema", "optimizers", "schedulers", "scalers", "rng", "epoch_step"}
    assert expected_keys <= set(ckpt)
    assert ckpt["epoch_step"] == k
    gen = load_generator(ckpt_path, backend=resolve_backend(BACKEND_NAME))
    x = real_batch(n=1)["blurry"]
    torch.testing.assert_close(gen.restore(x, 0.3),
                               first.eval_models()["generator"].eval().restore(x, 0.3),
                               rtol=0, atol=0)

    second = Trainer(tiny_config(tmp_path / "split", f"train.max_steps={2 * k}", *common),
                     resume="auto")
    second.fit()
    _assert_same(_final_state(straight), _final_state(second))
    logged = (tmp_path / "split" / "train.csv").read_text().splitlines()
    assert [int(line.split(",")[0]) for line in logged[1:]] == list(range(1, 2 * k + 1))


def test_cosine_schedule_with_warmup():
    from facedeblur_ext.training.trainer import build_scheduler

    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=2.0)
    sched = build_scheduler(opt, {"cosine_steps": 6, "warmup_steps": 2, "min_lr_ratio": 0.1})
    lrs = []
    for _ in range(8):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    cosine = [0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * k / 4)) for k in range(5)]
    expected = [2.0 * f for f in [0.5, 1.0, *cosine, 0.1]]
    np.testing.assert_allclose(lrs, expected, rtol=1e-12)
    with pytest.raises(ValueError, match="must exceed"):
        build_scheduler(opt, {"cosine_steps": 2, "warmup_steps": 2})


def test_kernel_blur_recipe_trains_the_generator_alone_and_exports(tmp_path, cli_error):
    """The default checkpoint's recipe (cfmd_kernel_blur) at toy size: still faces, u = 0.5,
    no discriminator updates, per-step cosine LR, then a float16 inference export."""
    faces = tmp_path / "faces"
    faces.mkdir()
    for path in sorted((REPO_ROOT / "facedeblur_ext/assets/faces").glob("celeba_*.png")):
        (faces / path.name).write_bytes(path.read_bytes())
    tiny_g = ("{widths: [8, 16, 32], blocks_per_stage: 1, control_channels: 16, "
              "attention_reduction: 4}")
    config = load_config("cfmd", "cfmd_kernel_blur", [
        f"output_dir={tmp_path / 'run'}", "device=cpu", f"model.backend={BACKEND_NAME}",
        f"model.generator={tiny_g}", "model.discriminator={base_channels: 8, "
        "channel_multipliers: [1, 2, 4]}", "loss.weights.per=0", "loss.perceptual=none",
        "train.max_steps=4", "optim.cosine_steps=4", "optim.warmup_steps=1",
        "train.num_workers=0", "train.num_threads=1", "train.log_every=1",
        "train.checkpoint_every=0", "train.progress=false", "data.val_count=2",
        "data.train.args.crop_size=32", "data.train.args.base_size=40",
        "data.val.args.crop_size=40", "data.val.args.base_size=40", "val.every_steps=0",
        "val.max_batches=1", "val.batch_size=2", "val.preview.images=2"])
    config["data"]["root"] = str(faces)
    trainer = Trainer(config)
    result = trainer.fit()
    assert result["step"] == 4 and result["last_val"]["psnr"] > 10
    disc = trainer.raw_models["discriminator"]
    torch.manual_seed(int(config["seed"]))  # the trainer seeds before building the models
    CFMDGenerator(**config["model"]["generator"], backend=resolve_backend(BACKEND_NAME))
    fresh_disc = UNetDiscriminator(**config["model"]["discriminator"])
    assert model_digest(disc) == model_digest(fresh_disc)  # D never updated
    rows = (tmp_path / "run" / "train.csv").read_text().splitlines()
    header = rows[0].split(",")
    values = [dict(zip(header, r.split(","), strict=True)) for r in rows[1:]]
    assert all(float(v["g_adv"]) == 0 and float(v["g_ar"]) == 0 for v in values)
    assert [float(v["lr_generator"]) for v in values] == pytest.approx(
        [3e-4, 3e-4, 3e-4 * (0.02 + 0.98 * 0.5 * (1 + np.cos(np.pi / 3))),
         3e-4 * (0.02 + 0.98 * 0.5 * (1 + np.cos(2 * np.pi / 3)))], rel=1e-6)

    ckpt = tmp_path / "run" / "checkpoints" / "last.pt"
    small = tmp_path / "small.pt"
    assert cli.main(["export", str(ckpt), str(small)]) == 0
    exported = load_checkpoint(small)
    assert set(exported["models"]) == {"generator"} and "optimizers" not in exported
    assert all(v.dtype == torch.float16 for v in exported["models"]["generator"].values()
               if v.is_floating_point())
    assert small.stat().st_size < 0.3 * ckpt.stat().st_size
    assert checkpoint_working_size(small) == 40  # the validation face scale
    x = real_batch(n=1)["blurry"]
    full = load_generator(ckpt, backend=resolve_backend(BACKEND_NAME)).restore(x, 0.5)
    half = load_generator(small, backend=resolve_backend(BACKEND_NAME)).restore(x, 0.5)
    torch.testing.assert_close(half, full, atol=2e-2, rtol=0)
    assert (half - full).abs().max() > 0  # really rounded to float16
    err = cli_error(["export", str(ckpt), str(tmp_path / "x.pt"), "--models", "critic"])
    assert "no model 'critic'" in err
    with pytest.raises(FileNotFoundError, match="packaged config"):
        load_config("cfmd", "no_such_recipe")


def test_sigterm_saves_a_checkpoint_and_stops(tmp_path):
    def send_at_step_3(trainer):
        if trainer.step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    previous = signal.getsignal(signal.SIGTERM)
    trainer = Trainer(tiny_config(tmp_path, "train.max_steps=10"), step_callback=send_at_step_3)
    result = trainer.fit()
    assert result["stopped_by_signal"] == signal.SIGTERM
    assert result["step"] == 3
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["step"] == 3
    assert signal.getsignal(signal.SIGTERM) == previous


def test_cli_train_and_deblur_end_to_end(tmp_path, capsys):
    run_dir = tmp_path / "run"
    # A model trained on moments says so (facedeblur_ext.inference); deblur sweeps its range.
    config = yaml.safe_load(TINY_CONFIG.read_text())
    config["inference"] = {"moments": True, "u_range": [0.0, 1.0]}
    config_path = tmp_path / "cfmd_tiny_moments.yaml"
    config_path.write_text(yaml.safe_dump(config))
    argv = ["train", "cfmd", "--config", str(config_path), "-o", str(run_dir),
            f"data.train.args.roots=[{FRAMES}]", f"data.val.args.roots=[{FRAMES}]",
            f"model.backend={BACKEND_NAME}", "train.max_steps=3", "val.every_steps=2"]
    assert cli.main(argv) == 0
    assert (run_dir / "samples" / "step_00000002.png").exists()
    val_rows = (run_dir / "val.csv").read_text().splitlines()
    assert val_rows[0].startswith("step,epoch,psnr,ssim") and len(val_rows) == 3
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["max_steps"] == 3

    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for i in (1, 4):  # small odd sizes: the generator pads to multiples of 4 and crops back
        Image.open(FRAMES / f"{i:05d}.png").resize((45, 51)).save(inputs / f"face{i}.png")
    ckpt = run_dir / "checkpoints" / "last.pt"
    out = tmp_path / "out"
    common = ["--model", "cfmd", "--checkpoint", str(ckpt), "--backend", BACKEND_NAME,
              "--device", "cpu"]
    assert cli.main(["deblur", *common, "--frames", "3", str(inputs), "-o", str(out)]) == 0
    for i in (1, 4):
        frames = sorted((out / f"face{i}").glob("frame_*.png"))
        assert [f.name for f in frames] == ["frame_000_u0.000.png", "frame_001_u0.500.png",
                                            "frame_002_u1.000.png"]
        assert Image.open(frames[0]).size == (45, 51)
        with Image.open(out / f"face{i}.gif") as gif:
            # Pillow merges frames that are identical after palette quantisation into one
            # longer frame (this undertrained generator barely reacts to u), so count time:
            # 3 frames at 8 fps (GIF keeps centiseconds: 120 ms each).
            assert gif.is_animated or gif.n_frames == 1
            assert gif.size == (45, 51)
            total = 0
            for j in range(gif.n_frames):
                gif.seek(j)
                total += gif.info["duration"]
            assert total == 3 * gif_frame_ms(8.0) == 360
    single = tmp_path / "single"
    assert cli.main(["deblur", *common, "--frames", "1", str(inputs / "face1.png"),
                     "-o", str(single)]) == 0
    assert [p.name for p in single.iterdir()] == ["face1.png"]
    # The centre frame of the sweep and the single frame are the same moment, u = 0.5.
    np.testing.assert_array_equal(np.asarray(Image.open(single / "face1.png")),
                                  np.asarray(Image.open(out / "face1" / "frame_001_u0.500.png")))


def test_ddp_gloo_two_processes_keep_replicas_identical(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), str(REPO_ROOT / "python")]),
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "facedeblur_ext", "train", "cfmd", "--config", str(TINY_CONFIG),
           "-o", str(tmp_path), f"data.train.args.roots=[{FRAMES}]",
           f"data.val.args.roots=[{FRAMES}]", f"model.backend={BACKEND_NAME}",
           "train.max_steps=4", "distributed.check_replicas_every=1", "val.at_end=false",
           "train.ema.enabled=true"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = (tmp_path / "train.csv").read_text().splitlines()
    header = rows[0].split(",")
    column = header.index("replica_mismatch")
    assert len(rows) == 5 and all(float(r.split(",")[column]) == 0 for r in rows[1:])
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2 and ckpt["step"] == 4


# ----------------------------------------------------------------------------- backends


@pytest.mark.skipif(not HAS_FUSED, reason="fused modulated_deform_conv2d not registered")
@pytest.mark.parametrize("device", device_params())
def test_fused_and_reference_backends_agree(device):
    torch.manual_seed(0)
    ref = CFMDGenerator(**TINY_G, backend=facedeblur_ref).to(device)
    with torch.no_grad():  # non-zero offsets so that the bilinear sampling is exercised
        for m in ref.modules():
            if hasattr(m, "offset_conv"):
                m.offset_conv.weight.normal_(0, 0.05)
    fused = set_backend(copy.deepcopy(ref), None)
    batch = real_batch(n=2, device=device)
    outs = [model(batch["blurry"], batch["u"]) for model in (ref, fused)]
    for a, b in zip(*outs):
        torch.testing.assert_close(b, a, atol=2e-5, rtol=1e-4)
    for o in outs:
        sum((t * (i + 1)).mean() for i, t in enumerate(o)).backward()
    for (name, p), q in zip(ref.named_parameters(), fused.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-4, rtol=1e-3, msg=name)


@pytest.mark.cuda
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_cuda_amp_training_steps(tmp_path, amp):
    cfg = tiny_config(tmp_path, "device=cuda", f"train.amp={amp}", "train.max_steps=3",
                      "val.at_end=true")
    result = Trainer(cfg).fit()
    assert result["step"] == 3 and np.isfinite(result["last_val"]["psnr"])


def test_init_checkpoint_starts_from_a_trained_generator(tmp_path):
    cfg = load_config("cfmd", TINY_CONFIG, [f"model.backend={BACKEND_NAME}"])
    trained = CFMDTask(cfg, torch.device("cpu")).build_models()["generator"]
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(torch.randn_like(p))
    # the exported form: float16 weights of the generator only
    path = tmp_path / "exported.pt"
    torch.save({"format": 1, "task": "cfmd", "config": cfg,
                "models": {"generator": {k: v.half() for k, v in
                                         trained.state_dict().items()}}}, path)
    fresh = CFMDTask(cfg, torch.device("cpu")).build_models()["generator"]
    tuned = CFMDTask(apply_overrides(cfg, [f"model.init_checkpoint={path}"]),
                     torch.device("cpu")).build_models()["generator"]
    for name, value in trained.state_dict().items():
        torch.testing.assert_close(tuned.state_dict()[name], value.half().float())
    assert not any(torch.equal(a, b) for a, b in zip(fresh.parameters(), tuned.parameters()))


def test_lr_multipliers_give_a_submodule_its_own_learning_rate():
    cfg = load_config("cfmd", TINY_CONFIG, [f"model.backend={BACKEND_NAME}", "optim.lr=1e-3",
                                            "optim.lr_multipliers={generator.mapping: 20}"])
    task = CFMDTask(cfg, torch.device("cpu"))
    models = task.build_models()
    optimizer = task.build_optimizers(models)["generator"]
    plain, mapping = optimizer.param_groups
    assert plain["lr"] == pytest.approx(1e-3) and mapping["lr"] == pytest.approx(2e-2)
    assert {id(p) for p in mapping["params"]} == {id(p) for p in
                                                  models["generator"].mapping.parameters()}
    total = sum(len(g["params"]) for g in optimizer.param_groups)
    assert total == len(list(models["generator"].parameters()))
    bad = apply_overrides(cfg, ["optim.lr_multipliers={generator.mappings: 2}"])
    with pytest.raises(ValueError, match="names no parameters"):
        CFMDTask(bad, torch.device("cpu")).build_optimizers(models)


def test_working_size_is_the_validation_face_scale(tmp_path):
    """A validation crop cut smaller than its faces (room for motion) is not the face size."""
    path = tmp_path / "ckpt.pt"
    data = {"val": {"args": {"crop_size": 112, "base_size": 128}},
            "train": {"args": {"crop_size": 80, "base_size": 128}}}
    torch.save({"config": {"data": data}}, path)
    assert checkpoint_working_size(path) == 128
    data["val"]["args"]["base_size"] = None
    torch.save({"config": {"data": data}}, path)
    assert checkpoint_working_size(path) == 112
