"""Steppers: how the loop turns UNet output into the next latents.

- :class:`ReferenceStepper`: the torch CFG combine, then diffusers' own ``scheduler.step``.
- :class:`FusedStepper`: one ``guide_and_step`` kernel call per step. The host reads the
  scheduler's state (``alphas_cumprod``, ``sigmas``, ``step_index``, ``model_outputs``,
  ``lower_order_nums``) and computes the per-image coefficients of the update exactly as the
  scheduler's ``step`` would (:mod:`cfgswitch.step_coefficients`), then advances that state as
  ``step`` does, so the same scheduler object can go on with ``scheduler.step`` at any point.

Covered: ``DDIMScheduler`` (eta 0), ``EulerDiscreteScheduler`` (s_churn 0) and
``DPMSolverMultistepScheduler`` (``dpmsolver++``, order 1 or 2, midpoint or heun), each with
epsilon or v-prediction (converted per row) and no clipping or thresholding. Any other
scheduler runs the reference.

Both steppers also take rows that mix guided and one-prediction images (:meth:`step_rows`):
adaptive plans switch per image, and the step engine shares one fused call among requests
(:meth:`FusedStepper.prepare` and :meth:`FusedStepper.finish`).
"""

from __future__ import annotations

import copy
import inspect
import json
import logging
import os
from collections import OrderedDict
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch

from .errors import BackendUnavailableError, InvalidArgumentError
from .kernels_bridge import (
    cfg_combine,
    compiled_available,
    guide_and_step,
    guide_and_step_reference,
    rescale_noise_cfg_reference,
)
from .step_coefficients import advance_state, coefficients, fused_support, previous_x0, step_key

logger = logging.getLogger(__name__)

#: Values of ``LoopRequest.step_kernel`` and of the ``CFGSWITCH_STEP_KERNEL`` environment variable.
STEP_KERNEL_CHOICES = ("auto", "fused", "reference")


def cosine_per_image(uncond: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of each image's two predictions, in float32 (shape ``[B]``)."""
    u = uncond.reshape(uncond.shape[0], -1).float()
    c = cond.reshape(cond.shape[0], -1).float()
    return torch.nn.functional.cosine_similarity(u, c, dim=1)


def combine_rows(
    pred: torch.Tensor, rows_a: Sequence[int], rows_b: Sequence[int], weights: torch.Tensor, want_cosine: bool = False,
    guidance_rescale: float = 0.0,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Per-image predictions from mixed rows: ``u + w (c - u)`` where ``rows_b >= 0``, else row ``rows_a``.

    All guided with diffusers' layout gives exactly ``cfg_combine(*pred.chunk(2), weights)``;
    ``guidance_rescale > 0`` then applies diffusers' ``rescale_noise_cfg`` to the guided images.
    Returns the predictions ``[B, ...]`` and, when asked, the cosines (NaN where one prediction).
    """
    guided = [b >= 0 for b in rows_b]
    index_a = torch.tensor(list(rows_a), dtype=torch.long, device=pred.device)
    first = pred.index_select(0, index_a)
    if not any(guided):
        cos = torch.full((len(rows_a),), float("nan"), device=pred.device) if want_cosine else None
        return first, cos
    index_b = torch.tensor([b if b >= 0 else a for a, b in zip(rows_a, rows_b)], dtype=torch.long, device=pred.device)
    second = pred.index_select(0, index_b)
    combined = cfg_combine(first, second, weights)
    if guidance_rescale > 0:
        combined = rescale_noise_cfg_reference(combined, second, guidance_rescale)
    if all(guided):
        eps = combined
    else:
        mask = torch.tensor(guided, device=pred.device).reshape((-1,) + (1,) * (pred.dim() - 1))
        eps = torch.where(mask, combined, first)
    cos = None
    if want_cosine:
        cos = cosine_per_image(first, second)
        cos = torch.where(torch.tensor(guided, device=cos.device), cos, torch.full_like(cos, float("nan")))
    return eps, cos


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

    def step_rows(
        self, pred: torch.Tensor, rows_a: Sequence[int], rows_b: Sequence[int], t: torch.Tensor, latents: torch.Tensor,
        want_cosine: bool = False, guidance_rescale: float = 0.0,
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Next latents (and cosines) from UNet rows that mix guided and one-prediction images.

        Args:
            pred (`torch.Tensor` of shape `[R, ...]`): the UNet output rows.
            rows_a (`list[int]`): per image, its first row (the uncond row of a guided image).
            rows_b (`list[int]`): per image, its cond row, or -1 for one prediction (late, or
                already guided).
            t, latents: the step's timestep and the current latents ``[B, ...]``.
            want_cosine (`bool`, defaults to False): also return the per-image cosine (NaN for
                one-prediction images).
            guidance_rescale (`float`, defaults to 0): diffusers' CFG rescale of guided images.
        """
        eps, cos = combine_rows(pred, rows_a, rows_b, self.weights, want_cosine, guidance_rescale)
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

    def prepare(self, t, latents: torch.Tensor, pred: torch.Tensor) -> Optional["FusedPart"]:
        """This stepper's share of a fused call over several requests, or ``None`` to step alone.

        Reads (and on DPM-Solver's first step initialises) the scheduler's step index; changes
        nothing else. After the shared call, :meth:`finish` must be given the part's x0.
        """
        sch = self.scheduler
        key = step_key(sch, t)
        prev = previous_x0(sch, key)
        if (
            self.impl != "compiled"
            or pred.dtype != latents.dtype
            or pred.device != latents.device
            or (prev is not None and (prev.dtype != latents.dtype or prev.device != latents.device))
            or not self._kernel_serves(latents)
        ):
            return None
        form, params = self._params_for(key, True)
        return FusedPart(form=form, params=params, prev=prev, multistep=self._multistep)

    def finish(self, x0: Optional[torch.Tensor]) -> None:
        """Advance the scheduler past a step taken by a shared fused call."""
        advance_state(self.scheduler, x0)

    def step_rows(
        self, pred: torch.Tensor, rows_a: Sequence[int], rows_b: Sequence[int], t: torch.Tensor, latents: torch.Tensor,
        want_cosine: bool = False, guidance_rescale: float = 0.0,
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """As :meth:`ReferenceStepper.step_rows`, in one ``guide_and_step`` call."""
        part = self.prepare(t, latents, pred)
        if part is None:
            return self._fallback.step_rows(pred, rows_a, rows_b, t, latents, want_cosine, guidance_rescale)
        rows = torch.tensor([[int(a), int(b), int(part.form), 0] for a, b in zip(rows_a, rows_b)], dtype=torch.int32)
        result = guide_and_step(pred, latents, rows.to(self.device), part.params, part.prev, want_x0=part.multistep,
                                want_cosine=want_cosine, impl="compiled", check_rows=False,
                                guidance_rescale=guidance_rescale if guidance_rescale > 0 else None)
        self.finish(result.x0)
        return result.latents, result.cosine

    def guide_and_step(
        self, pair: torch.Tensor, t: torch.Tensor, latents: torch.Tensor, want_cosine: bool = False
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Next latents (and cosines) from the ``[uncond; cond]`` rows of a guided step, fused."""
        return self._run(pair, t, latents, guided=True, want_cosine=want_cosine)


class FusedPart(NamedTuple):
    """One request's share of a fused ``guide_and_step`` call (see :meth:`FusedStepper.prepare`)."""

    form: int  #: the update form of this step
    params: torch.Tensor  #: float32 ``[B, 8]``: weights and coefficients
    prev: Optional[torch.Tensor]  #: the previous x0 (second-order DPM-Solver++), else ``None``
    multistep: bool  #: whether the scheduler keeps x0 (the call must return it)


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
    "FusedPart",
    "FusedStepper",
    "combine_rows",
    "ReferenceStepper",
    "STEP_KERNEL_CHOICES",
    "coefficients_agree",
    "cosine_per_image",
    "make_stepper",
    "schedule_key",
]
