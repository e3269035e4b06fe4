"""The fused rule of ``DDIMScheduler`` (eta 0; DDIM paper, Song et al. 2021, eq. 12).

epsilon: ``x0 = (x - sqrt(1 - a_t) e) / sqrt(a_t)``; v: ``x0 = sqrt(a_t) x - sqrt(1 - a_t) v`` and
``e = sqrt(a_t) v + sqrt(1 - a_t) x``; then ``x' = sqrt(a_prev) x0 + sqrt(1 - a_prev) e``.
``timestep_spacing`` and ``rescale_betas_zero_snr`` only change the timesteps and ``alphas_cumprod``
the coefficients are read from.
"""

from __future__ import annotations

from typing import Optional, Tuple

from ..kernels_bridge import StepForm
from .base import Coefficients, FusedRule, as_float


class DdimRule(FusedRule):
    """``DDIMScheduler.step`` with ``eta=0``, no clipping or thresholding."""

    class_name = "DDIMScheduler"
    scheduler_name = "ddim"
    tag = "ddim"

    def config_reason(self, cfg) -> Optional[str]:
        if cfg.thresholding or cfg.clip_sample:
            return "DDIMScheduler with thresholding or clip_sample"
        return None

    def step_key(self, scheduler, t) -> tuple:
        return (self.tag, int(t))

    def coefficients(self, scheduler, key: tuple) -> Tuple[StepForm, Coefficients]:
        s, timestep = scheduler, key[1]
        prev_timestep = timestep - s.config.num_train_timesteps // s.num_inference_steps
        alpha_prod_t = s.alphas_cumprod[timestep]
        alpha_prod_t_prev = s.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else s.final_alpha_cumprod
        beta_prod_t = 1 - alpha_prod_t
        c0 = beta_prod_t ** (0.5)
        c1 = alpha_prod_t ** (0.5)
        c2 = alpha_prod_t_prev ** (0.5)
        c3 = (1 - alpha_prod_t_prev) ** (0.5)  # eta = 0: std_dev_t = 0, and x - 0 is exact
        form = StepForm.DDIM_V if self.v_prediction(s) else StepForm.DDIM
        return form, (as_float(c0), as_float(c1), as_float(c2), as_float(c3), 0.0, 0.0)

    def advance(self, scheduler, x0) -> None:
        """DDIM keeps no state between steps."""


__all__ = ["DdimRule"]
