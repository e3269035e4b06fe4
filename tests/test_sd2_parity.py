"""SD 2.x schedules end to end: v-prediction, trailing spacing and zero-terminal-SNR betas.

A tiny random-weight UNet stands in for SD 2.1 (speed and parity do not depend on the weights);
its scheduler is SD 2.1-v's published config (``tests/fixtures/scheduler_configs/sd21_v.json``), and
for zero SNR that config with ``timestep_spacing="trailing"`` and ``rescale_betas_zero_snr=True``
(Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed", sec. 3.1-3.3).
The reference is diffusers' own ``StableDiffusionPipeline`` with the scheduler a diffusers user
swaps in, ``Class.from_config(pipe.scheduler.config)``. The fused step (compiled kernel when built,
else its torch oracle through ``step_kernel="reference"``) and diffusers' ``scheduler.step`` must
give the same images within 1e-5 (the bound of ``test_core_parity.py``).
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, StableDiffusionPipeline

from cfgswitch import GuidancePlan, Sampler, kernels

FIXTURES = Path(__file__).parent / "fixtures" / "scheduler_configs"
TOL = 1e-5
STEPS = 8
PROMPTS = ["a red square at the top", "blue circle, large", "a green triangle on black"]
NEGATIVES = ["blurry", "", "ugly, low quality"]
SEEDS = [11, 22, 33]
DIFFUSERS_CLASSES = {"ddim": DDIMScheduler, "euler": EulerDiscreteScheduler, "dpmpp_2m": DPMSolverMultistepScheduler}
ZERO_SNR = {"timestep_spacing": "trailing", "rescale_betas_zero_snr": True}


def _pipe(tiny_pipe, extra):
    """The tiny model's modules with SD 2.1-v's scheduler (plus ``extra``), as a diffusers user builds it."""
    config = json.loads((FIXTURES / "sd21_v.json").read_text())
    scheduler = DDIMScheduler.from_config(config, **extra)
    components = {**tiny_pipe.components, "scheduler": scheduler}
    return StableDiffusionPipeline(**components, requires_safety_checker=False)


@pytest.fixture(scope="module")
def v_pipe(tiny_pipe):
    return _pipe(tiny_pipe, {})


@pytest.fixture(scope="module")
def zero_snr_pipe(tiny_pipe):
    return _pipe(tiny_pipe, ZERO_SNR)


def cfg_cutoff_callback(switch_step: int, late: str):
    """Stop CFG from ``switch_step`` on, keeping one half of ``[uncond; cond]`` (right at any batch)."""

    def callback(pipe, step, timestep, kwargs):
        if step == switch_step - 1:
            uncond, cond = kwargs["prompt_embeds"].chunk(2)
            pipe._guidance_scale = 0.0
            return {"prompt_embeds": cond if late == "cond" else uncond}
        return {}

    return callback


def _diffusers(pipe, scheduler, switch_step=None, late="uncond", guidance_rescale=0.0):
    original = pipe.scheduler
    kwargs = {}
    if switch_step is not None:
        kwargs = dict(callback_on_step_end=cfg_cutoff_callback(switch_step, late),
                      callback_on_step_end_tensor_inputs=["prompt_embeds"])
    try:
        pipe.scheduler = DIFFUSERS_CLASSES[scheduler].from_config(original.config)
        return pipe(PROMPTS, negative_prompt=NEGATIVES, num_inference_steps=STEPS, guidance_scale=7.5,
                    guidance_rescale=guidance_rescale, generator=[torch.Generator().manual_seed(s) for s in SEEDS],
                    output_type="np", **kwargs).images
    finally:
        pipe.scheduler = original


def _kernels():
    return ["auto", "reference"] if kernels.HAS_COMPILED else ["reference"]


@pytest.mark.parametrize("step_kernel", _kernels())
@pytest.mark.parametrize("scheduler", sorted(DIFFUSERS_CLASSES))
@pytest.mark.parametrize("schedule", ["v", "v_zero_snr"])
def test_v_prediction_matches_diffusers(schedule, scheduler, step_kernel, v_pipe, zero_snr_pipe):
    pipe = v_pipe if schedule == "v" else zero_snr_pipe
    sampler = Sampler.from_diffusers(pipe)
    assert sampler.scheduler_config["prediction_type"] == "v_prediction"
    ours = sampler.generate(PROMPTS, NEGATIVES, steps=STEPS, scheduler=scheduler, plan="always", seed=SEEDS,
                            output_type="np", step_kernel=step_kernel)
    assert ours.step_kernel == ("fused" if step_kernel == "auto" else "reference")
    ref = _diffusers(pipe, scheduler)
    assert np.abs(ours.images - ref).max() <= TOL


@pytest.mark.parametrize("late", ["cond", "uncond"])
def test_v_prediction_switch_matches_diffusers_cfg_cutoff(late, zero_snr_pipe):
    sampler = Sampler.from_diffusers(zero_snr_pipe)
    ours = sampler.generate(PROMPTS, NEGATIVES, steps=STEPS, scheduler="dpmpp_2m",
                            plan=GuidancePlan.switch_at(0.5, late=late), seed=SEEDS, output_type="np")
    assert ours.switch_step == STEPS // 2
    ref = _diffusers(zero_snr_pipe, "dpmpp_2m", switch_step=STEPS // 2, late=late)
    assert np.abs(ours.images - ref).max() <= TOL


def test_zero_snr_schedule_is_what_diffusers_builds(zero_snr_pipe):
    """The schedule really is trailing and zero-SNR (guards against a config silently dropped)."""
    from cfgswitch.schedulers import make_scheduler

    sch = make_scheduler("ddim", Sampler.from_diffusers(zero_snr_pipe).scheduler_config)
    sch.set_timesteps(STEPS)
    assert int(sch.timesteps[0]) == 999 and float(sch.alphas_cumprod[-1]) == 0.0


_GENERATE_TAKES_RESCALE = "guidance_rescale" in inspect.signature(Sampler.generate).parameters


@pytest.mark.skipif(not _GENERATE_TAKES_RESCALE, reason="Sampler.generate has no guidance_rescale argument yet "
                    "(the loop must apply cfgswitch.kernels.rescale_noise_cfg_reference where it combines)")
@pytest.mark.parametrize("step_kernel", _kernels())
@pytest.mark.parametrize("scheduler", ["ddim", "euler"])
def test_guidance_rescale_matches_diffusers(scheduler, step_kernel, zero_snr_pipe):
    """diffusers' CFG rescale (phi = 0.7, the paper's value) on the zero-SNR v-prediction schedule."""
    sampler = Sampler.from_diffusers(zero_snr_pipe)
    ours = sampler.generate(PROMPTS, NEGATIVES, steps=STEPS, scheduler=scheduler, plan="always", seed=SEEDS,
                            output_type="np", step_kernel=step_kernel, guidance_rescale=0.7)
    ref = _diffusers(zero_snr_pipe, scheduler, guidance_rescale=0.7)
    plain = _diffusers(zero_snr_pipe, scheduler)
    assert np.abs(ref - plain).max() > 10 * TOL  # the rescale changes the images
    assert np.abs(ours.images - ref).max() <= TOL
