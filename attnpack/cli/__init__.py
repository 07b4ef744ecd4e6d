"""The ``attnpack`` command line.

Each subcommand lives in its own module of this package and exposes ``register(subparsers)``; the module list below
is the only place that names them. User mistakes (``ValueError``, ``TypeError``, missing files, missing optional
packages) print one ``attnpack <command>: error: ...`` line and exit with status 2; other exceptions are bugs and show
a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys


__all__ = ["main", "build_parser", "COMMAND_MODULES"]

# subcommand modules, in --help order
COMMAND_MODULES = [
    "generate",
    "batch",
    "info",
    "ir",
    "astar",
    "search_heads",
    "distill_clear",
    "calibrate_paro",
    "convert_paro",
    "train_toy",
    "ui",
]

USER_ERRORS = (ValueError, TypeError, ImportError, OSError)  # OSError: missing files, permissions, full disks


def build_parser() -> argparse.ArgumentParser:
    from .._version import __version__

    parser = argparse.ArgumentParser(
        prog="attnpack",
        description="Attention techniques for diffusers pipelines: generate, inspect and benchmark.",
    )
    parser.add_argument("--version", action="version", version=f"attnpack {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-v info, -vv debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(f"{__name__}.{name}").register(sub)
    return parser


class _DropTorchvisionFallbackNotice(logging.Filter):
    """transformers warns on every command that its image processors fall back to PIL without torchvision; attnpack
    needs no torchvision (the PIL processors are what it uses), so the notice is noise on the command line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed)" not in record.getMessage()


_NOTICE_FILTER = _DropTorchvisionFallbackNotice()  # one instance: addFilter keeps it once however often main() runs


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    logging.getLogger("transformers.utils.import_utils").addFilter(_NOTICE_FILTER)
    parser = build_parser()
    args = parser.parse_args(argv)
    level = {0: logging.WARNING, 1: logging.INFO}.get(args.verbose, logging.DEBUG)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except USER_ERRORS as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"attnpack {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"attnpack {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
