"""SDXL served: requests carry ``original_size``, ``target_size`` and ``crops_coords_top_left`` (``[b, 2]``).

Fast tests parse requests and run them through the request-batching path without a server;
the slow one serves a tiny SDXL folder with ``cfgswitch serve`` (a real Triton server) and
compares the served image with a direct ``generate`` of the same sizes.
"""

from __future__ import annotations

import numpy as np
import pytest

from cfgswitch.errors import CfgSwitchError, InvalidArgumentError
from cfgswitch.output import to_uint8
from cfgswitch.serving.batching import parse_batch, parse_request, run_batch
from cfgswitch.serving.limits import ServeLimits
from _serving_requests import req  # noqa: E402

LIMITS = ServeLimits(max_steps=20, max_batch=4, max_image_side=64, max_prompt_bytes=64, default_steps=3)
KW = dict(limits=LIMITS, default_size=64, vae_factor=8)


def test_size_inputs_are_parsed_per_image():
    jobs = parse_request(req(prompt=["a", "b"], original_size=[[128, 96], [128, 96]], target_size=[[64, 64], [64, 64]]), **KW)
    assert jobs[0].key == jobs[1].key
    assert jobs[0].key.size_kwargs() == {"original_size": (128, 96), "target_size": (64, 64)}
    (plain,) = parse_request(req(prompt=["a"]), **KW)
    assert plain.key.sizes == () and plain.key.size_kwargs() == {}


@pytest.mark.parametrize("cols, message", [
    (dict(prompt=["a"], original_size=[[0, 64]]), "original_size[0]: expected an integer in [1, 1048576], got 0"),
    (dict(prompt=["a"], crops_coords_top_left=[[-1, 0]]), "crops_coords_top_left[0]: expected an integer in [0, 1048576], got -1"),
])
def test_bad_sizes_name_the_input(cols, message):
    with pytest.raises(InvalidArgumentError) as e:
        parse_request(req(**cols), **KW)
    assert message in str(e.value)


def test_size_input_of_the_wrong_shape_is_refused():
    data = req(prompt=["a"])
    data["original_size"] = np.array([[64]], dtype=np.int32)
    with pytest.raises(InvalidArgumentError, match=r"original_size: expected shape \[1, 2\], got \[1, 1\]"):
        parse_request(data, **KW)


def test_served_sizes_equal_generate_with_them(sdxl_sampler):
    parsed = parse_batch([
        req(prompt=["a red square"], seed=[3], steps=[3], original_size=[[128, 128]], crops_coords_top_left=[[8, 0]]),
        req(prompt=["a red square"], seed=[3], steps=[3]),
    ], **KW)
    sized, plain = run_batch(sdxl_sampler, parsed, 4)
    ref = sdxl_sampler.generate(["a red square"], steps=3, plan="switch:0.5", scheduler="ddim", seed=[3], output_type="np",
                                original_size=(128, 128), crops_coords_top_left=(8, 0))
    ref_plain = sdxl_sampler.generate(["a red square"], steps=3, plan="switch:0.5", scheduler="ddim", seed=[3], output_type="np")
    assert np.array_equal(sized["image"][0], to_uint8(ref.images)[0])
    assert np.array_equal(plain["image"][0], to_uint8(ref_plain.images)[0])
    assert not np.array_equal(sized["image"][0], plain["image"][0])  # the sizes reached the UNet


def test_sizes_on_an_sd_model_fail_that_request_alone(tiny_sampler):
    parsed = parse_batch([req(prompt=["a"], seed=[1], steps=[2], original_size=[[32, 32]]),
                          req(prompt=["b"], seed=[2], steps=[2])], limits=LIMITS, default_size=16, vae_factor=2)
    bad, good = run_batch(tiny_sampler, parsed, 4)
    assert isinstance(bad, CfgSwitchError) and "size conditioning" in str(bad)
    assert good["image"].shape == (1, 16, 16, 3)


@pytest.mark.slow
def test_cfgswitch_serve_an_sdxl_folder(sdxl_pipe, sdxl_sampler, tmp_path):
    pytest.importorskip("pytriton")
    pytest.importorskip("tritonclient.http")
    from cfgswitch.serving.client import ServingClient
    from cfgswitch.serving.process import start_serve

    folder = tmp_path / "tiny-sdxl"
    sdxl_pipe.save_pretrained(folder, safe_serialization=True)
    work = tmp_path / "work"
    work.mkdir()
    proc = start_serve(str(folder), work, ["--default-steps", "3", "--max-batch", "2"])
    try:
        proc.wait_ready("cfgswitch", timeout_s=240)
        with ServingClient(proc.http_url) as client:
            got = client.generate("a blue circle", seed=5, plan="always", original_size=(96, 64), target_size=(64, 64))
            plain = client.generate("a blue circle", seed=5, plan="always")
        proc.stop()
    finally:
        proc.kill_session()
    ref = sdxl_sampler.generate(["a blue circle"], steps=3, plan="always", scheduler="ddim", seed=[5], output_type="np",
                                original_size=(96, 64), target_size=(64, 64))
    # The step engine serves one request alone: within 5e-5 of generate, so at most one uint8 level.
    diff = np.abs(got.image.astype(int) - to_uint8(ref.images)[0].astype(int))
    assert got.image.shape == (64, 64, 3) and diff.max() <= 1
    assert not np.array_equal(got.image, plain.image)
