"""Per-step coefficients of the fused update, read from a diffusers scheduler's own state.

The functions the steppers call, on top of the fused rules of :mod:`cfgswitch.fused` (one rule
per covered scheduler: DDIM, Euler, DPM-Solver++; epsilon or v prediction):

- :func:`fused_support`: whether the fused update covers a scheduler, or why not;
- :func:`step_key`: the name of the update the step at a timestep takes;
- :func:`coefficients`: that update's form and ``c0..c5`` (``kernels/include/cfgswitch_kernels.h``),
  computed with the torch float32 expressions of the scheduler's ``step``, so the fused update
  rounds exactly as ``step`` does;
- :func:`previous_x0` and :func:`advance_state`: the multistep state, kept as ``step`` keeps it
  (``step_index``, ``model_outputs``, ``lower_order_nums``), so ``scheduler.step`` can take over
  at any step.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .fused import FUSED_SCHEDULER_NAMES, Coefficients, rule_for, rule_for_key
from .kernels_bridge import StepForm


def fused_support(scheduler) -> Optional[str]:
    """``None`` when the fused update covers ``scheduler``, else the reason it does not."""
    rule = rule_for(scheduler)
    if rule is None:
        return f"{type(scheduler).__name__} has no fused update (covered: {', '.join(FUSED_SCHEDULER_NAMES)})"
    return rule.supports(scheduler)


def _rule(scheduler):
    rule = rule_for(scheduler)
    if rule is None:
        raise ValueError(f"scheduler: expected a scheduler with a fused rule ({', '.join(FUSED_SCHEDULER_NAMES)}), "
                         f"got {type(scheduler).__name__}")
    return rule


def step_key(scheduler, t) -> tuple:
    """A hashable name of the update the step at timestep ``t`` takes, within its schedule.

    Initialises ``step_index`` as ``step`` would when it is still unset; changes nothing else.
    For DPM-Solver++ the key records the order diffusers picks for this step.
    """
    return _rule(scheduler).step_key(scheduler, t)


def coefficients(scheduler, key: tuple) -> Tuple[StepForm, Coefficients]:
    """The update form and ``c0..c5`` of the step :func:`step_key` named ``key``."""
    return rule_for_key(key).coefficients(scheduler, key)


def previous_x0(scheduler, key: tuple) -> Optional[torch.Tensor]:
    """The previous step's x0 that a second-order step needs (``None`` for the others)."""
    return rule_for_key(key).previous_x0(scheduler, key)


def advance_state(scheduler, x0: Optional[torch.Tensor]) -> None:
    """Move the scheduler's state past the step just taken, as its ``step`` does.

    Args:
        scheduler: the scheduler :func:`coefficients` was called on for this step.
        x0 (`torch.Tensor`, optional): the step's predicted x0 (multistep schedulers keep it).
    """
    _rule(scheduler).advance(scheduler, x0)


__all__ = ["Coefficients", "advance_state", "coefficients", "fused_support", "previous_x0", "step_key"]
