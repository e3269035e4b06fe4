"""The recipe renders and encodes only the training images its steps draw."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cfgswitch.shapes.captions import sample_captioned
from cfgswitch.shapes.train import TrainConfig, Trainer, sample_timesteps
from cfgswitch.shapes.train_data import RenderedImages, unet_batches, used_indices, vae_batches
from cfgswitch.shapes.world import render

QUICK = dict(
    train_images=12000, vae_channels=(16, 16, 16), vae_norm_groups=4, vae_steps=3, vae_batch=4, vae_crop=16,
    text_hidden=32, text_layers=1, text_heads=2, text_ffn=64, unet_channels=(32, 32), unet_heads=4,
    unet_steps=3, batch=4, warmup=1, log_every=1, save_every=0, eval_every=0, ema_decay=0.0, threads=1,
)


def test_draws_replay_the_recipe_order():
    # the order the recipe has always drawn its UNet batches in: indices, drop mask, timesteps, noise, offset
    cfg = TrainConfig(seed=3, train_images=50, batch=8)
    gen = torch.Generator().manual_seed(cfg.seed + 20)
    for idx, drop, t, eps in unet_batches(cfg, 5, (4, 16, 16)):
        assert torch.equal(idx, torch.randint(0, 50, (8,), generator=gen))
        assert torch.equal(drop, torch.rand(8, generator=gen) < cfg.uncond_prob)
        assert torch.equal(t, sample_timesteps(8, cfg.t_power, gen))
        ref = torch.randn((8, 4, 16, 16), generator=gen)
        assert torch.equal(eps, ref + cfg.offset_noise * torch.randn((8, 4, 1, 1), generator=gen))
    gen = torch.Generator().manual_seed(cfg.seed + 10)
    for idx, corner in vae_batches(cfg, 5):
        assert torch.equal(idx, torch.randint(0, 50, (cfg.vae_batch,), generator=gen))
        oy, ox = (torch.randint(0, (64 - cfg.vae_crop) // 4 + 1, (2,), generator=gen) * 4).tolist()
        assert corner == (oy, ox)


def test_rendered_images_are_the_scenes_of_their_indices():
    scenes = [s for s, _ in sample_captioned(0, 20)]
    store = RenderedImages(scenes, [2, 5, 11], torch.device("cpu"))
    got = store[torch.tensor([11, 2, 2])]
    want = np.stack([render(scenes[i]) for i in (11, 2, 2)])
    assert torch.equal(got, torch.from_numpy(want).permute(0, 3, 1, 2).float() / 127.5 - 1.0)
    with pytest.raises(IndexError, match=r"images \[3\] were not rendered"):
        store[torch.tensor([3, 5])]


@pytest.mark.slow
def test_a_short_run_renders_only_what_it_draws(tmp_path):
    cfg = TrainConfig(seed=1, **QUICK)
    vae_used, unet_used = used_indices(cfg, (4, 16, 16))
    expected = len(set(vae_used) | set(unet_used))
    assert expected <= 3 * 4 + 3 * 4  # 3 steps of 4 images in each phase, of 12,000 scenes
    trainer = Trainer(cfg, tmp_path / "run", progress=False)
    trainer.run()
    assert trainer.rendered_images == expected
    data = next(h for h in trainer.history if h["phase"] == "data")
    assert (data["rendered"], data["encoded"], data["train_images"]) == (expected, len(unet_used), 12000)
    assert len([h for h in trainer.history if h["phase"] == "unet"]) == 3
    # the latents of drawn images are their encodings; the others were never encoded
    drawn = torch.tensor(unet_used)
    assert bool((trainer.lat_mean[drawn].abs().sum(dim=(1, 2, 3)) > 0).all())
    undrawn = torch.tensor(sorted(set(range(12000)) - set(unet_used))[:50])
    assert bool((trainer.lat_mean[undrawn] == 0).all())
