"""The ``cfgswitch`` command line: one entry, one module per subcommand.

Each subcommand module defines ``add_parser(subparsers)`` (which registers the
subcommand and sets ``func``) and is imported only when needed. A missing
optional module (not yet built, or its extra not installed) only hides its
subcommand. Errors from :mod:`cfgswitch.errors` print as one line, exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import List, Optional

from .errors import CfgSwitchError

# subcommand -> module that implements it
SUBCOMMANDS = {
    "generate": "cfgswitch.cli_generate",
    "demo": "cfgswitch.demo",
    "export": "cfgswitch.export.cli",
    "build": "cfgswitch.export.build_cli",
    "bench": "cfgswitch.benchmarks.cli",
    "serve": "cfgswitch.serving.cli",
    "triton-repo": "cfgswitch.serving.repo_cli",
    "client": "cfgswitch.serving.client_cli",
    "train-shapes": "cfgswitch.shapes.train_cli",
    "analyze": "cfgswitch.analysis.cli",
}


def build_parser(only: Optional[str] = None) -> argparse.ArgumentParser:
    """The argument parser; ``only`` loads just that subcommand's module (faster start)."""
    parser = argparse.ArgumentParser(prog="cfgswitch", description="Switching-CFG sampler engine for text-to-image diffusion.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module in SUBCOMMANDS.items():
        if only is not None and name != only:
            continue
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name and (e.name == module or module.startswith(e.name + ".")):
                continue  # this subcommand is not part of the installed package
            raise
        mod.add_parser(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Run the command line; returns the exit code (0 ok, 2 bad input, 130 interrupted)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    first = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(first if first in SUBCOMMANDS else None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except CfgSwitchError as e:
        print(f"cfgswitch {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"cfgswitch {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
