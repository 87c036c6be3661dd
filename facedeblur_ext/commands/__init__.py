"""Subcommands of the ``facedeblur`` CLI (see ``facedeblur_ext.cli``)."""
from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).resolve().parents[1] / "assets"
# Model families with a checkpoint shipped in the package (its model card sits beside it).
BUNDLED_CHECKPOINTS = {"cfmd": ASSETS / "checkpoints" / "cfmd_default.pt"}


def checkpoint_to_run(model: str, given: str | None) -> Path:
    """The checkpoint a command runs: ``given``, else the bundled one of ``model``.

    Raises:
        FileNotFoundError: the file is missing (the message says what to pass instead).
        ValueError: ``model`` has no bundled checkpoint.
    """
    if given:
        path = Path(given)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {path} does not exist")
        return path
    if model not in BUNDLED_CHECKPOINTS:
        raise ValueError(f"--model {model} needs --checkpoint (only "
                         f"{', '.join(sorted(BUNDLED_CHECKPOINTS))} has a bundled default)")
    path = BUNDLED_CHECKPOINTS[model]
    if not path.is_file():
        raise FileNotFoundError(
            f"the default checkpoint {path} is not part of this installation (it ships in the "
            "repository and the package data; reinstall, or check out the file). Or pass "
            f"--checkpoint PATH with a checkpoint written by `facedeblur train {model}`.")
    return path


def resolve_device(name: str):
    """The torch device of a ``--device`` value (auto: CUDA when available).

    Raises:
        ValueError: ``name`` is not a device, or names CUDA on a machine without one.
    """
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name}: expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA device is available (use cpu or auto)")
    return device
