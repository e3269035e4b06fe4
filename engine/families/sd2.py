"""Stable Diffusion 2.x (``StableDiffusionPipeline`` with OpenCLIP ViT-H, 1024-wide text).

Loading and text encoding are SD 1.x's; what differs lives in the scheduler config the model
ships (``prediction_type: v_prediction`` for the 768 px models, ``timestep_spacing``,
``rescale_betas_zero_snr``), which the schedulers read as diffusers does.
"""

from __future__ import annotations

from typing import Any, Dict

from .sd1 import SD1


class SD2(SD1):
    """The SD 2.x family: SD 1.x's layout with a 1024-wide OpenCLIP text encoder."""

    name = "sd2"

    def matches(self, class_name: str, unet_config: Dict[str, Any]) -> bool:
        return class_name in self.pipeline_classes and unet_config.get("cross_attention_dim") == self._sd2_width

    def matches_object(self, pipe: Any) -> bool:
        width = getattr(getattr(getattr(pipe, "unet", None), "config", None), "cross_attention_dim", None)
        return width == self._sd2_width and getattr(pipe, "text_encoder_2", None) is None


FAMILY = SD2()

__all__ = ["FAMILY", "SD2"]
