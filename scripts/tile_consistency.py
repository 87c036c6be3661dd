#!/usr/bin/env python3
"""How far CFMD-GAN in tiles is from CFMD-GAN on the whole image (the README's tile figures).

The bundled test face (``facedeblur_ext/assets/faces/celeba_201418.png``) is brought to 512 px
(bicubic) and restored at u = 0.5 once whole and by ``restore_tiled`` in tiles of 256, for
each checkpoint and each overlap: plain tiles (``overlaps``), and tiles whose global average
pools (every ContAda block's channel attention) take the whole-image values measured in a first
pass over the tiles (``shared_pools``: what ``facedeblur deblur`` runs). A last variant per
checkpoint freezes every block's attention at its exact whole-image value before tiling: what
remains then comes from the receptive field alone, since the attention's global average pool is
the network's only other non-local part. Differences are absolute, in grey levels of 255, over
all pixels and channels.

Usage::

    python scripts/tile_consistency.py [CHECKPOINT ...] [--overlaps 64 128]
        [-o benchmarks/results/tile_consistency.json]

With no checkpoint: the bundled default. Minutes on a 2-core CPU per checkpoint.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import sys
import time
from pathlib import Path

import torch

from facedeblur_ext.data import load_rgb
from facedeblur_ext.inference import global_average_pools, restore_tiled
from facedeblur_ext.models.cfmd import load_generator
from facedeblur_ext.nn.control_adaptive import ControlAdaptiveBlock

REPO_ROOT = Path(__file__).resolve().parents[1]
FACE = REPO_ROOT / "facedeblur_ext" / "assets" / "faces" / "celeba_201418.png"
SIZE, TILE, U = 512, 256, 0.5


def difference(tiled: torch.Tensor, whole: torch.Tensor) -> dict[str, float]:
    gap = (tiled - whole).abs() * 255
    return {"max_255": float(gap.max()), "mean_255": float(gap.mean()),
            "above_1_of_255": int((gap > 1).sum())}


def file_sha256(path: Path) -> str:
    """The hash that names a checkpoint's weights (a path such as the bundled file's changes
    contents)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def bundled_face(size: int = SIZE) -> torch.Tensor:
    """The bundled test face as a (1, 3, size, size) float tensor in [0, 1]."""
    face = torch.from_numpy(load_rgb(FACE).copy()).permute(2, 0, 1)[None].float() / 255
    return torch.nn.functional.interpolate(face, size=(size, size), mode="bicubic").clamp(0, 1)


def measure(generator: torch.nn.Module, face: torch.Tensor, overlaps: list[int],
            freeze_attention: bool = True) -> dict:
    """Tiles of ``TILE`` at each overlap vs the whole ``face``, plain and with the global pools
    shared, and with ``freeze_attention`` the first overlap again with every block's attention
    at its exact whole-image value."""

    def restore(x: torch.Tensor) -> torch.Tensor:
        return generator.restore(x, U)

    attentions = [m.attention for m in generator.modules() if isinstance(m, ControlAdaptiveBlock)]
    whole_scales: dict[torch.nn.Module, torch.Tensor] = {}
    hooks = [a.register_forward_hook(lambda m, args, out: whole_scales.__setitem__(m, out))
             for a in attentions]
    with torch.no_grad():
        whole = restore(face)
    for hook in hooks:
        hook.remove()
    row = {"attention_blocks": len(attentions), "overlaps": {}, "shared_pools": {}}
    pools = global_average_pools(generator)
    with torch.no_grad():
        for overlap in overlaps:
            tiled = restore_tiled(restore, face, tile=TILE, overlap=overlap)
            row["overlaps"][str(overlap)] = difference(tiled, whole)
            tiled = restore_tiled(restore, face, tile=TILE, overlap=overlap, global_pools=pools)
            row["shared_pools"][str(overlap)] = difference(tiled, whole)
        if not freeze_attention:
            return row
        # A forward hook's return value replaces the module's output: each tile gets the
        # attention scales (one per channel) the whole image had.
        hooks = [a.register_forward_hook(lambda m, args, out: whole_scales[m].expand_as(out))
                 for a in attentions]
        try:
            tiled = restore_tiled(restore, face, tile=TILE, overlap=overlaps[0])
        finally:
            for hook in hooks:
                hook.remove()
    row["attention_frozen"] = {"overlap": overlaps[0], **difference(tiled, whole)}
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoints", nargs="*", type=Path,
                        help="CFMD-GAN checkpoints (default: the bundled one)")
    parser.add_argument("--overlaps", nargs="+", type=int, default=[64, 128])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("-o", "--output", type=Path,
                        default=REPO_ROOT / "benchmarks" / "results" / "tile_consistency.json")
    args = parser.parse_args(argv)
    checkpoints = args.checkpoints or [
        REPO_ROOT / "facedeblur_ext" / "assets" / "checkpoints" / "cfmd_default.pt"]
    for path in checkpoints:
        if not path.is_file():
            parser.error(f"no such checkpoint: {path}")
    torch.set_num_threads(args.threads)
    face = bundled_face()
    rows = []
    for path in checkpoints:
        start = time.perf_counter()
        rows.append({"checkpoint": str(path), "sha256": file_sha256(path),
                     **measure(load_generator(path), face, args.overlaps)})
        print(json.dumps(rows[-1]), f"({time.perf_counter() - start:.0f} s)", file=sys.stderr)
    result = {
        "measurement": "CFMD-GAN at u = 0.5, tiles vs the whole image (grey levels of 255)",
        "face": str(FACE.relative_to(REPO_ROOT)), "size": SIZE, "tile": TILE, "u": U,
        "command": " ".join(["python scripts/tile_consistency.py", *(sys.argv[1:] if argv is None
                                                                      else argv)]),
        "torch": torch.__version__, "machine": platform.machine(), "rows": rows,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    partial = args.output.with_name(args.output.name + ".partial")
    partial.write_text(json.dumps(result, indent=2) + "\n")
    partial.replace(args.output)
    print(args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
