"""The runner protocols every backend implements.

All runners take and return torch tensors on the sampler's device; a backend
that computes elsewhere (ONNX Runtime, TensorRT) converts at its boundary.
Rows are ordered ``[uncond_0..uncond_{B-1}, cond_0..cond_{B-1}]`` (diffusers' order).
UNet runners take a family's added conditioning (SDXL: ``text_embeds``, ``time_ids``) as
``added=``, a dict by name with one row per sample row, beside ``encoder_hidden_states``.
:class:`~cfgswitch.model_spec.ModelSpec` lives in :mod:`cfgswitch.model_spec`; it is
re-exported here for older imports.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Protocol, Tuple, runtime_checkable

import torch

from ..model_spec import ModelSpec  # noqa: F401  (re-exported for older imports)


@runtime_checkable
class TextEncoderRunner(Protocol):
    """Token ids ``[N, L]`` (int64) to embeddings ``[N, L, C]``."""

    def encode(self, input_ids: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class PooledTextEncoderRunner(Protocol):
    """Token ids ``[N, L]`` to hidden states ``[N, L, C]`` and a pooled projection ``[N, P]`` (SDXL's second encoder)."""

    def encode_pooled(self, input_ids: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]: ...


@runtime_checkable
class UNetRunner(Protocol):
    """The plain UNet: ``eps = unet(sample, timestep, encoder_hidden_states, added)`` on any row count."""

    def predict(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                added: Optional[Dict[str, torch.Tensor]] = None) -> torch.Tensor: ...


@runtime_checkable
class GuidedUNetRunner(Protocol):
    """The CFG role: B latents, 2B embeddings ``[uncond; cond]``, B weights to B guided predictions."""

    def predict_guided(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        guidance_scale: torch.Tensor,
        added: Optional[Dict[str, torch.Tensor]] = None,
    ) -> torch.Tensor: ...


@runtime_checkable
class PairedGuidedUNetRunner(GuidedUNetRunner, Protocol):
    """A CFG role that also returns both predictions, for the adaptive plan's cosine.

    ``predict_pair(sample [B], timestep [B], encoder_hidden_states [2B] = [uncond; cond])``
    returns ``[eps_uncond (B); eps_cond (B)]`` (2B rows), computed on the CFG role's own
    engine or profile. The loop calls it when the runner has it.
    """

    def predict_pair(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                     added: Optional[Dict[str, torch.Tensor]] = None) -> torch.Tensor: ...


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
        text_encoder_2 (optional): a :class:`PooledTextEncoderRunner`, for families with a second
            text encoder (SDXL bundles); ``None`` otherwise (the torch backend's SDXL runs the
            family's modules).
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
    text_encoder_2: Optional[PooledTextEncoderRunner] = None
