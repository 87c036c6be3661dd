"""SNADNet generator and multi-patch discriminator [paper 004, Sec. II-B to II-E].

Generator (LinkNet backbone):

* encoder: a 7x7 stem at full resolution, then ``num_stages`` stages (default 4), each a
  "ResBlock with two residuals": a residual unit whose first conv has stride 2 (the paper's
  stride-2 conv downsampling) and a second residual unit; widths w, 2w, 4w, 8w (LinkNet:
  64 ... 512);
* decoder: one SNAD block per stage, from the deepest up. A SNAD block is
  ``SNAD -> ReLU -> conv -> SNAD -> ReLU -> conv``, concatenated with the first SNAD's output
  (the skip), then ``ReLU -> deconv (x2) -> conv``. As in LinkNet, the block's output is added
  to the encoder features of the same resolution;
* texture extractors (Sec. II-D, Fig. 5) on the three shallowest decoder maps: two convs, then
  one branch predicts the Laplacian texture ``t'_G`` of the target at that resolution and the
  other a residual ``F_t`` added to the features;
* a 3x3 conv to RGB, added to the blurry input (global residual; the paper does not specify
  the output layer, a residual on the input is the usual choice for deblurring and starts
  training from the identity).

Every SNAD layer here does separable normalization over regions of the parsing map resized to
the feature size, followed by adaptive denormalization with ``gamma = conv2(conv1(P))`` and
``beta = conv3(conv1(P))`` (Eq. 3-9), through ``backend.separable_norm``.

Discriminator: spectral-norm blocks of two parallel stride-2 branches (4x4 and 3x3 convs), 3x3
patch heads after the last three blocks (8x8, 4x4, 2x2 maps for 256 px inputs) and a global
dense head.

Where the paper leaves a detail open, this is what we chose:

* the SNAD block's skip ("concatenating another output of SNAD") is the first SNAD layer's
  output, reused;
* the parsing map is resized to each feature size by area averaging (soft masks that keep each
  region's mass) and the separable-norm foreground is facial parts + skin (the data
  pipeline's face mask); ``norm_regions="parsing"`` normalizes all four regions separately;
* Eq. 12 sums over ``N = 3`` texture predictions: one per texture extractor, at full, 1/2 and
  1/4 resolution, each against the Laplacian of the target resized to that scale;
* the SN block concatenates its two branches (half the channels each); the heads carry no
  bias, which the relativistic loss cannot see.

Size constraint: the generator needs H and W to be multiples of ``2 ** num_stages`` (16 by
default); it raises a ValueError otherwise. The discriminator takes any size (each block
gives ceil(H / 2) x ceil(W / 2)); the head map sizes above are those of a 256 px input.

:class:`SNADNet` is the whole deblurring network of stage II and inference: the stage-I face
parser, frozen, computing the parsing map that drives the generator. ``build_*`` make the
networks from the ``model`` table of a training config and :func:`load_snadnet` restores a
trained SNADNet from a stage-II checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm

from ..nn.backend import set_backend
from ..nn.separable_norm import SNADLayer
from .face_parsing import PARSER_STRIDE, FaceParsingNet, check_spatial_multiple


def resize_parsing(parsing: Tensor, size: Sequence[int]) -> Tensor:
    """Resize a parsing map [N, R, H, W] to ``size``.

    Downsampling uses area averaging: a one-hot map becomes soft masks that still sum to 1 per
    pixel and keep each region's mass; upsampling uses nearest neighbour.
    """
    if tuple(parsing.shape[-2:]) == tuple(size):
        return parsing
    if parsing.shape[-2] >= size[0] and parsing.shape[-1] >= size[1]:
        return F.interpolate(parsing, size=tuple(size), mode="area")
    return F.interpolate(parsing, size=tuple(size), mode="nearest")


def as_parsing_map(parsing: Tensor, num_regions: int, dtype: torch.dtype) -> Tensor:
    """Accept a label map [N, H, W] (integer) or a [N, R, H, W] float map; return the float map."""
    if parsing.dim() == 3:
        if parsing.is_floating_point():
            raise ValueError("a [N, H, W] parsing map must hold integer labels")
        return F.one_hot(parsing.long(), num_regions).permute(0, 3, 1, 2).to(dtype)
    if parsing.dim() != 4 or parsing.shape[1] != num_regions:
        raise ValueError(f"parsing map must be [N, {num_regions}, H, W] or [N, H, W] labels, "
                         f"got {tuple(parsing.shape)}")
    return parsing.to(dtype)


class ParsingSNAD(SNADLayer):
    """The SNAD layer as SNADNet's decoder uses it: ``nn.SNADLayer`` fed by the parsing map.

    Args:
        channels: feature channels C.
        parsing_channels: channels R of the parsing map P (4 regions).
        hidden: channels of the shared ``conv1`` (SPADE uses 128).
        norm_regions: ``"face_background"`` normalizes the two regions of Eq. 3-7, the face
            foreground ``M_f`` (the sum of the ``face_regions`` channels of P) and the rest
            ``M_b = 1 - M_f``; ``"parsing"`` normalizes each of the R parsing regions
            separately (the R-region generalization).
        face_regions: channels of P forming the face foreground; the default (facial parts,
            skin) is the data pipeline's face mask. Hair counts as background, as in the
            face-only blur mask.
        eps: added to the variance.
        backend: object providing ``separable_norm(x, masks, gamma, beta, eps)``; None means
            ``facedeblur_ext.ops`` (looked up when the layer runs).

    The parsing map is brought to the feature size by area averaging, so a one-hot map
    becomes soft masks that keep each region's mass.
    """

    def __init__(self, channels: int, parsing_channels: int = 4, hidden: int = 128,
                 norm_regions: str = "face_background", face_regions: tuple[int, ...] = (0, 1),
                 eps: float = 1e-5, backend=None):
        if norm_regions not in ("face_background", "parsing"):
            raise ValueError("norm_regions must be 'face_background' or 'parsing', "
                             f"got {norm_regions!r}")
        face = tuple(int(r) for r in face_regions)
        if not face or any(not 0 <= r < parsing_channels for r in face):
            raise ValueError(f"face_regions {face_regions} must name channels of the "
                             f"{parsing_channels}-channel parsing map")
        if norm_regions == "parsing":
            regions = [[r] for r in range(parsing_channels)]
        else:
            regions = [list(face), [r for r in range(parsing_channels) if r not in face]]
        super().__init__(channels, parsing_channels, hidden_channels=hidden, regions=regions,
                         resize_mode="area", eps=eps, backend=backend)
        self.norm_regions = norm_regions
        self.face_regions = face
        # Eq. 9 multiplies by gamma directly (no "1 + gamma" as in SPADE); starting gamma near 1
        # keeps the normalized signal alive at initialization.
        nn.init.ones_(self.conv2.bias)


class SNADBlock(nn.Module):
    """SNAD block (Fig. 3 (c)): two SNAD-ReLU-conv steps, a skip, then x2 upsampling.

    ``s = SNAD(x)``; ``h = conv(ReLU(SNAD(conv(ReLU(s)))))``; ``y = cat(h, s)``;
    ``out = conv(deconv(ReLU(y)))`` with a 4x4 stride-2 transposed conv (exact x2 size).
    """

    def __init__(self, in_channels: int, out_channels: int, parsing_channels: int = 4,
                 ad_hidden: int = 128, norm_regions: str = "face_background",
                 face_regions: tuple[int, ...] = (0, 1), backend=None):
        super().__init__()
        kw = dict(parsing_channels=parsing_channels, hidden=ad_hidden,
                  norm_regions=norm_regions, face_regions=face_regions, backend=backend)
        self.snad_in = ParsingSNAD(in_channels, **kw)
        self.conv_in = nn.Conv2d(in_channels, out_channels, 3, 1, 1)
        self.snad_mid = ParsingSNAD(out_channels, **kw)
        self.conv_mid = nn.Conv2d(out_channels, out_channels, 3, 1, 1)
        self.deconv = nn.ConvTranspose2d(out_channels + in_channels, out_channels, 4, 2, 1)
        self.conv_out = nn.Conv2d(out_channels, out_channels, 3, 1, 1)

    def forward(self, x: Tensor, parsing: Tensor) -> Tensor:
        skip = self.snad_in(x, parsing)
        h = self.conv_in(F.relu(skip))
        h = self.conv_mid(F.relu(self.snad_mid(h, parsing)))
        y = torch.cat([h, skip], dim=1)
        return self.conv_out(self.deconv(F.relu(y)))


class TextureExtractor(nn.Module):
    """Texture enhancement (Fig. 5): predicts the target's Laplacian texture at this scale and
    adds a learned residual to the features.

    Returns ``(features + F_t, t'_G)``.
    """

    def __init__(self, channels: int, image_channels: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, 1, 1)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1)
        self.texture = nn.Conv2d(channels, image_channels, 3, 1, 1)
        self.residual = nn.Conv2d(channels, channels, 3, 1, 1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = F.relu(self.conv2(F.relu(self.conv1(x))))
        return x + self.residual(h), self.texture(h)


class _ResidualUnit(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1, norm: bool = True):
        super().__init__()
        norm_layer = nn.BatchNorm2d if norm else (lambda c: nn.Identity())
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=not norm)
        self.norm1 = norm_layer(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=not norm)
        self.norm2 = norm_layer(cout)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=not norm),
                                          norm_layer(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        identity = x if self.shortcut is None else self.shortcut(x)
        return F.relu(out + identity)


class SNADNetGenerator(nn.Module):
    """SNADNet generator (see the module docstring).

    Args:
        width: base width w; encoder stage k has ``w * 2**k`` channels (k = 0..num_stages-1),
            the full-resolution stem w.
        num_stages: encoder stages (each halves the resolution); inputs must be multiples of
            ``2 ** num_stages``.
        parsing_channels: regions in the parsing map (4).
        ad_hidden: hidden channels of each SNAD layer's ``conv1``.
        texture_levels: texture extractors on this many of the shallowest decoder maps (the
            texture loss sums over them, Eq. 12 with N = 3); 0 disables them.
        norm_regions, face_regions: see :class:`ParsingSNAD`.
        encoder_norm: batch norm in the encoder residual units (LinkNet/ResNet do).
        global_residual: add the output to the blurry input.
        backend: see :class:`ParsingSNAD`; :meth:`set_backend` changes it later.

    ``forward(blurry, parsing)`` takes a [N, 3, H, W] image in [0, 1] and a parsing map
    ([N, R, H, W] one-hot/probabilities, or [N, H, W] labels) and returns the deblurred
    [N, 3, H, W] image, plus the list of texture predictions (shallowest, i.e. largest, first)
    with ``return_textures=True``.
    """

    def __init__(self, width: int = 64, num_stages: int = 4, parsing_channels: int = 4,
                 ad_hidden: int = 128, texture_levels: int = 3,
                 norm_regions: str = "face_background", face_regions: tuple[int, ...] = (0, 1),
                 encoder_norm: bool = True, global_residual: bool = True, backend=None):
        super().__init__()
        if num_stages < 1:
            raise ValueError("num_stages must be >= 1")
        if not 0 <= texture_levels <= num_stages:
            raise ValueError(f"texture_levels must be in [0, {num_stages}]")
        self.num_stages = num_stages
        self.parsing_channels = parsing_channels
        self.global_residual = global_residual
        widths = [width * 2 ** k for k in range(num_stages)]
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 7, 1, 3, bias=not encoder_norm),
            nn.BatchNorm2d(width) if encoder_norm else nn.Identity(),
            nn.ReLU(),
        )
        self.encoder = nn.ModuleList()
        cin = width
        for cout in widths:
            self.encoder.append(nn.Sequential(_ResidualUnit(cin, cout, 2, encoder_norm),
                                              _ResidualUnit(cout, cout, 1, encoder_norm)))
            cin = cout
        # decoder[k] maps the stage-k resolution to stage k-1's (k = num_stages-1 .. 0); the
        # target widths are those of the encoder features it is added to (stem for k = 0).
        skip_widths = [width] + widths[:-1]
        self.decoder = nn.ModuleList(
            SNADBlock(widths[k], skip_widths[k], parsing_channels, ad_hidden, norm_regions,
                      face_regions, backend)
            for k in range(num_stages)
        )
        # texture[j] acts on the decoder map at resolution 1/2**j (j = 0 is full resolution).
        self.texture = nn.ModuleList(TextureExtractor(skip_widths[j])
                                     for j in range(texture_levels))
        self.head = nn.Conv2d(width, 3, 3, 1, 1)
        if global_residual:
            # Start close to the identity (output ~ blurry input) rather than blurry + noise;
            # a small but nonzero scale keeps gradients flowing to every layer from step one.
            with torch.no_grad():
                self.head.weight.mul_(0.1)
                self.head.bias.zero_()

    @property
    def size_multiple(self) -> int:
        return 2 ** self.num_stages

    def set_backend(self, backend) -> None:
        """Switch every SNAD layer to another backend (None: ``facedeblur_ext.ops``)."""
        set_backend(self, backend)

    def forward(self, blurry: Tensor, parsing: Tensor, return_textures: bool = False):
        check_spatial_multiple(blurry, self.size_multiple, "SNADNetGenerator")
        p = as_parsing_map(parsing, self.parsing_channels, blurry.dtype)
        if p.shape[0] != blurry.shape[0] or p.shape[-2:] != blurry.shape[-2:]:
            raise ValueError(f"parsing map {tuple(p.shape)} does not match the image "
                             f"{tuple(blurry.shape)}")
        skips = [self.stem(blurry)]
        x = skips[0]
        for stage in self.encoder:
            x = stage(x)
            skips.append(x)
        textures: list[Tensor] = []
        for k in reversed(range(self.num_stages)):
            x = self.decoder[k](x, p) + skips[k]
            if k < len(self.texture):
                x, tex = self.texture[k](x)
                textures.append(tex)
        out = self.head(F.relu(x))
        if self.global_residual:
            out = out + blurry
        if return_textures:
            return out, textures[::-1]
        return out

    @torch.no_grad()
    def deblur(self, blurry: Tensor, parsing: Tensor) -> Tensor:
        """Inference helper: the output clamped to [0, 1]."""
        return self(blurry, parsing).clamp_(0.0, 1.0)


class SNADNet(nn.Module):
    """SNADNet's deblurring network: the stage-I face parser, frozen, feeding the generator.

    Stage II trains the generator with the parser fixed [004 Sec. III-A], so the parser always
    runs in eval mode and without gradients, whatever mode this module is in, and its
    parameters have ``requires_grad=False``: optimizers built from the trainable parameters,
    DDP and gradient clipping leave it alone.

    Args:
        parser: the trained face parser; its classes are the generator's parsing channels.
        generator: the SNADNet generator.
        parsing_input: how the generator sees the parser's output: ``"onehot"`` (the arg-max
            labels, the paper's semantic label ``P_t``) or ``"soft"`` (class probabilities).

    ``forward(blurry, return_textures=False)`` parses ``blurry`` [N, 3, H, W] in [0, 1] (H and W
    multiples of :attr:`size_multiple`) and returns the generator's output (and its texture
    predictions); :meth:`restore` takes any size and clamps to [0, 1].
    """

    def __init__(self, parser: FaceParsingNet, generator: SNADNetGenerator,
                 parsing_input: str = "onehot"):
        super().__init__()
        if parsing_input not in ("onehot", "soft"):
            raise ValueError(f"parsing_input must be 'onehot' or 'soft', got {parsing_input!r}")
        if parser.num_classes != generator.parsing_channels:
            raise ValueError(f"the parser predicts {parser.num_classes} classes but the "
                             f"generator expects {generator.parsing_channels} parsing channels")
        self.parser = parser.requires_grad_(False).eval()
        self.generator = generator
        self.parsing_input = parsing_input

    def train(self, mode: bool = True) -> SNADNet:
        super().train(mode)
        self.parser.eval()  # frozen: batch-norm statistics of stage I, no updates
        return self

    @property
    def size_multiple(self) -> int:
        """H and W of ``forward`` inputs must be multiples of this (parser and generator)."""
        return math.lcm(PARSER_STRIDE, self.generator.size_multiple)

    @torch.no_grad()
    def parse(self, blurry: Tensor) -> Tensor:
        """The parsing map [N, R, H, W] of blurry faces (one-hot or probabilities)."""
        return self.parser.parse(blurry, soft=self.parsing_input == "soft")

    def forward(self, blurry: Tensor, return_textures: bool = False):
        return self.generator(blurry, self.parse(blurry), return_textures=return_textures)

    @torch.no_grad()
    def restore(self, blurry: Tensor, return_parsing: bool = False):
        """Deblur images of any size: pad H and W to :attr:`size_multiple` by edge replication,
        run, crop back and clamp to [0, 1].

        Returns:
            [N, 3, H, W]; with ``return_parsing`` also the parsing map [N, R, H, W] used.
        """
        h, w = blurry.shape[-2:]
        m = self.size_multiple
        pad_h, pad_w = (-h) % m, (-w) % m
        x = F.pad(blurry, (0, pad_w, 0, pad_h), mode="replicate") if pad_h or pad_w else blurry
        parsing = self.parse(x)
        out = self.generator(x, parsing)[..., :h, :w].clamp(0.0, 1.0)
        if return_parsing:
            return out, parsing[..., :h, :w]
        return out


def build_parser(model_config: Mapping) -> FaceParsingNet:
    """The stage-I parser of a config's ``model`` table (``num_regions``, ``parser``)."""
    return FaceParsingNet(num_classes=int(model_config.get("num_regions", 4)),
                          **(model_config.get("parser") or {}))


def build_generator(model_config: Mapping, backend=None) -> SNADNetGenerator:
    """The generator of a config's ``model`` table (``num_regions``, ``generator``)."""
    args = dict(model_config.get("generator") or {})
    if "face_regions" in args:
        args["face_regions"] = tuple(args["face_regions"])
    return SNADNetGenerator(parsing_channels=int(model_config.get("num_regions", 4)),
                            backend=backend, **args)


def build_discriminator(model_config: Mapping) -> MultiPatchDiscriminator:
    """The multi-patch discriminator of a config's ``model`` table (``discriminator``)."""
    return MultiPatchDiscriminator(**(model_config.get("discriminator") or {}))


def build_snadnet(model_config: Mapping, parser: FaceParsingNet | None = None,
                  backend=None) -> SNADNet:
    """A :class:`SNADNet` from a config's ``model`` table (a new parser unless given)."""
    return SNADNet(parser if parser is not None else build_parser(model_config),
                   build_generator(model_config, backend),
                   model_config.get("parsing_input", "onehot"))


def load_snadnet(checkpoint_path, device="cpu", backend=None, prefer_ema: bool = True
                 ) -> SNADNet:
    """The SNADNet (parser and generator) of a stage-II training checkpoint, in eval mode.

    Args:
        checkpoint_path: ``<run>/deblur/checkpoints/*.pt`` written by ``facedeblur train
            snadnet``.
        device: where to put the model.
        backend: separable-norm provider (None: the fused op ``facedeblur_ext.ops``).
        prefer_ema: use the EMA weights when the checkpoint has them.
    """
    ckpt = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    config = ckpt.get("config") or {}
    if ckpt.get("task") != "snadnet":
        raise ValueError(f"{checkpoint_path} is not a SNADNet checkpoint "
                         f"(task={ckpt.get('task')!r})")
    if config.get("stage") != "deblur":
        raise ValueError(f"{checkpoint_path} is a checkpoint of SNADNet's {config.get('stage')!r}"
                         " stage; deblurring needs the stage-II checkpoint "
                         "(<output_dir>/deblur/checkpoints/last.pt)")
    model = build_snadnet(config.get("model") or {}, backend=backend)
    ema = ckpt.get("ema") or {}
    state = ema.get("generator") if prefer_ema and ema.get("generator") else None
    model.load_state_dict(state if state is not None else ckpt["models"]["generator"])
    return model.to(device).eval()


class SNBranchBlock(nn.Module):
    """Discriminator "SN block" (Fig. 4 (b)): parallel spectral-norm 4x4 and 3x3 stride-2 convs
    with ReLU, concatenated (half the output channels each).

    Both branches give ``ceil(H / 2)`` rows for any H (the 4x4 one is padded 1 before and 2
    after), so odd sizes such as the 5x5 map of a 160 px CelebA input work.
    """

    def __init__(self, cin: int, cout: int):
        super().__init__()
        half = cout // 2
        self.branch4 = spectral_norm(nn.Conv2d(cin, cout - half, 4, 2, 0))
        self.branch3 = spectral_norm(nn.Conv2d(cin, half, 3, 2, 1))

    def forward(self, x: Tensor) -> Tensor:
        a = F.relu(self.branch4(F.pad(x, (1, 2, 1, 2))))
        b = F.relu(self.branch3(x))
        return torch.cat([a, b], dim=1)


class MultiPatchDiscriminator(nn.Module):
    """Multi-patch discriminator (Sec. II-E, Fig. 4).

    Args:
        width: channels of the first block; each next block doubles them up to ``max_width``.
        max_width: channel cap (512).
        num_blocks: SN blocks (7: 256 px inputs give 8x8, 4x4 and 2x2 maps after the last
            three).
        in_channels: image channels.

    ``forward(image)`` takes [N, C, H, W] in [0, 1] and returns the logits of the global head
    [N, 1] and of the patch heads from coarse to fine ([N, 1, 2, 2], [N, 1, 4, 4], [N, 1, 8, 8]
    at 256 px): the order of :data:`facedeblur_ext.losses.snadnet.ADV_HEAD_WEIGHTS`.
    """

    def __init__(self, width: int = 64, max_width: int = 512, num_blocks: int = 7,
                 in_channels: int = 3):
        super().__init__()
        if num_blocks < 3:
            raise ValueError("the multi-patch discriminator needs at least 3 blocks")
        widths = [min(width * 2 ** k, max_width) for k in range(num_blocks)]
        self.blocks = nn.ModuleList()
        cin = in_channels
        for cout in widths:
            self.blocks.append(SNBranchBlock(cin, cout))
            cin = cout
        # No biases in the heads: the relativistic loss only sees D(a) - D(b), where a bias
        # cancels (it would never receive a gradient).
        self.patch_heads = nn.ModuleList(
            spectral_norm(nn.Conv2d(c, 1, 3, 1, 1, bias=False)) for c in widths[-3:]
        )
        self.global_head = spectral_norm(nn.Linear(widths[-1] * 4, 1, bias=False))

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        if image.dim() != 4:
            raise ValueError(f"expected [N, C, H, W], got {tuple(image.shape)}")
        x = image * 2.0 - 1.0
        patch = []
        first_head = len(self.blocks) - 3
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i >= first_head:
                patch.append(self.patch_heads[i - first_head](x))
        # The dense head sees the last map as 2x2 (exactly so at 256 px); other sizes are pooled.
        pooled = F.adaptive_avg_pool2d(x, 2).flatten(1)
        global_logit = self.global_head(pooled)
        fine, mid, coarse = patch
        return global_logit, coarse, mid, fine

