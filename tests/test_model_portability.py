"""The embedded model (and what ``train-shapes`` writes) loads in transformers 4.x and 5.x alike.

transformers 4.x names a ``CLIPTextModel``'s weights ``text_model.*`` and, given other names,
loads a random encoder with only a warning; its slow ``CLIPTokenizer`` (and optimum's ONNX
exporter) reads ``vocab.json`` and ``merges.txt``. transformers 5 reads ``tokenizer.json`` and
drops the ``text_model.`` prefix on load. These tests check the saved files against what each
major requires, with transformers 5 (installed) as the loader; a run under transformers 4.57
is recorded in the model card.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors import safe_open

from cfgswitch.default_model import EMBEDDED_MODEL_DIR
from cfgswitch.errors import InvalidArgumentError
from cfgswitch.shapes.portable import make_portable, portability_problems

CAT_IDS = [49406, 320, 1125, 539, 320, 2368, 49407]  # CLIP's ids of "a photo of a cat"
#: Key names of SD 1.x text encoders as transformers 4.x saves them (e.g. runwayml's checkpoints).
KNOWN_4X_KEYS = ("text_model.embeddings.token_embedding.weight", "text_model.embeddings.position_embedding.weight",
                 "text_model.encoder.layers.0.self_attn.q_proj.weight", "text_model.encoder.layers.1.mlp.fc2.bias",
                 "text_model.final_layer_norm.weight")

pytestmark = pytest.mark.skipif(
    not (EMBEDDED_MODEL_DIR / "model_index.json").is_file(), reason="the trained model is not shipped in this checkout"
)


def _keys(model_dir):
    with safe_open(str(model_dir / "text_encoder" / "model.safetensors"), framework="pt") as f:
        return set(f.keys())


def _names_of_transformers_4(config) -> set:
    """The state-dict names of a 4.x ``CLIPTextModel``, built by transformers itself.

    transformers 5's ``CLIPTextModelWithProjection`` keeps the text model under ``text_model``, as
    4.x's ``CLIPTextModel`` did; only its projection is extra.
    """
    from transformers import CLIPTextModelWithProjection

    return set(CLIPTextModelWithProjection(config).state_dict()) - {"text_projection.weight"}


def test_embedded_text_encoder_keys_are_the_transformers_4_names():
    from transformers import CLIPTextConfig

    keys = _keys(EMBEDDED_MODEL_DIR)
    config = CLIPTextConfig.from_pretrained(EMBEDDED_MODEL_DIR / "text_encoder")
    assert keys == _names_of_transformers_4(config)
    assert set(KNOWN_4X_KEYS) <= keys
    assert portability_problems(EMBEDDED_MODEL_DIR) == []


def test_embedded_text_encoder_loads_in_transformers_5_with_every_weight():
    from transformers import CLIPTextModel

    model, info = CLIPTextModel.from_pretrained(EMBEDDED_MODEL_DIR / "text_encoder", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    state = model.state_dict()
    with safe_open(str(EMBEDDED_MODEL_DIR / "text_encoder" / "model.safetensors"), framework="pt") as f:
        for key in f.keys():
            saved = f.get_tensor(key)
            loaded = state[key.removeprefix("text_model.")]
            assert loaded.dtype == saved.dtype and torch.equal(loaded, saved), key


def test_slow_tokenizer_files_alone_give_clip_ids(tmp_path):
    """vocab.json + merges.txt, without tokenizer.json, tokenize exactly as tokenizer.json does."""
    from transformers import CLIPTokenizer

    tok_dir = EMBEDDED_MODEL_DIR / "tokenizer"
    slow_only = tmp_path / "tokenizer"
    slow_only.mkdir()
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copy(tok_dir / name, slow_only / name)
    lines = (tok_dir / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert lines[0].startswith("#version")  # transformers 4.x's slow tokenizer skips the first line
    assert len(lines) - 1 == 48894 and len(json.loads((tok_dir / "vocab.json").read_text(encoding="utf-8"))) == 49408
    fast = CLIPTokenizer.from_pretrained(tok_dir)
    slow = CLIPTokenizer.from_pretrained(slow_only)
    prompts = ["a photo of a cat", "a large red circle at the top left on a white background", "Ünïcode, punct.!?"]
    assert slow("a photo of a cat")["input_ids"] == CAT_IDS
    assert slow(prompts)["input_ids"] == fast(prompts)["input_ids"]


def test_train_shapes_writer_saves_portable_folders(tiny_pipe, tmp_path):
    from transformers import CLIPTextModel

    from cfgswitch.shapes.train import save_pipeline

    out = save_pipeline(tiny_pipe.vae, tiny_pipe.text_encoder, tiny_pipe.unet, tmp_path / "model", fp16=False)
    assert portability_problems(out) == []
    assert _keys(out) == _names_of_transformers_4(tiny_pipe.text_encoder.config)
    reloaded = CLIPTextModel.from_pretrained(out / "text_encoder")
    ids = torch.tensor([CAT_IDS + [49407] * 70])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).last_hidden_state, tiny_pipe.text_encoder(ids).last_hidden_state,
                                   rtol=0, atol=0)


def test_make_portable_is_idempotent_and_refuses_other_folders(tmp_path):
    copy = tmp_path / "shapes"
    shutil.copytree(EMBEDDED_MODEL_DIR / "text_encoder", copy / "text_encoder")
    shutil.copytree(EMBEDDED_MODEL_DIR / "tokenizer", copy / "tokenizer")
    before = (copy / "text_encoder" / "model.safetensors").read_bytes()
    make_portable(copy)
    assert (copy / "text_encoder" / "model.safetensors").read_bytes() == before
    with pytest.raises(InvalidArgumentError, match="model_dir.*text_encoder/model.safetensors"):
        make_portable(tmp_path / "nothing")


@pytest.mark.slow
def test_diffusers_pipeline_on_the_folder_follows_prompts():
    """What optimum and OpenVINO's pipelines load: diffusers' own classes on the folder."""
    from diffusers import StableDiffusionPipeline

    from cfgswitch.shapes.captions import canonical_caption
    from cfgswitch.shapes.scorer import accuracy
    from cfgswitch.shapes.world import sample_scenes

    pipe = StableDiffusionPipeline.from_pretrained(EMBEDDED_MODEL_DIR, dtype=torch.float32, local_files_only=True)
    scenes = [s for s in sample_scenes(4242, 60) if len(s.objects) == 1][:16]
    generators = [torch.Generator().manual_seed(i) for i in range(len(scenes))]
    images = pipe([canonical_caption(s) for s in scenes], num_inference_steps=10, guidance_scale=7.5,
                  generator=generators, output_type="np").images
    figures = accuracy(list(np.asarray(images)), scenes)
    # measured 16/16 colour, 15/16 shape, 16/16 position under transformers 5.24 and 4.57 alike; a
    # random text encoder (what 4.x loaded before) sits near chance (1/7, 1/4, 1/5)
    assert figures["colour"] >= 0.75 and figures["shape"] >= 0.6 and figures["position"] >= 0.6, figures
