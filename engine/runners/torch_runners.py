"""The PyTorch backend: diffusers modules, the UNet eager, compiled or under CUDA graphs (the reference and fallback)."""

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
    """The plain UNet on any number of rows, run in one of :data:`~cfgswitch.runners.torch_modes.TORCH_MODES`.

    Args:
        unet (`torch.nn.Module`): a diffusers ``UNet2DConditionModel`` (or a module with its call).
        mode (`str`, defaults to ``"eager"``): ``eager``; ``compile`` (``torch.compile``, compiled at
            the first call of each shape, cache in the cfgswitch cache folder); ``graphs`` (one CUDA
            graph per input signature, captured once and replayed).
        compile_options (`dict`, optional): passed to ``torch.compile`` in ``compile`` mode (for
            example ``{"mode": "reduce-overhead"}`` on CUDA, ``{"backend": "aot_eager"}``).
    """

    def __init__(self, unet: torch.nn.Module, mode: str = "eager", compile_options: "dict | None" = None) -> None:
        from .torch_modes import CompiledCall, CudaGraphCache

        self.module = unet
        # diffusers' ModelMixin.dtype walks every submodule: read it once, not once per call
        self.dtype = unet.dtype
        self.mode = mode
        self._compiled = self._graphs = None
        if mode == "compile":
            self._compiled = CompiledCall(self._forward, "unet", **(compile_options or {}))
        elif mode == "graphs":
            self._graphs = CudaGraphCache(self._forward)

    def _forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                 *added: torch.Tensor) -> torch.Tensor:
        extra = {}
        if added:
            extra["added_cond_kwargs"] = dict(zip(self._added_names, added))
        return self.module(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False, **extra)[0]

    @torch.no_grad()
    def predict(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                added: "dict | None" = None) -> torch.Tensor:
        """``eps`` of every row; ``added`` holds a family's added conditioning by name (SDXL:
        ``text_embeds``, ``time_ids``), one row per sample row."""
        dtype = self.dtype
        names = tuple(sorted(added)) if added else ()
        self._added_names = names
        args = (sample.to(dtype), timestep, encoder_hidden_states.to(dtype), *(added[k].to(dtype) for k in names))
        if self._graphs is not None:
            return self._graphs(*(a.contiguous() for a in args))
        if self._compiled is not None:
            return self._compiled(*args)
        return self._forward(*args)


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
        added: "dict | None" = None,
    ) -> torch.Tensor:
        uncond, cond = self.predict_pair(sample, timestep, encoder_hidden_states, added).chunk(2)
        return cfg_combine(uncond, cond, guidance_scale)

    @torch.no_grad()
    def predict_pair(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                     added: "dict | None" = None) -> torch.Tensor:
        """``[eps_uncond (B); eps_cond (B)]``: the UNet on ``[x; x]`` with ``[uncond; cond]`` (2B) embeddings
        (and 2B rows of each added conditioning tensor)."""
        return self.unet.predict(torch.cat([sample, sample]), torch.cat([timestep, timestep]), encoder_hidden_states,
                                 added)


class TorchVaeDecoder:
    """``AutoencoderKL.decode`` on latents already divided by the scaling factor."""

    def __init__(self, vae: torch.nn.Module) -> None:
        self.module = vae
        self.dtype = vae.dtype

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.module.decode(latents.to(self.dtype), return_dict=False)[0]


def torch_runners(text_encoder, unet, vae, device: torch.device, dtype: torch.dtype, mode: str = "eager",
                  compile_options: "dict | None" = None) -> Runners:
    """Wrap diffusers/transformers modules (already on ``device`` in ``dtype``) as runners.

    Args:
        mode (`str`, defaults to ``"eager"``): how the UNet roles run (see :class:`TorchUNet`).
        compile_options (`dict`, optional): ``torch.compile`` options in ``compile`` mode.

    Raises:
        InvalidArgumentError: an unknown mode.
        BackendUnavailableError: ``graphs`` without a CUDA device.
    """
    from .torch_modes import check_mode

    plain = TorchUNet(unet, check_mode(mode, torch.device(device)), compile_options)
    return Runners(
        text_encoder=TorchTextEncoder(text_encoder, device),
        unet_cfg=TorchGuidedUNet(plain),
        unet=plain,
        vae_decoder=TorchVaeDecoder(vae),
        backend="torch",
        device=device,
        dtype=dtype,
        info={"device": str(device), "dtype": str(dtype).replace("torch.", ""), "mode": mode},
    )
