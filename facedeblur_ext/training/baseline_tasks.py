"""Per-step training logic of the thesis baselines [paper 002, Sec. 4.4, Tables 4.1-4.2].

Like :mod:`facedeblur_ext.training.snadnet_task`: no loop, the shared trainer drives the steps.
Batches are dicts with ``blurry`` and ``sharp`` [N, 3, H, W] in [0, 1].
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..losses.baselines import (
    CONTENT_WEIGHT,
    PERCEPTUAL_WEIGHT,
    autoencoder_loss,
    gan_discriminator_loss,
    gan_generator_loss,
)
from ..models.baselines import BNDiscriminator, ResnetDeblurGenerator, SkipAutoencoder


def _floats(terms: dict[str, Tensor]) -> dict[str, float]:
    return {k: float(v) for k, v in terms.items()}


class AutoencoderBaselineTask:
    """Skip autoencoder, ``MSE + 0.001 perceptual``, Adam lr 1e-3 (Table 4.1; batch 16 is the
    trainer's setting).

    Args:
        widths: encoder widths (default the thesis-sized 64..512).
        perceptual: optional perceptual loss callable (e.g. ``VGG19Perceptual(path)``); off by
            default because VGG19 weights are not downloadable here.
        lr: Adam learning rate.
        device: where the model lives.
    """

    def __init__(self, widths=(64, 128, 256, 512),
                 perceptual: Callable[[Tensor, Tensor], Tensor] | None = None,
                 lr: float = 1e-3, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.model = SkipAutoencoder(tuple(widths)).to(self.device)
        if isinstance(perceptual, torch.nn.Module):
            perceptual = perceptual.to(self.device)
        self.perceptual = perceptual
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=lr)

    def train_step(self, batch: dict) -> dict[str, float]:
        self.model.train()
        blurry = batch["blurry"].to(self.device)
        sharp = batch["sharp"].to(self.device)
        loss, terms = autoencoder_loss(self.model(blurry), sharp, self.perceptual,
                                       PERCEPTUAL_WEIGHT)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return _floats(terms)

    @torch.no_grad()
    def deblur(self, blurry: Tensor) -> Tensor:
        self.model.eval()
        return self.model(blurry.to(self.device)).clamp_(0.0, 1.0)

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        if "optimizer" in state:
            self.optimizer.load_state_dict(state["optimizer"])


class GANBaselineTask:
    """9-residual-block generator with the BN discriminator: generator loss
    ``BCE + 100 MSE + (1 - SSIM)``, discriminator BCE, Adam lr 2e-4, betas (0.5, 0.999).

    Args:
        gen_width, num_blocks: generator stem width and residual blocks (64, 9).
        disc_width, disc_layers: discriminator width and stride-2 layers (64, 4).
        lr, betas: Adam settings for both networks.
        device: where the models live.
    """

    def __init__(self, gen_width: int = 64, num_blocks: int = 9, disc_width: int = 64,
                 disc_layers: int = 4, lr: float = 2e-4, betas=(0.5, 0.999),
                 device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.generator = ResnetDeblurGenerator(gen_width, num_blocks).to(self.device)
        self.discriminator = BNDiscriminator(disc_width, disc_layers).to(self.device)
        self.generator_optimizer = torch.optim.Adam(self.generator.parameters(), lr=lr,
                                                    betas=tuple(betas))
        self.discriminator_optimizer = torch.optim.Adam(self.discriminator.parameters(), lr=lr,
                                                        betas=tuple(betas))

    def train_step(self, batch: dict) -> dict[str, float]:
        """A discriminator update on (sharp, detached fake), then a generator update."""
        self.generator.train()
        self.discriminator.train()
        blurry = batch["blurry"].to(self.device)
        sharp = batch["sharp"].to(self.device)
        fake = self.generator(blurry)

        d_loss = gan_discriminator_loss(self.discriminator(sharp),
                                        self.discriminator(fake.detach()))
        self.discriminator_optimizer.zero_grad(set_to_none=True)
        d_loss.backward()
        self.discriminator_optimizer.step()

        self.discriminator.requires_grad_(False)
        try:
            g_loss, terms = gan_generator_loss(self.discriminator(fake), fake, sharp,
                                               CONTENT_WEIGHT)
            self.generator_optimizer.zero_grad(set_to_none=True)
            g_loss.backward()
            self.generator_optimizer.step()
        finally:
            self.discriminator.requires_grad_(True)
        out = _floats(terms)
        out["discriminator"] = float(d_loss.detach())
        return out

    @torch.no_grad()
    def deblur(self, blurry: Tensor) -> Tensor:
        self.generator.eval()
        return self.generator(blurry.to(self.device)).clamp_(0.0, 1.0)

    def state_dict(self) -> dict:
        return {
            "generator": self.generator.state_dict(),
            "discriminator": self.discriminator.state_dict(),
            "generator_optimizer": self.generator_optimizer.state_dict(),
            "discriminator_optimizer": self.discriminator_optimizer.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.generator.load_state_dict(state["generator"])
        self.discriminator.load_state_dict(state["discriminator"])
        for name in ("generator_optimizer", "discriminator_optimizer"):
            if name in state:
                getattr(self, name).load_state_dict(state[name])
