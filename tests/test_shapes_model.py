"""The shipped model (engine/models/shapes): it loads everywhere and follows its prompts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cfgswitch.default_model import EMBEDDED_MODEL_DIR, default_model_path
from cfgswitch.shapes.captions import canonical_caption
from cfgswitch.shapes.scorer import accuracy
from cfgswitch.shapes.world import sample_scenes

pytestmark = pytest.mark.skipif(
    not (EMBEDDED_MODEL_DIR / "model_index.json").is_file(), reason="the trained model is not shipped in this checkout"
)


@pytest.fixture(scope="module")
def sampler():
    from cfgswitch import Sampler

    return Sampler.load(default_model_path())


def test_default_model_is_the_shipped_one_and_small():
    assert default_model_path() == EMBEDDED_MODEL_DIR
    size = sum(p.stat().st_size for p in EMBEDDED_MODEL_DIR.rglob("*") if p.is_file())
    assert size <= 25 * 1024 * 1024, size
    assert (EMBEDDED_MODEL_DIR / "MODEL_CARD.md").is_file()


def test_loads_in_diffusers_offline(monkeypatch):
    from diffusers import StableDiffusionPipeline

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = StableDiffusionPipeline.from_pretrained(EMBEDDED_MODEL_DIR, dtype=torch.float32, local_files_only=True)
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    assert pipe.scheduler.config.beta_schedule == "scaled_linear"
    assert pipe.scheduler.config.prediction_type == "epsilon"
    img = pipe("a large red circle at the top left on a white background", num_inference_steps=2, output_type="np").images
    assert img.shape == (1, 64, 64, 3)


@pytest.mark.slow
def test_colour_shape_and_position_follow_the_prompt(sampler):
    # 16 one-object scenes from a fixed seed the training never saw; chance is 1/7 for colour,
    # 1/4 for shape, 1/5 for position, 1/3 for background
    scenes = [s for s in sample_scenes(4242, 60) if len(s.objects) == 1][:16]
    prompts = [canonical_caption(s) for s in scenes]
    out = sampler.generate(prompts, steps=10, guidance_scale=7.5, seed=0, output_type="np")
    figures = accuracy(list(out.images), scenes)
    assert out.images.shape == (16, 64, 64, 3)
    # measured 16/16 colour, 15/16 shape, 16/16 position, 16/16 background (10 steps); the
    # thresholds leave room for other CPUs' rounding and are far out of chance's reach
    # (10/16 shapes by chance: p < 0.001; 12/16 colours: p < 1e-8)
    assert figures["colour"] >= 0.75, figures
    assert figures["shape"] >= 0.6, figures
    assert figures["position"] >= 0.6, figures
    assert figures["background"] >= 0.9, figures


def test_evaluate_reports_figures_and_rows_per_plan(sampler):
    from cfgswitch.shapes.evaluate import CARD_PLANS, evaluate

    res = evaluate(sampler, count=4, seed=5, steps=4, batch=4)
    assert list(res) == list(CARD_PLANS)
    # 4 steps: CFG all the way is 2 rows per step; the switch at 0.5 runs 2 steps guided, 2 single
    assert res["always"]["unet_rows_per_image"] == 8
    assert res["switch:0.5"]["unet_rows_per_image"] == 6
    assert res["switch:0.5:cond"]["unet_rows_per_image"] == 6
    for figures in res.values():
        assert set(figures) >= {"colour", "shape", "size", "position", "background", "all_attributes", "seconds_per_image"}
        assert all(0.0 <= figures[k] <= 1.0 for k in ("colour", "shape", "size", "position", "background"))
