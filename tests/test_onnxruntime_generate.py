"""The onnxruntime backend runs the same loop as torch and gives the same images."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from _bundle_fixtures import ort_sampler, tiny_bundle  # noqa: F401  (fixtures)

from cfgswitch import Sampler
from cfgswitch.cli import main

# Same weights, same loop; only kernel order differs (measured ~1.5e-6 on 8 steps). The bound:
IMAGE_TOL = 1e-3
PLANS = ["always", "switch:0.5", "switch:0.5:cond", "interval:0.2:0.6"]
PROMPTS = {1: ["a red fox"], 3: ["a red fox", "a blue house", "two cats"]}


@pytest.mark.slow
@pytest.mark.parametrize("plan", PLANS)
@pytest.mark.parametrize("batch", [1, 3])
def test_generate_matches_torch_backend(plan, batch, ort_sampler, tiny_sampler):  # noqa: F811
    kwargs = dict(steps=6, guidance_scale=7.5, plan=plan, seed=11, output_type="np")
    ref = tiny_sampler.generate(PROMPTS[batch], **kwargs)
    got = ort_sampler.generate(PROMPTS[batch], **kwargs)
    assert got.backend == "onnxruntime" and ref.backend == "torch"
    assert (got.cfg_steps, got.late_steps, got.unet_rows) == (ref.cfg_steps, ref.late_steps, ref.unet_rows)
    assert got.images.shape == ref.images.shape == (batch, 16, 16, 3)
    assert np.abs(ref.images - 0.5).max() > 0.05  # not a flat image
    np.testing.assert_allclose(got.images, ref.images, rtol=0, atol=IMAGE_TOL)


@pytest.mark.slow
def test_adaptive_plan_runs_plain_graph_on_2b_rows(ort_sampler, tiny_sampler):  # noqa: F811
    kwargs = dict(steps=6, plan="adaptive:0.5", seed=3, output_type="np")
    ref = tiny_sampler.generate(PROMPTS[3], **kwargs)
    got = ort_sampler.generate(PROMPTS[3], **kwargs)
    assert got.late_steps == ref.late_steps
    np.testing.assert_allclose(got.images, ref.images, rtol=0, atol=IMAGE_TOL)


@pytest.mark.slow
def test_negative_prompts_and_images_per_prompt(ort_sampler, tiny_sampler):  # noqa: F811
    kwargs = dict(steps=4, plan="switch:0.5", seed=5, output_type="np", num_images_per_prompt=3)
    ref = tiny_sampler.generate(["a"], ["blurry"], **kwargs)
    got = ort_sampler.generate(["a"], ["blurry"], **kwargs)
    np.testing.assert_allclose(got.images, ref.images, rtol=0, atol=IMAGE_TOL)


def test_encode_prompts_matches_torch(ort_sampler, tiny_sampler):  # noqa: F811
    got, _ = ort_sampler.encode_prompts(["a photo of a cat", ""])
    ref, _ = tiny_sampler.encode_prompts(["a photo of a cat", ""])
    assert got.dtype == torch.float32 and got.device.type == "cpu"
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-4)


def test_runner_outputs_are_fresh_tensors(ort_sampler):  # noqa: F811
    """Schedulers (PNDM) keep past predictions: a second call must not overwrite the first result."""
    unet = ort_sampler.runners.unet
    x = torch.randn(1, 4, 8, 8)
    ehs = torch.randn(1, 77, 32)
    a = unet.predict(x, torch.tensor([500.0]), ehs)
    a_copy = a.clone()
    unet.predict(x * 2, torch.tensor([10.0]), ehs)
    torch.testing.assert_close(a, a_copy, rtol=0, atol=0)


def test_load_without_backend_picks_by_the_rule_and_logs(tiny_bundle, caplog):  # noqa: F811
    # docs/export.md 2b: OpenVINO when it imports, else ONNX Runtime (no plans, no GPU here)
    from cfgswitch.backends.registry import importable

    picked = "openvino" if importable("openvino") else "onnxruntime"
    with caplog.at_level(logging.INFO, logger="cfgswitch.bundle_loading"):
        s = Sampler.load(tiny_bundle)
    assert s.backend == picked
    assert f"backend: {picked} (the bundle has no TensorRT plans)" in caplog.text
    assert s.spec.default_size == 16 and s.spec.text_width == 32
    ort = Sampler.load(tiny_bundle, backend="onnxruntime")
    assert ort.runners.info["providers"] == ["CPUExecutionProvider"]  # the default provider: the CPU


def test_cli_generate_on_onnxruntime(tiny_bundle, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    rc = main(["generate", "a red fox", "--model", str(tiny_bundle), "--backend", "onnxruntime", "--steps", "3",
               "--plan", "switch:0.5", "--out", str(out)])
    assert rc == 0
    result = json.loads((out / "result.json").read_text())
    assert result["files"] == ["image_000.png"] and (out / "image_000.png").is_file()
    assert result["backend"] == "onnxruntime"


@pytest.mark.slow
def test_fp16_bundle_on_onnxruntime_cpu(tiny_bundle_fp16, tiny_sampler):
    """fp16 graphs run on ORT's CPU provider; images stay close to the fp32 torch reference.

    Tolerance: fp16 rounding of UNet and VAE activations (measured ~6e-4 max on 8 steps).
    """
    from cfgswitch.bundle import read_manifest

    m = read_manifest(tiny_bundle_fp16).manifest
    assert m["dtype"] == "float16"
    assert all(m["graphs"][g]["verify"]["ok"] for g in m["graphs"]), {g: e["verify"] for g, e in m["graphs"].items()}
    unet_in = {t["name"]: t["dtype"] for t in m["graphs"]["unet_cfg"]["inputs"]}
    assert unet_in == {"sample": "float16", "timestep": "float32", "encoder_hidden_states": "float16", "guidance_scale": "float32"}
    s = Sampler.load(tiny_bundle_fp16, backend="onnxruntime", threads=2)
    kwargs = dict(steps=6, plan="switch:0.5", seed=2, output_type="np")
    got = s.generate(PROMPTS[3], **kwargs).images
    ref = tiny_sampler.generate(PROMPTS[3], **kwargs).images
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, ref, rtol=0, atol=5e-3)


from _bundle_fixtures import tiny_bundle_fp16  # noqa: E402,F401  (fixture)


def test_concurrent_runner_calls_match_serial_calls(ort_sampler):  # noqa: F811
    """Serving threads may share one sampler: concurrent calls give the serial results."""
    from concurrent.futures import ThreadPoolExecutor

    unet = ort_sampler.runners.unet
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(3, 4, 8, 8, generator=g) for _ in range(4)]
    ehs = torch.randn(3, 77, 32, generator=g)
    t = torch.full((3,), 300.0)
    serial = [unet.predict(x, t, ehs) for x in xs]
    with ThreadPoolExecutor(4) as pool:
        parallel = list(pool.map(lambda x: unet.predict(x, t, ehs), xs))
    for a, b in zip(serial, parallel):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
