"""The training data of the recipe, drawn as the training loops draw it, rendered only where used.

Both phases sample their batches from seeded generators. :func:`vae_batches` and
:func:`unet_batches` are those samplers: the training loops consume them, and a replay of the
same generators before training (:func:`used_indices`) says which of the ``train_images``
scenes the run will ever touch. Only those are rendered (and, for the UNet phase, encoded),
so a short run costs what it uses. A full run draws every image, renders all of them and
encodes them in the same order and chunks as before, so its weights do not change.
"""

from __future__ import annotations

from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .world import IMAGE_SIZE, Scene, render_batch


def sample_timesteps(count: int, power: float, generator: torch.Generator) -> torch.Tensor:
    """``count`` training timesteps in [0, 999]: ``floor(1000 * u**power)``, uniform at ``power`` 1."""
    if power == 1.0:
        return torch.randint(0, 1000, (count,), generator=generator)
    u = torch.rand(count, generator=generator, dtype=torch.float64)
    return (1000 * u.pow(power)).long().clamp_(0, 999)


def vae_batches(cfg, steps: int) -> Iterator[Tuple[torch.Tensor, Optional[Tuple[int, int]]]]:
    """Per autoencoder step: the image indices and the crop's top-left corner (``None``: no crop)."""
    gen = torch.Generator().manual_seed(cfg.seed + 10)
    crop = bool(cfg.vae_crop and cfg.vae_crop < IMAGE_SIZE)
    f = cfg.latent_factor()
    for _ in range(steps):
        idx = torch.randint(0, cfg.train_images, (cfg.vae_batch,), generator=gen)
        corner = None
        if crop:
            oy, ox = (torch.randint(0, (IMAGE_SIZE - cfg.vae_crop) // f + 1, (2,), generator=gen) * f).tolist()
            corner = (oy, ox)
        yield idx, corner


def unet_batches(cfg, steps: int, latent_shape: Tuple[int, int, int]) -> Iterator[Tuple[torch.Tensor, ...]]:
    """Per UNet step: ``(indices, uncond drop mask, timesteps, noise)``, noise with its offset part added."""
    gen = torch.Generator().manual_seed(cfg.seed + 20)
    for _ in range(steps):
        idx = torch.randint(0, cfg.train_images, (cfg.batch,), generator=gen)
        drop = torch.rand(cfg.batch, generator=gen) < cfg.uncond_prob
        t = sample_timesteps(cfg.batch, cfg.t_power, gen)
        eps = torch.randn((cfg.batch, *latent_shape), generator=gen)
        if cfg.offset_noise:
            eps = eps + cfg.offset_noise * torch.randn((cfg.batch, latent_shape[0], 1, 1), generator=gen)
        yield idx, drop, t, eps


def unet_step_count(cfg) -> int:
    """UNet steps the run may take: ``stop_at`` when set, else the schedule's (``max_minutes`` may stop it sooner)."""
    return min(cfg.stop_at, cfg.unet_steps) if cfg.stop_at > 0 else cfg.unet_steps


def used_indices(cfg, latent_shape: Tuple[int, int, int]) -> Tuple[List[int], List[int]]:
    """Sorted indices of the images the autoencoder phase and the UNet phase draw."""
    vae = torch.unique(torch.cat([idx for idx, _ in vae_batches(cfg, cfg.vae_steps)] or [torch.zeros(0, dtype=torch.long)]))
    unet = torch.unique(torch.cat([b[0] for b in unet_batches(cfg, unet_step_count(cfg), latent_shape)]
                                  or [torch.zeros(0, dtype=torch.long)]))
    return vae.tolist(), unet.tolist()


class RenderedImages:
    """The rendered images of some scenes, as ``[-1, 1]`` float tensors, looked up by scene index.

    Args:
        scenes (`Sequence[Scene]`): every training scene.
        indices (`Sequence[int]`): the scenes to render (sorted).
        device (`torch.device`): where the images live.
    """

    def __init__(self, scenes: Sequence[Scene], indices: Sequence[int], device: torch.device) -> None:
        self.indices = [int(i) for i in indices]
        self.position = torch.full((len(scenes),), -1, dtype=torch.long)
        self.position[torch.tensor(self.indices, dtype=torch.long)] = torch.arange(len(self.indices))
        pixels = render_batch([scenes[i] for i in self.indices])
        self.images = (torch.from_numpy(np.ascontiguousarray(pixels)).permute(0, 3, 1, 2).float() / 127.5 - 1.0).to(device)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, idx: torch.Tensor) -> torch.Tensor:
        pos = self.position[idx.cpu()]
        if bool((pos < 0).any()):
            raise IndexError(f"images {idx[pos < 0].tolist()} were not rendered (not in the run's draws)")
        return self.images[pos.to(self.images.device)]


__all__ = ["RenderedImages", "sample_timesteps", "unet_batches", "unet_step_count", "used_indices", "vae_batches"]
