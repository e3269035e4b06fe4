"""The step engine: many requests per UNet call, each equal to its solo ``generate``.

Tolerance: images within 1e-5 of solo ``generate`` (the batch invariance the sampler tests
already state for one image in a batch), counters equal exactly.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time

import numpy as np
import pytest

from cfgswitch.errors import (
    DeadlineExceededError,
    EngineClosedError,
    InvalidArgumentError,
    PlanParseError,
    QueueFullError,
    RequestFailedError,
    UnknownSchedulerError,
)
from cfgswitch.step_engine import StepEngine, default_buckets

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TOL = 1e-5
STEPS = (3, 4, 5, 6)
SCHEDULERS = ("ddim", "euler", "euler_a", "dpmpp_2m")
# adaptive:0.998 switches the tiny model's images at different steps (per-image modes in one request)
PLANS = ("always", "switch:0.3", "switch:0.5:cond", "step:2", "interval:0.2:0.6", "adaptive:0.99", "adaptive:0.998")
PROMPTS = ("a red fox in the snow", "a cat", "a lighthouse at dusk", "two dogs")


def mixed_requests(count: int):
    """``count`` requests that mix steps, schedulers, plans, guidance, negatives, seeds and images per prompt."""
    out = []
    for i in range(count):
        out.append(dict(
            prompts=[PROMPTS[i % 4]] if i % 3 else [PROMPTS[i % 4], PROMPTS[(i + 1) % 4]],
            negative_prompts=None if i % 2 else "blurry",
            steps=STEPS[i % 4], scheduler=SCHEDULERS[(i // 4) % 4], plan=PLANS[i % 7],
            guidance_scale=(7.5, 3.0, 12.0)[i % 3], seed=100 + 7 * i,
            num_images_per_prompt=1 + (i % 5 == 0),
        ))
    return out


def _solo(sampler, req):
    kw = dict(req)
    prompts = kw.pop("prompts")
    return sampler.generate(prompts, output_type="np", **kw)


def _same(out, ref):
    assert np.abs(out.images - ref.images).max() <= TOL
    assert (out.cfg_steps, out.late_steps, out.unet_rows, out.switch_step) == (
        ref.cfg_steps, ref.late_steps, ref.unet_rows, ref.switch_step)
    assert out.plan == ref.plan and out.seeds == ref.seeds and out.step_kernel == ref.step_kernel


class RecordingUNet:
    """Wraps the real plain-UNet runner and records the rows of every call."""

    def __init__(self, inner):
        self.inner = inner
        self.calls = []

    def predict(self, sample, timestep, encoder_hidden_states):
        self.calls.append(int(sample.shape[0]))
        return self.inner.predict(sample, timestep, encoder_hidden_states)


@pytest.fixture()
def recorded(tiny_sampler):
    runners = tiny_sampler.runners
    inner = runners.unet
    rec = RecordingUNet(inner)
    runners.unet = rec
    yield rec
    runners.unet = inner


@pytest.mark.parametrize("unet_call", ["single", "split"])
def test_24_mixed_concurrent_requests_equal_solo_generate(tiny_sampler, unet_call):
    reqs = mixed_requests(24)
    with tiny_sampler.engine(max_rows=12, unet_call=unet_call) as engine:
        futs = [None] * len(reqs)

        def send(i):
            kw = dict(reqs[i])
            futs[i] = engine.submit(kw.pop("prompts"), output_type="np", **kw)

        threads = [threading.Thread(target=send, args=(i,)) for i in range(len(reqs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        outs = [f.result(timeout=120) for f in futs]
        stats = engine.stats()
    assert stats["completed"] == 24 and stats["failed"] == 0
    assert max(stats["rows_per_call"]) <= 12
    assert max(stats["rows_per_call"]) > 4, "requests should share calls"
    for req, out in zip(reqs, outs):
        _same(out, _solo(tiny_sampler, req))


def test_every_call_has_the_rows_the_plans_imply(tiny_sampler, recorded):
    # alone, a request's calls are exactly its plan's rows: 2 per guided image, 1 per late one
    with tiny_sampler.engine(max_rows=8) as engine:
        out = engine.submit(["a cat", "a dog"], steps=6, plan="interval:0.2:0.6", output_type="latent").result(60)
    assert recorded.calls == [2, 4, 4, 4, 2, 2]  # CFG at steps round(1.2)=1 .. round(3.6)-1=3
    assert sum(recorded.calls) == out.unet_rows == 18
    recorded.calls.clear()
    reqs = mixed_requests(10)
    with tiny_sampler.engine(max_rows=7) as engine:
        futs = []
        for r in reqs:
            kw = dict(r)
            if len(kw["prompts"]) * kw["num_images_per_prompt"] > 3:
                kw["num_images_per_prompt"] = 1
            futs.append(engine.submit(kw.pop("prompts"), output_type="latent", **kw))
        outs = [f.result(timeout=120) for f in futs]
        stats = engine.stats()
    assert max(recorded.calls) <= 7
    assert sum(recorded.calls) == sum(o.unet_rows for o in outs) == stats["rows"]
    assert stats["padded_rows"] == 0


def test_row_buckets_pad_but_never_leak(tiny_sampler, recorded):
    reqs = mixed_requests(8)
    with tiny_sampler.engine(max_rows=8, row_buckets=True) as engine:
        futs = []
        for r in reqs:
            kw = dict(r)
            kw["num_images_per_prompt"] = 1
            futs.append(engine.submit(kw.pop("prompts"), output_type="np", **kw))
        outs = [f.result(timeout=120) for f in futs]
        stats = engine.stats()
    assert set(recorded.calls) <= {1, 2, 4, 8}
    real = sum(o.unet_rows for o in outs)
    assert stats["rows"] == real and stats["padded_rows"] == sum(recorded.calls) - real
    assert stats["padded_rows"] > 0, "the mix should need padding somewhere"
    for r, out in zip(reqs, outs):
        r = dict(r)
        r["num_images_per_prompt"] = 1
        _same(out, _solo(tiny_sampler, r))
    assert default_buckets(12) == [1, 2, 4, 8, 12]


def test_bad_requests_are_refused_at_submit_with_generate_errors(tiny_sampler):
    with tiny_sampler.engine(max_rows=4, max_queue=2) as engine:
        cases = [
            (dict(prompts=[]), InvalidArgumentError, "prompts"),
            (dict(prompts="x", steps=0), InvalidArgumentError, "steps"),
            (dict(prompts="x", plan="sometimes"), PlanParseError, "plan"),
            (dict(prompts="x", scheduler="heun"), UnknownSchedulerError, "scheduler"),
            (dict(prompts="x", guidance_scale=float("nan")), InvalidArgumentError, "guidance_scale"),
            (dict(prompts="x", height=13), InvalidArgumentError, "height"),
            (dict(prompts="x", deadline=-1), InvalidArgumentError, "deadline"),
            (dict(prompts=["a", "b", "c"]), InvalidArgumentError, "max_rows"),
        ]
        for kw, err, word in cases:
            kw = dict(kw)
            prompts = kw.pop("prompts")
            with pytest.raises(err, match=word):
                engine.submit(prompts, **kw)
            if word not in ("deadline", "max_rows"):  # generate refuses the same arguments the same way
                with pytest.raises(err, match=word):
                    tiny_sampler.generate(prompts, **kw)
        assert engine.stats()["submitted"] == 0
    with pytest.raises(EngineClosedError, match="closed"):
        engine.submit("a cat", steps=2)


def test_a_failing_request_fails_alone(tiny_sampler):
    with tiny_sampler.engine(max_rows=12) as engine:
        good = [engine.submit(PROMPTS[i % 4], steps=5, plan="switch:0.5", seed=i, output_type="np") for i in range(6)]
        # an enormous guidance weight drives the latents to inf within the iteration
        bad = engine.submit("a cat", steps=5, guidance_scale=1e38, plan="always", seed=3, output_type="np")
        more = [engine.submit(PROMPTS[i % 4], steps=4, plan="always", seed=50 + i, output_type="np") for i in range(3)]
        with pytest.raises(RequestFailedError, match="not finite"):
            bad.result(timeout=60)
        outs = [f.result(timeout=60) for f in good + more]
        assert engine.stats()["failed"] == 1
    for i, out in enumerate(outs[:6]):
        _same(out, tiny_sampler.generate(PROMPTS[i % 4], steps=5, plan="switch:0.5", seed=i, output_type="np"))


def test_queue_limit_cancel_deadline_and_close_while_busy(tiny_sampler):
    engine = StepEngine(tiny_sampler, max_rows=2, max_queue=3)
    try:
        running = engine.submit("a cat", steps=40, seed=1, output_type="latent")
        deadline = time.time() + 30
        while engine.stats()["admitted"] < 1 and time.time() < deadline:  # it left the queue
            time.sleep(0.005)
        queued = [engine.submit("a dog", steps=3, seed=2 + i, output_type="latent") for i in range(3)]
        with pytest.raises(QueueFullError, match="max_queue=3"):
            engine.submit("a fox", steps=3)
        assert queued[0].cancel() and queued[0].cancelled()
        with pytest.raises(concurrent.futures.CancelledError):
            queued[0].result(timeout=1)
        deadline = time.time() + 30
        while engine.stats()["iterations"] < 2 and time.time() < deadline:
            time.sleep(0.01)
        assert running.cancel(), "a running request can be cancelled"
        for f in queued[1:]:
            assert f.result(timeout=60).late_steps == 0
        s = engine.stats()
        assert s["cancelled"] == 2 and s["completed"] == 2
        expiring = engine.submit("a fox", steps=400, seed=9, output_type="latent", deadline=0.3)
        with pytest.raises(DeadlineExceededError, match="deadline"):
            expiring.result(timeout=60)
        busy = [engine.submit("a fox", steps=6, seed=20 + i, output_type="latent") for i in range(2)]
    finally:
        engine.close()
    assert all(f.done() and f.exception() is None for f in busy), "close finishes work in flight"
    with pytest.raises(EngineClosedError):
        engine.submit("a cat")


@pytest.mark.slow
def test_embedded_model_requests_equal_solo_generate():
    from cfgswitch import Sampler

    sampler = Sampler.load("default")
    reqs = [dict(prompts=["a small red triangle at the top left on a white background"], steps=8, scheduler="ddim",
                 plan="switch:0.5", seed=0),
            dict(prompts=["a large blue circle at the centre on black"], steps=6, scheduler="euler",
                 plan="always", seed=1, negative_prompts="green"),
            dict(prompts=["a yellow cross"], steps=7, scheduler="dpmpp_2m", plan="adaptive:0.99", seed=2),
            dict(prompts=["a green square"], steps=5, scheduler="euler_a", plan="interval:0.2:0.6", seed=3)]
    with sampler.engine(max_rows=8) as engine:
        futs = []
        for r in reqs:
            kw = dict(r)
            futs.append(engine.submit(kw.pop("prompts"), output_type="np", **kw))
        outs = [f.result(timeout=300) for f in futs]
    for r, out in zip(reqs, outs):
        _same(out, _solo(sampler, r))


def test_guidance_rescale_requests_share_the_engine(tiny_sampler):
    reqs = [dict(steps=4, scheduler="ddim", plan="switch:0.5", guidance_rescale=0.7, seed=1),
            dict(steps=4, scheduler="euler", plan="always", seed=2),
            dict(steps=5, scheduler="dpmpp_2m", plan="always", guidance_rescale=0.3, seed=3)]
    with tiny_sampler.engine(max_rows=8) as engine:
        futs = [engine.submit("a red fox", output_type="np", **r) for r in reqs]
        outs = [f.result(timeout=60) for f in futs]
    for r, out in zip(reqs, outs):
        _same(out, tiny_sampler.generate("a red fox", output_type="np", **r))
    plain = tiny_sampler.generate("a red fox", output_type="np", **dict(reqs[0], guidance_rescale=0.0))
    assert np.abs(plain.images - outs[0].images).max() > 1e-4, "the rescale changed the images"
    with pytest.raises(InvalidArgumentError, match="guidance_rescale"):
        tiny_sampler.generate("a cat", steps=1, guidance_rescale=1.5)
