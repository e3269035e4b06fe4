"""The torch modules behind each exported graph, and example inputs for them.

Each wrapper returns one tensor and takes exactly the inputs that
:mod:`cfgswitch.io_specs` names, in that order, so the exporter and the runtimes
agree by construction.
"""

from __future__ import annotations

from typing import Dict, Tuple

import torch

from cfgswitch.io_specs import GraphSpec, ModelDims, resolve_shape, shape_env

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


class UNetGraph(torch.nn.Module):
    """The plain UNet: ``noise_pred = unet(sample, timestep, encoder_hidden_states)``."""

    def __init__(self, unet: torch.nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]


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


class VaeDecoderGraph(torch.nn.Module):
    """``AutoencoderKL.decode``: latents already divided by the scaling factor to images in [-1, 1]."""

    def __init__(self, vae: torch.nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents, return_dict=False)[0]


def graph_module(name: str, text_encoder, unet, vae) -> torch.nn.Module:
    """The wrapper module of graph ``name``; the text encoder's output takes the UNet's dtype."""
    if name == "text_encoder":
        return TextEncoderGraph(text_encoder, None if unet.dtype == text_encoder.dtype else unet.dtype)
    if name == "unet":
        return UNetGraph(unet)
    if name == "unet_cfg":
        return GuidedUNetGraph(unet)
    if name == "vae_decoder":
        return VaeDecoderGraph(vae)
    raise KeyError(f"graph: unknown graph {name!r}")


def example_inputs(spec: GraphSpec, dims: ModelDims, model_dtype: str, rows: int, height: int, width: int,
                   seed: int = 0) -> Tuple[torch.Tensor, ...]:
    """Random inputs of ``spec`` for a request of ``rows`` images of ``height`` x ``width`` pixels.

    Timesteps are drawn in [0, 1000), token ids among CLIP's, guidance weights in [1, 10).
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
        else:
            x = torch.randn(shape, generator=g).to(dtype)
        out.append(x)
    return tuple(out)


def example_feed(spec: GraphSpec, inputs: Tuple[torch.Tensor, ...]) -> Dict[str, "object"]:
    """``{input name: numpy array}`` for ONNX Runtime."""
    return {t.name: x.numpy() for t, x in zip(spec.inputs, inputs)}


__all__ = ["GuidedUNetGraph", "TextEncoderGraph", "UNetGraph", "VaeDecoderGraph", "example_feed", "example_inputs",
           "graph_module", "torch_dtype"]
