"""The training recipe, run for a few steps on a tiny configuration."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cfgswitch.shapes.train import TrainConfig, Trainer

TINY = dict(
    train_images=96, vae_channels=(16, 16, 16), vae_norm_groups=4, vae_steps=60, vae_batch=4, vae_crop=16,
    text_hidden=32, text_layers=1, text_heads=2, text_ffn=64, unet_channels=(32, 32), unet_heads=4,
    unet_steps=40, batch=8, warmup=5, log_every=1, save_every=0, eval_every=0, ema_decay=0.0,
)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("recipe")
    trainer = Trainer(TrainConfig(seed=3, **TINY), out, progress=False)
    model = trainer.run()
    return trainer, model


def _losses(trainer, phase):
    return np.array([h["loss"] for h in trainer.history if h["phase"] == phase])


@pytest.mark.slow
def test_losses_fall_and_log_is_written(trained):
    trainer, model = trained
    vae, unet = _losses(trainer, "autoencoder"), _losses(trainer, "unet")
    assert len(vae) == 60 and len(unet) == 40
    assert vae[-10:].mean() < 0.7 * vae[:5].mean(), vae
    assert unet[-10:].mean() < 0.9 * unet[:5].mean(), unet
    logged = [json.loads(line) for line in (model.parent / "train_log.jsonl").read_text().splitlines()]
    assert [e["loss"] for e in logged if e["phase"] == "unet"] == pytest.approx(list(unet))
    assert json.loads((model.parent / "train_config.json").read_text())["seed"] == 3


@pytest.mark.slow
def test_saved_folder_loads_in_diffusers_offline(trained, monkeypatch):
    from diffusers import StableDiffusionPipeline

    _, model = trained
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert (model / "tokenizer" / "tokenizer.json").is_file()
    assert sorted(p.name for p in (model / "unet").iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    pipe = StableDiffusionPipeline.from_pretrained(model, dtype=torch.float32, local_files_only=True)
    assert pipe.vae.config.scaling_factor != pytest.approx(0.18215)  # measured on the latents, not SD's
    img = pipe("a red square at the centre on a white background", num_inference_steps=2, output_type="np").images
    assert img.shape == (1, 64, 64, 3) and np.isfinite(img).all()


@pytest.mark.slow
def test_saved_folder_loads_in_the_sampler(trained):
    from cfgswitch import Sampler

    trainer, model = trained
    sampler = Sampler.from_diffusers(model)
    out = sampler.generate(["a blue circle at the top left on a black background"], steps=3, output_type="np")
    assert out.images.shape == (1, 64, 64, 3)
    # the saved (float16) text encoder matches the trained one (no averaging here) to float16 precision
    from cfgswitch.shapes.train import tokenize

    ids = tokenize(["a blue circle"])
    with torch.no_grad():
        ref = trainer.text_encoder(ids)[0]
        got = sampler.modules["text_encoder"](ids)[0]
    assert torch.allclose(ref, got, atol=0.01), float((ref - got).abs().max())


def test_cli_rejects_bad_arguments_before_training(tmp_path, capsys):
    from cfgswitch.cli import main

    assert main(["train-shapes", "--out", str(tmp_path / "x"), "--unet-steps", "0"]) == 2
    assert "--unet-steps" in capsys.readouterr().err
    f = tmp_path / "file"
    f.write_text("")
    assert main(["train-shapes", "--out", str(f)]) == 2
    assert "--out: expected a folder" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
