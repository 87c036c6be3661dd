"""The ``facedeblur`` command.

Each subcommand lives in its own module with ``configure(parser)`` and ``run(args) -> int``;
modules are imported only when their subcommand runs, so that ``facedeblur --help`` stays fast
and a missing optional dependency affects only the command that needs it.

A user error (a missing or unreadable file, a bad option or config value, an unusable
checkpoint) ends with one line, ``facedeblur COMMAND: error: MESSAGE``, and exit status 2;
``FACEDEBLUR_DEBUG=1`` shows the traceback instead. Ctrl-C ends a command with
``facedeblur COMMAND: interrupted`` and exit status 130 (the files written are complete).
"""

from __future__ import annotations

import argparse
import importlib
import os
import pickle
import sys

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "info": ("facedeblur_ext.commands.info", "build information and available devices"),
    "selfcheck": ("facedeblur_ext.commands.selfcheck", "check that the native ops load and run"),
    "synth": ("facedeblur_ext.commands.synth",
              "write a synthetic blur data set (kernel, face-only or frame averaging)"),
    "train": ("facedeblur_ext.commands.train", "train a model (cfmd, ...) from a config file"),
    "export": ("facedeblur_ext.commands.export",
               "a small inference checkpoint (weights only, float16) from a training one"),
    "deblur": ("facedeblur_ext.commands.deblur", "restore blurry face images with a checkpoint"),
    "eval": ("facedeblur_ext.commands.eval",
             "evaluation tables of the papers' protocols (kernel, frames, face-region)"),
    "demo": ("facedeblur_ext.commands.demo",
             "blur bundled faces, deblur them with the default model, show the metrics"),
}

#: Exceptions that report a problem with the user's input rather than a bug: files that are
#: missing, unreadable or unusable (OSError, the data package's BadImageError is a ValueError),
#: bad option and config values (ValueError, TypeError, KeyError), missing optional modules or a
#: bad --backend import path (ImportError), bad devices and checkpoints torch cannot read
#: (RuntimeError, EOFError, UnpicklingError for truncated or foreign files).
USER_ERRORS: tuple[type[BaseException], ...] = (
    OSError, ValueError, TypeError, KeyError, ImportError, RuntimeError, EOFError,
    pickle.UnpicklingError,
)

DEBUG_ENV = "FACEDEBLUR_DEBUG"


def describe_error(exc: BaseException) -> str:
    """The first line of a user error's message, with the exception type where the message
    alone says nothing (a KeyError's bare key, an empty EOFError)."""
    # str() of a KeyError is the repr of its argument: quoted, escaped.
    text = str(exc.args[0]) if isinstance(exc, KeyError) and len(exc.args) == 1 else str(exc)
    text = text.strip()
    if " " not in text:
        text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text.splitlines()[0]


def _version() -> str:
    from ._version import __version__

    return __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="facedeblur", description="Face deblurring with fused C++/CUDA kernels.",
        epilog=f"A user error is reported in one line, without a Python traceback; set "
               f"{DEBUG_ENV}=1 to see the traceback.",
    )
    parser.add_argument("--version", action="version", version=f"facedeblur {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_module, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or argv[0].startswith("-") or argv[0] not in COMMANDS:
        # Top-level flags (--version, --help) or an unknown command: argparse reports it.
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 2
    name, rest = argv[0], argv[1:]
    module_name, help_text = COMMANDS[name]
    try:
        module = importlib.import_module(module_name)
        sub_parser = argparse.ArgumentParser(prog=f"facedeblur {name}", description=help_text)
        module.configure(sub_parser)
        # A module may parse its own way (e.g. key=value overrides mixed with options).
        parse = getattr(module, "parse_args", None)
        args = parse(sub_parser, rest) if parse is not None else sub_parser.parse_args(rest)
        return int(module.run(args) or 0)
    except KeyboardInterrupt:
        # Writers are atomic: what is on disk is complete, and a rerun continues from it.
        print(f"facedeblur {name}: interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as exc:
        if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            raise
        # These types also come from bugs: say how to get the traceback for a report.
        hint = (f" (set {DEBUG_ENV}=1 for the traceback)"
                if isinstance(exc, (RuntimeError, TypeError)) else "")
        print(f"facedeblur {name}: error: {describe_error(exc)}{hint}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
