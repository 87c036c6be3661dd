"""SNADNet: parser, generator, discriminator, losses and training steps (paper 004).

Networks run at reduced widths on 64 px crops of the bundled CelebA faces; region masks are a
geometric test stand-in (see face_batches.py). The fused separable-norm op is compared with the
reference composition where it is registered.
"""

from __future__ import annotations

import copy
import math

import facedeblur_ref
import pytest
import torch
import torch.nn.functional as F
from face_batches import load_faces, make_batch
from step_context import PlainStepContext

import facedeblur_ext
from facedeblur_ext.losses.snadnet import (
    ADV_HEAD_WEIGHTS,
    REGION_WEIGHTS,
    focal_loss,
    laplacian_texture,
    multi_region_reconstruction_loss,
    relativistic_adversarial_loss,
    snadnet_generator_loss,
    texture_loss,
)
from facedeblur_ext.models.face_parsing import (
    FaceParsingNet,
    confusion_matrix,
    evaluate_parsing,
    iou_from_confusion,
    mean_iou,
    parsing_labels,
)
from facedeblur_ext.models.snadnet import (
    MultiPatchDiscriminator,
    ParsingSNAD,
    SNADNet,
    SNADNetGenerator,
)
from facedeblur_ext.training import load_config
from facedeblur_ext.training.checkpoint import atomic_torch_save
from facedeblur_ext.training.snadnet_task import SNADNetTask, stage_config

# Reduced widths through config overrides (the packaged config keeps the paper's sizes).
SMALL = [
    "model.backend=facedeblur_ref",
    "model.parser={width: 8, context_channels: 16, fusion_channels: 16}",
    "model.generator={width: 8, num_stages: 4, ad_hidden: 16}",
    "model.discriminator={width: 8, max_width: 32, num_blocks: 5}",
]


def fused_available() -> bool:
    return hasattr(facedeblur_ext.ops, "separable_norm")


def small_generator(**kw) -> SNADNetGenerator:
    args = dict(width=8, num_stages=4, ad_hidden=16, backend=facedeblur_ref)
    args.update(kw)
    return SNADNetGenerator(**args)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def faces64():
    return load_faces(64)


# ----------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("size", [(32, 32), (64, 48), (48, 80)])
def test_generator_shapes(size):
    h, w = size
    gen = small_generator()
    blurry = torch.rand(2, 3, h, w)
    labels = torch.randint(0, 4, (2, h, w))
    out, textures = gen(blurry, labels, return_textures=True)
    assert out.shape == (2, 3, h, w)
    assert [t.shape for t in textures] == [(2, 3, h // 2**j, w // 2**j) for j in range(3)]
    # A one-hot map and the label map are the same input.
    onehot = F.one_hot(labels, 4).permute(0, 3, 1, 2).float()
    torch.testing.assert_close(gen(blurry, onehot), out)


def test_generator_rejects_sizes_that_are_not_multiples_of_its_stride():
    gen = small_generator()
    with pytest.raises(ValueError, match="multiples of 16"):
        gen(torch.rand(1, 3, 40, 48), torch.zeros(1, 40, 48, dtype=torch.long))
    gen3 = small_generator(num_stages=3)
    out = gen3(torch.rand(1, 3, 40, 24), torch.zeros(1, 40, 24, dtype=torch.long))
    assert out.shape[-2:] == (40, 24)
    with pytest.raises(ValueError, match="does not match"):
        gen(torch.rand(1, 3, 32, 32), torch.zeros(1, 4, 16, 16))


@pytest.mark.parametrize("size", [(64, 64), (32, 96)])
def test_parser_shapes(size):
    net = FaceParsingNet(width=8, context_channels=16, fusion_channels=16)
    x = torch.rand(2, 3, *size)
    logits, aux8, aux16 = net(x, return_aux=True)
    assert logits.shape == aux8.shape == aux16.shape == (2, 4, *size)
    p = net.parse(x)
    assert p.shape == (2, 4, *size)
    torch.testing.assert_close(p.sum(1), torch.ones(2, *size))
    with pytest.raises(ValueError, match="multiples of 32"):
        net(torch.rand(1, 3, 48, 64))


def test_discriminator_heads_match_the_paper_at_256_px_and_accept_other_sizes():
    disc = MultiPatchDiscriminator(width=4, max_width=16)  # 7 blocks, as the paper
    outs = disc(torch.rand(2, 3, 256, 256))
    assert [tuple(o.shape) for o in outs] == [(2, 1), (2, 1, 2, 2), (2, 1, 4, 4), (2, 1, 8, 8)]
    outs = disc(torch.rand(1, 3, 160, 160))  # CelebA's 160 px: odd maps (5 -> 3 -> 2)
    assert [tuple(o.shape) for o in outs] == [(1, 1), (1, 1, 2, 2), (1, 1, 3, 3), (1, 1, 5, 5)]
    sn = [n for n, _ in disc.named_parameters() if "parametrizations" in n]
    assert sn and all("original" in n for n in sn)  # every weight is spectrally normalized


# ----------------------------------------------------------------------------- gradients


def test_every_parameter_receives_a_gradient(faces64):
    batch = make_batch(faces64[:2])
    gen = small_generator()
    disc = MultiPatchDiscriminator(width=8, max_width=32, num_blocks=5)
    fake, textures = gen(batch["blurry"], parsing_labels(batch), return_textures=True)
    d_fake, d_real = disc(fake), disc(batch["sharp"])
    g_loss, _ = snadnet_generator_loss(fake, batch["sharp"], batch["regions"], textures,
                                       d_fake, d_real)
    d_loss = relativistic_adversarial_loss(d_real, d_fake)
    (g_loss + d_loss).backward()
    for module in (gen, disc):
        for name, p in module.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, name

    parser = FaceParsingNet(width=8, context_channels=16, fusion_channels=16)
    outs = parser(batch["blurry"], return_aux=True)
    sum(focal_loss(o, parsing_labels(batch)) for o in outs).backward()
    for name, p in parser.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


# ----------------------------------------------------------------------------- SNAD layer


@pytest.mark.parametrize("norm_regions", ["face_background", "parsing"])
def test_parsing_snad_is_separable_norm_with_parsing_driven_gamma_beta(norm_regions):
    layer = ParsingSNAD(6, 4, hidden=5, norm_regions=norm_regions, backend=facedeblur_ref)
    x = torch.randn(2, 6, 8, 8)
    parsing = F.one_hot(torch.randint(0, 4, (2, 16, 16)), 4).permute(0, 3, 1, 2).float()
    p = F.interpolate(parsing, size=(8, 8), mode="area")
    shared = F.relu(layer.conv1(p))
    gamma, beta = layer.conv2(shared), layer.conv3(shared)
    face = p[:, 0] + p[:, 1]  # facial parts + skin; hair and background are "background"
    masks = p if norm_regions == "parsing" else torch.stack([face, 1 - face], 1)
    # Direct composition of Eq. 3-9.
    out = torch.zeros_like(x)
    for r in range(masks.shape[1]):
        m = masks[:, r:r + 1]
        mass = m.sum((2, 3), keepdim=True)
        mu = (m * x).sum((2, 3), keepdim=True) / mass.clamp_min(1e-12)
        var = (m * (x - mu) ** 2).sum((2, 3), keepdim=True) / mass.clamp_min(1e-12)
        out = out + m * (x - mu) / torch.sqrt(var + 1e-5)
    torch.testing.assert_close(layer(x, parsing), out * gamma + beta, rtol=1e-4, atol=1e-4)


def test_parsing_snad_rejects_face_regions_outside_the_parsing_map():
    with pytest.raises(ValueError, match="face_regions"):
        ParsingSNAD(4, 4, face_regions=(4,), backend=facedeblur_ref)
    with pytest.raises(ValueError, match="norm_regions"):
        ParsingSNAD(4, 4, norm_regions="batch", backend=facedeblur_ref)


def test_backend_none_resolves_to_the_fused_op_when_the_layer_runs():
    gen = small_generator(backend=None)  # constructing never needs the op
    x, labels = torch.rand(1, 3, 32, 32), torch.zeros(1, 32, 32, dtype=torch.long)
    if fused_available():
        assert gen(x, labels).shape == x.shape
    else:
        with pytest.raises(RuntimeError, match="provides no separable_norm"):
            gen(x, labels)
    gen.set_backend(facedeblur_ref)
    assert gen(x, labels).shape == x.shape
    clone = copy.deepcopy(gen)  # EMA-style copies share the backend
    torch.testing.assert_close(clone(x, labels), gen(x, labels))


@pytest.mark.skipif(not fused_available(), reason="fused separable_norm op not registered")
def test_fused_backend_matches_reference_composition(faces64):
    batch = make_batch(faces64[:2])
    gen_ref = small_generator(backend=facedeblur_ref)
    gen_fused = small_generator(backend=None)
    gen_fused.load_state_dict(gen_ref.state_dict())
    outs = []
    for gen in (gen_ref, gen_fused):
        out, textures = gen(batch["blurry"], parsing_labels(batch), return_textures=True)
        loss = multi_region_reconstruction_loss(out, batch["sharp"], batch["regions"])
        loss = loss + texture_loss(textures, batch["sharp"])
        loss.backward()
        outs.append((out.detach(), [p.grad.clone() for p in gen.parameters()]))
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=1e-4, atol=1e-4)
    for g_fused, g_ref in zip(outs[1][1], outs[0][1]):
        torch.testing.assert_close(g_fused, g_ref, rtol=1e-3, atol=1e-4)


# ----------------------------------------------------------------------------- losses


def test_focal_loss_reduces_to_cross_entropy_and_down_weights_easy_pixels():
    logits = torch.randn(2, 4, 5, 6)
    labels = torch.randint(0, 4, (2, 5, 6))
    ce = F.cross_entropy(logits, labels)
    torch.testing.assert_close(focal_loss(logits, labels, gamma=0.0), ce)
    fl = focal_loss(logits, labels, gamma=2.0, reduction="none")
    pt = logits.softmax(1).gather(1, labels[:, None])[:, 0]
    torch.testing.assert_close(fl, -(1 - pt) ** 2 * pt.log())
    alpha = [0.1, 0.2, 0.3, 0.4]
    weighted = focal_loss(logits, labels, alpha=alpha, reduction="none")
    torch.testing.assert_close(weighted, fl * torch.tensor(alpha)[labels])
    ignored = labels.clone()
    ignored[0] = 255
    torch.testing.assert_close(focal_loss(logits, ignored, ignore_index=255),
                               fl[1].mean())


def test_multi_region_loss_is_region_mean_error_weighted_by_the_paper():
    target = torch.zeros(2, 3, 4, 4)
    labels = torch.tensor([0, 1, 2, 3]).repeat_interleave(4).view(1, 4, 4).repeat(2, 1, 1)
    labels[1, 3] = 1  # sample 1 has no background
    masks = F.one_hot(labels, 4).permute(0, 3, 1, 2).float()
    pred = target.clone()
    errors = torch.tensor([0.1, 0.2, 0.3, 0.4])
    pred += errors[labels][:, None]  # constant error per region
    loss, terms = multi_region_reconstruction_loss(pred, target, masks, return_terms=True)
    # Background error is 0.4 in sample 0 and absent (0, not NaN) in sample 1.
    expected_per_region = torch.tensor([0.1, 0.2, 0.3, 0.2])
    torch.testing.assert_close(loss, (expected_per_region * torch.tensor(REGION_WEIGHTS)).sum())
    assert math.isclose(float(terms["rec_skin"]), 0.2, rel_tol=1e-6)
    assert REGION_WEIGHTS == (10.0, 12.0, 8.0, 6.0)  # parts, skin, hair, background
    assert float(multi_region_reconstruction_loss(target, target, masks)) == 0.0


def test_relativistic_loss_and_head_weights():
    real = [torch.zeros(2, 1)] + [torch.zeros(2, 1, s, s) for s in (2, 4, 8)]
    fake = [t + 3.0 for t in real]
    assert ADV_HEAD_WEIGHTS == (1.0, 0.8, 0.4, 0.2)  # global, then coarse to fine
    equal = relativistic_adversarial_loss(real, real)
    assert math.isclose(float(equal), sum(ADV_HEAD_WEIGHTS) * math.log(2), rel_tol=1e-6)
    g = relativistic_adversarial_loss(fake, real)  # fake judged more real: small G loss
    d = relativistic_adversarial_loss(real, fake)
    assert math.isclose(float(g), sum(ADV_HEAD_WEIGHTS) * math.log1p(math.exp(-3)), rel_tol=1e-5)
    assert math.isclose(float(d), sum(ADV_HEAD_WEIGHTS) * math.log1p(math.exp(3)), rel_tol=1e-5)


def test_laplacian_texture_and_texture_loss():
    flat = torch.full((1, 3, 8, 8), 0.7)
    assert float(laplacian_texture(flat).abs().max()) == 0.0
    img = torch.rand(1, 3, 8, 8)
    t = laplacian_texture(img)
    manual = (img[..., :-2, 1:-1] + img[..., 2:, 1:-1] + img[..., 1:-1, :-2] + img[..., 1:-1, 2:]
              - 4 * img[..., 1:-1, 1:-1])
    torch.testing.assert_close(t[..., 1:-1, 1:-1], manual)
    half = laplacian_texture(F.interpolate(img, size=(4, 4), mode="area"))
    assert float(texture_loss([t, half], img)) < 1e-6
    assert float(texture_loss([t * 0, half], img)) == pytest.approx(float(t.abs().mean()), rel=1e-5)


def test_miou_on_known_label_maps():
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 3, 3]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 2, 3, 0]])
    cm = confusion_matrix(pred, target, 4)
    assert cm.tolist() == [[1, 1, 0, 0], [0, 2, 0, 0], [0, 0, 2, 0], [1, 0, 0, 1]]
    miou, per_class = iou_from_confusion(cm)
    assert per_class == pytest.approx([1 / 3, 2 / 3, 1.0, 1 / 2])
    assert miou == pytest.approx((1 / 3 + 2 / 3 + 1 + 1 / 2) / 4)
    # A class in neither map is left out of the mean.
    assert mean_iou(torch.zeros(3, dtype=torch.long), torch.zeros(3, dtype=torch.long), 4) == 1.0


# ----------------------------------------------------------------------------- training




def stage_task(stage, tmp_path, *overrides):
    """(task, models, context) of one stage, built as the trainer builds them."""
    config = stage_config(load_config("snadnet", None, [f"output_dir={tmp_path}", *SMALL,
                                                        *overrides]), stage)
    task = SNADNetTask(config, torch.device("cpu"))
    models = task.build_models()
    return task, models, PlainStepContext(task.build_optimizers(models))


def stage1_checkpoint(tmp_path, parser) -> str:
    """A stage-I checkpoint holding ``parser`` (what stage II loads)."""
    path = tmp_path / "parsing" / "checkpoints" / "last.pt"
    atomic_torch_save({"task": "snadnet", "config": {"stage": "parsing"},
                       "models": {"parser": parser.state_dict()}, "ema": {}}, path)
    return str(path)


def test_paper_hyper_parameters_are_the_defaults(tmp_path):
    task, models, ctx = stage_task("parsing", tmp_path)
    sgd = ctx.optimizers["parser"]
    assert isinstance(sgd, torch.optim.SGD)
    assert {k: sgd.defaults[k] for k in ("lr", "momentum", "weight_decay")} == {
        "lr": 0.02, "momentum": 0.9, "weight_decay": 5e-4}
    assert task.loss["focal_gamma"] == 2.0
    assert (task.loss["rec_weight"], task.loss["adv_weight"], task.loss["texture_weight"]) == (
        120.0, 0.1, 1.0)
    assert tuple(task.loss["region_weights"]) == REGION_WEIGHTS == (10.0, 12.0, 8.0, 6.0)
    assert tuple(task.loss["head_weights"]) == ADV_HEAD_WEIGHTS

    stage1_checkpoint(tmp_path, models["parser"])
    task, models, ctx = stage_task("deblur", tmp_path)
    for name in ("generator", "discriminator"):
        adam = ctx.optimizers[name]
        assert isinstance(adam, torch.optim.Adam)
        assert (adam.defaults["lr"], adam.defaults["betas"]) == (2e-4, (0.5, 0.999))
    # Stage II optimizes the generator only: the frozen parser is not in its optimizer.
    optimized = {id(p) for g in ctx.optimizers["generator"].param_groups for p in g["params"]}
    assert optimized == {id(p) for p in models["generator"].generator.parameters()}
    with pytest.raises(ValueError, match="unknown SNADNet loss keys"):
        SNADNetTask(stage_config(load_config("snadnet", None, ["loss.rec_wieght=1"]),
                                 "parsing"), torch.device("cpu"))


def test_stage1_steps_reduce_the_focal_loss_and_improve_miou(faces64, tmp_path):
    torch.manual_seed(0)
    task, models, ctx = stage_task("parsing", tmp_path)
    train = make_batch(faces64[:6])
    held_out = [make_batch(faces64[6:])]
    before = evaluate_parsing(models["parser"], held_out)["miou"]
    losses = [task.training_step(models, train, ctx)["focal"] for _ in range(12)]
    after = evaluate_parsing(models["parser"], held_out)
    assert losses[-1] < 0.6 * losses[0], losses
    assert after["miou"] > before, (before, after)
    assert 0.0 <= after["pixel_accuracy"] <= 1.0
    # The task's validation hooks give the same mIoU as evaluate_parsing.
    models["parser"].eval()
    task.validation_step(models, held_out[0])
    assert task.validation_results()["miou"] == pytest.approx(after["miou"])
    assert task.validation_results() == {}  # reading the results resets them


def test_stage2_steps_reduce_the_generator_loss(faces64, tmp_path):
    torch.manual_seed(0)
    parser = FaceParsingNet(width=8, context_channels=16, fusion_channels=16)
    stage1_checkpoint(tmp_path, parser)
    task, models, ctx = stage_task("deblur", tmp_path)
    snadnet = models["generator"]
    assert isinstance(snadnet, SNADNet)
    for a, b in zip(snadnet.parser.state_dict().values(), parser.state_dict().values()):
        assert torch.equal(a, b)  # the stage-I weights
    parser_before = copy.deepcopy(snadnet.parser.state_dict())
    batch = make_batch(faces64[:4])
    logs = [task.training_step(models, batch, ctx) for _ in range(10)]
    assert all(math.isfinite(v) for log in logs for v in log.values())
    assert set(logs[0]) >= {"generator_total", "rec", "adv", "texture", "discriminator",
                            "rec_skin", "rec_facial_parts", "rec_hair", "rec_background"}
    recs = [log["rec"] for log in logs]
    assert recs[-1] < 0.97 * recs[0], recs
    # The generator starts near the identity; after a few steps it is already closer to the
    # sharp faces than the blurry input is (in the multi-region loss).
    identity = float(multi_region_reconstruction_loss(batch["blurry"], batch["sharp"],
                                                      batch["regions"]))
    assert recs[-1] < identity, (recs, identity)
    assert logs[-1]["generator_total"] < logs[0]["generator_total"]
    # The parser stayed frozen (weights and batch-norm statistics) and in eval mode.
    assert not snadnet.parser.training and snadnet.training
    for name, value in snadnet.parser.state_dict().items():
        assert torch.equal(value, parser_before[name]), name
    out = snadnet.restore(batch["blurry"][:, :, :50, :45])  # any size: padded and cropped
    assert out.shape == (4, 3, 50, 45) and 0.0 <= float(out.min()) <= float(out.max()) <= 1.0


@pytest.mark.slow
def test_generator_traces_as_one_graph():
    # Dynamo tracing only (backend="eager"): no graph breaks in the model code itself.
    gen = small_generator()
    x, labels = torch.rand(1, 3, 32, 32), torch.zeros(1, 32, 32, dtype=torch.long)
    compiled = torch.compile(gen, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x, labels), gen(x, labels))
