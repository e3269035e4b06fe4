"""The denoising loop: one UNet call per step, CFG or late as the plan says.

It switches runners at the switch step with no reallocation; it never branches
on the backend. Scheduler updates are diffusers' own ``scheduler.step``.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .kernels_bridge import cfg_combine
from .plans import GuidancePlan
from .runners.base import Runners
from .schedulers import make_scheduler, set_timesteps
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


def cosine_per_image(uncond: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of each image's two predictions, in float32 (shape ``[B]``)."""
    u = uncond.reshape(uncond.shape[0], -1).float()
    c = cond.reshape(cond.shape[0], -1).float()
    return torch.nn.functional.cosine_similarity(u, c, dim=1)


def _step_kwargs(scheduler, generators: List[torch.Generator]) -> Dict[str, object]:
    params = set(inspect.signature(scheduler.step).parameters)
    kwargs: Dict[str, object] = {}
    if "generator" in params:
        kwargs["generator"] = generators
    if "eta" in params:
        kwargs["eta"] = 0.0
    return kwargs


def denoise(runners: Runners, scheduler_config: Dict, req: LoopRequest, timer: StageTimer) -> LoopResult:
    """Run the switching loop from per-image noise to final latents."""
    from tqdm.auto import tqdm

    device, dtype = runners.device, runners.dtype
    batch = len(req.seeds)
    scheduler = make_scheduler(req.scheduler, scheduler_config)
    set_timesteps(scheduler, req.steps, device)
    generators = make_generators(req.seeds)
    latents = initial_latents(generators, req.latent_shape, device, dtype) * scheduler.init_noise_sigma
    step_kwargs = _step_kwargs(scheduler, generators)

    both = torch.cat([req.uncond, req.cond])
    late_embeds = req.uncond if req.plan.late == "uncond" else req.cond
    weights = torch.full((batch,), req.guidance_scale, dtype=torch.float32, device=device)
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
            with timer("unet_cfg"):
                pair = runners.unet.predict(torch.cat([x_in, x_in]), torch.cat([t_rows, t_rows]), both)
            with timer("scheduler"):
                u, c = pair.chunk(2)
                eps = cfg_combine(u, c, weights)
                cos = cosine_per_image(u, c)
                cosines.append(cos.tolist())
                if req.plan.should_switch(float(cos.min())):
                    switched = True
        elif guided:
            with timer("unet_cfg"):
                eps = runners.unet_cfg.predict_guided(x_in, t_rows, both, weights)
            cosines.append(None)
        else:
            with timer("unet_late"):
                eps = runners.unet.predict(x_in, t_rows, late_embeds)
            cosines.append(None)
        if guided:
            cfg_steps += 1
        else:
            late_steps += 1
            if switch_step is None:
                switch_step = i
        with timer("scheduler"):
            latents = scheduler.step(eps, t, latents, **step_kwargs, return_dict=False)[0]
    timer.add("loop", time.perf_counter() - loop_start)
    return LoopResult(
        latents=latents, cfg_steps=cfg_steps, late_steps=late_steps,
        unet_rows=2 * batch * cfg_steps + batch * late_steps, switch_step=switch_step,
        step_kernel="reference", cosines=cosines,
    )
