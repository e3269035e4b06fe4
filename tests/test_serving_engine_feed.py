"""Serving on the step engine without a server: admitted requests in, one answer each.

Reference: ``run_batch`` (today's request-level path), image for image; batch invariance
tolerance of 1e-5 on float images is at most one uint8 level after rounding.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

from cfgswitch.errors import InvalidArgumentError, RequestFailedError
from cfgswitch.serving.admission import validate_request
from cfgswitch.serving.batching import run_batch
from cfgswitch.serving.engine_feed import EngineFeeder
from cfgswitch.serving.limits import ServeLimits
from cfgswitch.serving.merger import ServerDrainingError
from _serving_requests import req  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LIMITS = ServeLimits(max_steps=20, max_batch=4, max_image_side=64, max_prompt_bytes=64, default_steps=3)


def admit(sampler, data):
    spec = sampler.spec
    return validate_request(data, limits=LIMITS, default_size=spec.default_size, vae_factor=spec.vae_scale_factor,
                            check_request=sampler.runners.check_request)


GOOD = [
    req(prompt=["a cat"], seed=[1], plan=["switch:0.5"]),
    req(prompt=["a dog", "a fox"], seed=[2, 3], steps=[4, 4], scheduler=["euler", "euler"], plan=["always", "always"]),
    req(prompt=["a boat", "a tree"], seed=[4, 5], steps=[3, 5], plan=["always", "interval:0.2:0.6"]),  # two groups
    req(prompt=["a house"], negative_prompt=["blurry"], seed=[6], guidance_scale=[3.0], plan=["adaptive:0.998"]),
]


def test_answers_equal_request_level_batching_and_bad_requests_fail_alone(tiny_sampler):
    feeder = EngineFeeder(tiny_sampler, max_rows=8)
    try:
        bad = [req(prompt=["x"], steps=[0]), req(prompt=["x"], plan=["sometimes"]), req(prompt=["y"] * 5)]
        refused = [admit(tiny_sampler, d) for d in bad]
        assert all(isinstance(r, InvalidArgumentError) for r in refused)
        admitted = [admit(tiny_sampler, d) for d in GOOD]
        futures = [None] * len(admitted)

        def send(i):
            futures[i] = feeder.submit(admitted[i])

        threads = [threading.Thread(target=send, args=(i,)) for i in range(len(admitted))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        # one that fails inside the iteration (non-finite latents) fails alone too
        broken = feeder.submit(admit(tiny_sampler, req(prompt=["z"], seed=[9], guidance_scale=[3e38])))
        answers = [f.result(timeout=120) for f in futures]
        with pytest.raises(RequestFailedError, match="not finite"):
            broken.result(timeout=120)
        ref = run_batch(tiny_sampler, [a.jobs for a in admitted], LIMITS.max_batch)
        for got, want in zip(answers, ref):
            assert got["image"].shape == want["image"].shape and got["image"].dtype == np.uint8
            assert np.abs(got["image"].astype(int) - want["image"].astype(int)).max() <= 1
            assert np.array_equal(got["cfg_steps"], want["cfg_steps"])
            assert np.array_equal(got["late_steps"], want["late_steps"])
        m = feeder.metrics()
        assert m["completed"] >= 5 and m["failed"] == 1 and m["mean_rows_per_call"] > 1
        assert feeder.pending() == 0
    finally:
        assert feeder.drain(30)
        feeder.close()
    with pytest.raises(ServerDrainingError):
        feeder.submit(admitted[0])


def test_drain_finishes_in_flight_and_close_answers_the_rest(tiny_sampler):
    feeder = EngineFeeder(tiny_sampler, max_rows=2)
    long = [feeder.submit(admit(tiny_sampler, req(prompt=["a cat"], seed=[i], steps=[20]))) for i in range(3)]
    assert not feeder.drain(0.05), "work is still in flight"
    with pytest.raises(ServerDrainingError):
        feeder.submit(admit(tiny_sampler, req(prompt=["late"], seed=[1])))
    assert feeder.drain(120)
    assert all(f.result(timeout=1)["image"].shape[0] == 1 for f in long)
    feeder2 = EngineFeeder(tiny_sampler, max_rows=2)
    pending = [feeder2.submit(admit(tiny_sampler, req(prompt=["a cat"], seed=[i], steps=[20]))) for i in range(3)]
    feeder2.close()
    for f in pending:
        assert f.done()
        if f.exception() is not None:
            assert isinstance(f.exception(), ServerDrainingError)
    feeder.close()


def test_plan_auto_reaches_the_model_recommendation(tiny_sampler):
    from cfgswitch.serving.batching import parse_request

    jobs = parse_request(req(prompt=["a cat"], seed=[1], plan=["auto"]), limits=LIMITS,
                         default_size=tiny_sampler.spec.default_size, vae_factor=tiny_sampler.spec.vae_scale_factor)
    assert jobs[0].key.plan == "auto"
    feeder = EngineFeeder(tiny_sampler, max_rows=4)
    try:
        out = feeder.submit(admit(tiny_sampler, req(prompt=["a cat"], seed=[1], plan=["auto"], steps=[4]))).result(60)
    finally:
        feeder.close()
    ref = tiny_sampler.generate("a cat", seed=1, steps=4, plan="auto", output_type="np")  # no cfgswitch.json: switch:0.5
    assert ref.plan == "switch:0.5" and out["cfg_steps"][0, 0] == ref.cfg_steps
