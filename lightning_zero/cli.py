"""The ``lightning-zero`` console command: ``lightning-zero consolidate ...`` and ``lightning-zero estimate ...``.

Each subcommand lives in its own module, which provides ``add_parser(subparsers)``; the parser it adds sets
``func`` (called with the parsed namespace, returns an exit code).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# subcommand -> module providing add_parser(subparsers)
SUBCOMMANDS = {
    "consolidate": "lightning_zero.consolidate",
    "estimate": "lightning_zero.estimate",
    "config": "lightning_zero.wizard",
    "launch": "lightning_zero.launch",
    "env": "lightning_zero.env",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lightning-zero", description="Tools for lightning_zero (DeepSpeed ZeRO"
                                     " for PyTorch Lightning).")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in SUBCOMMANDS.values():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name != module_name:
                raise
            continue  # subcommand not shipped in this build
        module.add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":  # python -m lightning_zero.cli
    sys.exit(main())
