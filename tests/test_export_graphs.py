"""The exported graphs: names and axes from io_specs, checker, parity with torch on ONNX Runtime."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from _bundle_fixtures import BATCH_SIZES, tiny_bundle  # noqa: F401  (fixture)

from cfgswitch.bundle import SCHEMA_VERSION, read_manifest, sha256_file
from cfgswitch.io_specs import GRAPH_NAMES, graph_spec

# ONNX Runtime vs torch on the same fp32 weights: kernel order differences only (measured ~1e-6).
GRAPH_TOL = 1e-4


@pytest.fixture(scope="module")
def torch_modules(tiny_model_dir):
    from cfgswitch.model_loading import load_components

    tok, te, unet, vae, _ = load_components(tiny_model_dir, torch.device("cpu"), torch.float32)
    return te, unet, vae


@pytest.fixture(scope="module")
def sessions(tiny_bundle):  # noqa: F811
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    return {g: ort.InferenceSession(str(tiny_bundle / f"{g}.onnx"), opts, providers=["CPUExecutionProvider"])
            for g in GRAPH_NAMES}


@pytest.mark.parametrize("graph", GRAPH_NAMES)
@pytest.mark.parametrize("rows", BATCH_SIZES)
def test_graph_matches_torch_on_onnxruntime(graph, rows, tiny_bundle, torch_modules, sessions):  # noqa: F811
    from cfgswitch.export.wrappers import example_feed, example_inputs, graph_module

    bundle = read_manifest(tiny_bundle)
    spec = graph_spec(graph, bundle.dims)
    module = graph_module(graph, *torch_modules)
    # A batch other than the one traced (2), and a seed other than the exporter's.
    inputs = example_inputs(spec, bundle.dims, "float32", rows, 16, 16, seed=123)
    with torch.no_grad():
        ref = module(*inputs).numpy()
    got = sessions[graph].run(None, example_feed(spec, inputs))[0]
    assert got.shape == ref.shape
    assert np.abs(ref).max() > 1e-3  # a real signal, not zeros
    np.testing.assert_allclose(got, ref, rtol=0, atol=GRAPH_TOL)


def test_guided_graph_equals_combine_of_plain_graph(tiny_bundle, sessions):  # noqa: F811
    """unet_cfg(x, t, [u; c], w) == u_eps + w (c_eps - u_eps) with the plain graph on 2B rows."""
    from cfgswitch.export.wrappers import example_feed, example_inputs

    bundle = read_manifest(tiny_bundle)
    spec = graph_spec("unet_cfg", bundle.dims)
    x, t, ehs, w = example_inputs(spec, bundle.dims, "float32", 3, 16, 16, seed=7)
    guided = sessions["unet_cfg"].run(None, example_feed(spec, (x, t, ehs, w)))[0]
    plain = sessions["unet"].run(None, {"sample": np.concatenate([x.numpy()] * 2), "timestep": np.concatenate([t.numpy()] * 2),
                                        "encoder_hidden_states": ehs.numpy()})[0]
    u, c = plain[:3], plain[3:]
    expected = u + w.numpy()[:, None, None, None] * (c - u)
    np.testing.assert_allclose(guided, expected, rtol=0, atol=GRAPH_TOL)


@pytest.mark.parametrize("graph", GRAPH_NAMES)
def test_graph_interface_is_the_io_spec(graph, tiny_bundle):  # noqa: F811
    bundle = read_manifest(tiny_bundle)
    spec = graph_spec(graph, bundle.dims)
    model = onnx.load(str(tiny_bundle / spec.file))
    onnx.checker.check_model(model)
    assert [i.name for i in model.graph.input] == spec.input_names
    assert [o.name for o in model.graph.output] == spec.output_names
    for vi, ts in zip(list(model.graph.input) + list(model.graph.output), spec.inputs + spec.outputs):
        dims = [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]
        assert dims[0] == ts.shape[0]  # the symbolic batch axis (B, 2B or T)
        assert [d for d in dims[1:] if isinstance(d, int)] == [d for d in ts.shape[1:] if isinstance(d, int)]


def test_manifest_records_model_graphs_roles_and_versions(tiny_bundle, tiny_model_dir):  # noqa: F811
    from cfgswitch.export.manifest import content_hash_dir

    m = json.loads((tiny_bundle / "manifest.json").read_text())
    assert m["schema_version"] == SCHEMA_VERSION and m["format"] == "cfgswitch-bundle"
    assert m["model"]["content_hash"] == content_hash_dir(tiny_model_dir)
    assert m["dims"] == {"latent_channels": 4, "vae_scale_factor": 2, "text_length": 77, "text_width": 32}
    assert m["vae_scaling_factor"] == pytest.approx(0.18215)
    assert m["batch_sizes"] == BATCH_SIZES and m["image_sizes"] == [[16, 16]]
    assert set(m["versions"]) >= {"cfgswitch", "torch", "diffusers", "onnx", "exporter"}
    for g in GRAPH_NAMES:
        e = m["graphs"][g]
        assert e["sha256"] == sha256_file(tiny_bundle / e["file"])
        assert e["bytes"] == (tiny_bundle / e["file"]).stat().st_size
        assert e["verify"]["ok"] is True and e["verify"]["max_abs_diff"] < GRAPH_TOL
    cfg, late = m["roles"]["cfg"], m["roles"]["late"]
    assert cfg["graph"] == "unet_cfg" and late["graph"] == "unet"
    assert cfg["sha256"] == m["graphs"]["unet_cfg"]["sha256"]
    shapes3 = next(s for s in cfg["shapes"] if s["batch"] == 3)
    assert shapes3["inputs"]["encoder_hidden_states"] == [6, 77, 32]
    assert shapes3["inputs"]["sample"] == [3, 4, 8, 8] and shapes3["outputs"]["noise_pred"] == [3, 4, 8, 8]
    assert [t["name"] for t in cfg["inputs"]] == ["sample", "timestep", "encoder_hidden_states", "guidance_scale"]
    assert {t["name"]: t["dtype"] for t in cfg["inputs"]}["timestep"] == "float32"
    assert (tiny_bundle / m["scheduler_config"]).is_file()
    assert (tiny_bundle / m["tokenizer"] / "vocab.json").is_file() or (tiny_bundle / m["tokenizer"] / "tokenizer.json").is_file()


def test_bundle_tokenizer_reproduces_clip_ids(tiny_bundle):  # noqa: F811
    tok = read_manifest(tiny_bundle).load_tokenizer()
    assert tok("a photo of a cat")["input_ids"] == [49406, 320, 1125, 539, 320, 2368, 49407]
