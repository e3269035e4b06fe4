"""Typed errors of cfgswitch.

Every error names the argument (or file) at fault, what was expected and what
came, so a CLI user sees one clear line and a library user can catch by type.
"""

from __future__ import annotations

from typing import Any


class CfgSwitchError(Exception):
    """Base class of every error cfgswitch raises on purpose."""


class InvalidArgumentError(CfgSwitchError, ValueError):
    """An argument has a wrong value, type or length.

    Args:
        argument (`str`): the argument's name as the caller wrote it.
        expected (`str`): what was expected, in words.
        got (`Any`): what came.
    """

    def __init__(self, argument: str, expected: str, got: Any) -> None:
        self.argument = argument
        self.expected = expected
        self.got = got
        shown = repr(got)
        if len(shown) > 200:
            shown = shown[:197] + "..."
        super().__init__(f"{argument}: expected {expected}, got {shown}")


class PlanParseError(InvalidArgumentError):
    """A guidance-plan string is unknown or malformed."""


class UnknownSchedulerError(InvalidArgumentError):
    """A scheduler name is unknown, or the scheduler cannot be used by the loop."""


class ModelLoadError(CfgSwitchError):
    """A model folder is missing, incomplete, or holds weights we refuse to load."""


class BundleError(CfgSwitchError):
    """An exported bundle is missing, malformed, tampered with, or cannot serve a request."""


class BackendUnavailableError(CfgSwitchError):
    """A backend's package is not installed; the message names the extra to install."""


class EngineMismatchError(BundleError):
    """A TensorRT plan was built for another TensorRT version or GPU; the message names the rebuild command."""


class EngineClosedError(CfgSwitchError):
    """Work was submitted to a :class:`~cfgswitch.step_engine.StepEngine` after ``close()``."""


class QueueFullError(CfgSwitchError):
    """The step engine's queue holds ``max_queue`` requests already; the request was not taken."""


class DeadlineExceededError(CfgSwitchError, TimeoutError):
    """A request's deadline passed before it finished; its work was dropped."""


class RequestFailedError(CfgSwitchError):
    """A request's own work failed inside a shared iteration (for example non-finite latents).

    The other requests of that iteration go on; only this one fails.
    """


class EngineExecutionError(CfgSwitchError, RuntimeError):
    """A compiled engine refused a call at run time (a profile, shape or address TensorRT rejected, no context)."""


__all__ = [
    "BackendUnavailableError",
    "DeadlineExceededError",
    "EngineClosedError",
    "QueueFullError",
    "RequestFailedError",
    "BundleError",
    "CfgSwitchError",
    "EngineExecutionError",
    "EngineMismatchError",
    "InvalidArgumentError",
    "ModelLoadError",
    "PlanParseError",
    "UnknownSchedulerError",
]
