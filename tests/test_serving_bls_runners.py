"""The BLS runners' composition (``cfgswitch.serving.bls_runners``), outside Triton.

Triton's Python backend calls one engine model per component over BLS. Here each
engine model is a real ONNX Runtime session of the bundle's graph (the
``onnxruntime-bls`` repository's stand-ins, called directly instead of through
BLS), wrapped to record the rows each model receives. The check is the defect
the review found: with ``two-engines`` and an adaptive plan, the late engine
(``unet_late``, profiles of B rows) was sent 2B rows.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")

from _bundle_fixtures import ort_sampler, tiny_bundle  # noqa: E402,F401

MODELS = {"text_encoder": "text_encoder", "cfg": "unet_cfg", "late": "unet_late", "vae_decoder": "vae_decoder"}
SHARED = {"text_encoder": "text_encoder", "cfg": "unet", "late": "unet", "vae_decoder": "vae_decoder"}


def _engine_models(bundle):
    """``graph_factory`` over ONNX Runtime sessions, and the rows each model name received."""
    import onnxruntime as ort

    from cfgswitch.runners.onnxruntime import OrtGraph

    rows = defaultdict(list)
    sessions = {}

    def factory(model, spec):
        if spec.name not in sessions:
            sessions[spec.name] = ort.InferenceSession(str(bundle.graph_path(spec.name)), providers=["CPUExecutionProvider"])
        g = OrtGraph(sessions[spec.name], spec, bundle.dtype, bundle.dims.vae_scale_factor)

        def call(*tensors):
            rows[model].append(int(tensors[0].shape[0]))
            return g(*tensors)

        return call

    return factory, rows


@pytest.mark.parametrize("layout", ["two-engines", "shared"])
def test_adaptive_plan_keeps_each_engine_within_its_rows(tiny_bundle, ort_sampler, layout):
    from cfgswitch.backends.assembly import assemble
    from cfgswitch.bundle import read_manifest
    from cfgswitch.serving.bls_runners import bls_runners

    bundle = read_manifest(tiny_bundle)
    factory, rows = _engine_models(bundle)
    runners = bls_runners(bundle, MODELS if layout == "two-engines" else SHARED, layout, backend="tensorrt",
                          device=torch.device("cpu"), graph_factory=factory)
    sampler = assemble(bundle, runners=runners)
    prompts, negatives = ["a red circle", "a blue square", "a green star"], ["", "dark", "blurry"]
    kw = dict(steps=6, guidance_scale=7.5, plan="adaptive:0.9:cond", seed=[3, 4, 5], output_type="np")
    out = sampler.generate(prompts, negatives, **kw)
    ref = ort_sampler.generate(prompts, negatives, **kw)
    batch = len(prompts)
    assert out.cfg_steps > 0  # the pair path ran
    if layout == "two-engines":
        assert rows["unet_late"] and max(rows["unet_late"]) <= batch  # the late engine's profiles cover B rows
        assert all(r <= batch for r in rows["unet_cfg"])  # unet_cfg takes B latents (2B rows inside)
        # Both predictions cost 2B UNet rows per guided step (two B-row calls of the late engine),
        # not 4B (the guided graph run twice): the engines did exactly the work the output accounts for.
        assert sum(rows["unet_late"]) + 2 * sum(rows["unet_cfg"]) == out.unet_rows
    else:
        assert max(rows["unet"]) <= 2 * batch  # the shared plan's CFG profile: 2B rows
    # Same graphs, same plan: the same images as the ONNX Runtime backend (row order of calls may differ).
    assert np.abs(np.asarray(out.images, dtype=np.float32) - np.asarray(ref.images, dtype=np.float32)).max() < 1e-5
