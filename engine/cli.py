"""The ``cfgswitch`` command line: one entry, one module per subcommand.

Each subcommand module defines ``add_parser(subparsers)`` (which registers the
subcommand and sets ``func``) and is imported only when needed. A missing
optional module (not yet built, or its extra not installed) only hides its
subcommand. Errors from :mod:`cfgswitch.errors` print as one line, exit code 2;
Ctrl-C stops a running command between steps with one line, exit code 130. Every
subcommand's ``--help`` shows its defaults. Warnings of third-party libraries (diffusers,
transformers, Python ``warnings``) go to the log at DEBUG level (shown with ``-v``).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from typing import List, Optional

from .cli_options import DefaultsHelpFormatter
from .errors import CfgSwitchError

#: Loggers of third-party libraries whose records the command line logs at DEBUG level.
THIRD_PARTY_LOGGERS = ("diffusers", "transformers", "torch", "onnxscript", "onnx_ir", "polygraphy", "PIL", "matplotlib")

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
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_SubcommandParser)
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


class _SubcommandParser(argparse.ArgumentParser):
    """A subcommand's parser: ``--help`` shows every default."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", DefaultsHelpFormatter)
        super().__init__(*args, **kwargs)


class _ThirdPartyAtDebug(logging.Filter):
    """On the root handlers: a third-party record becomes a DEBUG one, dropped unless DEBUG is on."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.split(".")[0] not in THIRD_PARTY_LOGGERS and record.name != "py.warnings":
            return True
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return logging.getLogger().isEnabledFor(logging.DEBUG)


def route_third_party_logs() -> None:
    """Send third-party warnings to the log at DEBUG level (cheap: imports nothing).

    Python ``warnings`` are captured as log records; diffusers and transformers start at
    verbosity ``error`` (their environment variables, unless the user set them) until a
    command calls :func:`route_library_logs` before it loads a model.
    """
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    logging.captureWarnings(True)
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, _ThirdPartyAtDebug) for f in handler.filters):
            handler.addFilter(_ThirdPartyAtDebug())


def route_library_logs() -> None:
    """diffusers' and transformers' own handlers off: their warnings (the "install accelerate"
    warning of every load, for example) reach the command line's log as DEBUG records."""
    for name in ("diffusers", "transformers"):
        try:
            mod = importlib.import_module(f"{name}.utils.logging")
        except ImportError:  # pragma: no cover - both are dependencies
            continue
        mod.disable_default_handler()
        mod.enable_propagation()
        mod.set_verbosity(logging.WARNING)
        if hasattr(mod, "disable_progress_bar"):
            mod.disable_progress_bar()


def main(argv: Optional[List[str]] = None) -> int:
    """Run the command line; returns the exit code (0 ok, 2 bad input, 130 interrupted)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    first = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(first if first in SUBCOMMANDS else None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    route_third_party_logs()
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
