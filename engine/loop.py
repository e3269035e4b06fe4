"""The denoising loop: one UNet call per step, CFG or late as the plan says.

It switches runners at the switch step with no reallocation; it never branches
on the backend. The update after each UNet call is a stepper's (:mod:`cfgswitch.steppers`):
the fused ``guide_and_step`` kernel when it serves the scheduler, device and dtype, else
diffusers' own ``scheduler.step`` after the torch combine (the reference).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .conditioning import TEXT, Conditioning
from .errors import InvalidArgumentError
from .kernels_bridge import rows_for_modes
from .plans import GuidancePlan
from .runners.base import Runners
from .schedulers import make_scheduler, set_timesteps
from .steppers import cosine_per_image, make_stepper
from .timing import StageTimer


@dataclass
class LoopRequest:
    """What the loop needs, already validated.

    Attributes:
        conditioning (`Conditioning`): uncond and cond tensors of the B images (or give ``cond``
            and ``uncond`` embeddings ``[B, L, C]`` and it is built from them).
        steps (`int`): number of steps.
        guidance_scale (`float`): CFG weight.
        scheduler (`str`): scheduler name.
        plan (`GuidancePlan`): the guidance plan.
        seeds (`list[int]`): one seed per image.
        latent_shape (`tuple`): ``(C, h, w)`` of one image's latents.
        progress (`bool`): show a progress bar.
        step_kernel (`str`): ``auto`` (fused when available), ``fused`` or ``reference``.
        guidance_rescale (`float`): diffusers' CFG rescale ``phi`` (0: none).
    """

    conditioning: Optional[Conditioning] = None
    steps: int = 30
    guidance_scale: float = 7.5
    scheduler: str = "ddim"
    plan: GuidancePlan = GuidancePlan.always()
    seeds: Sequence[int] = ()
    latent_shape: Tuple[int, int, int] = (4, 8, 8)
    progress: bool = False
    step_kernel: str = "auto"
    cond: Optional[torch.Tensor] = None
    uncond: Optional[torch.Tensor] = None
    guidance_rescale: float = 0.0

    def __post_init__(self) -> None:
        if self.conditioning is None:
            if self.cond is None or self.uncond is None:
                raise InvalidArgumentError("LoopRequest", "conditioning, or both cond and uncond", None)
            self.conditioning = Conditioning.from_text(self.uncond, self.cond)


@dataclass
class LoopResult:
    """Final latents and the accounting of the loop."""

    latents: torch.Tensor
    cfg_steps: int
    late_steps: int
    unet_rows: int
    switch_step: Optional[int]
    step_kernel: str
    cosines: List[Optional[List[float]]]


def make_generators(seeds: Sequence[int]) -> List[torch.Generator]:
    """One CPU generator per image, so an image does not change with its batch."""
    return [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]


def initial_latents(generators: List[torch.Generator], shape: Tuple[int, int, int], device, dtype) -> torch.Tensor:
    """Standard normal latents, row i drawn from generator i (as diffusers' ``randn_tensor``)."""
    rows = [torch.randn((1,) + tuple(shape), generator=g, dtype=dtype) for g in generators]
    return torch.cat(rows).to(device)


def plan_may_switch(plan: GuidancePlan, cosine: float, step: int, steps: int) -> bool:
    """Whether an adaptive ``plan`` ends CFG for an image whose cosine at ``step`` of ``steps`` is ``cosine``."""
    try:
        return bool(plan.should_switch(cosine, step, steps))
    except TypeError:  # a plan without a minimum share of CFG steps
        return bool(plan.should_switch(cosine))


def adaptive_rows(guided: Sequence[bool], late_mode: str) -> Tuple[List[Tuple[int, str]], List[int], List[int]]:
    """The row picks of one request's step where images may differ in mode.

    Rows are laid out as :func:`cfgswitch.kernels.guide_step.rows_for_modes` says: the first row of
    every image in image order (the uncond row of a guided image, the ``late_mode`` row of the
    others), then the cond rows of the guided images. Returns ``(picks, rows_a, rows_b)``.
    """
    rows_a, rows_b, _ = rows_for_modes(list(guided))
    picks = [(b, "uncond" if g else late_mode) for b, g in enumerate(guided)]
    picks += [(b, "cond") for b, g in enumerate(guided) if g]
    return picks, rows_a, rows_b


def denoise(runners: Runners, scheduler_config: Dict, req: LoopRequest, timer: StageTimer) -> LoopResult:
    """Run the switching loop from per-image noise to final latents.

    Every image follows its own plan: an adaptive plan ends CFG per image, when that image's
    cosine passes the threshold, so an image never depends on the others in its batch.
    """
    from tqdm.auto import tqdm

    device, dtype = runners.device, runners.dtype
    batch = len(req.seeds)
    conditioning = req.conditioning
    scheduler = make_scheduler(req.scheduler, scheduler_config)
    set_timesteps(scheduler, req.steps, device)
    generators = make_generators(req.seeds)
    latents = initial_latents(generators, req.latent_shape, device, dtype) * scheduler.init_noise_sigma

    both, late = conditioning.both(), conditioning.late(req.plan.late)
    text, late_embeds = both.pop(TEXT), late.pop(TEXT)
    # a family's added conditioning (SDXL): passed to the runners only when there is some
    added_both = {"added": both} if both else {}
    added_late = {"added": late} if late else {}
    weights = torch.full((batch,), req.guidance_scale, dtype=torch.float32, device=device)
    stepper = make_stepper(scheduler, weights, generators, device, dtype, req.step_kernel)
    static = req.plan.schedule(scheduler.timesteps)
    n_steps = len(static)
    switched = [False] * batch  # adaptive plans: images whose CFG has ended
    counts = StepCounts(batch)
    cosines: List[Optional[List[Optional[float]]]] = []
    predict_pair = getattr(runners.unet_cfg, "predict_pair", None)

    loop_start = time.perf_counter()
    bar = tqdm(scheduler.timesteps, desc="denoising", disable=not req.progress, leave=False)
    for i, t in enumerate(bar):
        guided = [static[i] and not s for s in switched]
        with timer("scheduler"):
            x_in = scheduler.scale_model_input(latents, t)
            t_rows = t.to(device=device, dtype=torch.float32).expand(batch)
        # the pair path: both predictions reach the stepper (adaptive cosines, CFG rescale)
        if (req.plan.is_adaptive or req.guidance_rescale > 0) and any(guided):
            if all(guided):  # the CFG role's 2B rows; the stepper combines, steps and measures
                with timer("unet_cfg"):
                    if predict_pair is not None:
                        pred = predict_pair(x_in, t_rows, text, **added_both)
                    else:
                        pred = runners.unet.predict(torch.cat([x_in, x_in]), torch.cat([t_rows, t_rows]), text,
                                                    **added_both)
                rows_a, rows_b = list(range(batch)), list(range(batch, 2 * batch))
            else:  # some images switched already: one plain call over the mixed rows
                picks, rows_a, rows_b = adaptive_rows(guided, req.plan.late)
                index = torch.tensor([b for b, _ in picks], dtype=torch.long, device=x_in.device)
                rows = conditioning.rows(picks)
                rows_text = rows.pop(TEXT)
                with timer("unet_cfg"):
                    pred = runners.unet.predict(x_in.index_select(0, index), t_rows.index_select(0, index.to(t_rows.device)),
                                                rows_text, **({"added": rows} if rows else {}))
            with timer("scheduler"):
                latents, cos = stepper.step_rows(pred, rows_a, rows_b, t, latents, want_cosine=req.plan.is_adaptive,
                                                 guidance_rescale=req.guidance_rescale)
                if req.plan.is_adaptive:
                    values = [float(c) for c in cos.tolist()]
                    cosines.append([v if g else None for v, g in zip(values, guided)])
                    for b, g in enumerate(guided):
                        if g and plan_may_switch(req.plan, values[b], i, n_steps):
                            switched[b] = True
                else:
                    cosines.append(None)
        else:
            if any(guided):
                with timer("unet_cfg"):
                    eps = runners.unet_cfg.predict_guided(x_in, t_rows, text, weights, **added_both)
            else:
                with timer("unet_late"):
                    eps = runners.unet.predict(x_in, t_rows, late_embeds, **added_late)
            cosines.append(None)
            with timer("scheduler"):
                latents = stepper.step(eps, t, latents)
        counts.add(i, guided)
    timer.add("loop", time.perf_counter() - loop_start)
    return LoopResult(
        latents=latents, cfg_steps=counts.cfg_steps, late_steps=counts.late_steps, unet_rows=counts.unet_rows,
        switch_step=counts.switch_step, step_kernel=stepper.kernel, cosines=cosines,
    )


class StepCounts:
    """The accounting of one request's steps, image by image.

    - ``cfg_steps``: steps in which at least one image ran guided; ``late_steps`` the others;
    - ``unet_rows``: rows evaluated (2 per guided image and step, 1 per late one);
    - ``switch_step``: the first step after the last guided step, ``None`` when the last step
      ran guided (``always``) and 0 when no step did.
    """

    def __init__(self, batch: int) -> None:
        self.batch = batch
        self.cfg_steps = 0
        self.late_steps = 0
        self.unet_rows = 0
        self.steps = 0
        self._last_guided: Optional[int] = None

    def add(self, step: int, guided: Sequence[bool]) -> None:
        """Count step ``step`` with each image's mode."""
        n_guided = sum(1 for g in guided if g)
        self.unet_rows += 2 * n_guided + (len(guided) - n_guided)
        if n_guided:
            self.cfg_steps += 1
            self._last_guided = step
        else:
            self.late_steps += 1
        self.steps = step + 1

    @property
    def switch_step(self) -> Optional[int]:
        """The first step after the last guided one (see the class docstring)."""
        if self._last_guided is None:
            return 0
        nxt = self._last_guided + 1
        return None if nxt >= self.steps else nxt


__all__ = ["LoopRequest", "LoopResult", "StepCounts", "adaptive_rows", "cosine_per_image", "denoise", "initial_latents",
           "make_generators", "plan_may_switch"]
