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


def added_conditioning(pooled_width: Optional[int], batch: int, height: int, width: int, device: torch.device,
                       dtype: torch.dtype, seed: int = 1) -> Dict[str, torch.Tensor]:
    """SDXL's added conditioning of ``batch`` images: random pooled ``text_embeds`` and the size ``time_ids``.

    Empty for a model without added conditioning (``pooled_width=None``, SD 1.x). The runtime
    carries these through :class:`cfgswitch.conditioning.Conditioning` to the UNet's
    ``added_cond_kwargs``, as an SDXL pipeline does.
    """
    if pooled_width is None:
        return {}
    gen = torch.Generator("cpu").manual_seed(seed)
    return {"text_embeds": torch.randn((batch, pooled_width), generator=gen).to(device, dtype),
            "time_ids": torch.tensor([[height, width, 0, 0, height, width]] * batch, dtype=dtype, device=device)}


__all__ = ["MODELS", "added_conditioning", "SD15_UNET", "SDXL_UNET", "TINY_MODELS",
           "build_unet", "count_parameters"]
