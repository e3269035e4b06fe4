"""The diffusers baseline: ``StableDiffusionPipeline`` on the very modules the sampler runs.

Always-CFG runs the pipeline as users do. Switch plans run it with a CFG-cutoff
``callback_on_step_end`` written for any batch size: diffusers' own
``SDCFGCutoffCallback`` keeps ``prompt_embeds[-1:]``, one row, which is right for
batch 1 only. Ours keeps ``prompt_embeds.chunk(2)[1]`` (the prompts, late mode ``cond``)
or ``[0]`` (the negative prompts, late mode ``uncond``) and sets the guidance scale
to 0 at the end of step ``k - 1``, so step ``k`` is the first late one.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Dict, List, Optional, Sequence

import torch

from cfgswitch.plans import AlwaysPlan, GuidancePlan, StepPlan, SwitchPlan
from cfgswitch.schedulers import make_scheduler

from .measure import forward_timer

logger = logging.getLogger(__name__)


class CfgCutoffCallback:
    """``callback_on_step_end`` that ends CFG before step ``switch_step`` (correct for any batch).

    Args:
        switch_step (`int`): the first late step (>= 1; step 0 always runs as the pipeline starts it).
        late (`str`): ``uncond`` keeps the negative-prompt rows, ``cond`` the prompt rows.
    """

    tensor_inputs = ["prompt_embeds"]
    #: An SDXL pipeline also halves its added conditioning (diffusers' own SDXL cutoff keeps ``[-1:]``).
    sdxl_tensor_inputs = ["prompt_embeds", "add_text_embeds", "add_time_ids"]

    def __init__(self, switch_step: int, late: str, tensor_inputs: Optional[List[str]] = None) -> None:
        if switch_step < 1:
            raise ValueError(f"switch_step: expected >= 1 (a callback acts after a step), got {switch_step}")
        self.switch_step = switch_step
        self.late = late
        self.tensor_inputs = list(tensor_inputs or self.tensor_inputs)

    def __call__(self, pipe, step_index: int, timestep, callback_kwargs: Dict[str, Any]) -> Dict[str, Any]:
        if step_index == self.switch_step - 1:
            for name in self.tensor_inputs:
                uncond, cond = callback_kwargs[name].chunk(2)
                callback_kwargs[name] = cond if self.late == "cond" else uncond
            pipe._guidance_scale = 0.0
        return callback_kwargs


def baseline_switch_step(plan: str, steps: int) -> Optional[int]:
    """The switch step diffusers' cutoff can reproduce for ``plan``; ``None`` when it cannot.

    ``always`` gives ``steps`` (no cutoff); ``switch`` and ``step`` plans give their step
    if it is in ``[1, steps]``; interval, timestep and adaptive plans give ``None``.
    """
    p = GuidancePlan.parse(plan)
    if isinstance(p, AlwaysPlan):
        return steps
    if not isinstance(p, (SwitchPlan, StepPlan)):
        return None
    schedule = p.schedule(list(range(steps)))
    k = sum(schedule)
    if schedule != [True] * k + [False] * (steps - k) or k < 1:
        return None
    return k


class DiffusersBaseline:
    """The model's diffusers pipeline over existing modules, timed per call.

    ``StableDiffusionPipeline`` for SD 1.x/2.x; ``StableDiffusionXLPipeline`` when the modules
    have a second text encoder (SDXL), with the cutoff halving its added conditioning too.

    Args:
        modules (`dict`): ``unet``, ``vae``, ``text_encoder``, ``tokenizer`` (and SDXL's
            ``text_encoder_2``, ``tokenizer_2``) as ``Sampler.modules`` holds them.
        scheduler_config (`dict`): the model's scheduler config.
        scheduler (`str`): scheduler name (:func:`cfgswitch.schedulers.make_scheduler`).
    """

    def __init__(self, modules: Dict[str, Any], scheduler_config: Dict[str, Any], scheduler: str) -> None:
        sched = make_scheduler(scheduler, scheduler_config)
        self.sdxl = modules.get("text_encoder_2") is not None
        if self.sdxl:
            from diffusers import StableDiffusionXLPipeline

            self.pipe = StableDiffusionXLPipeline(
                vae=modules["vae"], text_encoder=modules["text_encoder"], text_encoder_2=modules["text_encoder_2"],
                tokenizer=modules["tokenizer"], tokenizer_2=modules["tokenizer_2"], unet=modules["unet"], scheduler=sched,
                force_zeros_for_empty_prompt=bool(modules.get("force_zeros_for_empty_prompt", True)),
            )
        else:
            from diffusers import StableDiffusionPipeline

            self.pipe = StableDiffusionPipeline(
                vae=modules["vae"], text_encoder=modules["text_encoder"], tokenizer=modules["tokenizer"],
                unet=modules["unet"], scheduler=sched, safety_checker=None, feature_extractor=None,
                requires_safety_checker=False,
            )
        self.pipe.set_progress_bar_config(disable=True)
        self.device = modules["unet"].device

    def __call__(self, prompts: Sequence[str], seeds: Sequence[int], plan: str, steps: int, guidance_scale: float,
                 height: int, width: int) -> "tuple[Dict[str, float], Any]":
        """One timed pipeline call: ``({"total": seconds, "unet": seconds in the UNet's forward}, images
        [B, H, W, 3] float32 in [0, 1])``."""
        k = baseline_switch_step(plan, steps)
        if k is None:
            raise ValueError(f"plan: diffusers' CFG cutoff cannot run {plan!r}")
        callback = None
        if k < steps:
            callback = CfgCutoffCallback(k, GuidancePlan.parse(plan).late,
                                         CfgCutoffCallback.sdxl_tensor_inputs if self.sdxl else None)
        generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
        cuda = self.device.type == "cuda"
        sync = torch.cuda.synchronize if cuda else (lambda: None)
        # the UNet's own time, so a report can split a call into UNet and everything else
        with forward_timer(self.pipe.unet) as unet_s:
            sync()
            start = time.perf_counter()
            with torch.no_grad():
                out = self.pipe(
                    list(prompts), num_inference_steps=steps, guidance_scale=guidance_scale, generator=generators,
                    height=height, width=width, output_type="np", callback_on_step_end=callback,
                    callback_on_step_end_tensor_inputs=callback.tensor_inputs if callback else ["latents"],
                )
            sync()
            total = time.perf_counter() - start
        return {"total": total, "unet": unet_s[0]}, out.images


def baseline_plans(plans: List[str], steps: int) -> List[str]:
    """The plans of ``plans`` that the diffusers baseline can run (``always`` and single switches)."""
    return [p for p in plans if baseline_switch_step(p, steps) is not None]


__all__ = ["CfgCutoffCallback", "DiffusersBaseline", "baseline_plans", "baseline_switch_step"]
