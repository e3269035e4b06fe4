"""Random-weight UNets of the real SD 1.5 and SDXL sizes that the GPU suite times.

The configs are written out here (no download): speed does not depend on weight values.
The suite runs them through the runtime's torch runners in each mode (eager, CUDA graphs,
``torch.compile``: :mod:`cfgswitch.runners.torch_modes`), not through copies of them.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch

#: ``UNet2DConditionModel`` config of Stable Diffusion 1.5 (859.5 M parameters; 64x64 latents, 512 px).
SD15_UNET: Dict[str, Any] = {
    "act_fn": "silu", "attention_head_dim": 8, "block_out_channels": (320, 640, 1280, 1280),
    "center_input_sample": False, "cross_attention_dim": 768,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-5, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
}

#: ``UNet2DConditionModel`` config of SDXL base 1.0 (2.57 B parameters; 128x128 latents, 1024 px) with its
#: added conditioning: pooled text embeddings (1280) and six size/crop time ids (6 x 256 = 1536; 2816 in all).
SDXL_UNET: Dict[str, Any] = {
    "act_fn": "silu", "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256, "attention_head_dim": (5, 10, 20), "block_out_channels": (320, 640, 1280),
    "center_input_sample": False, "cross_attention_dim": 2048,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-5, "norm_num_groups": 32, "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816, "sample_size": 128, "transformer_layers_per_block": (1, 2, 10),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), "use_linear_projection": True,
}

#: Tiny stand-ins with the same structure, for ``--dry-run`` on a CPU.
TINY_SD15_UNET: Dict[str, Any] = {
    "block_out_channels": (32, 64), "layers_per_block": 1, "sample_size": 8, "in_channels": 4, "out_channels": 4,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"), "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
    "cross_attention_dim": 32, "attention_head_dim": 8, "norm_num_groups": 32,
}
TINY_SDXL_UNET: Dict[str, Any] = {
    **TINY_SD15_UNET, "addition_embed_type": "text_time", "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 32 + 6 * 8, "transformer_layers_per_block": (1, 2),
    "use_linear_projection": True, "attention_head_dim": (2, 4),
}

#: name -> (UNet config, pooled text width or None, image side in pixels, VAE factor)
MODELS: Dict[str, Tuple[Dict[str, Any], Optional[int], int]] = {
    "sd15": (SD15_UNET, None, 512),
    "sdxl": (SDXL_UNET, 1280, 1024),
}
TINY_MODELS: Dict[str, Tuple[Dict[str, Any], Optional[int], int]] = {
    "sd15": (TINY_SD15_UNET, None, 64),
    "sdxl": (TINY_SDXL_UNET, 32, 64),
}


def build_unet(config: Dict[str, Any], device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """A random-weight ``UNet2DConditionModel`` built directly on ``device`` (fast on a GPU)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(**config)
    return unet.to(dtype=dtype).eval().requires_grad_(False)


def count_parameters(config: Dict[str, Any]) -> int:
    """Parameters of a UNet config, counted on the meta device (no memory)."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    return sum(p.numel() for p in unet.parameters())


class AddedCondUNet(torch.nn.Module):
    """A UNet whose SDXL added conditioning (pooled text embeddings, time ids) is bound, one row per call row.

    With ``pooled_width=None`` (SD 1.x) it passes calls through unchanged.
    """

    def __init__(self, unet: torch.nn.Module, pooled_width: Optional[int], height: int, width: int) -> None:
        super().__init__()
        self.unet = unet
        self.config = unet.config
        self.text_embeds = self.time_ids = None
        if pooled_width is not None:
            p = next(unet.parameters())
            gen = torch.Generator("cpu").manual_seed(1)
            self.text_embeds = torch.randn((1, pooled_width), generator=gen).to(p.device, p.dtype)
            self.time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=p.dtype, device=p.device)

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor, return_dict: bool = False):
        kwargs = {}
        if self.text_embeds is not None:
            rows = sample.shape[0]
            kwargs["added_cond_kwargs"] = {"text_embeds": self.text_embeds.expand(rows, -1), "time_ids": self.time_ids.expand(rows, -1)}
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False, **kwargs)


__all__ = ["AddedCondUNet", "MODELS", "SD15_UNET", "SDXL_UNET", "TINY_MODELS",
           "build_unet", "count_parameters"]
