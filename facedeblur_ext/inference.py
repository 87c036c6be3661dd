"""Running a trained model on user images: what the checkpoint says about its moments, tiled
restoration with bounded memory, and a thread count that suits a shared machine.

**Moments.** CFMD-GAN restores the moment ``u`` of the exposure: in paper 003 the i-th of N
sharp frames, ranked in FMR order (the leftmost position of the left eye first), has
``u = (i - 1) / N``, so a model trained on N-frame stacks knows ``u`` in ``[0, (N - 1) / N]``.
A checkpoint records what its training taught in a top-level table (copied by ``facedeblur
export`` from the training config's ``inference`` table)::

    inference: {moments: true, u_range: [0.0, 0.857]}

A checkpoint without it (e.g. one trained on still faces, whose single target sits at
``u = 0.5``) restores one moment: ``moments = false``, ``u_range = [0.5, 0.5]``.
:func:`moment_controls` turns a frame count into the ``u`` values to restore.

**Tiles.** :func:`restore_tiled` runs a model on overlapping tiles and blends them with raised
cosine weights, so that peak memory depends on the tile size, not on the image. A model's
global average pools (CFMD-GAN's channel attention) get their whole-image values from a first
pass over the tiles.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

__all__ = ["DEFAULT_TILE", "DEFAULT_TILE_OVERLAP", "TILE_ALIGN", "InferenceSettings",
           "check_tiles", "default_frames", "global_average_pools", "inference_settings",
           "inference_threads", "moment_controls", "read_inference_settings", "restore_tiled",
           "tile_layout"]

#: Tile side and overlap of :func:`restore_tiled` (pixels). The overlap is the context a tile
#: edge sees and the width of the blend; see the README for the tiled-vs-whole difference.
DEFAULT_TILE = 512
DEFAULT_TILE_OVERLAP = 64
#: Frames ``deblur`` writes by default for a model that learned moments.
DEFAULT_MOMENT_FRAMES = 7


@dataclass(frozen=True)
class InferenceSettings:
    """What a checkpoint learned: ``moments`` (distinct moments of the exposure, ordered by
    ``u``) and the ``u_range`` its targets covered."""

    moments: bool = False
    u_range: tuple[float, float] = (0.5, 0.5)

    def as_dict(self) -> dict:
        """The plain table stored in a checkpoint."""
        return {"moments": self.moments, "u_range": list(self.u_range)}


def inference_settings(table, *, source: str = "the checkpoint") -> InferenceSettings:
    """Check an ``inference`` table (``None``: the defaults of a still-face model).

    Raises:
        ValueError: the table has unknown keys, ``moments`` is not a boolean, or ``u_range``
            is not two numbers with ``0 <= u_min <= u_max <= 1``.
    """
    if table is None:
        return InferenceSettings()
    if not isinstance(table, dict):
        raise ValueError(f"{source}: inference must be a table {{moments, u_range}}, got "
                         f"{type(table).__name__}")
    unknown = set(table) - {"moments", "u_range"}
    if unknown:
        raise ValueError(f"{source}: unknown inference key(s) {sorted(unknown)}; known: "
                         "moments, u_range")
    moments = table.get("moments", False)
    if not isinstance(moments, bool):
        raise ValueError(f"{source}: inference.moments must be true or false, got {moments!r}")
    u_range = table.get("u_range", [0.5, 0.5])
    try:
        u_min, u_max = (float(u) for u in u_range)
    except (TypeError, ValueError):
        raise ValueError(f"{source}: inference.u_range must be [u_min, u_max], got "
                         f"{u_range!r}") from None
    if not 0.0 <= u_min <= u_max <= 1.0:
        raise ValueError(f"{source}: inference.u_range must satisfy 0 <= u_min <= u_max <= 1, "
                         f"got [{u_min}, {u_max}]")
    return InferenceSettings(moments, (u_min, u_max))


def read_inference_settings(checkpoint: str | os.PathLike) -> InferenceSettings:
    """The inference settings stored in a checkpoint file: its top-level ``inference`` table
    (exported checkpoints), else its training config's (training checkpoints), else the
    defaults.

    Raises:
        ValueError: the file is not a checkpoint, or its table is malformed.
    """
    from facedeblur_ext.training.checkpoint import load_checkpoint

    state = load_checkpoint(checkpoint)
    table = state.get("inference")
    if table is None:
        table = (state.get("config") or {}).get("inference")
    return inference_settings(table, source=str(Path(checkpoint)))


def default_frames(settings: InferenceSettings) -> int:
    """How many moments ``deblur`` restores when not told: 7 across the range of a model that
    learned moments, 1 otherwise (more would be copies of one frame)."""
    return DEFAULT_MOMENT_FRAMES if settings.moments else 1


def moment_controls(settings: InferenceSettings, num_frames: int) -> list[float]:
    """The ``u`` of each of ``num_frames`` restored moments.

    ``u_k = u_min + k (u_max - u_min) / (F - 1)`` for ``F > 1`` frames (the ends of the trained
    range included); one frame is the centre of the range.

    Raises:
        ValueError: ``num_frames`` is below 1, or above 1 for a model without moments.
    """
    if num_frames < 1:
        raise ValueError(f"the number of frames must be at least 1, got {num_frames}")
    u_min, u_max = settings.u_range
    if num_frames == 1:
        return [(u_min + u_max) / 2]
    if not settings.moments:
        raise ValueError(f"this checkpoint restores one moment (it records no moments: "
                         f"inference.u_range [{u_min:g}, {u_max:g}]); {num_frames} frames "
                         "would be copies of one image. Use --frames 1")
    return [u_min + k * (u_max - u_min) / (num_frames - 1) for k in range(num_frames)]


def inference_threads(requested: int | None = None) -> int:
    """Intra-op threads for inference: ``requested``, else the CPUs not busy with other work.

    OpenMP threads wait for each other at the end of every parallel region; on a machine
    whose cores other processes keep busy, a descheduled thread stalls its siblings there.
    With two threads on two loaded cores a 128 px CFMD-GAN restoration took 9-19 s, with one
    0.7-1.7 s (README, "Time per image"). The default therefore counts the CPUs this process
    may use less the one-minute load average, and at least one.
    """
    if requested is not None:
        if requested < 1:
            raise ValueError(f"the number of threads must be at least 1, got {requested}")
        return requested
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = 0.0
    return max(1, min(cpus or 1, math.floor((cpus or 1) - load + 0.5)))


#: Tile starts and sizes are multiples of this, so that every tile sees the image on the grid
#: of the whole image at each scale of a multi-scale network (CFMD-GAN halves it twice).
TILE_ALIGN = 8


def tile_layout(length: int, tile: int, overlap: int) -> list[tuple[int, int]]:
    """Tiles along one axis, as ``(start, stop)`` spans.

    As few tiles of at most ``tile`` pixels as cover ``length`` with at least ``overlap``
    pixels shared by neighbours, each shrunk to the smallest length that still does (1000 px
    in tiles of 512 with overlap 64: three tiles of about 376, not of 512); starts and lengths
    are multiples of :data:`TILE_ALIGN` (the last tile ends at ``length``).
    """
    if length <= tile:
        return [(0, length)]
    step_max = (tile - overlap) // TILE_ALIGN * TILE_ALIGN
    count = math.ceil((length - tile) / step_max) + 1
    size = min(tile, _round_up(math.ceil((length + (count - 1) * overlap) / count), TILE_ALIGN))
    step = _round_up(math.ceil((length - size) / (count - 1)), TILE_ALIGN)
    while step > size - overlap:  # rounding the step up ate into the overlap
        size += TILE_ALIGN
        step = _round_up(math.ceil((length - size) / (count - 1)), TILE_ALIGN)
    starts = [min(i * step, length - 1) for i in range(count)]
    return [(start, min(start + size, length)) for start in starts]


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _blend_ramp(length: int, lead: int, trail: int, device) -> Tensor:
    """1-D weights over a tile: a raised cosine rising over ``lead`` pixels and falling over
    ``trail`` pixels (0 where a side touches the image border), 1 between."""
    pos = torch.arange(length, device=device, dtype=torch.float32) + 0.5
    ramp = torch.ones(length, device=device)
    if lead:
        ramp = torch.minimum(ramp, 0.5 - 0.5 * torch.cos(math.pi * (pos / lead).clamp(max=1)))
    if trail:
        ramp = torch.minimum(
            ramp, 0.5 - 0.5 * torch.cos(math.pi * ((length - pos) / trail).clamp(max=1)))
    return ramp


def check_tiles(tile: int, overlap: int) -> None:
    """Refuse a tile size below 16 pixels or an overlap outside [0, tile / 2].

    Raises:
        ValueError: naming the bad value.
    """
    if tile < 16:
        raise ValueError(f"the tile must be at least 16 pixels, got {tile}")
    if not 0 <= overlap <= tile // 2:
        raise ValueError(f"the tile overlap must be in [0, tile / 2 = {tile // 2}], got "
                         f"{overlap}")


def global_average_pools(model: nn.Module) -> list[nn.Module]:
    """The modules of ``model`` that average their input over all pixels
    (``nn.AdaptiveAvgPool2d(1)``, e.g. the channel attention of every ContAda block), for
    :func:`restore_tiled`'s ``global_pools``."""
    return [m for m in model.modules() if isinstance(m, nn.AdaptiveAvgPool2d)
            and _pair(m.output_size) == (1, 1)]


def _pair(size) -> tuple:
    return tuple(size) if isinstance(size, (tuple, list)) else (size, size)


def restore_tiled(restore: Callable[[Tensor], Tensor], image: Tensor, *,
                  tile: int = DEFAULT_TILE, overlap: int = DEFAULT_TILE_OVERLAP,
                  global_pools: Sequence[nn.Module] = (),
                  progress: Callable[[int, int], None] | None = None) -> Tensor:
    """``restore(image)`` computed on overlapping tiles and blended.

    An image that fits in one tile is restored whole. Otherwise each tile (at most ``tile``
    pixels a side, :func:`tile_layout`) is restored alone; where tiles overlap, their results
    are mixed with raised cosine weights that fall to 0 at a tile's inner edges (where it
    lacked context) and stay 1 at the image border.

    A tile alone gets a global average pool wrong: it averages the tile, not the image. With
    ``global_pools`` a first pass over the tiles measures each pool's whole-image value (every
    tile's pool input weighted by the tile's share of the blend, resampled to the pool's
    resolution: the shares of all tiles sum to 1 at every pixel), and the pass that is blended
    uses those values. That doubles the work and adds one vector per pool to the memory. Not
    exact: in the first pass a later pool sees features made with tile-local values of the
    pools before it, and every tile still lacks the context past its overlap (see the README's
    tile figures, ``scripts/tile_consistency.py``).

    Args:
        restore: maps [1, C, h, w] to the restored [1, C, h, w] (any h, w up to ``tile``).
        image: [1, C, H, W].
        tile: tile side in pixels.
        overlap: pixels shared by neighbouring tiles (at most half the tile).
        global_pools: modules inside ``restore``'s model, each run once per call of
            ``restore``, that average their input [1, C', h', w'] to [1, C', 1, 1]
            (:func:`global_average_pools`); their outputs are replaced while tiling (forward
            hooks, removed on return: no other call may use the model meanwhile).
        progress: called as ``progress(done, total)`` after each model run, ``total`` counting
            the runs of both passes.

    Returns:
        [1, C, H, W] float32 on ``image``'s device.

    Raises:
        ValueError: ``image`` is not one image, ``tile``/``overlap`` are out of range, or a
            global pool did not run exactly once in a call of ``restore``.
    """
    if image.dim() != 4 or image.shape[0] != 1:
        raise ValueError(f"restore_tiled takes one image [1, C, H, W], got {list(image.shape)}")
    check_tiles(tile, overlap)
    height, width = image.shape[-2:]
    if height <= tile and width <= tile:
        out = restore(image).float()
        if progress is not None:
            progress(1, 1)
        return out
    tiles = _tile_ramps(height, width, tile, overlap, image.device)
    weight_sum = torch.zeros((height, width), dtype=torch.float32, device=image.device)
    for (y0, y1, x0, x1), row_ramp, column_ramp in tiles:
        weight_sum[y0:y1, x0:x1] += row_ramp[:, None] * column_ramp[None]
    pools = list(dict.fromkeys(global_pools))  # each pool once
    total = len(tiles) * (2 if pools else 1)
    done = 0

    def step() -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total)

    whole_means: dict[nn.Module, Tensor] = {}
    sums: dict[nn.Module, Tensor] = {}
    runs: dict[nn.Module, int] = {}
    share: Tensor | None = None  # in the first pass: the current tile's share of each pixel

    def pool_hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor:
        if share is not None:
            runs[module] = runs.get(module, 0) + 1
            part = _share_of_mean(args[0], share, height * width)
            sums[module] = part if module not in sums else sums[module] + part
        if module in whole_means:
            return whole_means[module].to(device=output.device, dtype=output.dtype).clone()
        return output

    hooks = [pool.register_forward_hook(pool_hook) for pool in pools]
    try:
        if pools:
            for (y0, y1, x0, x1), row_ramp, column_ramp in tiles:
                share = row_ramp[:, None] * column_ramp[None] / weight_sum[y0:y1, x0:x1]
                runs.clear()
                restore(image[..., y0:y1, x0:x1])
                if any(runs.get(pool) != 1 for pool in pools):
                    raise ValueError(
                        "restore_tiled: every global pool must run once per call of restore, "
                        f"got {[runs.get(pool, 0) for pool in pools]} runs")
                step()
            share = None
            whole_means.update(sums)
        out = torch.zeros(image.shape, dtype=torch.float32, device=image.device)
        for (y0, y1, x0, x1), row_ramp, column_ramp in tiles:
            weight = row_ramp[:, None] * column_ramp[None]
            out[..., y0:y1, x0:x1] += restore(image[..., y0:y1, x0:x1]).float() * weight
            step()
    finally:
        for hook in hooks:
            hook.remove()
    return out.div_(weight_sum)


def _share_of_mean(features: Tensor, share: Tensor, image_pixels: int) -> Tensor:
    """One tile's part of the whole-image mean of ``features`` [1, C, h', w'] (float32
    [1, C, 1, 1]): each feature cell covers stride_y x stride_x tile pixels (the model may pad
    the tile up to its size multiple: those pixels get no share), so ``share`` [h, w], pooled
    by cells, still sums to 1 over every image pixel."""
    features = features.float()
    share = share.to(features.device)
    stride_y = -(-share.shape[0] // features.shape[-2])
    stride_x = -(-share.shape[1] // features.shape[-1])
    share = torch.nn.functional.pad(share, (0, features.shape[-1] * stride_x - share.shape[1],
                                            0, features.shape[-2] * stride_y - share.shape[0]))
    share = torch.nn.functional.avg_pool2d(share[None, None], (stride_y, stride_x))
    return ((features * share).sum(dim=(-2, -1), keepdim=True)
            * (stride_y * stride_x / image_pixels))


def _tile_ramps(height: int, width: int, tile: int, overlap: int, device
                ) -> list[tuple[tuple[int, int, int, int], Tensor, Tensor]]:
    """Each tile's span ``(y0, y1, x0, x1)`` and 1-D blend ramps along y and x (the weights
    are their outer product, formed when needed: memory stays at one tile's)."""
    rows, columns = tile_layout(height, tile, overlap), tile_layout(width, tile, overlap)
    tiles = []
    for iy, (y0, y1) in enumerate(rows):
        # Ramps span the pixels actually shared with the neighbour on that side.
        top = rows[iy - 1][1] - y0 if iy else 0
        bottom = y1 - rows[iy + 1][0] if iy + 1 < len(rows) else 0
        row_ramp = _blend_ramp(y1 - y0, top, bottom, device)
        for ix, (x0, x1) in enumerate(columns):
            left = columns[ix - 1][1] - x0 if ix else 0
            right = x1 - columns[ix + 1][0] if ix + 1 < len(columns) else 0
            tiles.append(((y0, y1, x0, x1), row_ramp,
                          _blend_ramp(x1 - x0, left, right, device)))
    return tiles
