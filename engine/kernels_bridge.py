"""The runtime's single door to ``cfgswitch.kernels`` (compiled ops with torch fallbacks)."""

from __future__ import annotations

from cfgswitch.kernels import (
    HAS_COMPILED,
    GuideStepResult,
    StepForm,
    cfg_combine,
    compiled_available,
    guide_and_step,
    guide_and_step_reference,
    rescale_noise_cfg_reference,
    rows_for_modes,
)

__all__ = [
    "HAS_COMPILED",
    "GuideStepResult",
    "StepForm",
    "cfg_combine",
    "compiled_available",
    "guide_and_step",
    "guide_and_step_reference",
    "rescale_noise_cfg_reference",
    "rows_for_modes",
]
