"""The thesis baselines as tasks of the shared trainer [paper 002, Sec. 4.4, Tables 4.1-4.2].

* ``baseline_ae`` (:class:`AutoencoderTask`): the skip autoencoder with
  ``MSE + 0.001 perceptual`` (VGG19 conv4_2, only when ``loss.vgg19_weights`` names a local
  weights file: nothing is downloaded), Adam lr 1e-3, batch 16.
* ``baseline_gan`` (:class:`GANBaselineTask`): the 9-residual-block generator and the
  batch-norm discriminator, generator loss ``BCE + 100 MSE + (1 - SSIM)``, discriminator BCE,
  Adam lr 2e-4, betas (0.5, 0.999), batch 16.

Batches are dicts with ``blurry`` and ``sharp`` [N, 3, H, W] in [0, 1] (the data pipeline's
``KernelBlurDataset``; see :mod:`facedeblur_ext.training.face_data`). The models are named
``generator`` (and ``discriminator``) in checkpoints; ``facedeblur deblur --model baseline_ae``
or ``baseline_gan`` restores images with them.
"""

from __future__ import annotations

import torch
from torch import nn

from ..losses.baselines import (
    CONTENT_WEIGHT,
    PERCEPTUAL_WEIGHT,
    autoencoder_loss,
    gan_discriminator_loss,
    gan_generator_loss,
)
from ..models.baselines import BNDiscriminator, VGG19Perceptual, build_baseline
from .face_data import build_face_datasets
from .task import StepContext, Task

__all__ = ["AutoencoderTask", "GANBaselineTask"]


class _BaselineTask(Task):
    ema_models = ("generator",)

    def build_datasets(self):
        return build_face_datasets(self.config)

    def validation_pairs(self, models, batch):
        yield models["generator"].restore(batch["blurry"]), batch["sharp"]

    @torch.no_grad()
    def preview(self, models, dataset):
        """Rows of [blurry, restored, sharp]."""
        import torch.nn.functional as F

        count = int((self.config.get("val", {}).get("preview") or {}).get("images", 4))
        if count <= 0 or len(dataset) == 0:
            return None
        picks = sorted({round(i * (len(dataset) - 1) / max(1, count - 1)) for i in range(count)})
        samples = [dataset[i] for i in picks]
        blurry = torch.stack([s["blurry"] for s in samples]).to(self.device)
        sharp = torch.stack([s["sharp"] for s in samples]).to(self.device)
        tiles = [blurry, models["generator"].restore(blurry), sharp]
        rows = torch.cat([F.pad(t.float().cpu(), (2, 2, 2, 2), value=1.0) for t in tiles], dim=3)
        return torch.cat(list(rows), dim=1).clamp(0, 1)


class AutoencoderTask(_BaselineTask):
    """The thesis autoencoder (Table 4.1); see the module docstring."""

    name = "baseline_ae"

    def __init__(self, config: dict, device: torch.device):
        super().__init__(config, device)
        loss = config.get("loss") or {}
        weights = loss.get("vgg19_weights")
        self.perceptual = VGG19Perceptual(weights).to(device) if weights else None
        self.perceptual_weight = float(loss.get("perceptual_weight", PERCEPTUAL_WEIGHT))

    def build_models(self) -> dict[str, nn.Module]:
        return {"generator": build_baseline(self.name, self.config["model"].get("generator"))}

    def training_step(self, models, batch, ctx: StepContext) -> dict[str, float]:
        with ctx.autocast():
            pred = models["generator"](batch["blurry"])
            # The VGG features run under autocast too; the losses themselves in float32.
            loss, terms = autoencoder_loss(pred.float(), batch["sharp"], self.perceptual,
                                           self.perceptual_weight)
        logs = ctx.optimize("generator", loss)
        logs.update({k: float(v) for k, v in terms.items()})
        return logs


class GANBaselineTask(_BaselineTask):
    """The thesis GAN (Table 4.2); see the module docstring."""

    name = "baseline_gan"

    def build_models(self) -> dict[str, nn.Module]:
        model = self.config["model"]
        return {"generator": build_baseline(self.name, model.get("generator")),
                "discriminator": BNDiscriminator(**(model.get("discriminator") or {}))}

    def training_step(self, models, batch, ctx: StepContext) -> dict[str, float]:
        gen, disc = models["generator"], models["discriminator"]
        blurry, sharp = batch["blurry"], batch["sharp"]
        with ctx.autocast():
            fake = gen(blurry)
        # Real and generated images in separate forwards: the discriminator's batch norm must
        # not mix their statistics (the usual DCGAN practice).
        with ctx.autocast():
            d_real, d_fake = disc(sharp), disc(fake.detach())
        d_loss = gan_discriminator_loss(d_real.float(), d_fake.float())
        logs = ctx.optimize("discriminator", d_loss)
        with ctx.frozen("discriminator"), ctx.autocast():
            d_fake = disc(fake)
        content_weight = float((self.config.get("loss") or {}).get("content_weight",
                                                                   CONTENT_WEIGHT))
        g_loss, terms = gan_generator_loss(d_fake.float(), fake.float(), sharp, content_weight)
        logs.update(ctx.optimize("generator", g_loss))
        logs["discriminator"] = float(d_loss.detach())
        logs.update({k: float(v) for k, v in terms.items()})
        return logs
