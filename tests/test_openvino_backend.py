"""The openvino backend: the bundle's ONNX graphs on real OpenVINO, each role compiled statically.

References are the torch backend on the diffusers folder the bundle was exported from (and,
for the embedded model, diffusers' folder loaded by the torch backend), never this backend.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from _bundle_fixtures import tiny_bundle, tiny_bundle_fp16  # noqa: F401  (fixtures)

from cfgswitch import Sampler
from cfgswitch.errors import BackendUnavailableError, InvalidArgumentError

ov = pytest.importorskip("openvino", reason="the openvino extra is not installed (pip install 'cfgswitch[openvino]')")

from cfgswitch.backends.openvino import auto_threads, blob_cache_key, openvino_runners  # noqa: E402
from cfgswitch.bundle import read_manifest  # noqa: E402

# The bound the onnxruntime backend meets against torch (tests/test_onnxruntime_generate.py); OpenVINO
# in f32 measured ~1.7e-6 on the tiny bundle (only kernel order differs).
IMAGE_TOL = 1e-3
PROMPTS = {1: ["a red fox"], 3: ["a red fox", "a blue house", "two cats"]}


@pytest.fixture(scope="module")
def ov_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("ov-cache")


@pytest.fixture(scope="module")
def ov_sampler(tiny_bundle, ov_cache):  # noqa: F811
    return Sampler.load(tiny_bundle, backend="openvino", threads=2, cache_dir=ov_cache)


def _shapes(sampler, role):
    runner = {"cfg": sampler.runners.unet_cfg, "late": sampler.runners.unet}[role]
    return runner.graph.compiled_shapes()


@pytest.mark.parametrize("plan", ["always", "switch:0.5", "switch:0.5:cond"])
@pytest.mark.parametrize("batch", [1, 3])
def test_generate_matches_torch_backend(plan, batch, ov_sampler, tiny_sampler):
    kwargs = dict(steps=6, guidance_scale=7.5, plan=plan, seed=11, output_type="np")
    ref = tiny_sampler.generate(PROMPTS[batch], **kwargs)
    got = ov_sampler.generate(PROMPTS[batch], **kwargs)
    assert got.backend == "openvino" and ref.backend == "torch"
    assert (got.cfg_steps, got.late_steps, got.unet_rows) == (ref.cfg_steps, ref.late_steps, ref.unet_rows)
    assert np.abs(ref.images - 0.5).max() > 0.05  # not a flat image
    np.testing.assert_allclose(got.images, ref.images, rtol=0, atol=IMAGE_TOL)


def test_each_role_is_compiled_once_per_static_shape(tiny_bundle, tiny_sampler, tmp_path):  # noqa: F811
    # the late role on its plain graph (its folded graph: tests/test_folded_context.py)
    s = Sampler.load(tiny_bundle, backend="openvino", cache_dir=tmp_path, fold_uncond=False)
    assert _shapes(s, "cfg") == {} and _shapes(s, "late") == {}  # nothing compiled before first use
    for _ in range(2):
        s.generate(["a red fox"], steps=4, plan="switch:0.5", seed=0)
    # cfg role: the guided graph at B=1 (2 rows of embeddings inside); late role: the plain UNet at B rows
    assert list(_shapes(s, "cfg")) == [((1, 4, 8, 8), (1,), (2, 77, 32), (1,))]
    assert list(_shapes(s, "late")) == [((1, 4, 8, 8), (1,), (1, 77, 32))]
    s.generate(PROMPTS[3], steps=4, plan="switch:0.5", seed=0)
    assert sorted(k[0][0] for k in _shapes(s, "late")) == [1, 3]
    # the adaptive plan runs the plain graph on other row counts (per-image switching): each its own shape
    ref = tiny_sampler.generate(PROMPTS[3], steps=6, plan="adaptive:0.5", seed=3, output_type="np")
    got = s.generate(PROMPTS[3], steps=6, plan="adaptive:0.5", seed=3, output_type="np")
    assert got.late_steps == ref.late_steps
    np.testing.assert_allclose(got.images, ref.images, rtol=0, atol=IMAGE_TOL)
    assert all(len({s[0][0], s[2][0]}) == 1 for s in _shapes(s, "late"))  # static: one row count per compile


def test_step_engine_compiles_one_shape_per_row_bucket(tiny_bundle, tmp_path):  # noqa: F811
    s = Sampler.load(tiny_bundle, backend="openvino", cache_dir=tmp_path)
    kwargs = [dict(prompts=["a red fox"], steps=4, plan="switch:0.5", seed=1),
              dict(prompts=["two cats", "a blue house"], steps=5, plan="always", seed=2)]
    solo = [s.generate(k.pop("prompts"), output_type="np", **k) for k in [dict(x) for x in kwargs]]
    before = set(s.runners.unet.graph.compiled_shapes())
    with s.engine(max_rows=4, row_buckets=True) as engine:
        futures = [engine.submit(k.pop("prompts"), output_type="np", **k) for k in [dict(x) for x in kwargs]]
        outs = [f.result(timeout=300) for f in futures]
    for out, ref in zip(outs, solo):
        np.testing.assert_allclose(out.images, ref.images, rtol=0, atol=1e-5)
    rows = {k[0][0] for k in set(s.runners.unet.graph.compiled_shapes()) - before}
    assert rows and rows <= {1, 2, 4}, rows  # padded to the buckets 1, 2, 4: one static shape each


def test_blobs_are_cached_by_graph_hash_openvino_version_and_cpu(tiny_bundle, tmp_path):  # noqa: F811
    bundle = read_manifest(tiny_bundle)
    core = ov.Core()
    key = blob_cache_key(bundle.graph_entry("unet")["sha256"], ov.get_version(), core.get_property("CPU", "FULL_DEVICE_NAME"))
    first = openvino_runners(bundle, cache_dir=tmp_path)
    folder = tmp_path / f"unet-{key[:16]}"
    assert first.info["cache_dirs"]["unet"] == str(folder)
    x, t, ehs = torch.randn(1, 4, 8, 8), torch.tensor([500.0]), torch.randn(1, 77, 32)
    a = first.unet.predict(x, t, ehs)
    assert [v["from_cache"] for v in first.unet.graph.compiled_shapes().values()] == [False]
    assert list(folder.glob("*.blob")), "no compiled blob written"
    second = openvino_runners(bundle, cache_dir=tmp_path)
    b = second.unet.predict(x, t, ehs)
    assert [v["from_cache"] for v in second.unet.graph.compiled_shapes().values()] == [True]
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    # another OpenVINO, another CPU or another graph is another folder
    assert len({key, blob_cache_key(bundle.graph_entry("unet")["sha256"], "2099.1", "x"),
                blob_cache_key(bundle.graph_entry("unet_cfg")["sha256"], ov.get_version(), "x")}) == 3


def test_precompile_compiles_every_bundle_shape_at_load(tiny_bundle, tmp_path):  # noqa: F811
    s = Sampler.load(tiny_bundle, backend="openvino", precompile=True, cache_dir=tmp_path)
    # the bundle's batch sizes 1 and 3 at 16 px (8x8 latents)
    assert sorted(_shapes(s, "cfg")) == [((b, 4, 8, 8), (b,), (2 * b, 77, 32), (b,)) for b in (1, 3)]
    assert sorted(_shapes(s, "late")) == [((b, 4, 8, 8), (b,), (b, 77, 32)) for b in (1, 3)]
    before = {role: dict(_shapes(s, role)) for role in ("cfg", "late")}
    s.generate(PROMPTS[3], steps=2, plan="switch:0.5", seed=0)
    assert {role: dict(_shapes(s, role)) for role in ("cfg", "late")} == before  # nothing compiled on the way


def test_default_cache_folder_is_the_cfgswitch_cache(tiny_bundle, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("CFGSWITCH_CACHE", str(tmp_path))
    r = openvino_runners(read_manifest(tiny_bundle), verify_files=False)
    assert all(d.startswith(str(tmp_path / "openvino")) for d in r.info["cache_dirs"].values())
    assert openvino_runners(read_manifest(tiny_bundle), cache_dir=False).info["cache_dirs"] == {}


def test_threads_per_role(tiny_bundle, tmp_path):  # noqa: F811
    bundle = read_manifest(tiny_bundle)
    r = openvino_runners(bundle, threads={"cfg": 2, "late": 1}, cache_dir=tmp_path)
    x, ehs = torch.randn(1, 4, 8, 8), torch.randn(2, 77, 32)
    r.unet_cfg.predict_guided(x, torch.tensor([10.0]), ehs, torch.tensor([7.5]))
    r.unet.predict(x, torch.tensor([10.0]), ehs[:1])
    assert [v["threads"] for v in r.unet_cfg.graph.compiled_shapes().values()] == [2]
    assert [v["threads"] for v in r.unet.graph.compiled_shapes().values()] == [1]
    one = openvino_runners(bundle, threads=1, cache_dir=tmp_path)
    one.unet.predict(x, torch.tensor([10.0]), ehs[:1])
    assert [v["threads"] for v in one.unet.graph.compiled_shapes().values()] == [1]


def test_auto_threads_rule():
    # one thread per UNet row up to the cores; text encoder and VAE take every core
    assert [auto_threads("late", rows, 2) for rows in (1, 2, 3)] == [1, 2, 2]
    assert auto_threads("cfg", 2, 16) == 2 and auto_threads("cfg", 8, 4) == 4
    assert auto_threads("text_encoder", 1, 4) == 4 and auto_threads("vae_decoder", 1, 4) == 4


def test_runner_outputs_are_fresh_tensors(ov_sampler):
    """Schedulers (PNDM) keep past predictions: a second call must not overwrite the first result."""
    unet = ov_sampler.runners.unet
    x, ehs = torch.randn(1, 4, 8, 8), torch.randn(1, 77, 32)
    a = unet.predict(x, torch.tensor([500.0]), ehs)
    a_copy = a.clone()
    unet.predict(x * 2, torch.tensor([10.0]), ehs)
    torch.testing.assert_close(a, a_copy, rtol=0, atol=0)


def test_encode_prompts_matches_torch(ov_sampler, tiny_sampler):
    got, _ = ov_sampler.encode_prompts(["a photo of a cat", ""])
    ref, _ = tiny_sampler.encode_prompts(["a photo of a cat", ""])
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-4)


def test_fp16_bundle_runs_and_stays_near_torch(tiny_bundle_fp16, tiny_sampler, tmp_path):  # noqa: F811
    s = Sampler.load(tiny_bundle_fp16, backend="openvino", cache_dir=tmp_path)
    kwargs = dict(steps=4, plan="switch:0.5", seed=2, output_type="np")
    got, ref = s.generate(PROMPTS[1], **kwargs), tiny_sampler.generate(PROMPTS[1], **kwargs)
    assert got.images.dtype == np.float32 and s.runners.info["bundle_dtype"] == "float16"
    # fp16 weights against the fp32 model: the rounding of the weights (measured 3.5e-4 here; ONNX
    # Runtime on the same fp16 bundle 8.7e-4), so a looser bound than the fp32 parity one
    np.testing.assert_allclose(got.images, ref.images, rtol=0, atol=5e-3)


@pytest.mark.parametrize("threads, match", [
    (0, "threads: expected None, a positive integer, 'auto'"), (1.5, "threads: expected"), (True, "threads: expected"),
    ("many", "threads: expected"), ({"unet": 2}, "threads: expected roles among text_encoder, cfg, late"),
    ({"late": 0}, r"threads\['late'\]: expected a positive integer"),
])
def test_bad_threads(tiny_bundle, threads, match):  # noqa: F811
    with pytest.raises(InvalidArgumentError, match=match):
        Sampler.load(tiny_bundle, backend="openvino", threads=threads)


@pytest.mark.parametrize("option, value, match", [
    ("device", "NPU7", "device: expected an OpenVINO device of this machine .*CPU.*got 'NPU7'"),
    ("precision", "fp8", "precision: expected one of 'f32', 'bf16', 'f16'"),
    ("hint", "fast", "hint: expected one of 'latency', 'throughput'"),
    ("cache_dir", 3, "cache_dir: expected a folder path"),
    ("precompile", "yes", "precompile: expected True or False"),
])
def test_bad_options(tiny_bundle, option, value, match):  # noqa: F811
    with pytest.raises(InvalidArgumentError, match=match):
        Sampler.load(tiny_bundle, backend="openvino", **{option: value})


def test_unknown_option_lists_the_valid_ones(tiny_bundle):  # noqa: F811
    with pytest.raises(InvalidArgumentError, match="options of backend 'openvino'.*threads.*providers"):
        Sampler.load(tiny_bundle, backend="openvino", providers="cpu")


def test_wrong_input_shape_is_refused(ov_sampler):
    with pytest.raises(InvalidArgumentError, match=r"unet.encoder_hidden_states: expected shape \('B', 77, 32\)"):
        ov_sampler.runners.unet.predict(torch.randn(1, 4, 8, 8), torch.tensor([1.0]), torch.randn(1, 77, 16))


def test_missing_openvino_names_the_extra(tiny_bundle, monkeypatch):  # noqa: F811
    monkeypatch.setitem(sys.modules, "openvino", None)  # what an environment without the package gives
    with pytest.raises(BackendUnavailableError, match=r"pip install 'cfgswitch\[openvino\]'"):
        Sampler.load(tiny_bundle, backend="openvino")


# ------------------------------------------------------------------ the embedded model
@pytest.fixture(scope="module")
def shapes_bundle(tmp_path_factory):
    from cfgswitch.cli import main
    from cfgswitch.default_model import EMBEDDED_MODEL_DIR

    if not (EMBEDDED_MODEL_DIR / "model_index.json").is_file():
        pytest.skip("the trained model is not shipped in this checkout")
    out = tmp_path_factory.mktemp("shapes-bundle") / "bundle"
    assert main(["export", str(EMBEDDED_MODEL_DIR), "--out", str(out), "--batch-sizes", "1,8", "--no-progress"]) == 0
    return out


@pytest.mark.slow
def test_embedded_model_matches_torch_and_follows_prompts(shapes_bundle, tmp_path):
    from cfgswitch.default_model import EMBEDDED_MODEL_DIR
    from cfgswitch.shapes.captions import canonical_caption
    from cfgswitch.shapes.scorer import accuracy
    from cfgswitch.shapes.world import sample_scenes

    scenes = [s for s in sample_scenes(4242, 40) if len(s.objects) == 1][:8]
    prompts = [canonical_caption(s) for s in scenes]
    kwargs = dict(steps=10, guidance_scale=7.5, plan="switch:0.5", seed=0, output_type="np")
    got = Sampler.load(shapes_bundle, backend="openvino", threads="auto", cache_dir=tmp_path).generate(prompts, **kwargs)
    ref = Sampler.from_diffusers(EMBEDDED_MODEL_DIR).generate(prompts, **kwargs)
    np.testing.assert_allclose(got.images, ref.images, rtol=0, atol=IMAGE_TOL)
    figures = accuracy(list(got.images), scenes)
    # a text encoder loaded with wrong weight names would sit near chance (1/7, 1/4, 1/5)
    assert figures["colour"] >= 0.75 and figures["shape"] >= 0.6 and figures["position"] >= 0.6, figures
