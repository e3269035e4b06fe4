"""Stable Diffusion 1.x (``StableDiffusionPipeline``, CLIP ViT-L text encoder, 768-wide).

Text encoding as diffusers' ``StableDiffusionPipeline.encode_prompt`` does it: one CLIP call
for the prompts and one for the negative prompts (``""`` when none), last hidden state, no
attention mask, each prompt repeated ``num_images_per_prompt`` times consecutively.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from ..conditioning import Conditioning
from ..errors import ModelLoadError
from .base import Family, SizeConditioning, prepare_modules

_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


class SD1(Family):
    """The SD 1.x family (see the module docstring)."""

    name = "sd1"
    pipeline_classes = ("StableDiffusionPipeline",)
    #: cross-attention width of SD 2.x's OpenCLIP ViT-H (the :mod:`.sd2` family)
    _sd2_width = 1024

    def matches(self, class_name: str, unet_config: Dict[str, Any]) -> bool:
        return class_name in self.pipeline_classes and unet_config.get("cross_attention_dim") != self._sd2_width

    def matches_object(self, pipe: Any) -> bool:
        width = getattr(getattr(getattr(pipe, "unet", None), "config", None), "cross_attention_dim", None)
        return (all(getattr(pipe, a, None) is not None for a in _PARTS) and getattr(pipe, "text_encoder_2", None) is None
                and width != self._sd2_width)

    def load_folder(self, path: Any, device: torch.device, dtype: torch.dtype) -> Dict[str, Any]:
        from ..model_loading import load_components

        tokenizer, text_encoder, unet, vae, sched_cfg = load_components(path, device, dtype)
        return {"tokenizer": tokenizer, "text_encoder": text_encoder, "unet": unet, "vae": vae,
                "scheduler_config": sched_cfg}

    def from_pipeline(self, pipe: Any, device: torch.device, dtype: torch.dtype) -> Dict[str, Any]:
        missing = [a for a in _PARTS if getattr(pipe, a, None) is None]
        if missing:
            raise ModelLoadError(f"model: expected a Stable Diffusion pipeline, got {type(pipe).__name__} without "
                                 f"{', '.join(missing)}")
        prepare_modules((pipe.unet, pipe.vae, pipe.text_encoder), device, dtype)
        return {"tokenizer": pipe.tokenizer, "text_encoder": pipe.text_encoder, "unet": pipe.unet, "vae": pipe.vae,
                "scheduler_config": dict(pipe.scheduler.config)}

    def encode(self, sampler: Any, prompts: Sequence[str], negatives: Sequence[str], n_per: int, *,
               negative_none: bool = False, sizes: Optional[SizeConditioning] = None) -> Tuple[Conditioning, List[str]]:
        from ..tokenizer import tokenize, truncation_warnings

        length = sampler.spec.text_length
        tok_c = tokenize(sampler.tokenizer, prompts, length)
        tok_u = tokenize(sampler.tokenizer, negatives, length)
        warnings = truncation_warnings(prompts, tok_c, "prompt") + truncation_warnings(negatives, tok_u, "negative prompt")
        cond = sampler.runners.text_encoder.encode(tok_c.input_ids)
        uncond = sampler.runners.text_encoder.encode(tok_u.input_ids)
        return Conditioning.from_text(uncond, cond).repeat_interleave(n_per), warnings


FAMILY = SD1()

__all__ = ["FAMILY", "SD1"]
