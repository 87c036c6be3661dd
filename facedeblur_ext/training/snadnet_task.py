"""SNADNet's per-step training logic, for the shared trainer [paper 004, Sec. II and III-A].

:class:`SNADNetTask` owns the three networks and their optimizers and does one optimization
step on a batch dict, returning the loss values as floats. It has no loop, no data loading and
no logging: the trainer drives it. Batches are the data pipeline's dicts:

* ``blurry``, ``sharp``: [N, 3, H, W] in [0, 1];
* ``region_masks``: [N, 4, H, W] masks of the *sharp* image (facial parts, skin, hair,
  background);
* ``parsing`` (optional): [N, H, W] long labels in the same order (else the masks' arg-max).

Stage I (:meth:`SNADNetTask.parsing_step`) trains the parser on blurry faces against the labels
of the sharp faces with focal loss (gamma 2), SGD lr 0.02, momentum 0.9, weight decay 5e-4.
Stage II (:meth:`SNADNetTask.deblur_step`) freezes the parser, parses the blurry input and
trains generator and discriminator with Adam lr 2e-4, betas (0.5, 0.999): one discriminator
step then one generator step per batch.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields

import torch
from torch import Tensor

from ..losses.snadnet import (
    ADV_HEAD_WEIGHTS,
    ADV_WEIGHT,
    REC_WEIGHT,
    REGION_WEIGHTS,
    TEXTURE_WEIGHT,
    focal_loss,
    relativistic_adversarial_loss,
    snadnet_generator_loss,
)
from ..models.face_parsing import FaceParsingNet, evaluate_parsing, parsing_labels
from ..models.snadnet import MultiPatchDiscriminator, SNADNetGenerator


@dataclass
class SNADNetConfig:
    """Hyper-parameters; the defaults are the paper's (widths: LinkNet / BiSeNet / Fig. 4)."""

    num_regions: int = 4
    # Stage I: parser.
    parser_width: int = 64
    parser_context_channels: int = 128
    parser_fusion_channels: int = 256
    parser_lr: float = 0.02
    parser_momentum: float = 0.9
    parser_weight_decay: float = 5e-4
    focal_gamma: float = 2.0
    focal_alpha: tuple[float, ...] | None = None
    # Weight of each auxiliary head's focal loss (face-parsing.PyTorch sums all three heads).
    parser_aux_weight: float = 1.0
    # Stage II: generator and discriminator.
    gen_width: int = 64
    gen_stages: int = 4
    ad_hidden: int = 128
    texture_levels: int = 3
    norm_regions: str = "face_background"
    # Parsing channels forming the face foreground of separable normalization (parts, skin).
    face_regions: tuple[int, ...] = (0, 1)
    encoder_norm: bool = True
    disc_width: int = 64
    disc_max_width: int = 512
    disc_blocks: int = 7
    lr: float = 2e-4
    betas: tuple[float, float] = (0.5, 0.999)
    rec_weight: float = REC_WEIGHT
    adv_weight: float = ADV_WEIGHT
    texture_weight: float = TEXTURE_WEIGHT
    region_weights: tuple[float, ...] = REGION_WEIGHTS
    head_weights: tuple[float, ...] = ADV_HEAD_WEIGHTS
    # How the generator sees the parser's output: "onehot" (the arg-max labels, the paper's
    # "semantic label P_t") or "soft" (probabilities).
    parsing_input: str = "onehot"

    @classmethod
    def from_dict(cls, values: dict) -> SNADNetConfig:
        """Build from a (YAML) dict; unknown keys raise, lists become tuples."""
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown SNADNet config keys: {sorted(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})

    def to_dict(self) -> dict:
        return asdict(self)


def _floats(terms: dict[str, Tensor]) -> dict[str, float]:
    return {k: float(v) for k, v in terms.items()}


class SNADNetTask:
    """Networks, optimizers and single training steps of SNADNet's two stages.

    Args:
        config: hyper-parameters (default: the paper's).
        device: where the networks live.
        backend: separable-normalization backend of the generator's SNAD layers (None:
            ``facedeblur_ext.ops``, the fused op).
    """

    def __init__(self, config: SNADNetConfig | None = None, device: torch.device | str = "cpu",
                 backend=None):
        self.config = cfg = config or SNADNetConfig()
        if cfg.parsing_input not in ("onehot", "soft"):
            raise ValueError(f"parsing_input must be 'onehot' or 'soft', got {cfg.parsing_input!r}")
        self.device = torch.device(device)
        self.parser = FaceParsingNet(cfg.num_regions, cfg.parser_width,
                                     cfg.parser_context_channels,
                                     cfg.parser_fusion_channels).to(self.device)
        self.generator = SNADNetGenerator(
            width=cfg.gen_width, num_stages=cfg.gen_stages, parsing_channels=cfg.num_regions,
            ad_hidden=cfg.ad_hidden, texture_levels=cfg.texture_levels,
            norm_regions=cfg.norm_regions, face_regions=cfg.face_regions,
            encoder_norm=cfg.encoder_norm, backend=backend,
        ).to(self.device)
        self.discriminator = MultiPatchDiscriminator(cfg.disc_width, cfg.disc_max_width,
                                                     cfg.disc_blocks).to(self.device)
        self.parser_optimizer = torch.optim.SGD(
            self.parser.parameters(), lr=cfg.parser_lr, momentum=cfg.parser_momentum,
            weight_decay=cfg.parser_weight_decay)
        self.generator_optimizer = torch.optim.Adam(self.generator.parameters(), lr=cfg.lr,
                                                    betas=tuple(cfg.betas))
        self.discriminator_optimizer = torch.optim.Adam(self.discriminator.parameters(),
                                                        lr=cfg.lr, betas=tuple(cfg.betas))

    # ---------------------------------------------------------------- helpers
    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device, non_blocking=True) if isinstance(v, Tensor) else v
                for k, v in batch.items()}

    def parsing_loss(self, blurry: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Focal loss of the parser's main head plus its auxiliary heads."""
        cfg = self.config
        logits, aux8, aux16 = self.parser(blurry, return_aux=True)
        main = focal_loss(logits, labels, cfg.focal_gamma, cfg.focal_alpha)
        aux = focal_loss(aux8, labels, cfg.focal_gamma, cfg.focal_alpha) + focal_loss(
            aux16, labels, cfg.focal_gamma, cfg.focal_alpha)
        total = main + cfg.parser_aux_weight * aux
        return total, {"focal": main.detach(), "focal_aux": aux.detach(),
                       "parser_total": total.detach()}

    @torch.no_grad()
    def parse(self, blurry: Tensor) -> Tensor:
        """Parsing map P_t of blurry faces from the (frozen) parser, in eval mode."""
        was_training = self.parser.training
        self.parser.eval()
        try:
            return self.parser.parse(blurry, soft=self.config.parsing_input == "soft")
        finally:
            self.parser.train(was_training)

    # ---------------------------------------------------------------- stage I
    def parsing_step(self, batch: dict) -> dict[str, float]:
        """One SGD step of the parser on ``batch['blurry']`` (stage I).

        Returns:
            ``focal`` (main head), ``focal_aux`` (sum of the two auxiliary heads) and
            ``parser_total``, measured before the update.
        """
        batch = self._to_device(batch)
        self.parser.train()
        loss, terms = self.parsing_loss(batch["blurry"], parsing_labels(batch))
        self.parser_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.parser_optimizer.step()
        return _floats(terms)

    def evaluate_parsing(self, batches: Iterable[dict]) -> dict:
        """mIoU etc. of the parser on held-out batches (see :func:`evaluate_parsing`)."""
        return evaluate_parsing(self.parser, batches, self.device)

    # ---------------------------------------------------------------- stage II
    def deblur_step(self, batch: dict, train_discriminator: bool = True) -> dict[str, float]:
        """One stage-II step: a discriminator update on (sharp, detached fake), then a generator
        update with ``120 rec + 0.1 adv + texture`` against the updated discriminator.

        Args:
            batch: see the module docstring.
            train_discriminator: False skips the discriminator update (e.g. a warm-up).

        Returns:
            ``generator_total``, ``rec``, ``adv``, ``texture``, the per-region ``rec_*`` and
            ``discriminator`` (when trained).
        """
        cfg = self.config
        batch = self._to_device(batch)
        sharp = batch["sharp"]
        parsing = self.parse(batch["blurry"])
        self.generator.train()
        self.discriminator.train()
        out: dict[str, float] = {}
        # One generator forward serves both updates: the discriminator sees it detached, and
        # the generator parameters do not change before the generator's own backward.
        fake, textures = self.generator(batch["blurry"], parsing, return_textures=True)

        if train_discriminator:
            d_loss = relativistic_adversarial_loss(self.discriminator(sharp),
                                                   self.discriminator(fake.detach()),
                                                   cfg.head_weights)
            self.discriminator_optimizer.zero_grad(set_to_none=True)
            d_loss.backward()
            self.discriminator_optimizer.step()
            out["discriminator"] = float(d_loss.detach())

        # The generator step must not accumulate gradients in the discriminator.
        self.discriminator.requires_grad_(False)
        try:
            d_fake = self.discriminator(fake)
            with torch.no_grad():
                d_real = self.discriminator(sharp)
            g_loss, terms = snadnet_generator_loss(
                fake, sharp, batch["region_masks"], textures, d_fake, d_real,
                cfg.rec_weight, cfg.adv_weight, cfg.texture_weight, cfg.region_weights,
                cfg.head_weights)
            self.generator_optimizer.zero_grad(set_to_none=True)
            g_loss.backward()
            self.generator_optimizer.step()
        finally:
            self.discriminator.requires_grad_(True)
        terms["generator_total"] = g_loss.detach()
        out.update(_floats(terms))
        return out

    @torch.no_grad()
    def deblur(self, blurry: Tensor) -> Tensor:
        """Inference: parse, deblur, clamp to [0, 1] (networks in eval mode)."""
        blurry = blurry.to(self.device)
        was_training = self.generator.training
        self.generator.eval()
        try:
            return self.generator.deblur(blurry, self.parse(blurry))
        finally:
            self.generator.train(was_training)

    # ---------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        """Everything needed to resume: config, networks and optimizers."""
        return {
            "config": self.config.to_dict(),
            "parser": self.parser.state_dict(),
            "generator": self.generator.state_dict(),
            "discriminator": self.discriminator.state_dict(),
            "parser_optimizer": self.parser_optimizer.state_dict(),
            "generator_optimizer": self.generator_optimizer.state_dict(),
            "discriminator_optimizer": self.discriminator_optimizer.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore from :meth:`state_dict` (optimizer states are optional, for inference-only
        checkpoints)."""
        self.parser.load_state_dict(state["parser"])
        self.generator.load_state_dict(state["generator"])
        self.discriminator.load_state_dict(state["discriminator"])
        for name in ("parser_optimizer", "generator_optimizer", "discriminator_optimizer"):
            if name in state:
                getattr(self, name).load_state_dict(state[name])

    @classmethod
    def from_state_dict(cls, state: dict, device: torch.device | str = "cpu",
                        backend=None) -> SNADNetTask:
        """A task with the checkpoint's config and weights."""
        task = cls(SNADNetConfig.from_dict(state["config"]), device, backend)
        task.load_state_dict(state)
        return task
