"""One rule per fused scheduler: coefficients and state of the ``guide_and_step`` update.

:data:`FUSED_RULES` is the registry (diffusers class name -> rule); :func:`rule_for` finds the rule
of a scheduler object, or ``None``. :mod:`cfgswitch.step_coefficients` keeps the functions the
steppers call (``fused_support``, ``step_key``, ``coefficients``, ``previous_x0``,
``advance_state``) on top of it. Everything here is plain Python and torch: no compiled library.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

from .base import PREDICTION_TYPES, Coefficients, FusedRule
from .ddim import DdimRule
from .dpm_solver import DpmSolverRule
from .euler import EulerRule

#: diffusers class name -> its fused rule.
FUSED_RULES: Dict[str, FusedRule] = {rule.class_name: rule for rule in (DdimRule(), EulerRule(), DpmSolverRule())}
#: The scheduler names whose scheduler has a fused rule.
FUSED_SCHEDULER_NAMES: Tuple[str, ...] = tuple(rule.scheduler_name for rule in FUSED_RULES.values())
_BY_TAG: Dict[str, FusedRule] = {rule.tag: rule for rule in FUSED_RULES.values()}


def rule_for(scheduler) -> Optional[FusedRule]:
    """The rule of ``scheduler``'s exact diffusers class (a subclass may change ``step``: ``None``)."""
    import diffusers

    name = type(scheduler).__name__
    rule = FUSED_RULES.get(name)
    if rule is None or type(scheduler) is not getattr(diffusers, name, None):
        return None
    return rule


def rule_for_key(key: tuple) -> FusedRule:
    """The rule that made a step key (its first element is the rule's :attr:`~FusedRule.tag`)."""
    try:
        return _BY_TAG[key[0]]
    except (KeyError, IndexError, TypeError):
        raise ValueError(f"key: expected a step key of {', '.join(sorted(_BY_TAG))}, got {key!r}") from None


__all__ = [
    "Coefficients",
    "FUSED_RULES",
    "FUSED_SCHEDULER_NAMES",
    "FusedRule",
    "PREDICTION_TYPES",
    "DdimRule",
    "DpmSolverRule",
    "EulerRule",
    "rule_for",
    "rule_for_key",
]
