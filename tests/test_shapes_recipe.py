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


def test_loss_weights_follow_inverse_snr_between_one_and_the_cap():
    from diffusers import DDPMScheduler

    from cfgswitch.shapes.train import loss_weights
    from cfgswitch.tiny_model import SD_SCHEDULER_CONFIG

    a = DDPMScheduler.from_config({k: v for k, v in SD_SCHEDULER_CONFIG.items() if k != "set_alpha_to_one"}).alphas_cumprod
    assert torch.equal(loss_weights(a, 0.0), torch.ones(1000))
    w = loss_weights(a, 5.0).double()
    assert w.mean().item() == pytest.approx(1.0, abs=1e-6)
    assert (w.max() / w.min()).item() == pytest.approx(5.0, rel=1e-5)  # clamp(1/SNR, 1, 5), then normalised
    inv_snr = (1 - a.double()) / a.double()
    low, high = inv_snr < 1, inv_snr > 5
    assert torch.allclose(w[low], w.min().expand(int(low.sum())))  # plain epsilon loss where the image shows
    assert torch.allclose(w[high], w.max().expand(int(high.sum())))  # capped at high noise
    mid = ~low & ~high
    assert torch.allclose(w[mid] / w.min(), inv_snr[mid], rtol=1e-5)  # the x0 loss in between
    assert bool((w[1:] >= w[:-1]).all())  # more noise, more weight


def test_timesteps_skew_to_high_noise_below_power_one():
    from cfgswitch.shapes.train import sample_timesteps

    uniform = sample_timesteps(40000, 1.0, torch.Generator().manual_seed(0))
    skewed = sample_timesteps(40000, 0.6, torch.Generator().manual_seed(0))
    for t in (uniform, skewed):
        assert t.dtype == torch.int64 and int(t.min()) >= 0 and int(t.max()) <= 999
    # E[floor(1000 u)] = 499.5; E[1000 u**0.6] = 1000 / 1.6 = 625 (minus about 0.5 for the floor)
    assert float(uniform.double().mean()) == pytest.approx(499.5, abs=5)
    assert float(skewed.double().mean()) == pytest.approx(624.5, abs=5)
    assert torch.equal(skewed, sample_timesteps(40000, 0.6, torch.Generator().manual_seed(0)))


def test_set_overrides_are_typed_and_bad_ones_name_the_field():
    from cfgswitch.errors import InvalidArgumentError
    from cfgswitch.shapes.train_cli import parse_override

    assert parse_override("x0_weight_cap=5") == ("x0_weight_cap", 5.0)
    assert parse_override("unet-steps=300") == ("unet_steps", 300)
    assert parse_override("unet_channels=32,64") == ("unet_channels", (32, 64))
    assert parse_override("fp16=false") == ("fp16", False)
    assert parse_override("device=cuda") == ("device", "cuda")
    with pytest.raises(InvalidArgumentError, match=r"--set: expected NAME=VALUE with NAME one of .*got 'nope=1'"):
        parse_override("nope=1")
    with pytest.raises(InvalidArgumentError, match="--set: expected NAME=VALUE"):
        parse_override("batch")
    with pytest.raises(InvalidArgumentError, match="expected batch= a int value, got 'many'"):
        parse_override("batch=many")
    with pytest.raises(InvalidArgumentError, match="expected lr= a non-negative float, got '-1'"):
        parse_override("lr=-1")
    with pytest.raises(InvalidArgumentError, match="expected fp16= a bool value, got 'maybe'"):
        parse_override("fp16=maybe")


def test_cli_rejects_bad_device_and_time_limit_before_training(tmp_path, capsys):
    from cfgswitch.cli import main

    assert main(["train-shapes", "--out", str(tmp_path / "x"), "--max-minutes", "0"]) == 2
    assert "--max-minutes: expected a positive number of minutes, got 0.0" in capsys.readouterr().err
    assert main(["train-shapes", "--out", str(tmp_path / "x"), "--device", "nonsense"]) == 2
    assert "--device: expected a torch device that exists here" in capsys.readouterr().err
    assert main(["train-shapes", "--out", str(tmp_path / "x"), "--set", "lr"]) == 2
    assert "--set: expected NAME=VALUE" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_time_limit_stops_saves_and_checks(tmp_path):
    """--max-minutes ends the UNet phase early, with the model saved and checked as at the end."""
    cfg = TrainConfig(seed=4, **{**TINY, "eval_every": 1000, "eval_prompts": 2, "eval_steps": 2, "x0_weight_cap": 5.0})
    cfg.max_minutes = 1e-4  # already past after the autoencoder: the first UNet step is the last
    trainer = Trainer(cfg, tmp_path, progress=False)
    model = trainer.run()
    phases = [h["phase"] for h in trainer.history]
    assert [h["step"] for h in trainer.history if h["phase"] == "unet"] == [0]
    assert phases[-3:] == ["time_limit", "save", "eval"], phases[-3:]
    assert (model / "unet" / "diffusion_pytorch_model.safetensors").is_file()
