"""The rows of the evaluation tables: baselines and trained models behind one interface.

A :class:`Method` maps a blurry batch to a restored batch. What it may use besides the blurry
image is declared by flags, and the protocols hand over only what is allowed:

* ``needs_kernel``: a non-blind method, given the true kernel (and the face mask and noise
  level when the protocol has them);
* ``continuous``: the method takes a moment ``u`` in [0, 1] of the exposure (CFMD-GAN);
  others give one image whatever the moment;
* ``moments``: the method learned distinct moments (a CFMD-GAN checkpoint whose ``inference``
  record says ``moments: true``, :mod:`facedeblur_ext.inference`). A
  continuous method without them (trained at ``u = 0.5`` only) is scored like a single-output
  method: its output at ``u = 0.5`` against every moment.

Trained models are loaded by family name with :func:`load_model` through the loaders of
:mod:`facedeblur_ext.models`; the same function serves ``facedeblur demo`` and
``facedeblur deblur --full-photo``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from facedeblur_ext.inference import InferenceSettings, read_inference_settings

from .baselines import (
    DEFAULT_UNSHARP_AMOUNT,
    DEFAULT_UNSHARP_SIGMA,
    unsharp_mask,
    wiener_deconvolve,
)

__all__ = [
    "MODEL_FAMILIES",
    "IdentityMethod",
    "Method",
    "ModelMethod",
    "UnsharpMaskMethod",
    "WienerMethod",
    "baseline_methods",
    "checkpoint_working_size",
    "load_model",
]

#: model family -> (module, loader function); the loader is called as
#: ``loader(checkpoint, device, backend, prefer_ema=...)`` (baselines without backend).
MODEL_FAMILIES: dict[str, tuple[str, str]] = {
    "cfmd": ("facedeblur_ext.models.cfmd", "load_generator"),
    "snadnet": ("facedeblur_ext.models.snadnet", "load_snadnet"),
    "baseline_ae": ("facedeblur_ext.models.baselines", "load_baseline"),
    "baseline_gan": ("facedeblur_ext.models.baselines", "load_baseline"),
}
#: The control factor of the centre moment (CFMD-GAN's single-image output, paper 003).
CENTRE_U = 0.5


@dataclass
class Method:
    """Base class of a table row."""

    name: str
    needs_kernel: bool = False
    continuous: bool = False
    description: str = ""
    #: what this method cannot do in a protocol, by protocol name (filled by the protocols)
    notes: dict = field(default_factory=dict)

    def __call__(self, blurry: Tensor, *, u: float | None = None, kernels: Tensor | None = None,
                 mask: Tensor | None = None, noise_sigma: float = 0.0) -> Tensor:
        raise NotImplementedError


@dataclass
class IdentityMethod(Method):
    """The blurry input itself (the "Blurry" row)."""

    name: str = "blurry input"
    description: str = "the degraded image, unchanged"

    def __call__(self, blurry, *, u=None, kernels=None, mask=None, noise_sigma=0.0):
        return blurry


@dataclass
class UnsharpMaskMethod(Method):
    """Unsharp masking with a Gaussian of ``sigma`` pixels and ``amount``."""

    name: str = "unsharp mask"
    sigma: float = DEFAULT_UNSHARP_SIGMA
    amount: float = DEFAULT_UNSHARP_AMOUNT

    def __post_init__(self):
        self.description = f"x + {self.amount:g} (x - G_{self.sigma:g} * x)"

    def __call__(self, blurry, *, u=None, kernels=None, mask=None, noise_sigma=0.0):
        return unsharp_mask(blurry, self.sigma, self.amount)


@dataclass
class WienerMethod(Method):
    """Wiener deconvolution with the true kernel (non-blind).

    With a face-only blur ``y = m (k * x) + (1 - m) x`` (the mask ``m`` says where the kernel
    acted) the sharp background is first blurred with the same kernel, ``y' = m y + (1 - m)
    (k * y)``, so that ``y'`` follows the whole-image model ``k * x`` the filter inverts;
    deconvolving ``y`` directly rings from every sharp background edge into the face (on 12
    CelebA test faces with the thesis's motion blur: 28.2 dB blurry, 23.7 deconvolving ``y``,
    30.3 with ``y'``). The result is kept inside the mask only: ``m W(y') + (1 - m) y``.
    """

    name: str = "Wiener (true kernel)"
    nsr: float | str = "auto"
    needs_kernel: bool = True

    def __post_init__(self):
        nsr = ("auto = (sigma_n^2 + 1/(12*255^2)) / 0.0056, >= 1e-2" if self.nsr == "auto"
               else f"{float(self.nsr):g}")
        self.description = ("non-blind, FFT, 1/|w|^2 image spectrum (NSR(w) = nsr |D(w)|^2), "
                            f"edge-tapered reflect padding; nsr {nsr}")

    def __call__(self, blurry, *, u=None, kernels=None, mask=None, noise_sigma=0.0):
        if kernels is None:
            raise ValueError("Wiener deconvolution needs the true kernel")
        if mask is None:
            return wiener_deconvolve(blurry, kernels, self.nsr, noise_sigma=noise_sigma)
        from facedeblur_ext import ops

        reblurred = ops.blur_synthesize(blurry.float(), kernels.float())
        whole = mask * blurry + (1 - mask) * reblurred
        restored = wiener_deconvolve(whole, kernels, self.nsr, noise_sigma=noise_sigma)
        return mask * restored + (1 - mask) * blurry


@dataclass
class ModelMethod(Method):
    """A trained network; CFMD-GAN restores moment ``u`` (``u = 0.5`` when not given)."""

    model: object = None
    family: str = ""
    checkpoint: str = ""
    multiple: int = 1
    moments: bool = False
    u_range: tuple[float, float] = (CENTRE_U, CENTRE_U)

    def __call__(self, blurry, *, u=None, kernels=None, mask=None, noise_sigma=0.0):
        """Restore ``blurry`` [B, 3, H, W]; CFMD-GAN at ``u``: a float, or one value per
        output (a sequence or 1-D tensor of K values for one image gives K moments in one
        batch)."""
        with torch.no_grad():
            if self.family != "cfmd":
                return self.model.restore(blurry)
            if u is None:
                return self.model.restore(blurry, CENTRE_U)
            values = torch.as_tensor(u, dtype=blurry.dtype, device=blurry.device).reshape(-1)
            if values.numel() > 1 and blurry.shape[0] == 1:
                blurry = blurry.expand(values.numel(), -1, -1, -1)
            return self.model.restore(blurry, values if values.numel() > 1 else values[0])


def baseline_methods(*, wiener_nsr: float | str = "auto",
                     unsharp_sigma: float = DEFAULT_UNSHARP_SIGMA,
                     unsharp_amount: float = DEFAULT_UNSHARP_AMOUNT) -> list[Method]:
    """The baseline rows: blurry input, unsharp mask, Wiener with the true kernel."""
    return [IdentityMethod(), UnsharpMaskMethod(sigma=unsharp_sigma, amount=unsharp_amount),
            WienerMethod(nsr=wiener_nsr)]


def _resolve_loader(family: str):
    if family not in MODEL_FAMILIES:
        raise ValueError(f"unknown model family {family!r}; known: {', '.join(MODEL_FAMILIES)}")
    module_name, attr = MODEL_FAMILIES[family]
    module = importlib.import_module(module_name)
    loader = getattr(module, attr, None)
    if loader is None:
        raise ValueError(f"this build cannot load {family} checkpoints: "
                         f"{module_name}.{attr} does not exist")
    return loader


def load_model(family: str, checkpoint: str | Path, device: torch.device | str = "cpu",
               backend=None, *, prefer_ema: bool = True, label: str | None = None
               ) -> ModelMethod:
    """Load a trained model as a table row.

    Args:
        family: ``cfmd``, ``snadnet``, ``baseline_ae`` or ``baseline_gan``.
        checkpoint: a checkpoint written by ``facedeblur train <family>``.
        device: where to run it.
        backend: provider of the fused op (None: ``facedeblur_ext.ops``).
        prefer_ema: use EMA weights when the checkpoint has them.
        label: the row's name (default ``"<family> (<file name>)"``).

    Raises:
        FileNotFoundError: the checkpoint does not exist.
        ValueError: unknown family, or the file is not a checkpoint of that family.
    """
    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    loader = _resolve_loader(family)
    if family.startswith("baseline_"):
        model = loader(path, device, prefer_ema=prefer_ema, task=family)
    else:
        model = loader(path, device, backend, prefer_ema=prefer_ema)
    multiple = int(getattr(model, "size_multiple", 4 if family == "cfmd" else 1) or 1)
    name = label or f"{family} ({path.name})"
    inference = read_inference_settings(path) if family == "cfmd" else InferenceSettings()
    moments, u_range = inference.moments, inference.u_range
    if family != "cfmd":
        what = ""
    elif moments:
        what = (f", learned moments (u in [{u_range[0]:g}, {u_range[1]:g}]): each moment "
                "restored at its u")
    else:
        what = f", no learned moments: its output at u = {CENTRE_U} stands for every moment"
    return ModelMethod(name=name, continuous=family == "cfmd", model=model, family=family,
                       checkpoint=str(path), multiple=multiple, moments=moments,
                       u_range=u_range,
                       description=f"{family} checkpoint {path}{what}")


def checkpoint_working_size(checkpoint: str | Path, default: int = 256) -> int:
    """The image size a checkpoint works at, else ``default``.

    That is the face scale of its validation data (``base_size``, the short side faces were
    brought to), else its validation crop (whole faces at the evaluation scale), else the same
    of its training data (whose crop may be a patch of a face): ``data.<val|train>.args``
    ``base_size``, ``crop_size`` (the data pipeline's datasets) or ``crop`` (the training
    package's frame-averaging dataset) in the stored configuration.
    """
    try:
        ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - an unreadable file is reported by the loader instead
        return default
    data = (ckpt.get("config") or {}).get("data") or {}
    for split in ("val", "train"):
        args = (data.get(split) or {}).get("args") or {}
        # base_size is the face scale (short side) the crops were cut from: a validation crop
        # smaller than it (room for motion) is a part of the face, not a smaller face.
        for key in ("base_size", "crop_size", "crop"):
            value = args.get(key)
            if isinstance(value, int) and value > 0:
                return value
    return default
