"""SDXL bundles: ``cfgswitch export`` of a tiny SDXL folder, ONNX Runtime against diffusers, the family seal.

The reference is diffusers' own ``StableDiffusionXLPipeline`` built from the same tiny random
components (:func:`cfgswitch.tiny_model.tiny_sdxl_components`, saved as a folder and exported
from it); switched plans use the batch-correct ``callback_on_step_end`` of ``tests/test_sdxl.py``.
Tolerance: the SD ONNX Runtime tests' bound, 1e-3 on images (same weights, same loop, only
kernel order differs; measured about 1e-5 here).
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from _bundle_fixtures import tiny_bundle  # noqa: F401  (fixture)
from test_sdxl import NEGATIVES, PROMPTS, SEEDS, STEPS, _reference

from cfgswitch import Sampler
from cfgswitch.bundle import read_manifest
from cfgswitch.cli import main
from cfgswitch.errors import BundleError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

IMAGE_TOL = 1e-3  # tests/test_onnxruntime_generate.py's bound
GRAPHS = ["text_encoder", "text_encoder_2", "unet", "unet_cfg", "vae_decoder"]


@pytest.fixture(scope="module")
def sdxl_bundle(tmp_path_factory, sdxl_pipe):
    """The tiny SDXL folder exported through the command line (fp32, batch sizes 1 and 3, verified)."""
    root = tmp_path_factory.mktemp("sdxl")
    sdxl_pipe.save_pretrained(root / "model", safe_serialization=True)
    out = root / "bundle"
    rc = main(["export", str(root / "model"), "--out", str(out), "--batch-sizes", "1,3", "--verify", "--no-progress"])
    assert rc == 0
    return out


@pytest.fixture(scope="module")
def sdxl_ort(sdxl_bundle):
    return Sampler.load(sdxl_bundle, backend="onnxruntime", threads=1)


def test_sdxl_manifest_records_family_graphs_and_tokenizer_2(sdxl_bundle):
    m = json.loads((sdxl_bundle / "manifest.json").read_text())
    assert m["family"] == "sdxl" and list(m["graphs"]) == GRAPHS
    assert m["dims"]["added"] == {"text_embeds": 32, "time_ids": 6} and m["dims"]["text_width"] == 64
    assert [(e["graph"], e["width"], e["pooled"]) for e in m["dims"]["text_encoders"]] == [
        ("text_encoder", 32, 0), ("text_encoder_2", 32, 32)]
    assert m["tokenizer_2"] == "tokenizer_2" and m["force_zeros_for_empty_prompt"] is True
    assert any(k.startswith("tokenizer_2/") for k in m["files"]) and any(k.startswith("tokenizer/") for k in m["files"])
    names = {g: [t["name"] for t in e["inputs"]] for g, e in m["graphs"].items()}
    assert names["unet"] == ["sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"]
    assert names["unet_cfg"] == ["sample", "timestep", "encoder_hidden_states", "guidance_scale", "text_embeds", "time_ids"]
    shapes = {t["name"]: t["shape"] for t in m["graphs"]["unet_cfg"]["inputs"]}
    assert shapes["text_embeds"] == ["2B", 32] and shapes["time_ids"] == ["2B", 6]
    assert [t["name"] for t in m["graphs"]["text_encoder_2"]["outputs"]] == ["hidden_states", "text_embeds"]
    assert all(e["verify"]["ok"] for e in m["graphs"].values()), {g: e["verify"] for g, e in m["graphs"].items()}
    # the second tokenizer pads with "!" as diffusers' SDXL tokenizer_2 does
    assert read_manifest(sdxl_bundle).load_tokenizer("tokenizer_2").pad_token == "!"


@pytest.mark.slow
@pytest.mark.parametrize("scheduler", ["ddim", "euler"])
@pytest.mark.parametrize("plan", ["always", "switch:0.5"])
@pytest.mark.parametrize("batch", [1, 3])
def test_sdxl_onnxruntime_matches_diffusers(sdxl_pipe, sdxl_ort, scheduler, plan, batch):
    prompts, seeds = PROMPTS[:batch], SEEDS[:batch]
    negatives = NEGATIVES[:batch] if batch > 1 else None  # batch 1: no negative -> force_zeros_for_empty_prompt
    ref = _reference(sdxl_pipe, scheduler, plan, prompts, negatives, seeds)
    out = sdxl_ort.generate(prompts, negatives, steps=STEPS, guidance_scale=5.0, scheduler=scheduler, plan=plan,
                            seed=seeds, output_type="np")
    assert out.backend == "onnxruntime" and out.images.shape == ref.shape == (batch, 64, 64, 3)
    assert np.abs(ref - 0.5).max() > 0.05  # not a flat image
    np.testing.assert_allclose(out.images, ref, rtol=0, atol=IMAGE_TOL)


def test_sdxl_onnxruntime_size_conditioning_matches_diffusers(sdxl_pipe, sdxl_ort):
    sizes = dict(original_size=(96, 80), target_size=(64, 48), crops_coords_top_left=(4, 2),
                 negative_original_size=(32, 32), negative_target_size=(48, 48))
    gens = [torch.Generator("cpu").manual_seed(SEEDS[0])]
    ref = sdxl_pipe([PROMPTS[0]], negative_prompt=[NEGATIVES[1]], num_inference_steps=4, guidance_scale=5.0,
                    generator=gens, output_type="np", **sizes).images
    out = sdxl_ort.generate([PROMPTS[0]], [NEGATIVES[1]], steps=4, guidance_scale=5.0, scheduler="euler",
                            seed=SEEDS[0], output_type="np", **sizes)
    np.testing.assert_allclose(out.images, ref, rtol=0, atol=IMAGE_TOL)


def test_sdxl_bundle_loaded_as_another_family_is_refused(sdxl_bundle, tmp_path):
    with pytest.raises(BundleError, match="exported for the sdxl family, loaded as sd1"):
        read_manifest(sdxl_bundle, family="sd1")
    assert read_manifest(sdxl_bundle, family="sdxl").family == "sdxl"
    copy = tmp_path / "b"
    shutil.copytree(sdxl_bundle, copy)
    m = json.loads((copy / "manifest.json").read_text())
    for family, match in (("sd1", "graph 'text_encoder' has outputs \\['hidden_states'\\], a sd1 bundle's are"),
                          ("flux", "names the model family 'flux'; this cfgswitch supports sd1, sd2, sdxl")):
        (copy / "manifest.json").write_text(json.dumps({**m, "family": family}))
        with pytest.raises(BundleError, match=match):
            Sampler.load(copy, backend="onnxruntime")
    no_tok2 = {k: v for k, v in m.items() if k != "tokenizer_2"}
    (copy / "manifest.json").write_text(json.dumps(no_tok2))
    with pytest.raises(BundleError, match="a sdxl bundle needs tokenizer_2"):
        read_manifest(copy)


def test_sdxl_tokenizer_2_is_sealed(sdxl_bundle, tmp_path):
    copy = tmp_path / "b"
    shutil.copytree(sdxl_bundle, copy)
    config = copy / "tokenizer_2" / "tokenizer_config.json"
    config.write_text(config.read_text().replace('"pad_token": "!"', '"pad_token": "?"'))
    with pytest.raises(BundleError, match="tokenizer file tokenizer_2/tokenizer_config.json has sha256"):
        Sampler.load(copy, backend="onnxruntime")


def test_sdxl_fp16_export_keeps_a_force_upcast_vae_in_float32(sdxl_pipe, tmp_path):
    from cfgswitch.export.exporter import check_options, export_bundle

    assert sdxl_pipe.vae.config.force_upcast
    folder = tmp_path / "model"
    sdxl_pipe.save_pretrained(folder, safe_serialization=True)
    out = export_bundle(folder, tmp_path / "b", check_options(dtype="fp16", batch_sizes=[1], graphs=("vae_decoder",)),
                        progress=False)
    graphs = json.loads((out / "manifest.json").read_text())["graphs"]
    assert [t["dtype"] for t in graphs["vae_decoder"]["inputs"] + graphs["vae_decoder"]["outputs"]] == ["float32"] * 2


def test_sd1_manifest_without_family_still_loads(tiny_bundle, tmp_path):  # noqa: F811
    copy = tmp_path / "b"
    shutil.copytree(tiny_bundle, copy)
    m = json.loads((copy / "manifest.json").read_text())
    assert m["family"] == "sd1" and set(m["dims"]) == {"latent_channels", "vae_scale_factor", "text_length", "text_width"}
    (copy / "manifest.json").write_text(json.dumps({k: v for k, v in m.items() if k != "family"}))
    b = read_manifest(copy, family="sd1")
    assert b.family == "sd1" and b.graph_names == ["text_encoder", "unet", "unet_cfg", "vae_decoder"]
    with pytest.raises(BundleError, match="exported for the sd1 family, loaded as sdxl"):
        read_manifest(copy, family="sdxl")



@pytest.mark.slow
def test_sdxl_bundle_on_openvino_matches_onnxruntime(sdxl_bundle, sdxl_ort):
    pytest.importorskip("openvino", reason="the openvino extra is not installed (pip install 'cfgswitch[openvino]')")
    ov = Sampler.load(sdxl_bundle, backend="openvino", threads=1, cache_dir=False)
    kw = dict(steps=4, guidance_scale=5.0, scheduler="euler", plan="switch:0.5", seed=SEEDS, output_type="np")
    got = ov.generate(PROMPTS, NEGATIVES, **kw)
    ref = sdxl_ort.generate(PROMPTS, NEGATIVES, **kw)
    assert got.backend == "openvino" and (got.cfg_steps, got.late_steps) == (ref.cfg_steps, ref.late_steps)
    np.testing.assert_allclose(got.images, ref.images, rtol=0, atol=IMAGE_TOL)


@pytest.mark.slow
def test_sdxl_bundle_builds_every_tensorrt_rtx_engine(sdxl_bundle, tmp_path):
    """``cfgswitch build --trt tensorrt-rtx`` of the tiny SDXL bundle (ahead of time, no GPU): five plans whose
    builder-reported tensors and profiles are the family table's (text_embeds/time_ids included)."""
    trt = pytest.importorskip("tensorrt_rtx", reason="TensorRT for RTX is not installed (pip install 'cfgswitch[tensorrt-rtx]')")
    from cfgswitch.io_specs import graph_spec, plan_specs

    copy = tmp_path / "b"
    shutil.copytree(sdxl_bundle, copy)
    assert main(["build", str(copy), "--trt", "tensorrt-rtx", "--layout", "two-engines", "--no-progress"]) == 0
    b = read_manifest(copy)
    entry = b.engines("two-engines")
    assert entry["tensorrt_version"] == trt.__version__
    expected = {p.name: p for p in plan_specs(b.dims, b.batch_sizes, b.image_sizes, "two-engines", True)}
    assert sorted(entry["plans"]) == sorted(GRAPHS) == sorted(expected)
    assert entry["roles"]["text_encoder_2"] == {"plan": "text_encoder_2", "profiles": [0], "combine_outside": False}
    for name, rec in entry["plans"].items():
        spec, report = graph_spec(name, b.dims), rec["builder_report"]
        assert [t["name"] for t in report["tensors"] if t["mode"] == "input"] == spec.input_names
        assert [t["name"] for t in report["tensors"] if t["mode"] == "output"] == spec.output_names
        assert report["profiles"] == [{k: [list(s) for s in v] for k, v in p.shapes.items()}
                                      for p in expected[name].profiles]
    cfg_profiles = entry["plans"]["unet_cfg"]["builder_report"]["profiles"]
    assert [p["time_ids"][0] for p in cfg_profiles] == [[2, 6], [6, 6]]


def test_sdxl_bundle_refuses_runners_without_a_second_text_encoder(sdxl_bundle, tiny_bundle):  # noqa: F811
    """What a backend without SDXL support (TensorRT, Triton BLS, for now) meets: a typed refusal."""
    from cfgswitch.backends.assembly import assemble
    from cfgswitch.errors import BackendUnavailableError

    sd = Sampler.load(tiny_bundle, backend="onnxruntime")
    with pytest.raises(BackendUnavailableError, match="does not run sdxl bundles yet .*text_encoder_2"):
        assemble(sdxl_bundle, runners=sd.runners)


def test_triton_repository_of_an_sdxl_bundle(sdxl_bundle, sdxl_ort, tmp_path):
    """``triton-repo --engines onnxruntime`` copies all five graphs and both tokenizers; the BLS layouts refuse SDXL."""
    from cfgswitch.errors import InvalidArgumentError
    from cfgswitch.serving.repo import RepoOptions, check_repository, write_repository

    repo = tmp_path / "repo"
    write_repository(sdxl_bundle, repo, RepoOptions(engines="onnxruntime"))
    copied = repo / "cfgswitch_pipeline" / "1" / "bundle"
    assert check_repository(repo)["cfgswitch_pipeline"][0] == "1/model.py"
    assert sorted(read_manifest(copied).graph_names) == sorted(GRAPHS)
    assert (copied / "tokenizer_2").is_dir()
    served = Sampler.load(copied, backend="onnxruntime", threads=1)
    kw = dict(steps=2, plan="switch:0.5", seed=[1], output_type="np")
    assert np.array_equal(served.generate(["a cat"], **kw).images, sdxl_ort.generate(["a cat"], **kw).images)
    with pytest.raises(InvalidArgumentError, match="--engines: expected onnxruntime for a sdxl bundle"):
        write_repository(sdxl_bundle, tmp_path / "bls", RepoOptions(engines="onnxruntime-bls"))
    assert not (tmp_path / "bls").exists()
