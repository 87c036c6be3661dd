"""Subcommands of the ``facedeblur`` CLI (see ``facedeblur_ext.cli``)."""
from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).resolve().parents[1] / "assets"
# Model families with a checkpoint shipped in the package (its model card sits beside it).
BUNDLED_CHECKPOINTS = {"cfmd": ASSETS / "checkpoints" / "cfmd_default.pt"}


def checkpoint_to_run(model: str, given: str | None) -> Path:
    """The checkpoint a command runs: ``given``, else the bundled one of ``model``.

    Raises:
        SystemExit: the file is missing, or ``model`` has no bundled checkpoint; the message
            says what to pass instead.
    """
    if given:
        path = Path(given)
        if not path.is_file():
            raise SystemExit(f"checkpoint {path} does not exist")
        return path
    if model not in BUNDLED_CHECKPOINTS:
        raise SystemExit(f"--model {model} needs --checkpoint (only "
                         f"{', '.join(sorted(BUNDLED_CHECKPOINTS))} has a bundled default)")
    path = BUNDLED_CHECKPOINTS[model]
    if not path.is_file():
        raise SystemExit(
            f"the default checkpoint {path} is not part of this installation (it ships in the "
            "repository and the package data; reinstall, or check out the file). Or pass "
            f"--checkpoint PATH with a checkpoint written by `facedeblur train {model}`.")
    return path
