"""Per-request admission, limits from the model, one-line errors and the merger's drain (no server, fast)."""

from __future__ import annotations

import logging
import traceback

import numpy as np
import pytest

from cfgswitch.errors import InvalidArgumentError, PlanParseError
from cfgswitch.output import to_uint8
from cfgswitch.serving.admission import AdmittedRequest, token_counter, validate_request, wire_error
from cfgswitch.serving.batching import run_batch
from cfgswitch.serving.client import ServingError, error_reason
from cfgswitch.serving.limits import ServeLimits
from cfgswitch.serving.merger import RequestMerger, ServerDrainingError
from _serving_requests import req  # noqa: E402


@pytest.fixture(scope="module")
def kw(tiny_sampler):
    spec = tiny_sampler.spec
    return dict(limits=ServeLimits(default_steps=2).for_model(spec.default_size, spec.text_length),
                default_size=spec.default_size, vae_factor=spec.vae_scale_factor,
                count_tokens=token_counter(tiny_sampler.tokenizer))


def test_limits_from_the_model():
    limits = ServeLimits().for_model(native_side=64, text_length=77)
    assert (limits.max_image_side, limits.max_prompt_tokens) == (128, 77)
    assert ServeLimits(image_side_factor=3).for_model(64, 77).max_image_side == 192
    assert ServeLimits(max_image_side=1024).for_model(64, 77).max_image_side == 1024  # raised explicitly
    assert ServeLimits(max_prompt_tokens=20).for_model(64, 77).max_prompt_tokens == 20
    with pytest.raises(InvalidArgumentError, match="image-side-factor: expected an integer >= 1, got 0"):
        ServeLimits(image_side_factor=0)
    assert ServeLimits.from_json(ServeLimits().to_json()) == ServeLimits()


def test_validate_request_returns_errors_instead_of_raising(kw):
    cases = [
        (req(prompt=["a"], steps=[0]), InvalidArgumentError, "steps: expected an integer in [1, 100]"),
        (req(prompt=["a"], plan=["sometimes"]), PlanParseError, "plan: expected a plan string"),
        (req(prompt=["a"], height=[34], width=[34]), InvalidArgumentError,
         "height: expected an integer in [2, 32] (the server's --max-image-side), got 34"),
        (req(prompt=["cat " * 80]), InvalidArgumentError, "prompt: expected at most 77 tokens (the server's --max-prompt-tokens"),
        (req(seed=[1]), InvalidArgumentError, "prompt: expected an input 'prompt'"),
    ]
    for data, error, message in cases:
        result = validate_request(data, **kw)
        assert type(result) is error and str(result).startswith(message), result
    ok = validate_request(req(prompt=["cat " * 75], seed=[3]), request_id="abc", **kw)  # 75 + start + end = 77
    assert isinstance(ok, AdmittedRequest) and ok.request_id == "abc" and ok.jobs[0].seed == 3


def test_token_count_is_clips(tiny_sampler):
    # CLIP's known ids of "a photo of a cat" are 7 with start and end (DESIGN.md section 10).
    count = token_counter(tiny_sampler.tokenizer)
    assert count("a photo of a cat") == 7
    assert count("cat " * 100) == 102  # nothing truncated: the limit sees the whole prompt


def test_wire_error_is_one_line_with_the_request_id():
    err = InvalidArgumentError("steps", "an integer in [1, 100]", 0)
    try:
        raise wire_error(err, "0123abcd")
    except Exception as e:  # noqa: BLE001
        text = "".join(traceback.format_exception(None, e, e.__traceback__))  # what PyTriton sends
    assert text == "InvalidArgumentError: steps: expected an integer in [1, 100], got 0 (request id 0123abcd)\n"


def test_an_unexpected_error_reaches_the_client_as_internal_and_the_log_with_its_traceback(caplog):
    caplog.set_level(logging.ERROR, logger="cfgswitch.serving.admission")
    try:
        {}["missing"]
    except KeyError as k:
        err = k
    try:
        raise wire_error(err, "feedbeef")
    except Exception as e:  # noqa: BLE001
        text = "".join(traceback.format_exception(None, e, e.__traceback__))
    assert text == "RequestError: internal error; the server log has the details (request id feedbeef)\n"
    record = caplog.records[-1]
    assert "request feedbeef: internal error" in record.getMessage() and record.exc_info[0] is KeyError


def test_client_reads_the_reason_and_id_through_pytritons_wrapper():
    # What a client received from PyTriton 0.7 for a refused request (its proxy adds a short frame of its own).
    text = ("[500] Failed to process the request(s) for model 'cfgswitch_0_3', message: TritonModelException: Model "
            "execute error: Traceback (most recent call last):\n  File \"/tmp/folderX/1/model.py\", line 492, in execute\n"
            "    raise triton_responses_or_error\nc_python_backend_utils.TritonModelException: InvalidArgumentError: "
            "steps: expected an integer in [1, 100], got 0 (request id 9f86d081884c)\n\n\n\nAt:\n  /tmp/folderX/1/model.py(501): execute\n")
    e = ServingError(text)
    assert str(e) == "InvalidArgumentError: steps: expected an integer in [1, 100], got 0 (request id 9f86d081884c)"
    assert e.request_id == "9f86d081884c"
    assert error_reason("[400] inference request batch-size must be <= 8") == "[400] inference request batch-size must be <= 8"


def test_merger_answers_each_request_and_drain_stops_admission(tiny_sampler, kw):
    merger = RequestMerger(lambda parsed: run_batch(tiny_sampler, parsed, 8), max_images=8, max_delay_s=0.05)
    try:
        reqs = [validate_request(req(prompt=[f"p{i}"], seed=[i], steps=[2]), **kw) for i in range(3)]
        futures = [merger.submit(r) for r in reqs]
        assert merger.drain(60) is True
        with pytest.raises(ServerDrainingError, match="shutting down"):
            merger.submit(reqs[0])
        for i, f in enumerate(futures):
            ref = tiny_sampler.generate([f"p{i}"], steps=2, plan="switch:0.5", seed=[i], output_type="np")
            assert np.abs(f.result()["image"][0].astype(np.int16) - to_uint8(ref.images)[0]).max() <= 1
    finally:
        merger.close()


def test_serve_help_lists_every_limit(capsys):
    from cfgswitch.cli import main

    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag in ("--max-steps", "--max-batch", "--max-image-side", "--image-side-factor", "--max-prompt-bytes",
                 "--max-prompt-tokens", "--drain-timeout", "--instances"):
        assert flag in text, flag
    assert "native side times --image-side-factor" in text
