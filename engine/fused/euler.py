"""The fused rule of ``EulerDiscreteScheduler`` (s_churn 0; Karras et al. 2022, Alg. 2 without churn).

epsilon: ``x0 = x - sigma e``; v: ``x0 = (-sigma / sqrt(sigma^2 + 1)) v + x / (sigma^2 + 1)``;
then ``x' = x + ((x - x0) / sigma) (sigma_next - sigma)``.
"""

from __future__ import annotations

from typing import Tuple

from ..kernels_bridge import StepForm
from .base import Coefficients, FusedRule, as_float


class EulerRule(FusedRule):
    """``EulerDiscreteScheduler.step`` without churn (the loop never passes ``s_churn``)."""

    class_name = "EulerDiscreteScheduler"
    scheduler_name = "euler"
    tag = "euler"

    def step_key(self, scheduler, t) -> tuple:
        if scheduler.step_index is None:
            scheduler._init_step_index(t)
        return (self.tag, scheduler.step_index)

    def coefficients(self, scheduler, key: tuple) -> Tuple[StepForm, Coefficients]:
        s, k = scheduler, key[1]
        sigma = s.sigmas[k]
        sigma_hat = sigma * (0.0 + 1)  # gamma = 0 without churn
        dt = s.sigmas[k + 1] - sigma_hat
        if self.v_prediction(s):
            c_out = -sigma / (sigma**2 + 1) ** 0.5
            c_skip_div = sigma**2 + 1
            coeffs = (as_float(c_out), as_float(c_skip_div), as_float(sigma_hat), as_float(dt), 0.0, 0.0)
            return StepForm.EULER_V, coeffs
        return StepForm.EULER, (as_float(sigma_hat), 1.0, as_float(sigma_hat), as_float(dt), 0.0, 0.0)


__all__ = ["EulerRule"]
