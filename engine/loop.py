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

from .plans import GuidancePlan
from .runners.base import Runners
from .schedulers import make_scheduler, set_timesteps
from .steppers import cosine_per_image, make_stepper
from .timing import StageTimer


@dataclass
class LoopRequest:
    """What the loop needs, already validated.

    Attributes:
        cond, uncond (`torch.Tensor` of shape `[B, L, C]`): prompt and negative-prompt embeddings.
        steps (`int`): number of steps.
        guidance_scale (`float`): CFG weight.
        scheduler (`str`): scheduler name.
        plan (`GuidancePlan`): the guidance plan.
        seeds (`list[int]`): one seed per image.
        latent_shape (`tuple`): ``(C, h, w)`` of one image's latents.
        progress (`bool`): show a progress bar.
        step_kernel (`str`): ``auto`` (fused when available), ``fused`` or ``reference``.
    """

    cond: torch.Tensor
    uncond: torch.Tensor
    steps: int
    guidance_scale: float
    scheduler: str
    plan: GuidancePlan
    seeds: Sequence[int]
    latent_shape: Tuple[int, int, int]
    progress: bool = False
    step_kernel: str = "auto"


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


def denoise(runners: Runners, scheduler_config: Dict, req: LoopRequest, timer: StageTimer) -> LoopResult:
    """Run the switching loop from per-image noise to final latents."""
    from tqdm.auto import tqdm

    device, dtype = runners.device, runners.dtype
    batch = len(req.seeds)
    scheduler = make_scheduler(req.scheduler, scheduler_config)
    set_timesteps(scheduler, req.steps, device)
    generators = make_generators(req.seeds)
    latents = initial_latents(generators, req.latent_shape, device, dtype) * scheduler.init_noise_sigma

    both = torch.cat([req.uncond, req.cond])
    late_embeds = req.uncond if req.plan.late == "uncond" else req.cond
    weights = torch.full((batch,), req.guidance_scale, dtype=torch.float32, device=device)
    stepper = make_stepper(scheduler, weights, generators, device, dtype, req.step_kernel)
    static = req.plan.schedule(scheduler.timesteps)
    switched = False
    cfg_steps = late_steps = 0
    switch_step: Optional[int] = None
    cosines: List[Optional[List[float]]] = []

    loop_start = time.perf_counter()
    bar = tqdm(scheduler.timesteps, desc="denoising", disable=not req.progress, leave=False)
    for i, t in enumerate(bar):
        guided = static[i] and not switched
        with timer("scheduler"):
            x_in = scheduler.scale_model_input(latents, t)
            t_rows = t.to(device=device, dtype=torch.float32).expand(batch)
        if guided and req.plan.is_adaptive:
            # 2B plain rows: the stepper combines, steps and measures the cosine in one pass.
            with timer("unet_cfg"):
                pair = runners.unet.predict(torch.cat([x_in, x_in]), torch.cat([t_rows, t_rows]), both)
            with timer("scheduler"):
                latents, cos = stepper.guide_and_step(pair, t, latents, want_cosine=True)
                cosines.append(cos.tolist())
                if req.plan.should_switch(float(cos.min())):
                    switched = True
        else:
            if guided:
                with timer("unet_cfg"):
                    eps = runners.unet_cfg.predict_guided(x_in, t_rows, both, weights)
            else:
                with timer("unet_late"):
                    eps = runners.unet.predict(x_in, t_rows, late_embeds)
            cosines.append(None)
            with timer("scheduler"):
                latents = stepper.step(eps, t, latents)
        if guided:
            cfg_steps += 1
        else:
            late_steps += 1
            if switch_step is None:
                switch_step = i
    timer.add("loop", time.perf_counter() - loop_start)
    return LoopResult(
        latents=latents, cfg_steps=cfg_steps, late_steps=late_steps,
        unet_rows=2 * batch * cfg_steps + batch * late_steps, switch_step=switch_step,
        step_kernel=stepper.kernel, cosines=cosines,
    )


__all__ = ["LoopRequest", "LoopResult", "cosine_per_image", "denoise", "initial_latents", "make_generators"]
