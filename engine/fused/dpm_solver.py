"""The fused rule of ``DPMSolverMultistepScheduler`` (dpmsolver++, Lu et al. 2022, eqs. 5-6).

epsilon: ``x0 = (x - sigma_s e) / alpha_s``; v: ``x0 = alpha_s x - sigma_s v``. First order
``x' = (sigma_t / sigma_s) x - alpha_t (e^-h - 1) x0``; second order adds ``- 0.5 alpha_t (e^-h - 1) D1``
(midpoint) or ``+ alpha_t ((e^-h - 1) / h + 1) D1`` (heun), ``D1 = (1 / r0) (x0 - x0_prev)``. First
order on the first step and, as diffusers decides it (``lower_order_final``, ``euler_at_final``,
``final_sigmas_type="zero"``), on the last.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..kernels_bridge import StepForm
from .base import Coefficients, FusedRule, as_float


def _alpha_sigma_lambda(s, sigma: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    alpha, sig = s._sigma_to_alpha_sigma_t(sigma)
    return alpha, sig, torch.log(alpha) - torch.log(sig)


class DpmSolverRule(FusedRule):
    """``DPMSolverMultistepScheduler.step`` for ``dpmsolver++`` of order 1 or 2, midpoint or heun."""

    class_name = "DPMSolverMultistepScheduler"
    scheduler_name = "dpmpp_2m"
    tag = "dpm"
    needs_x0 = True

    def config_reason(self, cfg) -> Optional[str]:
        if cfg.thresholding:
            return "DPMSolverMultistepScheduler with thresholding"
        if cfg.algorithm_type != "dpmsolver++":
            return f"DPMSolverMultistepScheduler with algorithm_type={cfg.algorithm_type!r} (only 'dpmsolver++')"
        if cfg.solver_order not in (1, 2):
            return f"DPMSolverMultistepScheduler with solver_order={cfg.solver_order} (only 1 or 2)"
        if cfg.solver_type not in ("midpoint", "heun"):
            return f"DPMSolverMultistepScheduler with solver_type={cfg.solver_type!r}"
        if cfg.variance_type is not None:
            return f"DPMSolverMultistepScheduler with variance_type={cfg.variance_type!r}"
        return None

    def step_key(self, scheduler, t) -> tuple:
        """``("dpm", step index, order)``: the order diffusers picks for this step."""
        if scheduler.step_index is None:
            scheduler._init_step_index(t)
        k, cfg = scheduler.step_index, scheduler.config
        n = len(scheduler.timesteps)
        lower_order_final = (k == n - 1) and (
            cfg.euler_at_final or (cfg.lower_order_final and n < 15) or cfg.final_sigmas_type == "zero"
        )
        first = cfg.solver_order == 1 or scheduler.lower_order_nums < 1 or lower_order_final
        return (self.tag, k, 1 if first else 2)

    def coefficients(self, scheduler, key: tuple) -> Tuple[StepForm, Coefficients]:
        s, k, order = scheduler, key[1], key[2]
        v = self.v_prediction(s)
        alpha_s0, sigma_s0, lambda_s0 = _alpha_sigma_lambda(s, s.sigmas[k])
        alpha_t, sigma_t, lambda_t = _alpha_sigma_lambda(s, s.sigmas[k + 1])
        h = lambda_t - lambda_s0
        c2 = sigma_t / sigma_s0
        c3 = alpha_t * (torch.exp(-h) - 1.0)
        if order == 1:
            form = StepForm.MULTISTEP_1_V if v else StepForm.MULTISTEP_1
            return form, (as_float(sigma_s0), as_float(alpha_s0), as_float(c2), as_float(c3), 0.0, 0.0)
        _, _, lambda_s1 = _alpha_sigma_lambda(s, s.sigmas[k - 1])
        h_0 = lambda_s0 - lambda_s1
        r0 = h_0 / h
        c4 = 1.0 / r0
        if s.config.solver_type == "midpoint":
            c5 = 0.5 * (alpha_t * (torch.exp(-h) - 1.0))
        else:  # heun: "+ k * D1" is "- (-k) * D1" exactly
            c5 = -(alpha_t * ((torch.exp(-h) - 1.0) / h + 1.0))
        form = StepForm.MULTISTEP_2_V if v else StepForm.MULTISTEP_2
        return form, (as_float(sigma_s0), as_float(alpha_s0), as_float(c2), as_float(c3), as_float(c4), as_float(c5))

    def previous_x0(self, scheduler, key: tuple) -> Optional[torch.Tensor]:
        return scheduler.model_outputs[-1] if key[2] == 2 else None

    def advance(self, scheduler, x0: Optional[torch.Tensor]) -> None:
        """Shift ``model_outputs`` (x0 of the last steps), count ``lower_order_nums``, step on."""
        order = scheduler.config.solver_order
        for i in range(order - 1):
            scheduler.model_outputs[i] = scheduler.model_outputs[i + 1]
        scheduler.model_outputs[-1] = x0
        if scheduler.lower_order_nums < order:
            scheduler.lower_order_nums += 1
        scheduler._step_index += 1


__all__ = ["DpmSolverRule"]
