"""``cfgswitch.diffusers``: cfgswitch plans on plain diffusers pipelines.

References: the engine's own ``generate`` (SD), and for SDXL a cutoff callback written here
the way a diffusers user would write a batch-correct one. Tolerance 1e-5 on images (the
batch invariance the sampler tests state); per-image modes and cosines must agree exactly.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cfgswitch import Sampler
from cfgswitch.diffusers import generate_with_plan
from cfgswitch.errors import InvalidArgumentError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TOL = 1e-5
PROMPTS = ["a red fox in the snow", "a cat", "a lighthouse at dusk"]
NEGATIVES = ["", "blurry", "low quality"]
SEEDS = [5, 6, 7]


def _gens(seeds):
    return [torch.Generator("cpu").manual_seed(s) for s in seeds]


@pytest.mark.parametrize("scheduler", ["ddim", "euler"])
@pytest.mark.parametrize("plan", ["switch:0.5", "switch:0.5:cond", "interval:0.2:0.6", "adaptive:0.998", "always"])
def test_sd_callback_equals_the_engine_at_batch_3(tiny_pipe, plan, scheduler):
    from diffusers import DDIMScheduler, EulerDiscreteScheduler

    original = tiny_pipe.scheduler
    cls = {"ddim": DDIMScheduler, "euler": EulerDiscreteScheduler}[scheduler]
    tiny_pipe.scheduler = cls.from_config(original.config)
    try:
        sampler = Sampler.from_diffusers(tiny_pipe)
        ours = sampler.generate(PROMPTS, NEGATIVES, steps=6, plan=plan, seed=SEEDS, scheduler=scheduler,
                                output_type="np", step_kernel="reference")
        out = generate_with_plan(tiny_pipe, PROMPTS, negative_prompt=NEGATIVES, plan=plan, num_inference_steps=6,
                                 generator=_gens(SEEDS), output_type="np")
    finally:
        tiny_pipe.scheduler = original
    assert np.abs(out.images - ours.images).max() <= TOL
    cb = out.cfgswitch
    if plan.startswith("adaptive"):  # image 1 switches after step 0, images 0 and 2 after step 1
        assert [c is None for c in cb.cosines[1]] == [False, True, False], cb.cosines
        assert ours.cfg_steps == 2 and ours.unet_rows == 3 * 2 + 2 * 2 + 1 + 3 * 4
    assert sum(cb.static) >= ours.cfg_steps


def test_sd_callback_with_images_per_prompt(tiny_pipe):
    sampler = Sampler.from_diffusers(tiny_pipe)
    ours = sampler.generate(PROMPTS[:2], NEGATIVES[:2], steps=5, plan="switch:0.4:cond", seed=[1, 2, 3, 4],
                            num_images_per_prompt=2, output_type="np")
    out = generate_with_plan(tiny_pipe, PROMPTS[:2], negative_prompt=NEGATIVES[:2], plan="switch:0.4:cond",
                             num_inference_steps=5, num_images_per_prompt=2, generator=_gens([1, 2, 3, 4]),
                             output_type="np")
    assert np.abs(out.images - ours.images).max() <= TOL


def test_bad_arguments(tiny_pipe):
    with pytest.raises(InvalidArgumentError, match="guidance_scale"):
        generate_with_plan(tiny_pipe, "a cat", guidance_scale=1.0)
    with pytest.raises(InvalidArgumentError, match="kwargs"):
        generate_with_plan(tiny_pipe, "a cat", prompt_embeds=torch.zeros(1, 77, 32))
    with pytest.raises(InvalidArgumentError, match="pipe"):
        generate_with_plan(object(), "a cat")


# ------------------------------------------------------------------ SDXL
@pytest.fixture(scope="module")
def tiny_sdxl():
    from cfgswitch.tiny_model import tiny_sdxl_pipeline

    return tiny_sdxl_pipeline(seed=0)


def _sdxl_reference_cutoff(switch_step, late, batch):
    """A batch-correct CFG cutoff, as a diffusers user writes it: keep each image's own half."""

    def callback(pipe, i, t, kw):
        if i + 1 != switch_step:
            return {}
        pipe._guidance_scale = 0.0
        half = slice(0, batch) if late == "uncond" else slice(batch, 2 * batch)
        return {k: kw[k][half] for k in ("prompt_embeds", "add_text_embeds", "add_time_ids")}

    return callback


@pytest.mark.parametrize("late", ["uncond", "cond"])
def test_sdxl_cutoff_keeps_every_image_at_batch_3(tiny_sdxl, late):
    steps, switch = 6, 3
    ref = tiny_sdxl(PROMPTS, negative_prompt=NEGATIVES, num_inference_steps=steps, guidance_scale=5.0,
                    generator=_gens(SEEDS), output_type="np", height=64, width=64,
                    callback_on_step_end=_sdxl_reference_cutoff(switch, late, 3),
                    callback_on_step_end_tensor_inputs=["prompt_embeds", "add_text_embeds", "add_time_ids"]).images
    plan = "step:3" if late == "uncond" else "step:3:cond"
    out = generate_with_plan(tiny_sdxl, PROMPTS, negative_prompt=NEGATIVES, plan=plan, num_inference_steps=steps,
                             guidance_scale=5.0, generator=_gens(SEEDS), output_type="np", height=64, width=64).images
    assert np.abs(out - ref).max() <= TOL
    always = tiny_sdxl(PROMPTS, negative_prompt=NEGATIVES, num_inference_steps=steps, guidance_scale=5.0,
                       generator=_gens(SEEDS), output_type="np", height=64, width=64).images
    assert np.abs(out - always).max() > 1e-4, "the cutoff changed the images"


def test_sdxl_interval_and_size_conditioning(tiny_sdxl):
    # interval: CFG off at step 0 (the helper starts unguided), on for steps 1-2, then off
    out = generate_with_plan(tiny_sdxl, PROMPTS[:2], negative_prompt=NEGATIVES[:2], plan="interval:0.2:0.6:cond",
                             num_inference_steps=5, guidance_scale=5.0, generator=_gens(SEEDS[:2]), output_type="np",
                             height=64, width=64, original_size=(96, 96))
    assert out.cfgswitch.static == [False, True, True, False, False]
    assert np.isfinite(out.images).all()
    with pytest.raises(InvalidArgumentError, match="original_size"):
        generate_with_plan(tiny_sdxl, "a cat", plan="switch:0.5", num_inference_steps=2, original_size=(64, -1),
                           height=64, width=64)
