"""The torch modules behind each exported graph, and example inputs for them.

Each wrapper returns one tensor and takes exactly the inputs that
:mod:`cfgswitch.io_specs` names, in that order, so the exporter and the runtimes
agree by construction.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Tuple

import torch

from cfgswitch.io_specs import GraphSpec, resolve_shape, shape_env
from cfgswitch.model_spec import ModelSpec

_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "int64": torch.int64}


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of an io_specs dtype name."""
    return _TORCH_DTYPES[name]


class TextEncoderGraph(torch.nn.Module):
    """``input_ids [T, L]`` to ``last_hidden_state [T, L, C]``, as diffusers calls CLIP (no attention mask).

    Args:
        text_encoder: a transformers ``CLIPTextModel``.
        out_dtype (`torch.dtype`, optional): cast the output to it. fp16 bundles keep the text
            encoder in fp32 and cast its output: the TorchScript exporter emits a mistyped
            ``Cast`` into CLIP's first residual in half precision (ONNX Runtime and TensorRT
            refuse the graph), and one text-encoder call per request costs nothing measurable.
    """

    def __init__(self, text_encoder: torch.nn.Module, out_dtype: "torch.dtype | None" = None) -> None:
        super().__init__()
        self.text_encoder = text_encoder
        self.out_dtype = out_dtype

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = self.text_encoder(input_ids, attention_mask=None)[0]
        return out if self.out_dtype is None else out.to(self.out_dtype)


class PenultimateTextEncoderGraph(torch.nn.Module):
    """SDXL's text-encoder graphs: ``input_ids [T, L]`` to the penultimate hidden state ``[T, L, C]``
    (and, with ``pooled``, the projected pooled ``text_embeds [T, P]`` too), as diffusers'
    ``StableDiffusionXLPipeline.encode_prompt`` calls CLIP (no attention mask).

    Args:
        text_encoder: a transformers ``CLIPTextModel`` (or ``CLIPTextModelWithProjection`` with ``pooled``).
        pooled (`bool`, defaults to False): also return the encoder's first output (``text_embeds``).
        out_dtype (`torch.dtype`, optional): cast the outputs to it (see :class:`TextEncoderGraph`).
    """

    def __init__(self, text_encoder: torch.nn.Module, pooled: bool = False, out_dtype: "torch.dtype | None" = None) -> None:
        super().__init__()
        self.text_encoder = text_encoder
        self.pooled = pooled
        self.out_dtype = out_dtype

    def forward(self, input_ids: torch.Tensor):
        out = self.text_encoder(input_ids, output_hidden_states=True)
        hidden = out.hidden_states[-2]
        if self.out_dtype is not None:
            hidden = hidden.to(self.out_dtype)
        if not self.pooled:
            return hidden
        pooled = out[0]
        return hidden, (pooled if self.out_dtype is None else pooled.to(self.out_dtype))


class UNetGraph(torch.nn.Module):
    """The plain UNet: ``noise_pred = unet(sample, timestep, encoder_hidden_states)``."""

    def __init__(self, unet: torch.nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]


class AddedUNetGraph(torch.nn.Module):
    """SDXL's plain UNet: ``unet(sample, timestep, encoder_hidden_states, added_cond_kwargs)`` with
    ``text_embeds [B, P]`` and ``time_ids [B, 6]`` as the graph's last inputs."""

    def __init__(self, unet: torch.nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                text_embeds: torch.Tensor, time_ids: torch.Tensor) -> torch.Tensor:
        added = {"text_embeds": text_embeds, "time_ids": time_ids}
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added,
                         return_dict=False)[0]


class GuidedUNetGraph(torch.nn.Module):
    """The ``cfg`` role in one graph: ``[x; x]`` through the UNet on 2B rows, then ``u + w (c - u)``.

    Inputs: ``sample [B]``, ``timestep [B]`` (float32), ``encoder_hidden_states [2B]``
    (``[uncond; cond]``), ``guidance_scale [B]`` (float32). Output ``noise_pred [B]``.
    The combine rounds as :func:`cfgswitch.kernels.cfg_combine_reference` does (weights cast
    to the prediction dtype first).
    """

    def __init__(self, unet: torch.nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                guidance_scale: torch.Tensor) -> torch.Tensor:
        rows = sample.shape[0]
        eps = self.unet(torch.cat([sample, sample]), torch.cat([timestep, timestep]),
                        encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]
        uncond, cond = eps[:rows], eps[rows:]
        w = guidance_scale.to(eps.dtype).reshape(-1, 1, 1, 1)
        return uncond + w * (cond - uncond)


class AddedGuidedUNetGraph(GuidedUNetGraph):
    """SDXL's ``cfg`` role in one graph: as :class:`GuidedUNetGraph`, with ``text_embeds [2B, P]`` and
    ``time_ids [2B, 6]`` (``[uncond; cond]``) after ``guidance_scale``."""

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                guidance_scale: torch.Tensor, text_embeds: torch.Tensor, time_ids: torch.Tensor) -> torch.Tensor:
        rows = sample.shape[0]
        added = {"text_embeds": text_embeds, "time_ids": time_ids}
        eps = self.unet(torch.cat([sample, sample]), torch.cat([timestep, timestep]),
                        encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added, return_dict=False)[0]
        uncond, cond = eps[:rows], eps[rows:]
        w = guidance_scale.to(eps.dtype).reshape(-1, 1, 1, 1)
        return uncond + w * (cond - uncond)


class VaeDecoderGraph(torch.nn.Module):
    """``AutoencoderKL.decode``: latents already divided by the scaling factor to images in [-1, 1]."""

    def __init__(self, vae: torch.nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents, return_dict=False)[0]


_ADDED = ("text_embeds", "time_ids")


def graph_module(name: str, text_encoder, unet, vae, spec: Optional[ModelSpec] = None,
                 components: Optional[Mapping[str, Any]] = None) -> torch.nn.Module:
    """The wrapper module of graph ``name``; the text encoders' outputs take the UNet's dtype.

    Args:
        name (`str`): a graph of the model's family (:func:`cfgswitch.io_specs.graph_names`).
        text_encoder, unet, vae: the model's modules.
        spec (`ModelSpec`, optional): the model's spec (SD 1.x when ``None``); SDXL's graphs take
            the penultimate hidden states and the added conditioning.
        components (`dict`, optional): the family's other modules (SDXL: ``text_encoder_2``).
    """
    added = bool(spec is not None and spec.added)
    if spec is not None and spec.added and tuple(spec.added_names) != _ADDED:
        raise KeyError(f"graph: no wrapper for added conditioning {', '.join(spec.added_names)}")
    encoders = {e.graph: e for e in spec.encoders} if spec is not None else {}
    if name in ("text_encoder", "text_encoder_2"):
        enc = text_encoder if name == "text_encoder" else (components or {}).get("text_encoder_2")
        if enc is None:
            raise KeyError(f"graph: {name} needs the model's {name} module")
        out_dtype = None if unet.dtype == enc.dtype else unet.dtype
        es = encoders.get(name)
        if es is not None and (es.penultimate or es.pooled):
            if not es.penultimate:
                raise KeyError(f"graph: no wrapper for a pooled {name} that gives its last hidden state")
            return PenultimateTextEncoderGraph(enc, pooled=bool(es.pooled), out_dtype=out_dtype)
        return TextEncoderGraph(enc, out_dtype)
    if name == "unet":
        return AddedUNetGraph(unet) if added else UNetGraph(unet)
    if name == "unet_cfg":
        return AddedGuidedUNetGraph(unet) if added else GuidedUNetGraph(unet)
    if name == "vae_decoder":
        return VaeDecoderGraph(vae)
    raise KeyError(f"graph: unknown graph {name!r}")


def example_inputs(spec: GraphSpec, dims: ModelSpec, model_dtype: str, rows: int, height: int, width: int,
                   seed: int = 0) -> Tuple[torch.Tensor, ...]:
    """Random inputs of ``spec`` for a request of ``rows`` images of ``height`` x ``width`` pixels.

    Timesteps are drawn in [0, 1000), token ids among CLIP's, guidance weights in [1, 10),
    SDXL's ``time_ids`` among pixel sizes and crops in [0, 1024).
    """
    g = torch.Generator("cpu").manual_seed(seed)
    env = shape_env(rows, height, width, dims.vae_scale_factor)
    out = []
    for t in spec.inputs:
        shape = resolve_shape(t.shape, env)
        dtype = torch_dtype(t.resolved_dtype(model_dtype))
        if t.name == "input_ids":
            x = torch.randint(0, 49406, shape, generator=g, dtype=torch.int64)
            x[:, 0] = 49406
            x[:, -1] = 49407
        elif t.name == "timestep":
            x = torch.randint(0, 1000, shape, generator=g).to(dtype)
        elif t.name == "guidance_scale":
            x = (1 + 9 * torch.rand(shape, generator=g)).to(dtype)
        elif t.name == "time_ids":
            x = torch.randint(0, 1024, shape, generator=g).to(dtype)
        else:
            x = torch.randn(shape, generator=g).to(dtype)
        out.append(x)
    return tuple(out)


def example_feed(spec: GraphSpec, inputs: Tuple[torch.Tensor, ...]) -> Dict[str, "object"]:
    """``{input name: numpy array}`` for ONNX Runtime."""
    return {t.name: x.numpy() for t, x in zip(spec.inputs, inputs)}


__all__ = ["AddedGuidedUNetGraph", "AddedUNetGraph", "GuidedUNetGraph", "PenultimateTextEncoderGraph", "TextEncoderGraph",
           "UNetGraph", "VaeDecoderGraph", "example_feed", "example_inputs", "graph_module", "torch_dtype"]
