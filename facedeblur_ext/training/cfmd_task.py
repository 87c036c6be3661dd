"""CFMD-GAN as a training task [paper 003, Sec. 4.3 and 5.1.2].

Batches are dicts with ``blurry`` and ``sharp`` [B, 3, H, W] in [0, 1] and ``u`` [B] (the
control factor of the sharp frame); an optional ``u_map`` [B, 1, H, W] replaces the constant
plane built from ``u``. Batches of ``facedeblur_ext.data.FrameStackDataset`` (FMR-ordered
stacks, collated by ``collate_frame_stacks``) carry the training pair as ``target`` and
``target_u`` instead; those take precedence. Each iteration updates D on (blurry, sharp) vs
(blurry, G(blurry, u)) and then G, as the paper alternates them.

**Still images** (single-to-single, e.g. ``KernelBlurDataset`` batches of kernel-blurred faces)
carry no ``u``: their target is the middle of the exposure, ``u = 0.5`` [003 Sec. 5.2]. A
``data`` table with a ``root`` folder of sharp faces builds those datasets with
:func:`~facedeblur_ext.training.face_data.build_face_datasets` (``--data-root DIR``).

**Generator-only training.** With the adversarial weights ``adv``, ``ar`` and ``q`` all 0 the
discriminator is not run: G is trained on the pixel and perceptual terms alone (a
restoration-quality pretraining; the GAN stage can resume from its checkpoint).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..losses.cfmd import CFMDObjective, build_perceptual_loss
from ..models.cfmd import (
    CFMDGenerator,
    DiscriminatorOutput,
    UNetDiscriminator,
    image_pyramid,
    load_generator,
)
from ..nn.backend import resolve_backend
from .face_data import build_face_datasets
from .task import StepContext, Task

__all__ = ["CFMDTask", "preview_grid"]


def _split(out: DiscriminatorOutput, n: int) -> tuple[DiscriminatorOutput, DiscriminatorOutput]:
    first = DiscriminatorOutput(*(t[:n] for t in out))
    second = DiscriminatorOutput(*(t[n:] for t in out))
    return first, second


def preview_grid(generator: CFMDGenerator, blurry: Tensor, sharp: Tensor | None,
                 controls: list[float], pad: int = 2) -> Tensor:
    """Rows of [blurry, G(b, u) for each u, sharp]: a [3, H', W'] image in [0, 1]."""
    rows = []
    for i in range(blurry.shape[0]):
        b = blurry[i:i + 1]
        tiles = [b] + [generator.restore(b, u).float() for u in controls]
        if sharp is not None:
            tiles.append(sharp[i:i + 1])
        rows.append(torch.cat([F.pad(t.float(), (pad, pad, pad, pad), value=1.0)
                               for t in tiles], dim=3))
    return torch.cat(rows, dim=2)[0].clamp(0, 1)


class CFMDTask(Task):
    """Generator and U-Net discriminator of CFMD-GAN with the paper's losses."""

    name = "cfmd"
    ema_models = ("generator",)
    #: Control factor of a still image's target (the middle of the exposure).
    still_image_u = 0.5

    def __init__(self, config: dict, device: torch.device):
        super().__init__(config, device)
        from ..inference import inference_settings

        # What the model learns (checked before training; the preview restores these u).
        self.inference = inference_settings(config.get("inference"), source="the config")
        lcfg = config.get("loss", {})
        perceptual = None
        weights = dict(lcfg.get("weights") or {})
        if float(weights.get("per", 0.01)) != 0:
            perceptual = build_perceptual_loss(lcfg.get("perceptual", "lpips"),
                                               **(lcfg.get("perceptual_args") or {}))
        self.objective = CFMDObjective(weights, float(lcfg.get("charbonnier_eps", 1e-3)),
                                       lcfg.get("gan", "bce"), perceptual).to(device)

    def build_models(self) -> dict[str, nn.Module]:
        mcfg = self.config["model"]
        backend = resolve_backend(mcfg.get("backend"))
        generator = CFMDGenerator(**mcfg.get("generator", {}), backend=backend)
        if mcfg.get("init_checkpoint"):
            # Fine-tuning: start from a trained generator (a training or an exported
            # checkpoint). A resumed run then restores its own weights over these.
            trained = load_generator(mcfg["init_checkpoint"])
            generator.load_state_dict({k: v.float() for k, v in trained.state_dict().items()})
        return {
            "generator": generator,
            "discriminator": UNetDiscriminator(**mcfg.get("discriminator", {})),
        }

    def build_datasets(self):
        if (self.config.get("data") or {}).get("root") is not None:
            return build_face_datasets(self.config)
        return super().build_datasets()

    @classmethod
    def pair(cls, batch: dict) -> tuple[Tensor, Tensor]:
        """(sharp [B, 3, H, W], control: [B] or a [B, 1, H, W] map) of a batch."""
        if "target" in batch:
            return batch["target"], batch["target_u"]
        sharp = batch["sharp"]
        if "u_map" in batch:
            return sharp, batch["u_map"]
        if "u" in batch:
            return sharp, batch["u"]
        if sharp.dim() == 3:  # one sample (previews)
            return sharp, torch.tensor(cls.still_image_u)
        return sharp, torch.full((sharp.shape[0],), cls.still_image_u, device=sharp.device)

    @classmethod
    def control_map(cls, batch: dict) -> Tensor:
        """``u_2D``: the batch's control map, or its ``u`` broadcast to [B, 1, H, W]."""
        sharp, u = cls.pair(batch)
        if u.dim() == 4:
            return u.float()
        b, _, h, w = sharp.shape
        return u.float().view(b, 1, 1, 1).expand(b, 1, h, w)

    def training_step(self, models: dict[str, nn.Module], batch: dict,
                      ctx: StepContext) -> dict[str, float]:
        gen, disc = models["generator"], models["discriminator"]
        blurry = batch["blurry"]
        sharp, u = self.pair(batch)
        u_map = self.control_map(batch)
        n = blurry.shape[0]
        with ctx.autocast():
            outputs = gen(blurry, u)
        restored = outputs[-1]
        if not self.objective.adversarial:
            with ctx.autocast():
                g_terms = self.objective.generator_terms(outputs, image_pyramid(sharp, 3), None,
                                                         u_map)
            logs = ctx.optimize("generator", g_terms["g_total"])
            logs.update({k: float(v.detach()) for k, v in g_terms.items()})
            return logs

        # Discriminator: real and generated pairs in one forward (one DDP forward/backward).
        with ctx.autocast():
            both = disc(torch.cat([blurry, blurry]), torch.cat([sharp, restored.detach()]))
            real, fake = _split(both, n)
            d_terms = self.objective.discriminator_terms(real, fake, u_map)
        logs = ctx.optimize("discriminator", d_terms["d_total"])

        # Generator: adversarial and auxiliary-regression terms through the updated D.
        with ctx.frozen("discriminator"), ctx.autocast():
            fake = disc(blurry, restored)
            g_terms = self.objective.generator_terms(outputs, image_pyramid(sharp, 3), fake,
                                                     u_map)
        logs.update(ctx.optimize("generator", g_terms["g_total"]))
        logs.update({k: float(v.detach()) for k, v in {**d_terms, **g_terms}.items()})
        return logs

    def validation_pairs(self, models, batch):
        sharp, u = self.pair(batch)
        yield models["generator"].restore(batch["blurry"], u), sharp

    @torch.no_grad()
    def preview(self, models, dataset) -> Tensor | None:
        pcfg = self.config.get("val", {}).get("preview") or {}
        count = int(pcfg.get("images", 4))
        if count <= 0 or len(dataset) == 0:
            return None
        # Spread the picks over the dataset (neighbouring samples share their blurry image).
        picks = sorted({round(i * (len(dataset) - 1) / max(1, count - 1)) for i in range(count)})
        samples = [dataset[i] for i in picks]
        blurry = torch.stack([s["blurry"] for s in samples]).to(self.device)
        sharp = torch.stack([self.pair(s)[0] for s in samples]).to(self.device)
        # The u values deblur would restore from this model (its config's inference table):
        # the trained range, or the one moment of a still-face model.
        from ..inference import moment_controls

        frames = int(pcfg.get("frames", 7)) if self.inference.moments else 1
        return preview_grid(models["generator"], blurry, sharp,
                            moment_controls(self.inference, frames)).cpu()
