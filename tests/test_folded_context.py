"""The late role on a folded context: the empty prompt's embedding built into the UNet (ONNX Runtime, OpenVINO).

References are diffusers' own pipeline with the CFG cut off by the batch-correct callback of
tests/test_core_parity.py, and the same backend loaded with ``fold_uncond=False`` (which runs the
plain graph the earlier tests of each backend check against torch).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _bundle_fixtures import tiny_bundle, tiny_bundle_fp16  # noqa: F401  (fixtures)
from test_onnxruntime_load_options import IMAGE_TOL, KWARGS, PROMPTS, diffusers_images  # noqa: F401  (fixture)

from cfgswitch import Sampler
from cfgswitch.errors import InvalidArgumentError
from cfgswitch.runners.folded_context import CONTEXT_INPUT, FoldedContextUNet, onnx_without_input

# Folded and plain graphs compute the same arithmetic; only the order of float operations may differ.
FOLD_TOL = 1e-5
# fp16 graphs: the folded keys and values are fp16 as in the plain graph; measured 0 (ONNX Runtime) and 5.5e-5
# (OpenVINO) on the latents of the tiny fp16 bundle.
FP16_FOLD_TOL = 1e-3
BACKENDS = ["onnxruntime", "openvino"]


def _load(backend, bundle, tmp_path_factory, **options):
    if backend == "openvino":
        pytest.importorskip("openvino", reason="the openvino extra is not installed (pip install 'cfgswitch[openvino]')")
        options.setdefault("cache_dir", tmp_path_factory.mktemp("ov-cache"))
    return Sampler.load(bundle, backend=backend, threads=2, **options)


@pytest.fixture(scope="module", params=BACKENDS)
def pair(request, tiny_bundle, tmp_path_factory):  # noqa: F811
    """``(backend, folding sampler, plain sampler)`` on the tiny bundle."""
    backend = request.param
    return backend, _load(backend, tiny_bundle, tmp_path_factory), _load(backend, tiny_bundle, tmp_path_factory,
                                                                         fold_uncond=False)


def test_folded_late_calls_give_the_diffusers_images(pair, diffusers_images):  # noqa: F811
    backend, folding, _ = pair
    assert folding.runners.info["fold_uncond"] is True
    before = folding.runners.unet.folded_rows
    got = folding.generate(PROMPTS, **KWARGS)
    assert got.switch_step == KWARGS["steps"] // 2
    assert 3 in folding.runners.unet.folded_rows and 3 not in before  # the late steps ran the folded graph
    np.testing.assert_allclose(got.images, diffusers_images, rtol=0, atol=IMAGE_TOL)


@pytest.mark.parametrize("batch", [1, 3])
def test_folding_changes_the_latents_by_float_rounding_only(pair, batch):
    _, folding, plain = pair
    kw = dict(KWARGS, output_type="latent")
    a = folding.generate(PROMPTS[:batch], **kw).latents
    b = plain.generate(PROMPTS[:batch], **kw).latents
    assert batch in folding.runners.unet.folded_rows
    assert not isinstance(plain.runners.unet, FoldedContextUNet) and plain.runners.info["fold_uncond"] is False
    torch.testing.assert_close(a, b, rtol=0, atol=FOLD_TOL)
    always = plain.generate(PROMPTS[:batch], **dict(kw, plan="always")).latents
    assert (always - b).abs().max() > 100 * FOLD_TOL  # the late steps matter: the check above can fail


def test_the_folded_graph_has_no_embedding_input(pair):
    backend, folding, _ = pair
    folding.generate(PROMPTS[:1], **KWARGS)
    graph = folding.runners.unet.folded_graph(1)
    assert [t.name for t in graph.spec.inputs] == ["sample", "timestep"]
    if backend == "onnxruntime":
        sessions = graph.shaped
        names = [[i.name for i in sessions.session_for(d).get_inputs()] for d in sessions.shapes]
    else:
        names = [[("timestep" if "timestep" in i.get_names() else i.get_any_name()) for i in compiled.inputs]
                 for compiled, *_ in graph._compiled.values()]  # OpenVINO may add names to a tensor
    assert names and all(n == ["sample", "timestep"] for n in names)


@pytest.mark.parametrize("case", ["negative prompt", "late cond"])
def test_calls_off_the_context_run_the_plain_graph_unchanged(pair, case):
    _, folding, plain = pair
    kw = dict(KWARGS, output_type="latent")
    if case == "negative prompt":
        kw["negative_prompts"] = ["blurry"] * 2
    else:
        kw["plan"] = "switch:0.5:cond"
    folding.runners.unet.set_context(folding.runners.unet.context)  # drops earlier folds
    a = folding.generate(PROMPTS[:2], **kw).latents
    b = plain.generate(PROMPTS[:2], **kw).latents
    assert folding.runners.unet.folded_rows == []  # no late call was on the empty prompt's embedding
    torch.testing.assert_close(a, b, rtol=0, atol=0)  # the very same graph and inputs


def test_the_context_is_the_empty_prompts_embedding(pair):
    _, folding, _ = pair
    conditioning, _ = folding.encode_conditioning(["a red fox"], [""], 1)
    unet = folding.runners.unet
    assert torch.equal(unet.context, conditioning.uncond[CONTEXT_INPUT])
    x = unet.context.expand(2, -1, -1).clone()
    assert unet.matches(x)
    x[1, 5, 3] += 1e-6
    assert not unet.matches(x)  # one element off: the plain graph runs


@pytest.mark.parametrize("backend", BACKENDS)
def test_precompile_folds_the_bundles_batch_sizes_at_load(backend, tiny_bundle, tmp_path_factory):  # noqa: F811
    s = _load(backend, tiny_bundle, tmp_path_factory, precompile=True)
    assert s.runners.unet.folded_rows == [1, 3]
    graph = s.runners.unet.folded_graph(3)
    opened = graph.shaped.shapes if backend == "onnxruntime" else list(graph.compiled_shapes())
    assert len(opened) == 1  # the bundle's one image size, before any call


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("value", ["yes", 1, None])
def test_a_bad_fold_option_is_refused_by_name(backend, value, tiny_bundle, tmp_path_factory):  # noqa: F811
    with pytest.raises(InvalidArgumentError, match="fold_uncond.*True or False"):
        _load(backend, tiny_bundle, tmp_path_factory, fold_uncond=value)


def test_onnx_runtime_folds_only_on_per_shape_sessions(tiny_bundle):  # noqa: F811
    s = Sampler.load(tiny_bundle, backend="onnxruntime", threads=1, static_shapes=False)
    assert s.runners.info["fold_uncond"] is False and not isinstance(s.runners.unet, FoldedContextUNet)


def test_a_bad_context_is_refused(pair):
    _, folding, _ = pair
    with pytest.raises(InvalidArgumentError, match="context.*\\[1, tokens, channels\\]"):
        folding.runners.unet.set_context(torch.zeros(2, 77, 32))


def test_folding_a_graph_without_the_input_is_refused(tiny_bundle):  # noqa: F811
    model_bytes = onnx_without_input(tiny_bundle / "vae_decoder.onnx")
    with pytest.raises(InvalidArgumentError, match="vae_decoder.onnx inputs.*encoder_hidden_states"):
        model_bytes(np.zeros((1, 77, 32), np.float32))


def test_openvino_refuses_to_fold_a_missing_parameter(tiny_bundle):  # noqa: F811
    ov = pytest.importorskip("openvino", reason="the openvino extra is not installed (pip install 'cfgswitch[openvino]')")
    from cfgswitch.backends.openvino import fold_parameter

    model = ov.Core().read_model(str(tiny_bundle / "vae_decoder.onnx"))
    with pytest.raises(InvalidArgumentError, match="model parameters.*encoder_hidden_states"):
        fold_parameter(ov, model, CONTEXT_INPUT, np.zeros((1, 77, 32), np.float32))


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_fp16_bundle_folds_its_context_in_fp16(backend, tiny_bundle_fp16, tmp_path_factory):  # noqa: F811
    kw = dict(KWARGS, output_type="latent")
    folding = _load(backend, tiny_bundle_fp16, tmp_path_factory)
    a = folding.generate(PROMPTS, **kw).latents
    b = _load(backend, tiny_bundle_fp16, tmp_path_factory, fold_uncond=False).generate(PROMPTS, **kw).latents
    assert folding.runners.unet.folded_rows == [3]
    torch.testing.assert_close(a, b, rtol=0, atol=FP16_FOLD_TOL)
