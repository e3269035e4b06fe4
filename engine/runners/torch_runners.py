"""The PyTorch backend: diffusers modules run eagerly (the reference and fallback)."""

from __future__ import annotations

import torch

from ..kernels_bridge import cfg_combine
from .base import Runners


class TorchTextEncoder:
    """Runs a transformers ``CLIPTextModel`` as diffusers' pipeline does (no attention mask)."""

    def __init__(self, text_encoder: torch.nn.Module, device: torch.device) -> None:
        self.module = text_encoder
        self.device = device

    @torch.no_grad()
    def encode(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.module(input_ids.to(self.device), attention_mask=None)[0]


class TorchUNet:
    """The plain UNet on any number of rows."""

    def __init__(self, unet: torch.nn.Module) -> None:
        self.module = unet

    @torch.no_grad()
    def predict(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        dtype = self.module.dtype
        return self.module(
            sample.to(dtype), timestep, encoder_hidden_states=encoder_hidden_states.to(dtype), return_dict=False
        )[0]


class TorchGuidedUNet:
    """The CFG role: UNet on ``[x; x]`` with ``[uncond; cond]`` embeddings, then ``u + w (c - u)``."""

    def __init__(self, unet: TorchUNet) -> None:
        self.unet = unet

    @torch.no_grad()
    def predict_guided(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        guidance_scale: torch.Tensor,
    ) -> torch.Tensor:
        doubled = torch.cat([sample, sample])
        eps = self.unet.predict(doubled, torch.cat([timestep, timestep]), encoder_hidden_states)
        uncond, cond = eps.chunk(2)
        return cfg_combine(uncond, cond, guidance_scale)


class TorchVaeDecoder:
    """``AutoencoderKL.decode`` on latents already divided by the scaling factor."""

    def __init__(self, vae: torch.nn.Module) -> None:
        self.module = vae

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.module.decode(latents.to(self.module.dtype), return_dict=False)[0]


def torch_runners(text_encoder, unet, vae, device: torch.device, dtype: torch.dtype) -> Runners:
    """Wrap diffusers/transformers modules (already on ``device`` in ``dtype``) as runners."""
    plain = TorchUNet(unet)
    return Runners(
        text_encoder=TorchTextEncoder(text_encoder, device),
        unet_cfg=TorchGuidedUNet(plain),
        unet=plain,
        vae_decoder=TorchVaeDecoder(vae),
        backend="torch",
        device=device,
        dtype=dtype,
        info={"device": str(device), "dtype": str(dtype).replace("torch.", "")},
    )
