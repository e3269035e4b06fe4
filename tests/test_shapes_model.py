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
    pipe = StableDiffusionPipeline.from_pretrained(EMBEDDED_MODEL_DIR, torch_dtype=torch.float32, local_files_only=True)
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    assert pipe.scheduler.config.beta_schedule == "scaled_linear"
    assert pipe.scheduler.config.prediction_type == "epsilon"
    img = pipe("a large red circle at the top left on a white background", num_inference_steps=2, output_type="np").images
    assert img.shape == (1, 64, 64, 3)


@pytest.mark.slow
def test_colours_follow_the_prompt(sampler):
    # 8 one-object scenes from a fixed seed the training never saw; chance is 1/7 for colour
    scenes = [s for s in sample_scenes(4242, 40) if len(s.objects) == 1][:8]
    prompts = [canonical_caption(s) for s in scenes]
    out = sampler.generate(prompts, steps=10, guidance_scale=7.5, seed=0, output_type="np")
    figures = accuracy(list(out.images), scenes)
    assert out.images.shape == (8, 64, 64, 3)
    assert figures["colour"] >= 0.6, figures
    assert figures["background"] >= 0.75, figures
