"""ONNX Runtime load options: UNet sessions fixed to each input shape (same images, one session per shape, the rule),
and thread pools that stop spinning when a run ends."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from _bundle_fixtures import tiny_bundle  # noqa: F401  (fixture)

from cfgswitch import Sampler
from cfgswitch.errors import InvalidArgumentError
from cfgswitch.runners.ort_static import STATIC_MAX_UNET_BYTES, dimension_values, unet_bytes, use_static_shapes

# Same weights; only kernel order differs (the onnxruntime backend's bound, tests/test_onnxruntime_generate.py).
IMAGE_TOL = 1e-3
KWARGS = dict(steps=6, guidance_scale=7.5, plan="switch:0.5", seed=4, output_type="np")
PROMPTS = ["a red fox", "a blue house", "two cats"]
CPU = ["CPUExecutionProvider"]


@pytest.fixture(scope="module")
def static_sampler(tiny_bundle):  # noqa: F811
    # late calls on the plain graph's per-shape sessions (folding them: tests/test_folded_context.py)
    return Sampler.load(tiny_bundle, backend="onnxruntime", threads=2, static_shapes=True, fold_uncond=False)


@pytest.fixture(scope="module")
def diffusers_images(tiny_model_dir):
    """diffusers' own pipeline on the folder the bundle was exported from, DDIM from its config, CFG cut off at
    step 3 of 6 (``switch:0.5``) by the batch-correct callback of tests/test_core_parity.py; seeds 4, 5, 6."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from test_core_parity import cfg_cutoff_callback

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    gens = [torch.Generator("cpu").manual_seed(KWARGS["seed"] + i) for i in range(len(PROMPTS))]
    return pipe(PROMPTS, num_inference_steps=KWARGS["steps"], guidance_scale=KWARGS["guidance_scale"], generator=gens,
                output_type="np", callback_on_step_end=cfg_cutoff_callback(KWARGS["steps"] // 2, "uncond"),
                callback_on_step_end_tensor_inputs=["prompt_embeds"]).images


@pytest.mark.parametrize("static", [True, False])
def test_both_session_kinds_give_the_diffusers_images(static, tiny_bundle, diffusers_images):  # noqa: F811
    s = Sampler.load(tiny_bundle, backend="onnxruntime", threads=2, static_shapes=static)
    assert s.runners.info["static_shapes"] is static
    assert (s.runners.unet.graph.shaped is not None) is static and (s.runners.unet.graph.session is None) is static
    got = s.generate(PROMPTS, **KWARGS)
    assert got.switch_step == KWARGS["steps"] // 2
    assert np.abs(diffusers_images - 0.5).max() > 0.05  # not a flat image
    np.testing.assert_allclose(got.images, diffusers_images, rtol=0, atol=IMAGE_TOL)


def test_the_rule_fixes_shapes_of_a_small_unet_by_default(tiny_bundle):  # noqa: F811
    assert Sampler.load(tiny_bundle, backend="onnxruntime", threads=1).runners.info["static_shapes"] is True


def test_each_shape_gets_one_session_with_every_dimension_fixed(static_sampler):
    for batch in (1, 3, 1):
        static_sampler.generate(PROMPTS[:batch], **KWARGS)
    for role in ("unet_cfg", "unet"):
        shaped = getattr(static_sampler.runners, role).graph.shaped
        dims = shaped.shapes
        assert sorted(d["B"] for d in dims) == [1, 3], role  # batch 1 twice: its session is reused
        for d in dims:
            session = shaped.session_for(d)
            assert session is shaped.session_for(dict(d))  # the same object, not reopened
            for i in session.get_inputs():
                assert all(isinstance(n, int) for n in i.shape), (role, i.name, i.shape)
            sample = next(i for i in session.get_inputs() if i.name == "sample")
            assert sample.shape == [d["B"], 4, d["h"], d["w"]]


def test_concurrent_calls_of_a_new_shape_open_it_once(static_sampler):
    unet = static_sampler.runners.unet
    before = len(unet.graph.shaped.shapes)
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(2, 4, 8, 8, generator=g) for _ in range(4)]  # 2 rows: no call of the tests above had them
    ehs = torch.randn(2, 77, 32, generator=g)
    t = torch.full((2,), 300.0)
    with ThreadPoolExecutor(4) as pool:
        parallel = list(pool.map(lambda x: unet.predict(x, t, ehs), xs))
    assert len(unet.graph.shaped.shapes) == before + 1
    for x, got in zip(xs, parallel):
        torch.testing.assert_close(got, unet.predict(x, t, ehs), rtol=0, atol=0)


def test_use_static_shapes_rule():
    assert use_static_shapes(None, CPU, 10 * 2**20) is True
    assert use_static_shapes(None, CPU, STATIC_MAX_UNET_BYTES + 1) is False  # a large UNet keeps one dynamic session
    assert use_static_shapes(None, ["CUDAExecutionProvider", *CPU], 10) is False
    assert use_static_shapes(True, CPU, STATIC_MAX_UNET_BYTES + 1) is True
    assert use_static_shapes(False, CPU, 10) is False


def test_unet_bytes_reads_the_recorded_sizes(tiny_bundle):  # noqa: F811
    from cfgswitch.bundle import read_manifest

    entry = read_manifest(tiny_bundle).graph_entry("unet")
    on_disk = (tiny_bundle / entry["file"]).stat().st_size + (tiny_bundle / entry["external_data"]["file"]).stat().st_size
    assert unet_bytes(entry) == on_disk
    fused = dict(entry, ort_optimized={"file": "f.onnx", "bytes": 10})  # shares the entry's weights file
    assert unet_bytes(fused) == 10 + entry["external_data"]["bytes"]
    own = dict(entry, ort_optimized={"file": "f.onnx", "bytes": 10, "external_data": {"file": "f.data", "bytes": 5}})
    assert unet_bytes(own) == 15


def test_dimension_values_names_the_graph_dimensions():
    assert dimension_values({"B": 2, "h": 4, "w": 6, "H": 16, "W": 24}) == {"B": 2, "2B": 4, "h": 4, "w": 6}


@pytest.mark.parametrize("bad", ["yes", 1, 0.5])
def test_bad_static_shapes_is_refused_by_name(bad, tiny_bundle):  # noqa: F811
    with pytest.raises(InvalidArgumentError, match=r"static_shapes: expected True, False or None"):
        Sampler.load(tiny_bundle, backend="onnxruntime", static_shapes=bad)


def _spin_stop(session):
    try:
        return session.get_session_options().get_session_config_entry("session.force_spinning_stop")
    except RuntimeError:  # ONNX Runtime: "does not have configuration with key"
        return None


@pytest.mark.parametrize("stop", [True, False])
def test_stop_spinning_reaches_every_session(stop, tiny_bundle):  # noqa: F811
    s = Sampler.load(tiny_bundle, backend="onnxruntime", threads=2, stop_spinning=stop)
    assert s.runners.info["stop_spinning"] is stop
    s.generate(PROMPTS[:1], **KWARGS)  # opens the per-shape UNet sessions
    r = s.runners
    sessions = [r.text_encoder.graph.session, r.vae_decoder.graph.session]
    graphs = [r.unet.graph, r.unet_cfg.graph] + [r.unet.folded_graph(n) for n in r.unet.folded_rows]
    sessions += [g.shaped.session_for(d) for g in graphs for d in g.shaped.shapes]
    assert len(sessions) == 4 and r.unet.folded_rows == [1]  # the late steps ran the folded graph
    assert [_spin_stop(x) for x in sessions] == ["1" if stop else None] * 4


def test_stop_spinning_is_on_by_default(tiny_bundle):  # noqa: F811
    s = Sampler.load(tiny_bundle, backend="onnxruntime")
    assert s.runners.info["stop_spinning"] is True and _spin_stop(s.runners.text_encoder.graph.session) == "1"


@pytest.mark.parametrize("bad", ["yes", 1, None])
def test_bad_stop_spinning_is_refused_by_name(bad, tiny_bundle):  # noqa: F811
    with pytest.raises(InvalidArgumentError, match=r"stop_spinning: expected True or False"):
        Sampler.load(tiny_bundle, backend="onnxruntime", stop_spinning=bad)


def test_precompile_opens_every_bundle_shape_at_load(tiny_bundle):  # noqa: F811
    from cfgswitch.bundle import read_manifest

    bundle = read_manifest(tiny_bundle)
    s = Sampler.load(tiny_bundle, backend="onnxruntime", threads=1, precompile=True)
    (height, width), factor = bundle.image_sizes[0], bundle.dims.vae_scale_factor
    want = sorted((b, height // factor, width // factor) for b in bundle.batch_sizes)
    for role in ("unet", "unet_cfg"):
        got = sorted((d["B"], d["h"], d["w"]) for d in getattr(s.runners, role).graph.shaped.shapes)
        assert got == want, role  # before any call
    before = {role: len(getattr(s.runners, role).graph.shaped.shapes) for role in ("unet", "unet_cfg")}
    s.generate(PROMPTS, **KWARGS)  # batch 3, one of the bundle's sizes: nothing new to open
    assert {role: len(getattr(s.runners, role).graph.shaped.shapes) for role in ("unet", "unet_cfg")} == before


@pytest.mark.parametrize("bad", ["yes", 1, None])
def test_bad_precompile_is_refused_by_name(bad, tiny_bundle):  # noqa: F811
    with pytest.raises(InvalidArgumentError, match=r"precompile: expected True or False"):
        Sampler.load(tiny_bundle, backend="onnxruntime", precompile=bad)
