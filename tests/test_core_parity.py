"""The switching loop against diffusers' own StableDiffusionPipeline, same components and seeds.

The reference scheduler is built as a diffusers user builds it, ``Class.from_config(config)`` on
the pipeline's original scheduler config, never through ``cfgswitch.schedulers``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler, EulerDiscreteScheduler

from cfgswitch import GuidancePlan, Sampler

TOL = 1e-5  # max abs difference on np images in [0, 1]
PROMPTS = ["a red square at the top", "blue circle, large", "a green triangle on black"]
NEGATIVES = ["blurry", "", "ugly, low quality"]
STEPS = 8
DIFFUSERS_CLASSES = {
    "ddim": DDIMScheduler,
    "euler": EulerDiscreteScheduler,
    "euler_a": EulerAncestralDiscreteScheduler,
    "dpmpp_2m": DPMSolverMultistepScheduler,
}


def cfg_cutoff_callback(switch_step: int, late: str):
    """A diffusers ``callback_on_step_end`` that stops CFG from ``switch_step`` on, right for any batch.

    After step ``switch_step - 1`` it keeps one half of the ``[uncond; cond]`` embeddings (chunk,
    not a ``[-1:]`` slice, so batches keep every image) and sets the guidance scale to 0, which
    turns diffusers' ``do_classifier_free_guidance`` off for the remaining steps.
    """

    def callback(pipe, step, timestep, kwargs):
        if step == switch_step - 1:
            uncond, cond = kwargs["prompt_embeds"].chunk(2)
            pipe._guidance_scale = 0.0
            return {"prompt_embeds": cond if late == "cond" else uncond}
        return {}

    return callback


def run_diffusers(pipe, base_config, scheduler, prompts, negatives, seeds, switch_step=None, late="uncond"):
    pipe.scheduler = DIFFUSERS_CLASSES[scheduler].from_config(base_config)
    kwargs = {}
    if switch_step is not None:
        kwargs = dict(callback_on_step_end=cfg_cutoff_callback(switch_step, late), callback_on_step_end_tensor_inputs=["prompt_embeds"])
    gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    return pipe(
        prompts, negative_prompt=negatives, num_inference_steps=STEPS, guidance_scale=7.5, generator=gens,
        output_type="np", **kwargs,
    ).images


@pytest.fixture(scope="module")
def base_config(tiny_pipe):
    """The pipeline's own scheduler config, kept before the tests swap schedulers (restored after)."""
    original = tiny_pipe.scheduler
    yield original.config
    tiny_pipe.scheduler = original


@pytest.fixture(scope="module")
def sampler(tiny_pipe, base_config):
    return Sampler.from_diffusers(tiny_pipe)


@pytest.mark.parametrize("scheduler", ["ddim", "euler", "euler_a", "dpmpp_2m"])
@pytest.mark.parametrize("batch", [1, 3])
def test_always_matches_diffusers(tiny_pipe, base_config, sampler, scheduler, batch):
    prompts, negatives, seeds = PROMPTS[:batch], NEGATIVES[:batch], [11, 22, 33][:batch]
    ours = sampler.generate(prompts, negatives, steps=STEPS, scheduler=scheduler, plan="always", seed=seeds, output_type="np")
    ref = run_diffusers(tiny_pipe, base_config, scheduler, prompts, negatives, seeds)
    assert ours.images.shape == ref.shape
    assert np.abs(ours.images - ref).max() <= TOL
    assert ours.cfg_steps == STEPS and ours.late_steps == 0


@pytest.mark.parametrize("late", ["cond", "uncond"])
@pytest.mark.parametrize("scheduler", ["ddim", "dpmpp_2m", "euler_a"])
def test_switch_matches_diffusers_cfg_cutoff(tiny_pipe, base_config, sampler, late, scheduler):
    seeds = [5, 6, 7]
    plan = GuidancePlan.switch_at(0.5, late=late)
    ours = sampler.generate(PROMPTS, NEGATIVES, steps=STEPS, scheduler=scheduler, plan=plan, seed=seeds, output_type="np")
    assert ours.switch_step == STEPS // 2 and ours.late_mode == late
    ref = run_diffusers(tiny_pipe, base_config, scheduler, PROMPTS, NEGATIVES, seeds, switch_step=STEPS // 2, late=late)
    assert np.abs(ours.images - ref).max() <= TOL


def test_switch_differs_from_always(sampler):
    """The switch must change the result (guards against a plan that is silently ignored)."""
    a = sampler.generate(PROMPTS[:1], steps=STEPS, plan="always", seed=1, output_type="np").images
    b = sampler.generate(PROMPTS[:1], steps=STEPS, plan="switch:0.5", seed=1, output_type="np").images
    c = sampler.generate(PROMPTS[:1], steps=STEPS, plan="switch:0.5:cond", seed=1, output_type="np").images
    # the random tiny model barely reacts to text, so "different" means well above the parity tolerance
    assert np.abs(a - b).max() > 10 * TOL and np.abs(b - c).max() > 10 * TOL


@pytest.mark.parametrize("guidance", [1.0, 0.5])
def test_guidance_at_most_one_runs_no_cfg_as_diffusers(tiny_pipe, base_config, sampler, guidance):
    """diffusers skips CFG for guidance_scale <= 1 (B rows of the prompt); so does generate."""
    seeds = [3, 4]
    ours = sampler.generate(PROMPTS[:2], NEGATIVES[:2], steps=STEPS, plan="always", guidance_scale=guidance,
                            seed=seeds, output_type="np")
    tiny_pipe.scheduler = DDIMScheduler.from_config(base_config)
    gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    ref = tiny_pipe(PROMPTS[:2], negative_prompt=NEGATIVES[:2], num_inference_steps=STEPS, guidance_scale=guidance,
                    generator=gens, output_type="np").images
    assert np.abs(ours.images - ref).max() <= TOL
    assert (ours.cfg_steps, ours.late_steps, ours.unet_rows) == (0, STEPS, 2 * STEPS)
    assert ours.plan == "switch:0:cond" and ours.late_mode == "cond"
