"""What every model family provides (see :mod:`cfgswitch.families`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from ..errors import InvalidArgumentError, ModelLoadError
from ..io_specs import GraphSpec, TensorSpec
from ..model_spec import ModelSpec, TextEncoderSpec, module_dims


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
    #: output name of each text-encoder graph's hidden states (SD: CLIP's last hidden state)
    hidden_output = "last_hidden_state"

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

    def text_encoders(self, components: Dict[str, Any]) -> Tuple[TextEncoderSpec, ...]:
        """The text encoders' specs; empty means one ``text_encoder`` of the UNet's width (SD 1.x/2.x)."""
        return ()

    def vae_force_upcast(self, components: Dict[str, Any]) -> bool:
        """Whether the VAE decodes in float32 in a float16 model (SD 1.x/2.x: no, as diffusers' SD pipeline)."""
        return False

    def model_spec(self, components: Dict[str, Any], name: str) -> ModelSpec:
        """The :class:`~cfgswitch.model_spec.ModelSpec` of loaded components (``unet``, ``vae``,
        ``text_encoder``, ``tokenizer``, and the family's others)."""
        return ModelSpec(
            **module_dims(components["unet"], components["vae"], components["text_encoder"], components["tokenizer"]),
            text_width=self.text_width(components),
            name=name,
            family=self.name,
            added=self.added_widths(components),
            text_encoders=self.text_encoders(components),
            vae_force_upcast=self.vae_force_upcast(components),
        )

    def graph_table(self, spec: ModelSpec) -> Dict[str, GraphSpec]:
        """The family's exported graphs by name, in export order (what :mod:`cfgswitch.io_specs` serves).

        One graph per text encoder (``input_ids [T, L]`` to its hidden states ``[T, L, width]``,
        and its pooled projection ``text_embeds [T, pooled]`` when it has one), the plain UNet
        ``unet`` (``B`` rows), the guided ``unet_cfg`` (``B`` latents, ``2B`` rows of every
        conditioning tensor, the combine inside) and ``vae_decoder``. The UNet graphs take the
        family's added conditioning after their SD inputs, in name order. SD 1.x/2.x get the
        table they always had (same names, tensors and order).
        """
        c, L, C = spec.latent_channels, spec.text_length, spec.text_width
        table: Dict[str, GraphSpec] = {}
        for enc in spec.encoders:
            outputs = [TensorSpec(self.hidden_output, "model", ("T", L, enc.width))]
            if enc.pooled:
                outputs.append(TensorSpec("text_embeds", "model", ("T", enc.pooled)))
            table[enc.graph] = GraphSpec(enc.graph, inputs=(TensorSpec("input_ids", "int64", ("T", L)),),
                                         outputs=tuple(outputs), rows="T")

        def added(rows: str) -> Tuple[TensorSpec, ...]:
            return tuple(TensorSpec(k, "model", (rows, spec.added[k])) for k in spec.added_names)

        table["unet"] = GraphSpec(
            "unet",
            inputs=(TensorSpec("sample", "model", ("B", c, "h", "w")), TensorSpec("timestep", "float32", ("B",)),
                    TensorSpec("encoder_hidden_states", "model", ("B", L, C))) + added("B"),
            outputs=(TensorSpec("noise_pred", "model", ("B", c, "h", "w")),),
            rows="B",
        )
        table["unet_cfg"] = GraphSpec(
            "unet_cfg",
            inputs=(TensorSpec("sample", "model", ("B", c, "h", "w")), TensorSpec("timestep", "float32", ("B",)),
                    TensorSpec("encoder_hidden_states", "model", ("2B", L, C)),
                    TensorSpec("guidance_scale", "float32", ("B",))) + added("2B"),
            outputs=(TensorSpec("noise_pred", "model", ("B", c, "h", "w")),),
            rows="B",
        )
        vae_dtype = "float32" if spec.vae_force_upcast else "model"
        table["vae_decoder"] = GraphSpec(
            "vae_decoder",
            inputs=(TensorSpec("latents", vae_dtype, ("B", c, "h", "w")),),
            outputs=(TensorSpec("image", vae_dtype, ("B", 3, "H", "W")),),
            rows="B",
        )
        return table

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
