"""Per-step coefficients of the fused update, read from a diffusers scheduler's own state.

For each covered scheduler, :func:`coefficients` computes ``c0..c5`` of the ``guide_and_step``
update (``kernels/include/cfgswitch_kernels.h``) with the same torch float32 scalar expressions
that the scheduler's ``step`` evaluates, so the fused update rounds exactly as ``step`` does:

- ``DDIMScheduler.step`` (eta 0, DDIM paper eq. 12):
  ``x0 = (x - sqrt(1 - a_t) e) / sqrt(a_t)``; ``x' = sqrt(a_prev) x0 + sqrt(1 - a_prev) e``.
- ``EulerDiscreteScheduler.step`` (s_churn 0, Karras et al. 2022 Alg. 2 without churn):
  ``x0 = x - sigma e``; ``x' = x + ((x - x0) / sigma) (sigma_next - sigma)``.
- ``DPMSolverMultistepScheduler.step`` (dpmsolver++, Lu et al. 2022 eqs. 5-6):
  ``x0 = (x - sigma_s e) / alpha_s``; first order ``x' = (sigma_t / sigma_s) x - alpha_t (e^-h - 1) x0``;
  second order adds ``- 0.5 alpha_t (e^-h - 1) D1`` (midpoint) or ``+ alpha_t ((e^-h - 1) / h + 1) D1``
  (heun), ``D1 = (1 / r0) (x0 - x0_prev)``; first order on the first step and, as diffusers decides
  it (``lower_order_final``, ``euler_at_final``, ``final_sigmas_type="zero"``), on the last.

:func:`advance_state` then moves the scheduler on as ``step`` does (``step_index``,
``model_outputs``, ``lower_order_nums``), so ``scheduler.step`` can take over at any step.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .kernels_bridge import StepForm

Coefficients = Tuple[float, float, float, float, float, float]


def fused_support(scheduler) -> Optional[str]:
    """``None`` when the fused update covers ``scheduler``, else the reason it does not."""
    import diffusers

    name = type(scheduler).__name__
    cfg = scheduler.config
    if name not in ("DDIMScheduler", "EulerDiscreteScheduler", "DPMSolverMultistepScheduler") or type(
        scheduler
    ) is not getattr(diffusers, name):
        return f"{name} has no fused update (covered: ddim, euler, dpmpp_2m)"
    if cfg.prediction_type != "epsilon":
        return f"{name} with prediction_type={cfg.prediction_type!r} (only 'epsilon' is fused)"
    if getattr(cfg, "thresholding", False) or getattr(cfg, "clip_sample", False):
        return f"{name} with thresholding or clip_sample"
    if name == "DPMSolverMultistepScheduler":
        if cfg.algorithm_type != "dpmsolver++":
            return f"DPMSolverMultistepScheduler with algorithm_type={cfg.algorithm_type!r} (only 'dpmsolver++')"
        if cfg.solver_order not in (1, 2):
            return f"DPMSolverMultistepScheduler with solver_order={cfg.solver_order} (only 1 or 2)"
        if cfg.solver_type not in ("midpoint", "heun"):
            return f"DPMSolverMultistepScheduler with solver_type={cfg.solver_type!r}"
        if cfg.variance_type is not None:
            return f"DPMSolverMultistepScheduler with variance_type={cfg.variance_type!r}"
    return None


def _f(x: torch.Tensor) -> float:
    return float(x)


def step_key(scheduler, t) -> tuple:
    """A hashable name of the update the step at timestep ``t`` takes, within its schedule.

    Initialises ``step_index`` as ``step`` would when it is still unset; changes nothing else.
    For DPM-Solver++ the key records the order diffusers picks for this step.
    """
    name = type(scheduler).__name__
    if name == "DDIMScheduler":
        return ("ddim", int(t))
    if scheduler.step_index is None:
        scheduler._init_step_index(t)
    k = scheduler.step_index
    if name == "EulerDiscreteScheduler":
        return ("euler", k)
    if name == "DPMSolverMultistepScheduler":
        cfg = scheduler.config
        n = len(scheduler.timesteps)
        lower_order_final = (k == n - 1) and (
            cfg.euler_at_final or (cfg.lower_order_final and n < 15) or cfg.final_sigmas_type == "zero"
        )
        first = cfg.solver_order == 1 or scheduler.lower_order_nums < 1 or lower_order_final
        return ("dpm", k, 1 if first else 2)
    raise ValueError(f"scheduler: expected one of DDIMScheduler, EulerDiscreteScheduler, DPMSolverMultistepScheduler, got {name}")


def _ddim(s, timestep: int) -> Tuple[StepForm, Coefficients]:
    prev_timestep = timestep - s.config.num_train_timesteps // s.num_inference_steps
    alpha_prod_t = s.alphas_cumprod[timestep]
    alpha_prod_t_prev = s.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else s.final_alpha_cumprod
    beta_prod_t = 1 - alpha_prod_t
    c0 = beta_prod_t ** (0.5)
    c1 = alpha_prod_t ** (0.5)
    c2 = alpha_prod_t_prev ** (0.5)
    c3 = (1 - alpha_prod_t_prev) ** (0.5)  # eta = 0: std_dev_t = 0, and x - 0 is exact
    return StepForm.DDIM, (_f(c0), _f(c1), _f(c2), _f(c3), 0.0, 0.0)


def _euler(s, k: int) -> Tuple[StepForm, Coefficients]:
    sigma = s.sigmas[k]
    sigma_hat = sigma * (0.0 + 1)  # gamma = 0 without churn
    dt = s.sigmas[k + 1] - sigma_hat
    return StepForm.EULER, (_f(sigma_hat), 1.0, _f(sigma_hat), _f(dt), 0.0, 0.0)


def _lambda(s, sigma: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    alpha, sig = s._sigma_to_alpha_sigma_t(sigma)
    return alpha, sig, torch.log(alpha) - torch.log(sig)


def _dpm(s, k: int, order: int) -> Tuple[StepForm, Coefficients]:
    alpha_s0, sigma_s0, lambda_s0 = _lambda(s, s.sigmas[k])
    alpha_t, sigma_t, lambda_t = _lambda(s, s.sigmas[k + 1])
    h = lambda_t - lambda_s0
    c2 = sigma_t / sigma_s0
    c3 = alpha_t * (torch.exp(-h) - 1.0)
    if order == 1:
        return StepForm.MULTISTEP_1, (_f(sigma_s0), _f(alpha_s0), _f(c2), _f(c3), 0.0, 0.0)
    _, _, lambda_s1 = _lambda(s, s.sigmas[k - 1])
    h_0 = lambda_s0 - lambda_s1
    r0 = h_0 / h
    c4 = 1.0 / r0
    if s.config.solver_type == "midpoint":
        c5 = 0.5 * (alpha_t * (torch.exp(-h) - 1.0))
    else:  # heun: "+ k * D1" is "- (-k) * D1" exactly
        c5 = -(alpha_t * ((torch.exp(-h) - 1.0) / h + 1.0))
    return StepForm.MULTISTEP_2, (_f(sigma_s0), _f(alpha_s0), _f(c2), _f(c3), _f(c4), _f(c5))


def coefficients(scheduler, key: tuple) -> Tuple[StepForm, Coefficients]:
    """The update form and ``c0..c5`` of the step :func:`step_key` named ``key``."""
    if key[0] == "ddim":
        return _ddim(scheduler, key[1])
    if key[0] == "euler":
        return _euler(scheduler, key[1])
    return _dpm(scheduler, key[1], key[2])


def previous_x0(scheduler, key: tuple) -> Optional[torch.Tensor]:
    """The previous step's x0 that a second-order step needs (``None`` for the others)."""
    return scheduler.model_outputs[-1] if key[0] == "dpm" and key[2] == 2 else None


def advance_state(scheduler, x0: Optional[torch.Tensor]) -> None:
    """Move the scheduler's state past the step just taken, as its ``step`` does.

    Args:
        scheduler: the scheduler :func:`coefficients` was called on for this step.
        x0 (`torch.Tensor`, optional): the step's predicted x0 (multistep schedulers keep it).
    """
    name = type(scheduler).__name__
    if name == "DDIMScheduler":
        return
    if name == "DPMSolverMultistepScheduler":
        order = scheduler.config.solver_order
        for i in range(order - 1):
            scheduler.model_outputs[i] = scheduler.model_outputs[i + 1]
        scheduler.model_outputs[-1] = x0
        if scheduler.lower_order_nums < order:
            scheduler.lower_order_nums += 1
    scheduler._step_index += 1


__all__ = ["advance_state", "coefficients", "fused_support", "previous_x0", "step_key"]
