"""cfgswitch plans on plain diffusers pipelines: a callback and a helper (SD 1.x/2.x and SDXL).

The first step for a diffusers user before moving to the compiled engine. Any cfgswitch plan
runs on a ``StableDiffusionPipeline`` or ``StableDiffusionXLPipeline`` object, correctly at any
batch size and any number of images per prompt:

- **cutoffs** (``switch:f``, ``step:k``, ``timestep:t``) in either late mode: after the last CFG
  step the pipeline runs B rows with the embeddings of the plan's late mode (``uncond``, the
  paper's rule, or ``cond``, diffusers' CFG cutoff). Unlike diffusers' own
  ``SDXLCFGCutoffCallback``, which slices ``[-1:]`` and keeps one row, every image keeps its
  own half of ``prompt_embeds``, ``add_text_embeds`` and ``add_time_ids``;
- **intervals** (``interval:a:b``): CFG off before ``a`` and after ``b``, on between;
- **adaptive** plans, per image: a forward hook on the UNet measures each image's cosine of the
  two predictions; an image whose CFG has ended keeps its late prediction (its rows still run
  until every image has switched, then the pipeline drops to B rows).

Example::

    from diffusers import StableDiffusionPipeline
    from cfgswitch.diffusers import generate_with_plan

    pipe = StableDiffusionPipeline.from_pretrained("path/to/sd15")
    images = generate_with_plan(pipe, ["a red fox"], plan="switch:0.5", num_inference_steps=30).images

The images equal :meth:`cfgswitch.Sampler.generate` with the same arguments (tests check it
at batch 3 with different negative prompts, within 1e-5).
"""

from __future__ import annotations

import copy
import logging
from typing import Any, Dict, List, Optional, Sequence, Union

import torch

from .errors import InvalidArgumentError
from .loop import plan_may_switch
from .plans import GuidancePlan
from .steppers import cosine_per_image

logger = logging.getLogger(__name__)

#: The conditioning names a pipeline's callback can swap, per pipeline kind.
_SWAPPED = {"sd": ("prompt_embeds",), "sdxl": ("prompt_embeds", "add_text_embeds", "add_time_ids")}


def _kind(pipe: Any) -> str:
    inputs = set(getattr(pipe, "_callback_tensor_inputs", ()))
    if {"prompt_embeds", "add_text_embeds", "add_time_ids"} <= inputs:
        return "sdxl"
    if "prompt_embeds" in inputs and hasattr(pipe, "unet"):
        return "sd"
    raise InvalidArgumentError("pipe", "a StableDiffusionPipeline or StableDiffusionXLPipeline (a UNet pipeline "
                               "whose callback can swap prompt_embeds)", type(pipe).__name__)


class PlanCallback:
    """A ``callback_on_step_end`` that makes a diffusers pipeline follow a cfgswitch plan.

    Use it through :func:`generate_with_plan`, which also sets the first step's mode and
    installs the adaptive hook; alone, it needs the halves of the conditioning
    (:meth:`set_halves`) before the pipeline runs.

    Args:
        plan (`str` or `GuidancePlan`): the plan.
        timesteps (`torch.Tensor`): the scheduler's timesteps for this call.
        guidance_scale (`float`): the CFG weight of guided steps.
        kind (`str`): ``sd`` or ``sdxl``.
    """

    def __init__(self, plan: Union[str, GuidancePlan], timesteps: torch.Tensor, guidance_scale: float, kind: str) -> None:
        self.plan = GuidancePlan.parse(plan)
        self.static: List[bool] = self.plan.schedule(timesteps)
        self.guidance_scale = float(guidance_scale)
        self.kind = kind
        self.names = _SWAPPED[kind]
        self.halves: Dict[str, Dict[str, torch.Tensor]] = {}
        self.switched: List[bool] = []
        self.step = 0
        self.cosines: List[Optional[List[float]]] = []
        self.mode = False  #: whether the pipeline currently runs 2B rows

    @property
    def tensor_inputs(self) -> List[str]:
        """The names to pass as ``callback_on_step_end_tensor_inputs``."""
        return list(self.names)

    def set_halves(self, uncond: Dict[str, torch.Tensor], cond: Dict[str, torch.Tensor]) -> None:
        """The uncond and cond tensors (``[B, ...]`` each) of every swapped name."""
        self.halves = {"uncond": dict(uncond), "cond": dict(cond)}
        self.switched = [False] * int(cond["prompt_embeds"].shape[0])
        self.mode = self.guided(0)

    def guided(self, step: int) -> bool:
        """Whether the pipeline runs 2B rows at ``step`` (some image still guided there)."""
        if step >= len(self.static) or not self.static[step]:
            return False
        return not (self.plan.is_adaptive and self.switched and all(self.switched))

    def tensors(self, guided: bool) -> Dict[str, torch.Tensor]:
        """The conditioning the pipeline must hold for a step of that mode."""
        if guided:
            return {k: torch.cat([self.halves["uncond"][k], self.halves["cond"][k]]) for k in self.names}
        return {k: self.halves[self.plan.late][k] for k in self.names}

    def __call__(self, pipe: Any, i: int, t: Any, kwargs: Dict[str, Any]) -> Dict[str, Any]:
        nxt = i + 1
        self.step = nxt
        if nxt >= len(self.static):
            return {}
        then = self.guided(nxt)
        if then == self.mode:
            return {}
        self.mode = then
        pipe._guidance_scale = self.guidance_scale if then else 0.0
        return self.tensors(then)

    # ------------------------------------------------------------------ adaptive plans
    def unet_hook(self, module: Any, inputs: Any, output: Any) -> Any:
        """Forward hook: per-image cosines, and late predictions for images whose CFG has ended."""
        pred = output[0] if isinstance(output, tuple) else output.sample
        batch = len(self.switched)
        if pred.shape[0] != 2 * batch:
            self.cosines.append(None)
            return output
        u, c = pred[:batch], pred[batch:]
        cos = [float(x) for x in cosine_per_image(u, c).tolist()]
        guided_now = [self.static[self.step] and not s for s in self.switched]
        self.cosines.append([v if g else None for v, g in zip(cos, guided_now)])
        if any(self.switched):
            u, c = u.clone(), c.clone()
            for b, s in enumerate(self.switched):
                if s:  # u + w (c - u) then gives the late prediction of that image
                    if self.plan.late == "uncond":
                        c[b] = u[b]
                    else:
                        u[b] = c[b]
            pred = torch.cat([u, c])
        for b, g in enumerate(guided_now):
            if g and plan_may_switch(self.plan, cos[b], self.step, len(self.static)):
                self.switched[b] = True
        if isinstance(output, tuple):
            return (pred,) + tuple(output[1:])
        output.sample = pred
        return output


def _encode(pipe: Any, kind: str, prompt, negative_prompt, n_per: int, device) -> "tuple[Dict, Dict]":
    if kind == "sd":
        pos, neg = pipe.encode_prompt(prompt, device, n_per, True, negative_prompt=negative_prompt)
        return {"prompt_embeds": neg}, {"prompt_embeds": pos}
    pos, neg, pooled, neg_pooled = pipe.encode_prompt(prompt, device=device, num_images_per_prompt=n_per,
                                                      do_classifier_free_guidance=True, negative_prompt=negative_prompt)
    return ({"prompt_embeds": neg, "pooled": neg_pooled}, {"prompt_embeds": pos, "pooled": pooled})


def generate_with_plan(
    pipe: Any,
    prompt: Union[str, Sequence[str]],
    *,
    plan: Union[str, GuidancePlan] = "switch:0.5",
    num_inference_steps: int = 30,
    guidance_scale: float = 7.5,
    negative_prompt: Union[None, str, Sequence[str]] = None,
    num_images_per_prompt: int = 1,
    **kwargs: Any,
):
    """Call a diffusers SD or SDXL pipeline with a cfgswitch guidance plan.

    Args:
        pipe: a ``StableDiffusionPipeline`` or ``StableDiffusionXLPipeline``.
        prompt (`str` or `list[str]`): as the pipeline takes it.
        plan (`str` or `GuidancePlan`, defaults to ``"switch:0.5"``): which steps run guided.
        num_inference_steps (`int`, defaults to 30), guidance_scale (`float`, defaults to 7.5),
        negative_prompt, num_images_per_prompt: as the pipeline takes them.
        kwargs: any other pipeline argument (``generator``, ``output_type``, ``height``,
            ``original_size`` for SDXL, ...), except prompt embeddings and callbacks, which this
            helper sets.

    Returns:
        The pipeline's own output; its ``cfgswitch`` attribute holds the callback (``static``
        schedule, per-image ``switched`` flags, ``cosines`` of adaptive plans).
    """
    kind = _kind(pipe)
    taken = {"prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds",
             "callback_on_step_end", "callback_on_step_end_tensor_inputs"} & set(kwargs)
    if taken:
        raise InvalidArgumentError("kwargs", "no embeddings or callbacks (generate_with_plan sets them)", sorted(taken))
    if not guidance_scale > 1:
        raise InvalidArgumentError("guidance_scale", "a weight above 1 (at 1 or below there is no CFG to switch)",
                                   guidance_scale)
    device = getattr(pipe, "_execution_device", None) or pipe.device
    scheduler = copy.deepcopy(pipe.scheduler)
    scheduler.set_timesteps(num_inference_steps, device="cpu")
    callback = PlanCallback(plan, scheduler.timesteps, guidance_scale, kind)
    uncond, cond = _encode(pipe, kind, prompt, negative_prompt, num_images_per_prompt, device)
    call: Dict[str, Any] = dict(kwargs, num_inference_steps=num_inference_steps, num_images_per_prompt=1,
                                callback_on_step_end=callback, callback_on_step_end_tensor_inputs=callback.tensor_inputs)
    first = callback.guided(0)
    call["guidance_scale"] = guidance_scale if first else 0.0
    if kind == "sd":
        callback.set_halves(uncond, cond)
        call["prompt_embeds"] = cond["prompt_embeds"] if first or callback.plan.late == "cond" else uncond["prompt_embeds"]
        call["negative_prompt_embeds"] = uncond["prompt_embeds"]
    else:
        time_ids = _sdxl_time_ids(pipe, kwargs, cond["prompt_embeds"])
        u = {"prompt_embeds": uncond["prompt_embeds"], "add_text_embeds": uncond["pooled"], "add_time_ids": time_ids[0]}
        c = {"prompt_embeds": cond["prompt_embeds"], "add_text_embeds": cond["pooled"], "add_time_ids": time_ids[1]}
        callback.set_halves(u, c)
        late = u if (not first and callback.plan.late == "uncond") else c
        call.update(prompt_embeds=late["prompt_embeds"], pooled_prompt_embeds=late["add_text_embeds"],
                    negative_prompt_embeds=u["prompt_embeds"], negative_pooled_prompt_embeds=u["add_text_embeds"])
        if not first and callback.plan.late == "uncond" and not torch.equal(time_ids[0], time_ids[1]):
            raise InvalidArgumentError("negative_original_size", "the same size conditioning as the prompt when the "
                                       "plan starts unguided with late='uncond'", kwargs.get("negative_original_size"))
    hook = pipe.unet.register_forward_hook(callback.unet_hook) if callback.plan.is_adaptive else None
    try:
        out = pipe(**call)
    finally:
        if hook is not None:
            hook.remove()
    out.cfgswitch = callback
    return out


def _sdxl_time_ids(pipe: Any, kwargs: Dict[str, Any], prompt_embeds: torch.Tensor) -> "tuple[torch.Tensor, torch.Tensor]":
    """``(negative, positive)`` ``add_time_ids`` ``[B, 6]`` as the SDXL pipeline builds them."""
    height = kwargs.get("height") or pipe.default_sample_size * pipe.vae_scale_factor
    width = kwargs.get("width") or pipe.default_sample_size * pipe.vae_scale_factor
    original = tuple(kwargs.get("original_size") or (height, width))
    target = tuple(kwargs.get("target_size") or (height, width))
    crop = tuple(kwargs.get("crops_coords_top_left") or (0, 0))
    for name, value in (("original_size", original), ("target_size", target), ("crops_coords_top_left", crop)):
        if len(value) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in value):
            raise InvalidArgumentError(name, "two non-negative ints", value)
    proj = pipe.text_encoder_2.config.projection_dim if pipe.text_encoder_2 is not None else 1280
    pos = pipe._get_add_time_ids(original, crop, target, dtype=prompt_embeds.dtype, text_encoder_projection_dim=proj)
    neg_original = tuple(kwargs.get("negative_original_size") or original)
    neg_target = tuple(kwargs.get("negative_target_size") or target)
    neg_crop = tuple(kwargs.get("negative_crops_coords_top_left") or crop)
    neg = pipe._get_add_time_ids(neg_original, neg_crop, neg_target, dtype=prompt_embeds.dtype,
                                 text_encoder_projection_dim=proj)
    batch = prompt_embeds.shape[0]
    device = prompt_embeds.device
    return neg.to(device).repeat(batch, 1), pos.to(device).repeat(batch, 1)


__all__ = ["PlanCallback", "generate_with_plan"]
