"""What every model family provides (see :mod:`cfgswitch.families`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from ..errors import InvalidArgumentError, ModelLoadError


@dataclass(frozen=True)
class SizeConditioning:
    """SDXL's micro-conditioning of one request (pixels), prompt and negative side.

    Attributes:
        original_size, target_size (`tuple[int, int]`): ``(height, width)``.
        crops_coords_top_left (`tuple[int, int]`): ``(top, left)``.
        negative_original_size, negative_target_size, negative_crops_coords_top_left: the same
            for the unconditional rows (used when both sizes are given, as diffusers does).
    """

    original_size: Tuple[int, int]
    target_size: Tuple[int, int]
    crops_coords_top_left: Tuple[int, int] = (0, 0)
    negative_original_size: Optional[Tuple[int, int]] = None
    negative_target_size: Optional[Tuple[int, int]] = None
    negative_crops_coords_top_left: Optional[Tuple[int, int]] = None

    def time_ids(self, negative: bool) -> List[int]:
        """The six ``add_time_ids`` of diffusers: original size, crop, target size.

        As diffusers' SDXL pipeline: the negative side has its own only when both
        ``negative_original_size`` and ``negative_target_size`` are given (its crop then
        defaults to ``(0, 0)``); otherwise it repeats the prompt's.
        """
        if negative and self.negative_original_size is not None and self.negative_target_size is not None:
            o, t = self.negative_original_size, self.negative_target_size
            c = self.negative_crops_coords_top_left or (0, 0)
        else:
            o, c, t = self.original_size, self.crops_coords_top_left, self.target_size
        return [*o, *c, *t]


SIZE_ARGUMENTS = ("original_size", "target_size", "crops_coords_top_left", "negative_original_size",
                  "negative_target_size", "negative_crops_coords_top_left")


def check_pair(name: str, value: Any, minimum: int) -> Optional[Tuple[int, int]]:
    """``None`` or two ints ``>= minimum`` (a typed error otherwise)."""
    if value is None:
        return None
    what = "two positive ints" if minimum > 0 else "two non-negative ints"
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 2:
        raise InvalidArgumentError(name, f"{what} (height, width)", value)
    if any(isinstance(x, bool) or not isinstance(x, int) or x < minimum or x > 1 << 20 for x in value):
        raise InvalidArgumentError(name, f"{what} (height, width)", value)
    return int(value[0]), int(value[1])


class Family:
    """A model layout: how to recognise, load and text-encode it.

    Attributes:
        name (`str`): the registry name.
        pipeline_classes (`tuple[str]`): the diffusers pipeline classes it loads.
        added (`dict[str, int]`): added conditioning names and widths (none for SD 1.x/2.x).
        size_conditioning (`bool`): whether requests may carry :class:`SizeConditioning`.
    """

    name = "base"
    pipeline_classes: Tuple[str, ...] = ()
    size_conditioning = False

    def matches(self, class_name: str, unet_config: Dict[str, Any]) -> bool:
        """Whether a folder or object of that pipeline class and UNet config is this family."""
        return class_name in self.pipeline_classes

    def matches_object(self, pipe: Any) -> bool:
        """Whether a pipeline object of an unknown class has this family's components."""
        return False

    def check_unet(self, unet_config: Dict[str, Any], where: str) -> None:
        """Refuse UNets of the family's class that the engine cannot run (inpainting: 9 channels)."""
        channels = unet_config.get("in_channels", 4)
        if channels != 4:
            raise ModelLoadError(f"model: {where} has a UNet with {channels} input channels (an inpainting or "
                                 f"image-conditioned UNet); cfgswitch runs text-to-image UNets with 4")

    def load_folder(self, path: Any, device: torch.device, dtype: torch.dtype) -> Dict[str, Any]:
        """Components of a checked folder: modules by name and ``scheduler_config``."""
        raise NotImplementedError

    def from_pipeline(self, pipe: Any, device: torch.device, dtype: torch.dtype) -> Dict[str, Any]:
        """Components of a live pipeline object (moved to ``device`` and ``dtype``)."""
        raise NotImplementedError

    def added_widths(self, components: Dict[str, Any]) -> Dict[str, int]:
        """Added conditioning name -> width for these components."""
        return {}

    def text_width(self, components: Dict[str, Any]) -> int:
        """The UNet's cross-attention width."""
        return int(components["unet"].config.cross_attention_dim)

    def encode(self, sampler: Any, prompts: Sequence[str], negatives: Sequence[str], n_per: int, *,
               negative_none: bool, sizes: Optional[SizeConditioning]) -> Tuple[Any, List[str]]:
        """``(Conditioning, warnings)`` of one request, as the family's diffusers pipeline encodes it."""
        raise NotImplementedError


def prepare_modules(modules: Sequence[torch.nn.Module], device: torch.device, dtype: torch.dtype) -> None:
    """Move modules to ``device``/``dtype`` (only where needed) and freeze them for inference."""
    for m in modules:
        if m.dtype != dtype or m.device != device:
            m.to(device=device, dtype=dtype)
        m.eval().requires_grad_(False)


__all__ = ["Family", "SIZE_ARGUMENTS", "SizeConditioning", "check_pair", "prepare_modules"]
