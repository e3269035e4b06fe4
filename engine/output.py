"""What one ``generate`` call returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import numpy as np
import torch


@dataclass
class GenerationOutput:
    """The images of one call and everything needed to account for them.

    Attributes:
        images: a list of PIL images (``output_type="pil"``), an array ``[B, H, W, 3]`` of
            float32 in [0, 1] (``"np"``), or ``None`` (``"latent"``).
        latents (`torch.Tensor` of shape `[B, C, h, w]`): the final latents (before VAE scaling).
        timings (`dict[str, float]`): seconds per stage: ``text``, ``unet_cfg``, ``unet_late``,
            ``scheduler`` (scheduler and host work of the loop), ``vae``, ``loop``, ``total``.
        cfg_steps (`int`): steps run guided (2B rows).
        late_steps (`int`): steps run with one prediction per image (B rows).
        unet_rows (`int`): UNet rows evaluated in total (``2*B*cfg_steps + B*late_steps``).
        warnings (`list[str]`): e.g. prompts cut by the tokenizer, with how many tokens dropped.
        plan (`str`): the plan string that ran.
        late_mode (`str`): ``uncond`` or ``cond``.
        backend (`str`): the backend that ran.
        step_kernel (`str`): ``fused`` when the compiled guide-and-step op ran, ``reference`` otherwise.
        switch_step (`int` or `None`): the first step after the last CFG step: ``k`` for
            ``switch:F`` (``k = round(F * N)``), the window's end for ``interval:0.2:0.6`` (18 of
            30), 0 when no step ran guided, ``None`` when CFG runs to the end (``always``).
            For an adaptive plan, the first step after the last step in which any image ran guided.
        seeds (`list[int]`): the seed of each image.
        info (`dict`): backend details.
    """

    images: Any
    latents: torch.Tensor
    timings: Dict[str, float]
    cfg_steps: int
    late_steps: int
    unet_rows: int
    warnings: List[str] = field(default_factory=list)
    plan: str = "always"
    late_mode: str = "uncond"
    backend: str = "torch"
    step_kernel: str = "reference"
    switch_step: Optional[int] = None
    seeds: List[int] = field(default_factory=list)
    info: Dict[str, Any] = field(default_factory=dict)

    def summary(self) -> Dict[str, Any]:
        """A JSON-ready dict of everything but the images and latents."""
        return {
            "plan": self.plan,
            "late_mode": self.late_mode,
            "backend": self.backend,
            "step_kernel": self.step_kernel,
            "cfg_steps": self.cfg_steps,
            "late_steps": self.late_steps,
            "switch_step": self.switch_step,
            "unet_rows": self.unet_rows,
            "seeds": list(self.seeds),
            "timings": {k: float(v) for k, v in self.timings.items()},
            "warnings": list(self.warnings),
            "info": self.info,
        }


def to_uint8(images: np.ndarray) -> np.ndarray:
    """``[B, H, W, 3]`` floats in [0, 1] to uint8 as diffusers rounds them (``round(x * 255)``)."""
    return (images * 255).round().astype(np.uint8)
