"""The command line's shared vocabulary: one name, one default and one help text per option.

Every subcommand that takes a model, sampling settings, threads or an output folder adds
them through these functions, so ``generate``, ``demo``, ``analyze``, ``bench`` and
``export`` spell them alike. Old spellings stay as aliases (``--guidance`` for
``--guidance-scale``). Defaults are shown by ``--help`` (:class:`DefaultsHelpFormatter`).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional

from .errors import InvalidArgumentError

#: Defaults shared by every command (the same as ``Sampler.generate``'s, except the plan:
#: the command line asks for the model's recommendation).
DEFAULT_STEPS = 30
DEFAULT_GUIDANCE_SCALE = 7.5
DEFAULT_SCHEDULER = "ddim"
DEFAULT_SEED = 0
DEFAULT_PLAN = "auto"
#: Files a command's output folder may hold from an earlier run (refused unless ``--overwrite``).
OUTPUT_PATTERNS = ("image_*.png", "result.json", "grid.png")


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: X)`` after each option's help, unless the help already says ``(default...``."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        unset = action.default is None or action.default is False or action.default is argparse.SUPPRESS
        if "(default" in text.lower() or unset or not action.option_strings:
            return text
        return super()._get_help_string(action)


def add_model_option(p: argparse.ArgumentParser, default: Optional[str] = "default", help_extra: str = "") -> None:
    """``--model``: a diffusers folder or bundle; ``default`` is the embedded model."""
    p.add_argument("--model", default=default, metavar="MODEL",
                   help="diffusers folder or bundle; 'default' is the embedded model" + help_extra)


def add_sampling_options(p: argparse.ArgumentParser, plan: bool = True, guidance_dest: str = "guidance") -> None:
    """``--steps``, ``--guidance-scale`` (alias ``--guidance``), ``--scheduler``, ``--seed`` and ``--plan``."""
    from .schedulers import SCHEDULER_NAMES

    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="denoising steps")
    p.add_argument("--guidance-scale", "--guidance", dest=guidance_dest, type=float, default=DEFAULT_GUIDANCE_SCALE,
                   metavar="W", help="CFG weight w in u + w (c - u)")
    p.add_argument("--scheduler", default=DEFAULT_SCHEDULER, help=f"one of {', '.join(SCHEDULER_NAMES)}")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seed of the first image (image i gets seed + i)")
    if plan:
        p.add_argument("--plan", default=DEFAULT_PLAN,
                       help="guidance plan (default: auto = the model's recommendation from cfgswitch analyze, else "
                            "switch:0.5), e.g. always, switch:0.5, switch:0.2:cond, step:6, interval:0.2:0.6, "
                            "adaptive:0.9997:min=0.2:cond")


def add_threads_option(p: argparse.ArgumentParser) -> None:
    """``--threads``: torch (and ONNX Runtime) CPU threads."""
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch and ONNX Runtime (default: the library's choice; 1 is often "
                        "fastest on a busy machine)")


def add_overwrite_option(p: argparse.ArgumentParser) -> None:
    """``--overwrite``: reuse an output folder that holds an earlier run's files."""
    p.add_argument("--overwrite", action="store_true", help="replace the files of an earlier run in --out")


def check_threads(value: Optional[int]) -> Optional[int]:
    """``--threads``: ``None`` or an integer >= 1."""
    if value is not None and (isinstance(value, bool) or value < 1):
        raise InvalidArgumentError("--threads", "an integer >= 1", value)
    return value


def apply_threads(value: Optional[int]) -> None:
    """Set torch's CPU threads (ONNX Runtime sessions take theirs as the ``threads`` option)."""
    if value is not None:
        import torch

        torch.set_num_threads(value)


def check_output_folder(out: "str | Path", overwrite: bool, name: str = "--out") -> Path:
    """An output folder: not a file, and without an earlier run's files unless ``overwrite``.

    Raises:
        InvalidArgumentError: ``out`` is a file, or holds earlier images and ``overwrite`` is False.
    """
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise InvalidArgumentError(name, "a folder (or a path that does not exist yet)", f"{out} (an existing file)")
    if path.is_dir() and not overwrite:
        earlier = sorted({f.name for pattern in OUTPUT_PATTERNS for f in path.glob(pattern)})
        if earlier:
            shown = ", ".join(earlier[:3]) + (", ..." if len(earlier) > 3 else "")
            raise InvalidArgumentError(name, "a folder without an earlier run's files (or pass --overwrite)",
                                       f"{out} (holds {shown})")
    return path


def clear_output_folder(path: Path) -> None:
    """Remove an earlier run's files from ``path`` (after ``--overwrite``), so none is left beside the new ones."""
    for pattern in OUTPUT_PATTERNS:
        for f in path.glob(pattern):
            f.unlink()


__all__ = [
    "DEFAULT_GUIDANCE_SCALE", "DEFAULT_PLAN", "DEFAULT_SCHEDULER", "DEFAULT_SEED", "DEFAULT_STEPS", "DefaultsHelpFormatter",
    "add_model_option", "add_overwrite_option", "add_sampling_options", "add_threads_option", "apply_threads",
    "check_output_folder", "check_threads", "clear_output_folder",
]
