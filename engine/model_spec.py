"""``ModelSpec``: the one description of a model's shapes, read by the loop, the exporter and the runtimes.

A spec says what a model family needs at every boundary: latent channels and VAE factors,
the token length, the UNet's cross-attention width, each text encoder (its graph name, its
hidden width and whether it also gives a pooled projection), the family's added
conditioning (SDXL: ``text_embeds`` and ``time_ids``) and whether the VAE decodes in
float32 whatever the bundle's dtype (``force_upcast``). The graph tables of
:mod:`cfgswitch.io_specs` and the manifest's ``dims`` are both made from it. Nothing here
imports torch, ONNX or TensorRT.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional, Tuple


@dataclass(frozen=True)
class TextEncoderSpec:
    """One text encoder of a model, as its exported graph sees it.

    Attributes:
        graph (`str`): its graph name (``text_encoder``, ``text_encoder_2``).
        width (`int`): the hidden width of the embeddings it gives the UNet.
        pooled (`int`, defaults to 0): width of its pooled projected output (SDXL's second
            encoder: ``text_embeds``); 0 when it has none.
        penultimate (`bool`, defaults to False): the UNet takes its penultimate hidden state
            (SDXL) rather than its last one after the final layer norm (SD 1.x/2.x).
    """

    graph: str
    width: int
    pooled: int = 0
    penultimate: bool = False

    def to_json(self) -> Dict[str, Any]:
        """The manifest's form."""
        return {"graph": self.graph, "width": self.width, "pooled": self.pooled, "penultimate": self.penultimate}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "TextEncoderSpec":
        """Inverse of :meth:`to_json`."""
        return cls(str(d["graph"]), int(d["width"]), int(d.get("pooled", 0)), bool(d.get("penultimate", False)))


@dataclass(frozen=True)
class ModelSpec:
    """The constant dimensions and layout of a model, whatever runs it.

    Attributes:
        latent_channels (`int`): UNet input channels (4 for SD 1.x/2.x and SDXL).
        vae_scale_factor (`int`): image pixels per latent pixel (8 for SD).
        vae_scaling_factor (`float`, defaults to 0.18215): latents are divided by it before decoding.
        sample_size (`int`, defaults to 64): the UNet's native latent size; the default image
            size is this times the factor.
        text_length (`int`, defaults to 77): tokens per prompt.
        text_width (`int`, defaults to 768): the UNet's cross-attention width (SDXL: both
            encoders' widths concatenated).
        name (`str`, defaults to ``"model"``): a display name of the model.
        family (`str`, defaults to ``"sd1"``): the model family (:mod:`cfgswitch.families`).
        added (`dict[str, int]`, optional): added conditioning, name to width (SDXL:
            ``{"text_embeds": 1280, "time_ids": 6}``); empty for SD 1.x/2.x.
        text_encoders (`tuple[TextEncoderSpec]`, optional): the text encoders in order; empty
            means one encoder ``text_encoder`` of ``text_width`` without pooled output (SD 1.x/2.x).
        vae_force_upcast (`bool`, defaults to False): the VAE decodes in float32 in a float16
            model (SDXL's VAE asks for it in its config: it overflows in float16).
    """

    latent_channels: int
    vae_scale_factor: int
    vae_scaling_factor: float = 0.18215
    sample_size: int = 64
    text_length: int = 77
    text_width: int = 768
    name: str = "model"
    family: str = "sd1"
    added: Dict[str, int] = field(default_factory=dict, hash=False, compare=True)
    text_encoders: Tuple[TextEncoderSpec, ...] = ()
    vae_force_upcast: bool = False

    @property
    def default_size(self) -> int:
        """Default image height and width in pixels."""
        return self.sample_size * self.vae_scale_factor

    @property
    def encoders(self) -> Tuple[TextEncoderSpec, ...]:
        """The text encoders (SD 1.x/2.x: one ``text_encoder`` of ``text_width``)."""
        return self.text_encoders or (TextEncoderSpec("text_encoder", self.text_width),)

    @property
    def added_names(self) -> Tuple[str, ...]:
        """Added conditioning names in the order graphs and runners take them (sorted)."""
        return tuple(sorted(self.added))

    def dims_json(self) -> Dict[str, Any]:
        """The manifest's ``dims``: SD 1.x/2.x keep the four keys they always had; a family with
        several encoders or added conditioning adds ``text_encoders`` and ``added`` (and
        ``vae_force_upcast`` when the VAE decodes in float32)."""
        d: Dict[str, Any] = {"latent_channels": self.latent_channels, "vae_scale_factor": self.vae_scale_factor,
                             "text_length": self.text_length, "text_width": self.text_width}
        if self.text_encoders:
            d["text_encoders"] = [e.to_json() for e in self.text_encoders]
        if self.added:
            d["added"] = {k: int(self.added[k]) for k in self.added_names}
        if self.vae_force_upcast:
            d["vae_force_upcast"] = True
        return d

    @classmethod
    def from_manifest(cls, manifest: Mapping[str, Any], name: Optional[str] = None,
                      sample_size: Optional[int] = None) -> "ModelSpec":
        """The spec a checked manifest records (``dims``, ``family``, VAE scaling, sample size)."""
        d = manifest["dims"]
        return cls(
            latent_channels=int(d["latent_channels"]), vae_scale_factor=int(d["vae_scale_factor"]),
            vae_scaling_factor=float(manifest.get("vae_scaling_factor", 0.18215)),
            sample_size=int(sample_size if sample_size is not None else manifest.get("sample_size", 64)),
            text_length=int(d["text_length"]), text_width=int(d["text_width"]),
            name=str(name if name is not None else (manifest.get("model") or {}).get("name", "model")),
            family=str(manifest.get("family", "sd1")),
            added={str(k): int(v) for k, v in (d.get("added") or {}).items()},
            text_encoders=tuple(TextEncoderSpec.from_json(e) for e in (d.get("text_encoders") or ())),
            vae_force_upcast=bool(d.get("vae_force_upcast", False)),
        )


def module_dims(unet: Any, vae: Any, text_encoder: Any, tokenizer: Any) -> Dict[str, Any]:
    """The :class:`ModelSpec` fields read off SD-layout diffusers/transformers modules' configs:
    latent channels, VAE factors, sample size and text length (the rest depends on the family)."""
    return {
        "latent_channels": int(unet.config.in_channels),
        "vae_scale_factor": 2 ** (len(vae.config.block_out_channels) - 1),
        "vae_scaling_factor": float(vae.config.scaling_factor),
        "sample_size": int(unet.config.sample_size),
        "text_length": int(min(tokenizer.model_max_length, text_encoder.config.max_position_embeddings)),
    }


__all__ = ["ModelSpec", "TextEncoderSpec", "module_dims"]
