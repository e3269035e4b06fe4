"""``make_scheduler`` against diffusers' own scheduler swap, on configs shaped like real checkpoints.

The reference is what a diffusers user writes: load the pipeline, then
``Class.from_config(pipe.scheduler.config)``. It is never built through ``cfgswitch.schedulers``.
cfgswitch's side takes the scheduler config the way each source hands it to the loop: a folder
(its JSON), a live pipeline (``Sampler.from_diffusers(pipe)``) and a bundle (the JSON the exporter
writes). The configs are SD 1.5's (PNDM, no ``timestep_spacing`` key) and SD 2.1-v's (DDIM,
``v_prediction``), in ``tests/fixtures/scheduler_configs/``.

Tolerances: the schedulers must be equal (class and config) and step bit-identically (0.0);
the generated images must match diffusers' pipeline within 1e-5 (the parity bound of
``test_core_parity.py``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    UniPCMultistepScheduler,
)

from cfgswitch import SCHEDULER_NAMES, Sampler
from cfgswitch.schedulers import make_scheduler

FIXTURES = Path(__file__).parent / "fixtures" / "scheduler_configs"
CONFIGS = ["sd15", "sd21_v"]
# What a diffusers user picks for each name cfgswitch offers.
DIFFUSERS_CLASSES = {
    "ddim": DDIMScheduler,
    "euler": EulerDiscreteScheduler,
    "euler_a": EulerAncestralDiscreteScheduler,
    "dpmpp_2m": DPMSolverMultistepScheduler,
    "pndm": PNDMScheduler,
    "unipc": UniPCMultistepScheduler,
    "lms": LMSDiscreteScheduler,
    "ddpm": DDPMScheduler,
}
STEPS = 8


def test_every_scheduler_name_is_covered():
    assert set(DIFFUSERS_CLASSES) == set(SCHEDULER_NAMES)


def _model_folder(root: Path, tiny_model_dir: Path, config_name: str) -> Path:
    """The tiny model's weights with a real checkpoint's scheduler JSON, byte for byte."""
    raw = (FIXTURES / f"{config_name}.json").read_text()
    folder = root / config_name
    folder.mkdir()
    for part in ("unet", "vae", "text_encoder", "tokenizer"):
        shutil.copytree(tiny_model_dir / part, folder / part)
    index = json.loads((tiny_model_dir / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", json.loads(raw)["_class_name"]]
    (folder / "model_index.json").write_text(json.dumps(index))
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(raw)
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("real-scheduler-configs")
    return {name: _model_folder(root, tiny_model_dir, name) for name in CONFIGS}


@pytest.fixture(scope="module")
def pipes(folders):
    """Pipelines loaded from the folders by diffusers itself."""
    return {name: StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
            for name, folder in folders.items()}


@pytest.fixture(scope="module")
def bundle_configs(folders, tmp_path_factory):
    """The scheduler config each bundle keeps, exported from a live pipeline (one small graph)."""
    from cfgswitch.export.exporter import check_options, export_bundle

    out = {}
    for name, folder in folders.items():
        pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
        bundle = export_bundle(pipe, tmp_path_factory.mktemp(f"bundle-{name}") / "bundle",
                               check_options(batch_sizes=[1], graphs=["vae_decoder"]), progress=False)
        out[name] = json.loads((bundle / "scheduler" / "scheduler_config.json").read_text())
    return out


def _config_from(source: str, config_name: str, folders, pipes, bundle_configs) -> dict:
    if source == "folder":
        return Sampler.from_diffusers(folders[config_name]).scheduler_config
    if source == "pipeline":
        return Sampler.from_diffusers(pipes[config_name]).scheduler_config
    return bundle_configs[config_name]


def _public(config) -> dict:
    d = dict(config)
    d["_use_default_values"] = sorted(d.get("_use_default_values", []))
    return d


def _trajectory(scheduler, seed: int = 0):
    scheduler.set_timesteps(STEPS)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 4, 4, generator=gen) * float(scheduler.init_noise_sigma)
    step_gen = torch.Generator().manual_seed(seed + 1)
    out = []
    for t in scheduler.timesteps:
        eps = torch.randn(2, 4, 4, 4, generator=gen)
        scheduler.scale_model_input(x, t)  # as a pipeline calls it (Euler checks it was called)
        kwargs = {"generator": step_gen} if type(scheduler) in (EulerAncestralDiscreteScheduler, DDPMScheduler) else {}
        x = scheduler.step(eps, t, x, return_dict=False, **kwargs)[0]
        out.append(x)
    return torch.stack(out)


@pytest.mark.parametrize("source", ["folder", "pipeline", "bundle"])
@pytest.mark.parametrize("config_name", CONFIGS)
@pytest.mark.parametrize("name", sorted(DIFFUSERS_CLASSES))
def test_make_scheduler_equals_diffusers_from_config(name, config_name, source, folders, pipes, bundle_configs):
    pipe = pipes[config_name]
    ref = DIFFUSERS_CLASSES[name].from_config(pipe.scheduler.config)
    ours = make_scheduler(name, _config_from(source, config_name, folders, pipes, bundle_configs))
    assert type(ours) is type(ref)
    assert _public(ours.config) == _public(ref.config)
    ref_traj, our_traj = _trajectory(ref), _trajectory(ours)
    assert torch.equal(ours.timesteps, ref.timesteps)
    assert torch.equal(our_traj, ref_traj)


@pytest.mark.parametrize("source", ["folder", "pipeline", "bundle"])
def test_sd15_to_euler_takes_eulers_default_spacing(source, folders, pipes, bundle_configs):
    """The issue's case: SD 1.5's PNDM config to Euler starts at 999 (linspace), not 876/901 (leading)."""
    sch = make_scheduler("euler", _config_from(source, "sd15", folders, pipes, bundle_configs))
    assert sch.config.timestep_spacing == "linspace"
    sch.set_timesteps(10)
    assert [round(float(t)) for t in sch.timesteps[:3]] == [999, 888, 777]


@pytest.mark.parametrize("scheduler", ["euler", "dpmpp_2m", "unipc"])
def test_generate_from_a_pipeline_matches_diffusers_swap(scheduler, pipes):
    """End to end on the pipeline-object path (which differed by 5e-2..1.2e-1 before the fix)."""
    pipe = pipes["sd15"]
    original = pipe.scheduler
    sampler = Sampler.from_diffusers(pipe)
    prompts, negatives, seeds = ["a red square", "blue circle"], ["", "blurry"], [3, 4]
    ours = sampler.generate(prompts, negatives, steps=STEPS, scheduler=scheduler, plan="always", seed=seeds,
                            output_type="np")
    try:
        pipe.scheduler = DIFFUSERS_CLASSES[scheduler].from_config(original.config)
        ref = pipe(prompts, negative_prompt=negatives, num_inference_steps=STEPS, guidance_scale=7.5,
                   generator=[torch.Generator().manual_seed(s) for s in seeds], output_type="np").images
    finally:
        pipe.scheduler = original
    assert np.abs(ours.images - ref).max() <= 1e-5


def test_make_scheduler_refuses_a_config_that_is_not_a_mapping():
    from cfgswitch.errors import InvalidArgumentError

    with pytest.raises(InvalidArgumentError, match="base_config: expected a scheduler config mapping, got 'list'"):
        make_scheduler("ddim", [("num_train_timesteps", 1000)])
