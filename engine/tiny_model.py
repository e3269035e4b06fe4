"""Small random-weight Stable Diffusion models, built offline from configs.

They have the exact Stable Diffusion layout (CLIP text encoder, UNet with
cross-attention, KL autoencoder, scaled-linear epsilon schedule) at a size that
runs in seconds on a CPU: the tests' models, in the style of diffusers'
``get_dummy_components``.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Dict, Optional

import torch

#: The scheduler config of Stable Diffusion 1.x (scaled-linear betas, epsilon prediction).
SD_SCHEDULER_CONFIG: Dict = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "timestep_spacing": "leading",
}


def tiny_components(seed: int = 0, sample_size: int = 8, cross_attention_dim: int = 32) -> Dict:
    """Random-weight components of a tiny SD model (64 px images at ``sample_size=8``).

    Args:
        seed (`int`, defaults to 0): weights seed.
        sample_size (`int`, defaults to 8): latent side (images are 8x larger... see note).
        cross_attention_dim (`int`, defaults to 32): text width.

    Note: the VAE has two blocks, so its factor is 2; images are ``2 * sample_size`` pixels
    unless a size is given to ``generate``.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from .tokenizer import load_clip_tokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        block_out_channels=(32, 64),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=32,
        sample_size=sample_size * 2,
    )
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
            hidden_size=cross_attention_dim,
            intermediate_size=37,
            layer_norm_eps=1e-5,
            num_attention_heads=4,
            num_hidden_layers=2,
            vocab_size=49408,
            max_position_embeddings=77,
        )
    )
    scheduler = DDIMScheduler.from_config(SD_SCHEDULER_CONFIG)
    for m in (unet, vae, text_encoder):
        m.eval()
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": load_clip_tokenizer(),
        "scheduler": scheduler,
        "safety_checker": None,
        "feature_extractor": None,
    }


def tiny_pipeline(seed: int = 0, **kwargs):
    """A diffusers ``StableDiffusionPipeline`` of :func:`tiny_components`."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(**tiny_components(seed, **kwargs), requires_safety_checker=False)


def save_tiny_model(path: "str | Path", seed: int = 0, pipeline: Optional[object] = None) -> Path:
    """Save a tiny model as a diffusers folder (safetensors) at ``path`` and return it.

    The folder is made portable (:func:`cfgswitch.shapes.portable.make_portable`): text-encoder
    keys and the slow tokenizer's files that transformers 4.x and optimum read too.
    """
    from .shapes.portable import make_portable

    pipe = pipeline if pipeline is not None else tiny_pipeline(seed)
    out = Path(path)
    pipe.save_pretrained(out, safe_serialization=True)
    return make_portable(out)


#: The scheduler config of SDXL base (Euler, scaled-linear betas, leading spacing, epsilon).
SDXL_SCHEDULER_CONFIG: Dict = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "interpolation_type": "linear",
    "use_karras_sigmas": False,
}


def tiny_sdxl_components(seed: int = 0) -> Dict:
    """Random-weight components of a tiny SDXL model (64 px images), in the style of diffusers'
    ``get_dummy_components`` for ``StableDiffusionXLPipeline``: two CLIP text encoders (the second
    with a projection, its tokenizer padding with ``!``) and a UNet with ``text_time`` added
    conditioning (``text_embeds`` 32 wide, ``time_ids`` 6)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from .tokenizer import load_clip_tokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80,
        cross_attention_dim=64, norm_num_groups=1,
    )
    torch.manual_seed(seed)
    vae = AutoencoderKL(block_out_channels=[32, 64], in_channels=3, out_channels=3,
                        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
                        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"], latent_channels=4, sample_size=128)
    cfg = CLIPTextConfig(bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, hidden_size=32, intermediate_size=37,
                         layer_norm_eps=1e-05, num_attention_heads=4, num_hidden_layers=5, vocab_size=49408,
                         hidden_act="gelu", projection_dim=32, max_position_embeddings=77)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(cfg)
    torch.manual_seed(seed + 1)
    text_encoder_2 = CLIPTextModelWithProjection(cfg)
    tokenizer_2 = copy.deepcopy(load_clip_tokenizer())  # the cached one is shared: pad a copy
    tokenizer_2.pad_token = "!"
    for m in (unet, vae, text_encoder, text_encoder_2):
        m.eval()
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2,
            "tokenizer": load_clip_tokenizer(), "tokenizer_2": tokenizer_2,
            "scheduler": EulerDiscreteScheduler.from_config(SDXL_SCHEDULER_CONFIG)}


def tiny_sdxl_pipeline(seed: int = 0):
    """A diffusers ``StableDiffusionXLPipeline`` of :func:`tiny_sdxl_components`."""
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline(**tiny_sdxl_components(seed))
    pipe.set_progress_bar_config(disable=True)
    return pipe
