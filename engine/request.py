"""One request's arguments, checked once: what ``Sampler.generate`` and ``StepEngine.submit`` share.

Both entries call :func:`check_request` before any work, so a bad value raises the same
typed error (:mod:`cfgswitch.errors`) whichever path took it, and nothing one request carries
can reach the work of another.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, List, Mapping, Optional, Sequence, Union

from . import validation as v
from .errors import InvalidArgumentError
from .plans import GuidancePlan
from .schedulers import scheduler_class_name

logger = logging.getLogger(__name__)

#: Values of ``step_kernel``.
STEP_KERNELS = ("auto", "fused", "reference")


@dataclass(frozen=True)
class RequestArgs:
    """The validated arguments of one ``generate`` call (or one submitted request).

    Attributes:
        prompts, negatives (`list[str]`): one negative prompt per prompt (``""`` for none).
        steps (`int`), guidance_scale (`float`), scheduler (`str`): as given.
        plan (`GuidancePlan`): the plan that runs (``switch:0:cond`` when ``guidance_scale <= 1``).
        images_per_prompt (`int`), seeds (`list[int]`): one seed per image.
        height, width (`int`): image size in pixels.
        output_type (`str`), step_kernel (`str`): as given.
    """

    prompts: List[str]
    negatives: List[str]
    steps: int
    guidance_scale: float
    scheduler: str
    plan: GuidancePlan
    images_per_prompt: int
    seeds: List[int]
    height: int
    width: int
    output_type: str
    step_kernel: str
    negative_none: bool = False
    sizes: Optional[Any] = None
    guidance_rescale: float = 0.0

    @property
    def batch(self) -> int:
        """Images in the request."""
        return len(self.seeds)


def check_request(
    sampler: Any,
    prompts: Union[str, Sequence[str]],
    negative_prompts: Union[None, str, Sequence[str]] = None,
    *,
    steps: int = 30,
    guidance_scale: float = 7.5,
    scheduler: str = "ddim",
    plan: Union[str, GuidancePlan] = "always",
    seed: Union[None, int, Sequence[int]] = 0,
    height: Optional[int] = None,
    width: Optional[int] = None,
    num_images_per_prompt: int = 1,
    output_type: str = "pil",
    step_kernel: str = "auto",
    max_image_side: Optional[int] = None,
    size_conditioning: Optional[Mapping[str, Any]] = None,
    guidance_rescale: float = 0.0,
) -> RequestArgs:
    """Check every argument of a request against ``sampler``'s model and backend.

    Raises the typed errors of :mod:`cfgswitch.errors`; see :meth:`cfgswitch.Sampler.generate`
    for what each argument means.
    """
    prompt_list = v.check_prompts(prompts)
    negative_list = v.check_negative_prompts(negative_prompts, len(prompt_list))
    steps = v.check_positive_int("steps", steps, 1, 10_000)
    v.check_steps_for_schedule(steps, getattr(sampler, "scheduler_config", None))
    guidance = v.check_guidance(guidance_scale)
    scheduler_class_name(scheduler)
    from .calibration import resolve_plan  # "auto": the model's recommended plan (cfgswitch.json)

    guidance_plan = resolve_plan(plan, getattr(sampler, "source", None))
    v.check_plan_steps(guidance_plan, steps)
    if guidance <= 1.0:  # as diffusers: no classifier-free guidance, the prompt's B rows every step
        unguided = GuidancePlan.switch_at(0.0, late="cond")
        if guidance_plan != unguided:
            logger.info("guidance_scale %s <= 1: no classifier-free guidance (plan %s -> %s)", guidance, guidance_plan, unguided)
        guidance_plan = unguided
    n_per = v.check_positive_int("num_images_per_prompt", num_images_per_prompt, 1, 1024)
    batch = len(prompt_list) * n_per
    seeds = v.check_seeds(seed, batch)
    spec = sampler.spec
    factor = spec.vae_scale_factor
    max_side = v.check_max_image_side(max_image_side, spec.default_size, factor)  # 2x native unless raised
    height = v.check_size("height", spec.default_size if height is None else height, factor, max_side)
    width = v.check_size("width", spec.default_size if width is None else width, factor, max_side)
    output_type = v.check_output_type(output_type)
    if step_kernel not in STEP_KERNELS:
        raise InvalidArgumentError("step_kernel", "'auto', 'fused' or 'reference'", step_kernel)
    if sampler.runners.check_request is not None:
        sampler.runners.check_request(batch=batch, height=height, width=width)
    sizes = check_size_conditioning(sampler.spec, size_conditioning or {}, height, width)
    if (isinstance(guidance_rescale, bool) or not isinstance(guidance_rescale, (int, float))
            or not 0.0 <= float(guidance_rescale) <= 1.0):
        raise InvalidArgumentError("guidance_rescale", "a number in [0, 1] (diffusers' CFG rescale phi)", guidance_rescale)
    return RequestArgs(
        prompts=prompt_list, negatives=negative_list, steps=steps, guidance_scale=guidance, scheduler=scheduler,
        plan=guidance_plan, images_per_prompt=n_per, seeds=seeds, height=height, width=width,
        output_type=output_type, step_kernel=step_kernel, negative_none=negative_prompts is None, sizes=sizes,
        guidance_rescale=float(guidance_rescale),
    )


def check_size_conditioning(spec: Any, given: Mapping[str, Any], height: int, width: int) -> Optional[Any]:
    """SDXL's :class:`~cfgswitch.families.base.SizeConditioning` of a request (``None`` for other families).

    ``given`` holds any of :data:`~cfgswitch.families.base.SIZE_ARGUMENTS`; sizes default to
    ``(height, width)`` and the crop to ``(0, 0)``, as diffusers' SDXL pipeline does.
    """
    from .families import get_family
    from .families.base import SIZE_ARGUMENTS, SizeConditioning, check_pair

    unknown = sorted(set(given) - set(SIZE_ARGUMENTS))
    if unknown:
        raise InvalidArgumentError("size conditioning", f"some of {', '.join(SIZE_ARGUMENTS)}", unknown)
    family = get_family(getattr(spec, "family", "sd1"))
    present = {k: v for k, v in given.items() if v is not None}
    if not family.size_conditioning:
        if present:
            name = sorted(present)[0]
            raise InvalidArgumentError(name, f"no size conditioning for a {family.name} model (SDXL only)", present[name])
        return None
    pairs = {k: check_pair(k, given.get(k), 0 if "crops" in k else 1) for k in SIZE_ARGUMENTS}
    return SizeConditioning(
        original_size=pairs["original_size"] or (height, width), target_size=pairs["target_size"] or (height, width),
        crops_coords_top_left=pairs["crops_coords_top_left"] or (0, 0),
        negative_original_size=pairs["negative_original_size"], negative_target_size=pairs["negative_target_size"],
        negative_crops_coords_top_left=pairs["negative_crops_coords_top_left"],
    )


__all__ = ["RequestArgs", "STEP_KERNELS", "check_request", "check_size_conditioning"]
