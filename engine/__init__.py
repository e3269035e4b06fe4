"""cfgswitch: a compiled sampler engine for latent text-to-image diffusion.

Classifier-free guidance runs only while the prompt matters (the first steps);
afterwards the UNet runs on one row per image. See README.md and docs/architecture.md.

Importing this package is cheap: it loads no model and probes no hardware.
"""

from __future__ import annotations

from .errors import (
    BackendUnavailableError,
    BundleError,
    CfgSwitchError,
    EngineMismatchError,
    InvalidArgumentError,
    ModelLoadError,
    PlanParseError,
    UnknownSchedulerError,
)
from .output import GenerationOutput
from .plans import GuidancePlan
from .schedulers import SCHEDULER_NAMES

__version__ = "0.1.0"


def __getattr__(name: str):
    # Sampler pulls in torch and diffusers; load it on first use.
    if name == "Sampler":
        from .sampler import Sampler

        return Sampler
    if name == "StepEngine":
        from .step_engine import StepEngine

        return StepEngine
    if name == "HAS_KERNELS":
        from .kernels_bridge import HAS_COMPILED

        return HAS_COMPILED
    raise AttributeError(f"module 'cfgswitch' has no attribute {name!r}")


__all__ = [
    "BackendUnavailableError",
    "BundleError",
    "CfgSwitchError",
    "EngineMismatchError",
    "GenerationOutput",
    "GuidancePlan",
    "HAS_KERNELS",
    "InvalidArgumentError",
    "ModelLoadError",
    "PlanParseError",
    "SCHEDULER_NAMES",
    "Sampler",
    "StepEngine",
    "UnknownSchedulerError",
    "__version__",
]
