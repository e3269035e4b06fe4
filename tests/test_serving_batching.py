"""Request parsing and grouping of the serving paths, without a server (fast)."""

from __future__ import annotations

import numpy as np
import pytest

from cfgswitch.errors import InvalidArgumentError, PlanParseError, UnknownSchedulerError
from cfgswitch.output import to_uint8
from cfgswitch.serving.batching import RequestError, group_jobs, parse_batch, parse_request, run_batch
from cfgswitch.serving.client import error_reason
from cfgswitch.serving.limits import ServeLimits
from _serving_requests import req  # noqa: E402

LIMITS = ServeLimits(max_steps=20, max_batch=4, max_image_side=64, max_prompt_bytes=32, default_steps=3)
KW = dict(limits=LIMITS, default_size=16, vae_factor=2)


def test_defaults_fill_in():
    (job,) = parse_request(req(prompt=["a cat"], seed=[4]), **KW)
    assert (job.prompt, job.negative_prompt, job.seed) == ("a cat", "", 4)
    k = job.key
    assert (k.steps, k.height, k.width, k.scheduler, k.plan, k.guidance_scale) == (3, 16, 16, "ddim", "switch:0.5", 7.5)
    assert k.no_negative and k.negatives([job]) is None and k.sizes == ()


def test_missing_seed_draws_one_per_image():
    jobs = parse_request(req(prompt=["a", "b"]), **KW)
    assert all(0 <= j.seed < 2**31 for j in jobs)


@pytest.mark.parametrize("cols, error, message", [
    (dict(seed=[1]), InvalidArgumentError, "prompt: expected an input 'prompt'"),
    (dict(prompt=["a"], steps=[0]), InvalidArgumentError, "steps: expected an integer in [1, 20] (the server's --max-steps), got 0"),
    (dict(prompt=["a"], guidance_scale=[float("nan")]), InvalidArgumentError, "guidance_scale: expected a finite number >= 0, got nan"),
    (dict(prompt=["a"], plan=["switch:x"]), PlanParseError, "plan: expected a plan string with numeric parameters"),
    (dict(prompt=["a"], scheduler=["heun"]), UnknownSchedulerError, "scheduler: expected a scheduler that calls the model once"),
    (dict(prompt=["a"], height=[17]), InvalidArgumentError, "height: expected a multiple of the VAE factor 2, got 17"),
    (dict(prompt=["a"], width=[66]), InvalidArgumentError, "width: expected an integer in [2, 64]"),
    (dict(prompt=["a" * 33]), InvalidArgumentError, "prompt: expected at most 32 bytes"),
    (dict(prompt=["a"] * 5), InvalidArgumentError, "prompt: expected at most 4 images per request"),
    (dict(prompt=["a", "b"], height=[16, 32]), InvalidArgumentError, "height[1]: expected the size of image 0 (16x16)"),
    (dict(prompt=["a", "b"], steps=[3, 0]), InvalidArgumentError, "steps[1]: expected an integer in [1, 20]"),
])
def test_bad_values_name_the_input(cols, error, message):
    with pytest.raises(error) as info:
        parse_request(req(**cols), **KW)
    assert str(info.value).startswith(message)


def test_wrong_dtype_and_shape_and_unknown_input():
    bad = req(prompt=["a"])
    bad["steps"] = np.array([[3.0]], dtype=np.float32)
    with pytest.raises(InvalidArgumentError, match=r"^steps: expected an integer \(INT32\), got 'dtype float32'"):
        parse_request(bad, **KW)
    bad = req(prompt=["a"], seed=[1, 2])
    with pytest.raises(InvalidArgumentError, match=r"^seed: expected shape \[1, 1\], got \[2, 1\]"):
        parse_request(bad, **KW)
    bad = req(prompt=["a"])
    bad["strength"] = np.zeros((1, 1), np.float32)
    with pytest.raises(InvalidArgumentError, match=r"^inputs: expected only .*got \['strength'\]"):
        parse_request(bad, **KW)


def test_a_bad_request_in_a_batch_is_named():
    with pytest.raises(RequestError, match=r"^request 1 of a dynamic batch of 2: steps: expected"):
        parse_batch([req(prompt=["a"]), req(prompt=["b"], steps=[0])], **KW)


def test_grouping_by_settings_in_chunks():
    parsed = parse_batch([
        req(prompt=["a", "b"], seed=[1, 2]),
        req(prompt=["c"], seed=[3], steps=[5]),
        req(prompt=["d", "e", "f"], seed=[4, 5, 6]),
    ], **KW)
    groups = group_jobs(parsed, max_batch=4)
    assert [(k.steps, [(r, row) for r, row, _ in m]) for k, m in groups] == [
        (3, [(0, 0), (0, 1), (2, 0), (2, 1)]), (3, [(2, 2)]), (5, [(1, 0)])]


def test_run_batch_matches_direct_generation(tiny_sampler):
    parsed = parse_batch([req(prompt=["a", "b"], seed=[1, 2], steps=[2, 2]), req(prompt=["c"], seed=[3], steps=[3])], **KW)
    outs = run_batch(tiny_sampler, parsed, max_batch=4)
    assert [o["image"].shape for o in outs] == [(2, 16, 16, 3), (1, 16, 16, 3)]
    ref = tiny_sampler.generate(["c"], steps=3, plan="switch:0.5", seed=[3], output_type="np")
    assert np.array_equal(outs[1]["image"][0], to_uint8(ref.images)[0])
    assert outs[1]["cfg_steps"].tolist() == [[2]] and outs[1]["late_steps"].tolist() == [[1]]
    ref2 = tiny_sampler.generate(["a", "b"], steps=2, plan="switch:0.5", seed=[1, 2], output_type="np")
    assert np.array_equal(outs[0]["image"], to_uint8(ref2.images))


def test_limits_are_checked():
    with pytest.raises(InvalidArgumentError, match="max-steps: expected an integer >= 1, got 0"):
        ServeLimits(max_steps=0)
    with pytest.raises(InvalidArgumentError, match=r"default_steps: expected at most max_steps \(10\)"):
        ServeLimits(max_steps=10, default_steps=30)
    assert ServeLimits.from_json(LIMITS.to_json()) == LIMITS


def test_error_reason_takes_the_last_error_line():
    text = ("Traceback (most recent call last):\n  File \"x.py\", line 1, in f\n"
            "cfgswitch.errors.InvalidArgumentError: steps: expected an integer in [1, 20], got 0\n\n\nAt:\n  model.py(501): execute\n")
    assert error_reason(text) == "InvalidArgumentError: steps: expected an integer in [1, 20], got 0"
    assert error_reason("[400] inference request batch-size must be <= 8") == "[400] inference request batch-size must be <= 8"
