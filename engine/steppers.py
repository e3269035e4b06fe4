"""Steppers: how the loop turns UNet output into the next latents.

- :class:`ReferenceStepper`: the torch CFG combine, then diffusers' own ``scheduler.step``.
- :class:`FusedStepper`: one ``guide_and_step`` kernel call per step. The host reads the
  scheduler's state (``alphas_cumprod``, ``sigmas``, ``step_index``, ``model_outputs``,
  ``lower_order_nums``) and computes the per-image coefficients of the update exactly as the
  scheduler's ``step`` would (:mod:`cfgswitch.step_coefficients`), then advances that state as
  ``step`` does, so the same scheduler object can go on with ``scheduler.step`` at any point.

Covered: ``DDIMScheduler`` (eta 0), ``EulerDiscreteScheduler`` (s_churn 0) and
``DPMSolverMultistepScheduler`` (``dpmsolver++``, order 1 or 2, midpoint or heun), each with
epsilon prediction and no clipping or thresholding. Any other scheduler runs the reference.
"""

from __future__ import annotations

import copy
import inspect
import json
import logging
import os
from collections import OrderedDict
from typing import Dict, List, Optional, Tuple

import torch

from .errors import BackendUnavailableError, InvalidArgumentError
from .kernels_bridge import cfg_combine, compiled_available, guide_and_step, guide_and_step_reference
from .step_coefficients import advance_state, coefficients, fused_support, previous_x0, step_key

logger = logging.getLogger(__name__)

#: Values of ``LoopRequest.step_kernel`` and of the ``CFGSWITCH_STEP_KERNEL`` environment variable.
STEP_KERNEL_CHOICES = ("auto", "fused", "reference")


def cosine_per_image(uncond: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of each image's two predictions, in float32 (shape ``[B]``)."""
    u = uncond.reshape(uncond.shape[0], -1).float()
    c = cond.reshape(cond.shape[0], -1).float()
    return torch.nn.functional.cosine_similarity(u, c, dim=1)


def step_kwargs(scheduler, generators: List[torch.Generator]) -> Dict[str, object]:
    """Keyword arguments of ``scheduler.step`` for this loop: per-image generators, ``eta=0``."""
    params = set(inspect.signature(scheduler.step).parameters)
    kwargs: Dict[str, object] = {}
    if "generator" in params:
        kwargs["generator"] = generators
    if "eta" in params:
        kwargs["eta"] = 0.0
    return kwargs


class ReferenceStepper:
    """The torch combine and diffusers' ``scheduler.step`` (the loop's reference behaviour).

    Args:
        scheduler: a diffusers scheduler after ``set_timesteps``.
        weights (`torch.Tensor` of shape `[B]`): per-image guidance weights.
        generators (`list[torch.Generator]`): per-image generators for stochastic schedulers.
    """

    kernel = "reference"

    def __init__(self, scheduler, weights: torch.Tensor, generators: List[torch.Generator]) -> None:
        self.scheduler = scheduler
        self.weights = weights
        self.step_kwargs = step_kwargs(scheduler, generators)

    def step(self, eps: torch.Tensor, t: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """Next latents from one prediction per image (already guided, or late)."""
        return self.scheduler.step(eps, t, latents, **self.step_kwargs, return_dict=False)[0]

    def guide_and_step(
        self, pair: torch.Tensor, t: torch.Tensor, latents: torch.Tensor, want_cosine: bool = False
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Next latents (and cosines) from the ``[uncond; cond]`` rows of a guided step."""
        u, c = pair.chunk(2)
        eps = cfg_combine(u, c, self.weights)
        cos = cosine_per_image(u, c) if want_cosine else None
        return self.step(eps, t, latents), cos


# (schedule, step key, guided, weights, device) -> [B, 8] params; bounded, shared by all steppers,
# so repeated calls with one schedule compute no coefficient twice.
_PARAMS_CACHE: "OrderedDict[tuple, torch.Tensor]" = OrderedDict()
_PARAMS_CACHE_SIZE = 4096


def schedule_key(scheduler) -> str:
    """A string naming a scheduler's class, config and timesteps (what fixes every coefficient)."""
    cfg = {k: v for k, v in dict(scheduler.config).items() if not k.startswith("_")}
    steps = [float(t) for t in scheduler.timesteps]
    return json.dumps([type(scheduler).__name__, cfg, steps], sort_keys=True, default=str)


class FusedStepper:
    """One compiled ``guide_and_step`` call per step, with the scheduler's state kept in step.

    Args:
        scheduler: a covered diffusers scheduler after ``set_timesteps`` (see :func:`fused_support`).
        weights (`torch.Tensor` of shape `[B]`): per-image guidance weights.
        device (`torch.device`): where latents live.
        impl (`str`, defaults to ``"compiled"``): ``compiled`` or ``reference`` (the torch oracle
            of the kernel, for tests).
        schedule (`str`, optional): :func:`schedule_key` of ``scheduler``, when already known.
    """

    kernel = "fused"

    def __init__(
        self, scheduler, weights: torch.Tensor, device: torch.device, impl: str = "compiled", schedule: Optional[str] = None
    ) -> None:
        self.scheduler = scheduler
        self.device = torch.device(device)
        self.impl = impl
        self.batch = int(weights.shape[0])
        self._weights = tuple(float(w) for w in weights.detach().to("cpu", torch.float32))
        self._schedule = schedule if schedule is not None else schedule_key(scheduler)
        self._multistep = hasattr(scheduler, "model_outputs")
        self._rows: Dict[Tuple[int, bool], torch.Tensor] = {}
        # Inputs the kernel cannot take (another dtype or device than the latents) go through
        # scheduler.step, which keeps the scheduler's state as the fused steps do.
        self._fallback = ReferenceStepper(scheduler, weights, [])
        self._served: Dict[tuple, bool] = {}

    def _kernel_serves(self, latents: torch.Tensor) -> bool:
        if self.impl != "compiled":
            return True
        key = (latents.device, latents.dtype)
        if key not in self._served:
            self._served[key] = compiled_available(latents.device, latents.dtype)
        return self._served[key]

    def _rows_for(self, form: int, guided: bool) -> torch.Tensor:
        key = (form, guided)
        if key not in self._rows:
            b = self.batch
            rows = torch.zeros((b, 4), dtype=torch.int32)
            rows[:, 0] = torch.arange(b, dtype=torch.int32)
            rows[:, 1] = torch.arange(b, 2 * b, dtype=torch.int32) if guided else -1
            rows[:, 2] = form
            self._rows[key] = rows.to(self.device)
        return self._rows[key]

    def _params_for(self, key: tuple, guided: bool) -> Tuple[int, torch.Tensor]:
        full = (self._schedule, key, guided, self._weights if guided else self.batch, str(self.device))
        hit = _PARAMS_CACHE.get(full)
        if hit is None:
            form, coeffs = coefficients(self.scheduler, key)
            params = torch.zeros((self.batch, 8), dtype=torch.float32)
            if guided:
                params[:, 0] = torch.tensor(self._weights, dtype=torch.float32)
            params[:, 1:7] = torch.tensor(coeffs, dtype=torch.float32)
            hit = (int(form), params.to(self.device))
            _PARAMS_CACHE[full] = hit
            if len(_PARAMS_CACHE) > _PARAMS_CACHE_SIZE:
                _PARAMS_CACHE.popitem(last=False)
        return hit

    def _run(self, pred: torch.Tensor, t, latents: torch.Tensor, guided: bool, want_cosine: bool):
        sch = self.scheduler
        key = step_key(sch, t)
        prev = previous_x0(sch, key)
        if (
            pred.dtype != latents.dtype
            or pred.device != latents.device
            or (prev is not None and (prev.dtype != latents.dtype or prev.device != latents.device))
            or not self._kernel_serves(latents)
        ):
            if guided:
                return self._fallback.guide_and_step(pred, t, latents, want_cosine)
            return self._fallback.step(pred, t, latents), None
        form, params = self._params_for(key, guided)
        rows = self._rows_for(form, guided)
        if self.impl == "compiled":
            result = guide_and_step(pred, latents, rows, params, prev, want_x0=self._multistep,
                                    want_cosine=want_cosine, impl="compiled", check_rows=False)
        else:
            result = _reference_op(pred, latents, rows, params, prev, want_x0=self._multistep, want_cosine=want_cosine)
        advance_state(sch, result.x0)
        return result.latents, result.cosine

    def step(self, eps: torch.Tensor, t: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """Next latents from one prediction per image (already guided, or late)."""
        return self._run(eps, t, latents, guided=False, want_cosine=False)[0]

    def guide_and_step(
        self, pair: torch.Tensor, t: torch.Tensor, latents: torch.Tensor, want_cosine: bool = False
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Next latents (and cosines) from the ``[uncond; cond]`` rows of a guided step, fused."""
        return self._run(pair, t, latents, guided=True, want_cosine=want_cosine)


def _reference_op(pred, sample, rows, params, prev, *, want_x0, want_cosine):
    from .kernels_bridge import GuideStepResult

    return GuideStepResult(*guide_and_step_reference(pred, sample, rows, params, prev, want_x0=want_x0,
                                                     want_cosine=want_cosine))


# ------------------------------------------------------------------------------ self-check
_PROBED: Dict[str, bool] = {}


def coefficients_agree(scheduler, rtol: float = 1e-5, key: Optional[str] = None) -> bool:
    """Whether fused stepping reproduces ``scheduler.step`` on this exact schedule.

    A fresh copy of ``scheduler`` (right after ``set_timesteps``) runs every step twice on small
    random latents, once with ``scheduler.step`` and once with the coefficients this module
    extracts (through the torch oracle of the kernel). It guards against a diffusers release that
    changes a step's formula; the answer is cached per scheduler class, config and timesteps.
    """
    key = key if key is not None else schedule_key(scheduler)
    if key in _PROBED:
        return _PROBED[key]
    ref_s, fused_s = copy.deepcopy(scheduler), copy.deepcopy(scheduler)
    gen = torch.Generator("cpu").manual_seed(1234)
    shape = (1, 4, 2, 2)
    x_ref = torch.randn(shape, generator=gen) * float(ref_s.init_noise_sigma)
    x_fused = x_ref.clone()
    ref = ReferenceStepper(ref_s, torch.ones(1), [torch.Generator("cpu").manual_seed(0)])
    fused = FusedStepper(fused_s, torch.ones(1), torch.device("cpu"), impl="reference", schedule=key)
    ok = True
    try:
        for t in ref_s.timesteps.cpu():
            eps = torch.randn(shape, generator=gen)
            ref_s.scale_model_input(x_ref, t)  # as the loop calls it (Euler sets its step index here)
            fused_s.scale_model_input(x_fused, t)
            x_ref = ref.step(eps, t, x_ref)
            x_fused = fused.step(eps, t, x_fused)
            scale = float(x_ref.abs().max()) + 1.0
            if not torch.isfinite(x_fused).all() or float((x_ref - x_fused).abs().max()) > rtol * scale:
                ok = False
                break
    except Exception as e:  # noqa: BLE001 - any failure means "do not fuse"
        logger.warning("fused stepping self-check raised %s: %s", type(e).__name__, e)
        ok = False
    if not ok:
        logger.warning("fused stepping disagrees with %s.step on this schedule; using the reference", type(scheduler).__name__)
    _PROBED[key] = ok
    return ok


def make_stepper(
    scheduler,
    weights: torch.Tensor,
    generators: List[torch.Generator],
    device: torch.device,
    dtype: torch.dtype,
    step_kernel: str = "auto",
):
    """The fused stepper when the scheduler and the device allow it, else the reference.

    Args:
        scheduler: a diffusers scheduler after ``set_timesteps``.
        weights (`torch.Tensor` of shape `[B]`): per-image guidance weights.
        generators (`list[torch.Generator]`): per-image generators.
        device (`torch.device`), dtype (`torch.dtype`): where and in what latents live.
        step_kernel (`str`, defaults to ``"auto"``): ``auto`` (fused when possible; the
            ``CFGSWITCH_STEP_KERNEL`` environment variable may force either), ``fused`` (raise
            :class:`BackendUnavailableError` when impossible) or ``reference``.
    """
    if step_kernel not in STEP_KERNEL_CHOICES:
        raise InvalidArgumentError("step_kernel", " or ".join(map(repr, STEP_KERNEL_CHOICES)), step_kernel)
    if step_kernel == "auto":
        env = os.environ.get("CFGSWITCH_STEP_KERNEL", "auto").strip().lower() or "auto"
        if env not in STEP_KERNEL_CHOICES:
            raise InvalidArgumentError("CFGSWITCH_STEP_KERNEL", " or ".join(map(repr, STEP_KERNEL_CHOICES)), env)
        step_kernel = env
    if step_kernel == "reference":
        return ReferenceStepper(scheduler, weights, generators)
    reason = fused_support(scheduler)
    if reason is None and not compiled_available(device, dtype):
        reason = f"no compiled guide_and_step kernel for {str(dtype).replace('torch.', '')} on {torch.device(device).type}"
    schedule = schedule_key(scheduler) if reason is None else None
    if reason is None and not coefficients_agree(scheduler, key=schedule):
        reason = f"the installed diffusers' {type(scheduler).__name__}.step no longer matches the fused coefficients"
    if reason is None:
        return FusedStepper(scheduler, weights, device, schedule=schedule)
    if step_kernel == "fused":
        raise BackendUnavailableError(f"step_kernel: the fused op cannot run here: {reason}")
    logger.debug("reference stepping: %s", reason)
    return ReferenceStepper(scheduler, weights, generators)


__all__ = [
    "FusedStepper",
    "ReferenceStepper",
    "STEP_KERNEL_CHOICES",
    "coefficients_agree",
    "cosine_per_image",
    "make_stepper",
    "schedule_key",
]
