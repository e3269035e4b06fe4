"""Sampler behaviour: accounting, batch independence, schedulers, tokenizer, bad input."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch

from cfgswitch import (
    GuidancePlan,
    InvalidArgumentError,
    ModelLoadError,
    PlanParseError,
    Sampler,
    UnknownSchedulerError,
)
from cfgswitch.tokenizer import load_clip_tokenizer, tokenize

PLANS = ["always", "switch:0.5", "switch:0.5:cond", "step:2", "timestep:500", "interval:0.2:0.6", "adaptive:0.9",
         "adaptive:1", "switch:0"]


def test_clip_tokenizer_known_ids():
    tok = load_clip_tokenizer()
    assert tok("a photo of a cat")["input_ids"] == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert len(tok.get_vocab()) == 49408
    ids = tokenize(tok, ["a photo of a cat"]).input_ids
    assert ids.shape == (1, 77) and ids[0, 7:].eq(49407).all()


def test_truncation_is_reported(tiny_sampler):
    long_prompt = "red " * 100  # 100 word tokens + start + end = 102 > 77
    out = tiny_sampler.generate([long_prompt, "short"], steps=1, output_type="latent")
    assert len(out.warnings) == 1
    assert "prompt 0 was truncated to 77 tokens: 25 token(s) dropped" in out.warnings[0]


@pytest.mark.parametrize("plan", PLANS)
def test_unet_rows_accounting(tiny_sampler, plan):
    b, steps = 2, 6
    out = tiny_sampler.generate(["a", "b"], steps=steps, plan=plan, seed=3, output_type="latent")
    assert out.cfg_steps + out.late_steps == steps
    assert out.unet_rows == 2 * b * out.cfg_steps + b * out.late_steps
    assert out.plan == plan
    expected_cfg = {"always": 6, "switch:0.5": 3, "switch:0.5:cond": 3, "step:2": 2, "interval:0.2:0.6": 3,
                    "adaptive:1": 6, "switch:0": 0}
    if plan in expected_cfg:
        assert out.cfg_steps == expected_cfg[plan]
    if plan == "adaptive:0.9":  # the random model's two predictions are nearly identical: it switches after step 0
        assert out.cfg_steps == 1 and out.switch_step == 1


def test_batch_image_equals_single(tiny_sampler):
    prompts, seeds = ["one", "two", "three"], [100, 200, 300]
    for plan in ("always", "switch:0.5", "adaptive:0.999"):
        batch = tiny_sampler.generate(prompts, steps=5, plan=plan, seed=seeds, scheduler="euler_a", output_type="np")
        alone = tiny_sampler.generate(prompts[1], steps=5, plan=plan, seed=seeds[1], scheduler="euler_a", output_type="np")
        assert np.abs(batch.images[1] - alone.images[0]).max() <= 1e-5, plan


def test_int_seed_gives_consecutive_seeds(tiny_sampler):
    a = tiny_sampler.generate(["x", "y"], steps=2, seed=7, output_type="latent")
    b = tiny_sampler.generate(["x", "y"], steps=2, seed=[7, 8], output_type="latent")
    assert a.seeds == [7, 8] and torch.equal(a.latents, b.latents)


def test_images_per_prompt_and_outputs(tiny_sampler):
    out = tiny_sampler.generate(["x", "y"], steps=2, num_images_per_prompt=2, seed=0)
    assert len(out.images) == 4 and out.images[0].size == (16, 16) and out.images[0].mode == "RGB"
    np_out = tiny_sampler.generate(["x"], steps=2, height=32, width=24, seed=0, output_type="np")
    assert np_out.images.shape == (1, 32, 24, 3) and np_out.images.dtype == np.float32
    assert 0.0 <= np_out.images.min() and np_out.images.max() <= 1.0
    lat = tiny_sampler.generate(["x"], steps=2, seed=0, output_type="latent")
    assert lat.images is None and lat.latents.shape == (1, 4, 8, 8)
    for key in ("text", "unet_cfg", "unet_late", "scheduler", "vae", "loop", "total"):
        assert key in out.timings and out.timings[key] >= 0
    json.dumps(out.summary())


@pytest.mark.parametrize("scheduler", ["pndm", "unipc", "lms", "ddpm"])
def test_other_schedulers_run(tiny_sampler, scheduler):
    out = tiny_sampler.generate(["x"], steps=4, scheduler=scheduler, plan="switch:0.5", output_type="np")
    calls = 5 if scheduler == "pndm" else 4  # PLMS warm-up makes one extra UNet call, as in diffusers
    assert np.isfinite(out.images).all() and out.cfg_steps + out.late_steps == calls
    assert out.cfg_steps == round(calls / 2 + 0.01) and out.late_steps == calls - out.cfg_steps


@pytest.mark.parametrize("name", ["heun", "dpm2"])
def test_multi_call_schedulers_refused(tiny_sampler, name):
    with pytest.raises(UnknownSchedulerError, match="calls it more than once per step"):
        tiny_sampler.generate(["x"], steps=2, scheduler=name)


@pytest.mark.parametrize(
    "kwargs, argument, fragment",
    [
        (dict(prompts=[]), "prompts", "at least one prompt"),
        (dict(prompts=["a", 3]), "prompts[1]", "a string"),
        (dict(prompts=["a", "b"], negative_prompts=["n"]), "negative_prompts", "2 negative prompt(s)"),
        (dict(seed=[1, 2, 3]), "seed", "2 seed(s), one per image"),
        (dict(seed=-1), "seed", "an integer in"),
        (dict(steps=0), "steps", "an integer in [1, 10000]"),
        (dict(steps=2.5), "steps", "an integer"),
        (dict(guidance_scale=float("nan")), "guidance_scale", "a finite number >= 0"),
        (dict(guidance_scale=float("inf")), "guidance_scale", "a finite number >= 0"),
        (dict(guidance_scale=-1.0), "guidance_scale", "a finite number >= 0"),
        (dict(height=15), "height", "a multiple of the VAE factor 2"),
        (dict(width=0), "width", "an integer >= 2"),
        (dict(scheduler="nope"), "scheduler", "one of ddim, euler"),
        (dict(plan="switch:2"), "plan", "a valid plan (fraction"),
        (dict(plan="nonsense"), "plan", "a plan string"),
        (dict(output_type="tensor"), "output_type", "'pil', 'np' or 'latent'"),
        (dict(num_images_per_prompt=0), "num_images_per_prompt", "an integer in"),
        (dict(step_kernel="fast"), "step_kernel", "'auto', 'fused' or 'reference'"),
    ],
)
def test_bad_input(tiny_sampler, kwargs, argument, fragment):
    args = dict(prompts=["a", "b"], steps=2)
    args.update(kwargs)
    with pytest.raises(InvalidArgumentError) as e:
        tiny_sampler.generate(args.pop("prompts"), **args)
    assert e.value.argument == argument
    assert fragment in str(e.value)
    assert str(e.value).startswith(f"{argument}: expected")


def test_bad_plan_type_is_plan_error(tiny_sampler):
    with pytest.raises(PlanParseError):
        tiny_sampler.generate(["a"], steps=1, plan="interval:0.9:0.1")


def test_model_path_errors(tmp_path, tiny_model_dir):
    with pytest.raises(ModelLoadError, match="no such path"):
        Sampler.from_diffusers(tmp_path / "missing")
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(ModelLoadError, match=r"not a Stable Diffusion folder: missing vae/"):
        Sampler.from_diffusers(broken)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match=r"missing model_index.json, unet/, vae/, text_encoder/, scheduler/"):
        Sampler.from_diffusers(tmp_path / "empty")


def test_pickle_only_model_refused(tmp_path, tiny_model_dir):
    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, pickled)
    for f in (pickled / "unet").glob("*.safetensors"):
        f.unlink()
    torch.save({"w": torch.zeros(1)}, pickled / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises(ModelLoadError, match=r"unet/ .* holds only pickle checkpoints .*safetensors only"):
        Sampler.from_diffusers(pickled)


def test_load_diffusers_folder_and_backend_errors(tiny_model_dir):
    s = Sampler.load(tiny_model_dir)
    assert s.backend == "torch"
    with pytest.raises(InvalidArgumentError, match="backend: expected one of torch, onnxruntime, tensorrt"):
        Sampler.load(tiny_model_dir, backend="jax")
    with pytest.raises(InvalidArgumentError, match="cfgswitch export"):
        Sampler.load(tiny_model_dir, backend="onnxruntime")


def test_saved_folder_matches_pipeline(tiny_pipe, tiny_model_dir):
    a = Sampler.from_diffusers(tiny_pipe).generate(["x"], steps=3, seed=1, output_type="np").images
    b = Sampler.from_diffusers(tiny_model_dir).generate(["x"], steps=3, seed=1, output_type="np").images
    assert np.abs(a - b).max() == 0.0


def test_step_kernel_choice_is_reported(tiny_sampler):
    ref = tiny_sampler.generate(["x"], steps=4, plan="switch:0.5", step_kernel="reference", output_type="latent")
    auto = tiny_sampler.generate(["x"], steps=4, plan="switch:0.5", step_kernel="auto", output_type="latent")
    assert ref.step_kernel == "reference"
    from cfgswitch.kernels import HAS_COMPILED

    assert auto.step_kernel == ("fused" if HAS_COMPILED else "reference")
    assert torch.allclose(ref.latents, auto.latents, atol=1e-6, rtol=0)
