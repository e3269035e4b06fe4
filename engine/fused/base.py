"""What every fused rule is: the contract between a diffusers scheduler and the fused update.

A rule reads one diffusers scheduler class's own state and gives, for each step, the update
form and the coefficients ``c0..c5`` of ``guide_and_step`` (``kernels/include/cfgswitch_kernels.h``),
computed with the same torch float32 scalar expressions that the scheduler's ``step`` evaluates,
so the fused update rounds exactly as ``step`` does. It then moves the scheduler's state on as
``step`` would, so ``scheduler.step`` can take over at any step.

The model output is converted to x0 per row, by the form: epsilon forms take
``x0 = (x - c0 e) / c1``; v-prediction forms (``StepForm.*_V``) take ``x0 = c1 x - c0 e``
(``c0 = sigma_t``, ``c1 = alpha_t``; Salimans & Ho 2022, eq. 4 of "Progressive Distillation"), or
Euler's ``x0 = c0 e + x / c1`` (Karras et al. 2022, ``c_out``/``c_skip`` of table 1).
"""

from __future__ import annotations

from typing import ClassVar, Optional, Tuple

import torch

from ..kernels_bridge import StepForm

#: The six coefficients ``c0..c5`` of one step.
Coefficients = Tuple[float, float, float, float, float, float]
#: Prediction types the fused update converts per row.
PREDICTION_TYPES: Tuple[str, ...] = ("epsilon", "v_prediction")


def as_float(x: torch.Tensor) -> float:
    """A float32 torch scalar as a Python float (exact: every float32 is a double)."""
    return float(x)


class FusedRule:
    """How one diffusers scheduler class maps onto the fused ``guide_and_step`` update.

    Subclasses set :attr:`class_name`, :attr:`scheduler_name` and :attr:`tag`, and implement
    :meth:`step_key`, :meth:`coefficients` and (for stateful schedulers) :meth:`advance`.
    """

    #: The diffusers class this rule reads (exactly that class, not a subclass).
    class_name: ClassVar[str] = ""
    #: The cfgswitch scheduler name (:data:`cfgswitch.SCHEDULER_NAMES`) that builds that class.
    scheduler_name: ClassVar[str] = ""
    #: First element of this rule's step keys.
    tag: ClassVar[str] = ""
    #: Whether :meth:`advance` needs the step's x0 (multistep state), so the op must write it.
    needs_x0: ClassVar[bool] = False

    def supports(self, scheduler) -> Optional[str]:
        """``None`` when this rule covers ``scheduler``'s config, else the reason it does not."""
        prediction = scheduler.config.prediction_type
        if prediction not in PREDICTION_TYPES:
            return (f"{self.class_name} with prediction_type={prediction!r} "
                    f"(fused: {', '.join(map(repr, PREDICTION_TYPES))})")
        return self.config_reason(scheduler.config)

    def config_reason(self, cfg) -> Optional[str]:
        """Rule-specific config checks (``None``: covered)."""
        return None

    @staticmethod
    def v_prediction(scheduler) -> bool:
        """Whether the model predicts v (SD 2.x 768) rather than epsilon."""
        return scheduler.config.prediction_type == "v_prediction"

    def step_key(self, scheduler, t) -> tuple:
        """A hashable name of the update the step at timestep ``t`` takes, within its schedule."""
        raise NotImplementedError

    def coefficients(self, scheduler, key: tuple) -> Tuple[StepForm, Coefficients]:
        """The update form and ``c0..c5`` of the step :meth:`step_key` named ``key``."""
        raise NotImplementedError

    def previous_x0(self, scheduler, key: tuple) -> Optional[torch.Tensor]:
        """The previous step's x0 that a second-order step needs (``None`` by default)."""
        return None

    def advance(self, scheduler, x0: Optional[torch.Tensor]) -> None:
        """Move the scheduler's state past the step just taken, as its ``step`` does."""
        scheduler._step_index += 1

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.class_name})"


__all__ = ["Coefficients", "FusedRule", "PREDICTION_TYPES", "as_float"]
