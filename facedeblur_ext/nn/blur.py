"""``BlurSynthesizer``: random blur degradation of sharp batches, for data pipelines.

Each sample gets a kernel type (linear motion, camera-shake trajectory, Gaussian, defocus)
and size drawn from a ``BlurConfig``, the type's parameters drawn from their ranges, and a
noise level; the batch is then blurred in one ``blur_synthesize`` call. Works on the CPU
(inside a ``collate_fn``) and on the GPU (inside the training loop)::

    synth = BlurSynthesizer(BlurConfig(), generator=torch.Generator().manual_seed(0))
    # or BlurSynthesizer({"kernel_sizes": [13, 17, 21], "noise_sigma": [0, 0.02]}) from YAML

    def collate(batch):                      # batch: list of [C, H, W] sharp images
        sharp = torch.stack(batch)
        return synth(sharp), sharp

    blurry, info = synth(sharp, mask=face_masks, return_info=True)   # face-only blur

DataLoader workers each hold a copy of the generator: reseed per worker (e.g.
``worker_init_fn=lambda i: synth.manual_seed(base_seed + i)``) or they draw the same blur.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .backend import BackendRef, resolve_backend

KERNEL_TYPES = ("motion", "trajectory", "gaussian", "defocus")

__all__ = ["KERNEL_TYPES", "BlurConfig", "BlurSynthesizer"]

Range = tuple[float, float]


@dataclass
class BlurConfig:
    """What ``BlurSynthesizer`` samples. Ranges are (low, high), drawn uniformly per sample.

    Attributes:
        kernel_sizes: odd kernel sizes drawn uniformly per sample (MSPL: 13 to 27; SNADNet's
            CelebA set: 13 to 29). Kernels are padded to the largest for the batch.
        motion_prob, trajectory_prob, gaussian_prob, defocus_prob: relative frequencies of
            the kernel types (normalized; zero disables a type).
        motion_length: linear motion length in pixels, capped at ``size - 1`` so the line
            fits its kernel at any angle (thesis 002: random length and angle).
        motion_angle: linear motion angle in degrees.
        trajectory_anxiety: camera-shake amount (see ``ops.trajectory_kernels``).
        trajectory_length: camera-shake path length in pixels; None uses the kernel size.
        trajectory_exposure: fraction of the path integrated.
        trajectory_steps: samples of the random walk.
        trajectory_centering: ``"box"`` (as Boracchi & Foi) or ``"mass"`` (no image shift).
        gaussian_sigma: Gaussian standard deviation in pixels.
        defocus_radius: defocus disk radius in pixels, capped at ``(size - 1) / 2``.
        noise_sigma: Gaussian noise standard deviation on the [0, 1] scale (SNADNet 0.03,
            MSPL 0.015); (0, 0) disables noise.
        mask_prob: when ``forward`` gets a mask, the probability that a sample uses it
            (face-only blur, thesis 002) rather than blurring the whole image.
        crf_gamma: camera-response gamma applied around the blur; None for none.
        quantize: round to 8-bit levels (always for uint8 images).
        border: border rule of the blur (see ``ops.BORDERS``).
    """

    kernel_sizes: tuple[int, ...] = (13, 15, 17, 19, 21, 23, 25, 27, 29)
    motion_prob: float = 0.3
    trajectory_prob: float = 0.5
    gaussian_prob: float = 0.1
    defocus_prob: float = 0.1
    motion_length: Range = (3.0, 27.0)
    motion_angle: Range = (0.0, 180.0)
    trajectory_anxiety: Range = (0.003, 0.01)
    trajectory_length: Range | None = None
    trajectory_exposure: Range = (1.0, 1.0)
    trajectory_steps: int = 2000
    trajectory_centering: str = "box"
    gaussian_sigma: Range = (0.5, 3.0)
    defocus_radius: Range = (1.0, 6.0)
    noise_sigma: Range = (0.0, 0.03)
    mask_prob: float = 1.0
    crf_gamma: float | None = None
    quantize: bool = False
    border: str = "reflect"

    def __post_init__(self) -> None:
        self.kernel_sizes = tuple(int(s) for s in self.kernel_sizes)
        if not self.kernel_sizes or min(self.kernel_sizes) < 1:
            raise ValueError(f"kernel_sizes must be positive ints, got {self.kernel_sizes}")
        probs = self.type_probabilities()
        if min(probs) < 0 or sum(probs) <= 0:
            raise ValueError(f"kernel type probabilities must be >= 0 with a positive sum, "
                             f"got {dict(zip(KERNEL_TYPES, probs))}")
        for name in ("motion_length", "motion_angle", "trajectory_anxiety", "trajectory_length",
                     "trajectory_exposure", "gaussian_sigma", "defocus_radius", "noise_sigma"):
            value = getattr(self, name)
            if value is None:
                continue
            if len(value) != 2 or float(value[0]) > float(value[1]):
                raise ValueError(f"{name} must be a (low, high) range, got {value}")
            setattr(self, name, (float(value[0]), float(value[1])))
        for name in ("motion_length", "trajectory_anxiety", "trajectory_length",
                     "gaussian_sigma", "defocus_radius", "noise_sigma"):
            value = getattr(self, name)
            if value is not None and value[0] < 0:
                raise ValueError(f"{name} must be non-negative, got {value}")
        if not 0 < self.trajectory_exposure[0] <= self.trajectory_exposure[1] <= 1:
            raise ValueError(f"trajectory_exposure must lie in (0, 1], got "
                             f"{self.trajectory_exposure}")
        if not 0.0 <= self.mask_prob <= 1.0:
            raise ValueError(f"mask_prob must lie in [0, 1], got {self.mask_prob}")
        if self.trajectory_centering not in ("box", "mass"):
            raise ValueError(f"trajectory_centering must be 'box' or 'mass', got "
                             f"{self.trajectory_centering!r}")

    @classmethod
    def from_dict(cls, values: Mapping) -> BlurConfig:
        """A config from a mapping (e.g. parsed YAML or JSON; lists become tuples)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown BlurConfig keys {unknown}; valid keys: {sorted(names)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})

    def type_probabilities(self) -> list[float]:
        return [float(self.motion_prob), float(self.trajectory_prob), float(self.gaussian_prob),
                float(self.defocus_prob)]


class BlurSynthesizer(nn.Module):
    """Samples a blur per sample from a ``BlurConfig`` and applies it to a sharp batch.

    ``forward(..., return_info=True)`` also returns a dict describing each sample's blur:
    ``kernels`` [N, K, K] (K the largest configured size, smaller kernels zero-padded around
    their origin; re-applying them with ``ops.blur_synthesize`` and the same mask, noise and
    CRF settings reproduces the output), ``kernel_types`` (N names from ``KERNEL_TYPES``),
    ``kernel_sizes`` [N] int64, ``params`` (N dicts of floats: ``length`` and ``angle`` for
    motion, ``sigma`` for gaussian, ``radius`` for defocus, nothing more for trajectory),
    ``noise_sigma`` [N] and ``mask_used`` [N] bool.

    Args:
        config: what to sample: a ``BlurConfig``, a mapping of its fields (e.g. parsed YAML),
            or None for the defaults.
        generator: torch.Generator for every random draw (kernel types, sizes, parameters,
            trajectories, noise); it must live on the device of the images passed to
            ``forward``. None uses torch's default generator of that device.
        backend: provider of ``motion_kernels``, ``trajectory_kernels``, ``gaussian_kernels``,
            ``defocus_kernels``, ``pad_kernels`` and ``blur_synthesize``: None for
            ``facedeblur_ext.ops``, a module or its import name (``"facedeblur_ref"`` gives the
            reference); see ``nn.set_backend``.
    """

    def __init__(self, config: BlurConfig | Mapping | None = None,
                 generator: torch.Generator | None = None, backend=None) -> None:
        super().__init__()
        self._backend = BackendRef(resolve_backend(backend))
        if config is None:
            config = BlurConfig()
        elif isinstance(config, Mapping):
            config = BlurConfig.from_dict(config)
        elif not isinstance(config, BlurConfig):
            raise TypeError(f"config must be a BlurConfig, a mapping or None, got "
                            f"{type(config).__name__}")
        self.config = config
        self.generator = generator

    @property
    def backend(self):
        """The op provider (None: ``facedeblur_ext.ops``)."""
        return self._backend.target

    def extra_repr(self) -> str:
        fields = ", ".join(f"{f.name}={getattr(self.config, f.name)!r}"
                           for f in dataclasses.fields(self.config))
        return f"config=BlurConfig({fields}), backend={self._backend!r}"

    def manual_seed(self, seed: int) -> BlurSynthesizer:
        """Reseed (creating a CPU generator if there is none); returns self."""
        if self.generator is None:
            self.generator = torch.Generator()
        self.generator.manual_seed(int(seed))
        return self

    def _check_generator(self, device: torch.device) -> None:
        if self.generator is not None and self.generator.device.type != device.type:
            raise ValueError(f"the generator is on {self.generator.device} but the images on "
                             f"{device}; create it with torch.Generator(device={str(device)!r})")

    def sample_kernels(self, n: int, device: torch.device | str = "cpu") -> tuple[Tensor, dict]:
        """Draw N kernels (types, sizes and parameters per the config).

        Returns:
            kernels [N, K, K] float32 on ``device`` (K the largest configured size) and the
            info dict of ``forward`` without ``noise_sigma`` and ``mask_used``.
        """
        cfg, gen, get = self.config, self.generator, self._backend.get
        device = torch.device(device)
        self._check_generator(device)
        f64 = torch.float64
        u = torch.rand(n, 4, generator=gen, device=device, dtype=f64)
        probs = torch.tensor(cfg.type_probabilities(), dtype=f64)
        edges = (probs.cumsum(0) / probs.sum()).tolist()
        type_u, size_u = u[:, 0].tolist(), u[:, 1].tolist()
        types = [min(sum(t >= e for e in edges[:-1]), 3) for t in type_u]
        # never pick a disabled type through the top edge's rounding
        types = [t if probs[t] > 0 else max(i for i in range(4) if probs[i] > 0) for t in types]
        sizes_cfg = cfg.kernel_sizes
        sizes = [sizes_cfg[min(int(s * len(sizes_cfg)), len(sizes_cfg) - 1)] for s in size_u]
        kmax = max(sizes_cfg)
        params: list[dict[str, float]] = [{} for _ in range(n)]
        kernels = torch.zeros(n, kmax, kmax, device=device)

        def span(rng, col):
            return rng[0] + (rng[1] - rng[0]) * col

        size_t = torch.tensor(sizes, dtype=f64, device=device)
        lengths = torch.minimum(span(cfg.motion_length, u[:, 2]), size_t - 1)
        angles = span(cfg.motion_angle, u[:, 3])
        sigmas = span(cfg.gaussian_sigma, u[:, 2])
        radii = torch.minimum(span(cfg.defocus_radius, u[:, 2]), (size_t - 1) / 2)
        # one generator call per (type, size) group, in a fixed order
        for kind in range(4):
            for size in sorted(set(s for s, t in zip(sizes, types) if t == kind)):
                idx = [i for i in range(n) if types[i] == kind and sizes[i] == size]
                index = torch.tensor(idx, device=device)
                if kind == 0:
                    k = get("motion_kernels")(lengths[index], angles[index], size, device=device)
                    for i, length, angle in zip(idx, lengths[index].tolist(),
                                                angles[index].tolist()):
                        params[i] = {"length": length, "angle": angle}
                elif kind == 1:
                    k = get("trajectory_kernels")(
                        len(idx), size, anxiety=cfg.trajectory_anxiety,
                        max_length=cfg.trajectory_length, exposure=cfg.trajectory_exposure,
                        num_steps=cfg.trajectory_steps, centering=cfg.trajectory_centering,
                        generator=gen, device=device)
                elif kind == 2:
                    k = get("gaussian_kernels")(sigmas[index], size, device=device)
                    for i, sigma in zip(idx, sigmas[index].tolist()):
                        params[i] = {"sigma": sigma}
                else:
                    k = get("defocus_kernels")(radii[index], size, device=device)
                    for i, radius in zip(idx, radii[index].tolist()):
                        params[i] = {"radius": radius}
                kernels[index] = get("pad_kernels")(list(k.float()), (kmax, kmax))
        info = {"kernels": kernels, "kernel_types": [KERNEL_TYPES[t] for t in types],
                "kernel_sizes": torch.tensor(sizes, dtype=torch.int64, device=device),
                "params": params}
        return kernels, info

    def forward(self, images: Tensor, mask: Tensor | None = None, return_info: bool = False):
        """Blur a batch of sharp images.

        Args:
            images: [N, C, H, W] sharp images, float in [0, 1] or uint8.
            mask: optional [N, 1, H, W] (or [N, H, W]) soft face mask in [0, 1]; each sample
                uses it with probability ``config.mask_prob`` (face-only blur), otherwise it
                is blurred whole.
            return_info: also return the info dict (see the class docstring).

        Returns:
            Blurred images (shape and dtype of ``images``), and the info dict when asked.
        """
        if not isinstance(images, Tensor) or images.dim() != 4:
            raise ValueError(f"images must be a [N, C, H, W] tensor, got "
                             f"{getattr(images, 'shape', type(images).__name__)}")
        cfg, gen = self.config, self.generator
        n, device = images.shape[0], images.device
        kernels, info = self.sample_kernels(n, device)
        u = torch.rand(n, 2, generator=gen, device=device, dtype=torch.float64)
        sigma = cfg.noise_sigma[0] + (cfg.noise_sigma[1] - cfg.noise_sigma[0]) * u[:, 0]
        noise_sigma = sigma if cfg.noise_sigma[1] > 0 else 0.0
        mask_used = torch.zeros(n, dtype=torch.bool, device=device)
        if mask is not None:
            mask_used = u[:, 1] < cfg.mask_prob
            if mask.dim() == 3:
                mask = mask[:, None]
            mask = mask.to(torch.float64 if images.dtype == torch.float64 else torch.float32)
            keep = mask_used.to(mask.dtype).view(-1, 1, 1, 1)
            mask = mask * keep + (1 - keep)  # a sample not using the mask blurs everywhere
        out = self._backend.get("blur_synthesize")(
            images, kernels.to(torch.float64 if images.dtype == torch.float64 else torch.float32),
            mask=mask, noise_sigma=noise_sigma, crf_gamma=cfg.crf_gamma, quantize=cfg.quantize,
            border=cfg.border, generator=gen)
        if not return_info:
            return out
        info["noise_sigma"] = sigma if cfg.noise_sigma[1] > 0 else torch.zeros_like(sigma)
        info["mask_used"] = mask_used
        return out, info
