"""The library's limits: image side, seeds, prompts and plans refused with one typed error, fast."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from cfgswitch import GuidancePlan
from cfgswitch.calibration import CALIBRATION_FILE, FALLBACK_PLAN, auto_plan, write_calibration
from cfgswitch.errors import InvalidArgumentError, PlanParseError
from cfgswitch.serving.batching import parse_request
from cfgswitch.serving.limits import ServeLimits
from cfgswitch.validation import MAX_SEED, check_seeds, max_side_for


def test_image_side_is_bounded_by_twice_the_native_size(tiny_sampler):
    native = tiny_sampler.spec.default_size
    assert max_side_for(tiny_sampler.spec) == max_side_for(native) == 2 * native
    # SD 1.5 (512 px) gets 1024, the serving default: one rule for both
    assert max_side_for(512) == ServeLimits().for_model(512, 77).max_image_side == 1024
    start = time.perf_counter()
    with pytest.raises(InvalidArgumentError) as e:
        tiny_sampler.generate("x", steps=2, width=100000)
    assert time.perf_counter() - start < 5  # refused before any work, not after minutes
    assert e.value.argument == "width"
    assert str(e.value) == (f"width: expected at most {2 * native} pixels (max_image_side; pass a larger "
                            "max_image_side to raise it), got 100000")
    with pytest.raises(InvalidArgumentError, match="height: expected at most"):
        tiny_sampler.generate("x", steps=2, height=2 * native + 2)
    with pytest.raises(InvalidArgumentError, match="max_image_side: expected an integer >= 2"):
        tiny_sampler.generate("x", steps=2, max_image_side=0)


def test_max_image_side_is_explicit_to_raise(tiny_sampler):
    side = 4 * tiny_sampler.spec.default_size
    out = tiny_sampler.generate("x", steps=1, height=side, width=side, max_image_side=side, output_type="np")
    assert out.images.shape == (1, side, side, 3)


def test_largest_seed_is_the_same_in_library_and_server(tiny_sampler):
    assert MAX_SEED == 2**63 - 1
    assert check_seeds(MAX_SEED, 1) == [MAX_SEED]
    assert check_seeds(MAX_SEED - 1, 2) == [MAX_SEED - 1, MAX_SEED]  # image i gets seed + i <= MAX_SEED
    assert check_seeds([MAX_SEED, 0], 2) == [MAX_SEED, 0]
    with pytest.raises(InvalidArgumentError, match=r"seed: expected an integer in \[0, 9223372036854775806\] for 2 images"):
        check_seeds(MAX_SEED, 2)
    with pytest.raises(InvalidArgumentError, match=r"seed: expected an integer in \[0, 9223372036854775807\], got 9223372036854775808"):
        check_seeds(MAX_SEED + 1, 1)
    # the server accepts the same largest seed and refuses the next (INT64 holds no more)
    data = {"prompt": np.array([[b"a"]], dtype=np.object_), "seed": np.array([[MAX_SEED]], dtype=np.int64)}
    (job,) = parse_request(data, limits=ServeLimits(), default_size=16, vae_factor=2)
    assert job.seed == MAX_SEED
    # and the library generates with it
    out = tiny_sampler.generate("x", steps=1, seed=MAX_SEED, output_type="latent")
    assert out.seeds == [MAX_SEED]


@pytest.mark.parametrize(
    "kwargs, argument, index",
    [
        (dict(prompts=["fine", "bad \udcff"]), "prompts[1]", 4),
        (dict(prompts="\ud800"), "prompts[0]", 0),
        (dict(prompts=["a"], negative_prompts="neg \udc80"), "negative_prompts[0]", 4),
    ],
)
def test_lone_surrogate_prompt_names_its_index(tiny_sampler, kwargs, argument, index):
    prompts = kwargs.pop("prompts")
    with pytest.raises(InvalidArgumentError) as e:
        tiny_sampler.generate(prompts, steps=1, **kwargs)
    assert e.value.argument == argument
    assert f"text that encodes as UTF-8 (character {index} is a lone surrogate" in str(e.value)


def test_steps_beyond_the_training_schedule_are_refused(tiny_sampler):
    train = tiny_sampler.scheduler_config["num_train_timesteps"]
    for steps in (train, train + 1):  # diffusers: IndexError at exactly train (steps_offset), ValueError above
        with pytest.raises(InvalidArgumentError) as e:
            tiny_sampler.generate("x", steps=steps)
        assert str(e.value) == (f"steps: expected an integer in [1, {train - 1}] (fewer than the model's {train} "
                                f"training timesteps), got {steps}")


def test_step_plan_past_the_end_is_refused(tiny_sampler):
    with pytest.raises(InvalidArgumentError) as e:
        tiny_sampler.generate("x", steps=10, plan="step:100")
    assert str(e.value) == "plan: expected step:K with K <= steps (10); use always for CFG at every step, got 'step:100'"
    out = tiny_sampler.generate("x", steps=3, plan="step:3", output_type="latent")  # K == steps: CFG all the way
    assert (out.cfg_steps, out.late_steps, out.switch_step) == (3, 0, None)
    with pytest.raises(PlanParseError, match=r"step: an integer >= 0\), got 'step:-1'"):
        tiny_sampler.generate("x", steps=10, plan="step:-1")


def test_auto_plan_uses_the_model_recommendation(tmp_path, tiny_model_dir, caplog):
    from cfgswitch import Sampler

    # without cfgswitch.json: switch:0.5, and the output says so
    sampler = Sampler.load(tiny_model_dir)
    with caplog.at_level("INFO", logger="cfgswitch.calibration"):
        out = sampler.generate("x", steps=4, plan="auto", output_type="latent")
    assert out.plan == FALLBACK_PLAN == "switch:0.5" and (out.cfg_steps, out.late_steps) == (2, 2)
    assert "plan auto: switch:0.5 (the default: the model has no cfgswitch.json recommendation)" in caplog.text
    # with one: its recommended plan
    folder = tmp_path / "model"
    folder.mkdir()
    for part in tiny_model_dir.iterdir():
        (folder / part.name).symlink_to(part)
    path = write_calibration(folder, "switch:0.25:cond", "adaptive:0.9997:min=0.25:cond", {"source": "test"})
    data = json.loads(path.read_text())
    assert path.name == CALIBRATION_FILE and data["recommended_plan"] == "switch:0.25:cond"
    assert data["recommended_adaptive_plan"] == "adaptive:0.9997:min=0.25:cond"
    assert auto_plan(folder)[0] == GuidancePlan.switch_at(0.25, late="cond")
    caplog.clear()
    with caplog.at_level("INFO", logger="cfgswitch.calibration"):
        out = Sampler.load(folder).generate("x", steps=4, plan="auto", output_type="latent")
    assert out.plan == "switch:0.25:cond" and (out.cfg_steps, out.late_steps) == (1, 3)
    assert "plan auto: switch:0.25:cond (the model's recommendation (cfgswitch.json))" in caplog.text
    # a damaged file is ignored with a warning, never a crash
    path.write_text("{not json")
    assert str(auto_plan(folder)[0]) == FALLBACK_PLAN


@pytest.mark.parametrize("plan, expected", [("switch:0.5", 5), ("interval:0.2:0.6", 6), ("always", None), ("switch:0", 0),
                                            ("step:10", None)])
def test_switch_step_is_the_first_step_after_the_last_cfg_step(tiny_sampler, plan, expected):
    out = tiny_sampler.generate("x", steps=10, plan=plan, output_type="latent")
    assert out.switch_step == expected
