"""The runner protocols every backend implements, and the model facts the loop needs.

All runners take and return torch tensors on the sampler's device; a backend
that computes elsewhere (ONNX Runtime, TensorRT) converts at its boundary.
Rows are ordered ``[uncond_0..uncond_{B-1}, cond_0..cond_{B-1}]`` (diffusers' order).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Protocol, runtime_checkable

import torch


@dataclass(frozen=True)
class ModelSpec:
    """What the loop must know about a model, whatever runs it.

    Attributes:
        latent_channels (`int`): UNet input channels (4 for SD 1.x/2.x).
        vae_scale_factor (`int`): image pixels per latent pixel (8 for SD).
        vae_scaling_factor (`float`): latents are divided by it before decoding (0.18215 for SD 1.x).
        sample_size (`int`): the UNet's native latent size; default image size is this times the factor.
        text_length (`int`): tokens per prompt (77).
        text_width (`int`): text-encoder hidden size (cross-attention dim).
        name (`str`): a display name of the model.
        family (`str`, defaults to ``"sd1"``): the model family (:mod:`cfgswitch.families`).
        added (`dict[str, int]`, optional): the family's added conditioning, name to width
            (SDXL: ``{"text_embeds": 1280, "time_ids": 6}``); empty for SD 1.x/2.x.
    """

    latent_channels: int
    vae_scale_factor: int
    vae_scaling_factor: float
    sample_size: int
    text_length: int
    text_width: int
    name: str = "model"
    family: str = "sd1"
    added: Dict[str, int] = field(default_factory=dict, hash=False, compare=True)

    @property
    def default_size(self) -> int:
        """Default image height and width in pixels."""
        return self.sample_size * self.vae_scale_factor


@runtime_checkable
class TextEncoderRunner(Protocol):
    """Token ids ``[N, L]`` (int64) to embeddings ``[N, L, C]``."""

    def encode(self, input_ids: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class UNetRunner(Protocol):
    """The plain UNet: ``eps = unet(sample, timestep, encoder_hidden_states)`` on any row count."""

    def predict(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class GuidedUNetRunner(Protocol):
    """The CFG role: B latents, 2B embeddings ``[uncond; cond]``, B weights to B guided predictions."""

    def predict_guided(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        guidance_scale: torch.Tensor,
    ) -> torch.Tensor: ...


@runtime_checkable
class PairedGuidedUNetRunner(GuidedUNetRunner, Protocol):
    """A CFG role that also returns both predictions, for the adaptive plan's cosine.

    ``predict_pair(sample [B], timestep [B], encoder_hidden_states [2B] = [uncond; cond])``
    returns ``[eps_uncond (B); eps_cond (B)]`` (2B rows), computed on the CFG role's own
    engine or profile. The loop calls it when the runner has it.
    """

    def predict_pair(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class VaeDecoderRunner(Protocol):
    """Latents already divided by the scaling factor ``[B, 4, h, w]`` to images in [-1, 1] ``[B, 3, H, W]``."""

    def decode(self, latents: torch.Tensor) -> torch.Tensor: ...


@dataclass
class Runners:
    """The components a :class:`~cfgswitch.Sampler` runs.

    Attributes:
        text_encoder: a :class:`TextEncoderRunner`.
        unet_cfg: a :class:`GuidedUNetRunner` (the ``cfg`` role).
        unet: a :class:`UNetRunner` (the ``late`` role; the adaptive plan's mixed row sets once some images switched).
        vae_decoder: a :class:`VaeDecoderRunner`.
        backend (`str`): the backend's name as results report it.
        device (`torch.device`): where latents live.
        dtype (`torch.dtype`): the dtype latents are kept in between steps.
        info (`dict`): backend details reported with every result (providers, engine files, ...).
        check_request (`callable`, optional): rejects batch or image sizes the backend cannot run.
    """

    text_encoder: TextEncoderRunner
    unet_cfg: GuidedUNetRunner
    unet: UNetRunner
    vae_decoder: VaeDecoderRunner
    backend: str
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    info: Dict[str, Any] = field(default_factory=dict)
    #: ``check_request(batch=, height=, width=)`` raises a typed error for a request the backend
    #: cannot run (bundle batch sizes, image sizes); ``None`` accepts everything.
    check_request: Optional[Callable[..., None]] = None
