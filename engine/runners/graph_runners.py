"""Runner adapters over any graph callable: ``graph(*tensors) -> tensor``.

ONNX Runtime sessions and Triton BLS engine models both expose one graph as such a
callable; these adapters give it the runner protocols of :mod:`cfgswitch.runners.base`.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..kernels_bridge import cfg_combine

Graph = Callable[..., torch.Tensor]


class GraphTextEncoder:
    """:class:`~cfgswitch.runners.base.TextEncoderRunner` on a ``text_encoder`` graph."""

    def __init__(self, graph: Graph) -> None:
        self.graph = graph

    def encode(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.graph(input_ids)


class GraphUNet:
    """:class:`~cfgswitch.runners.base.UNetRunner` on a plain ``unet`` graph (any row count)."""

    def __init__(self, graph: Graph) -> None:
        self.graph = graph

    def predict(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        return self.graph(sample, timestep, encoder_hidden_states)


class GraphGuidedUNet:
    """:class:`~cfgswitch.runners.base.GuidedUNetRunner`.

    With ``combine_outside=False`` the graph is ``unet_cfg`` (concat, UNet on 2B rows and the
    combine inside); with ``True`` it is the plain ``unet`` run on 2B rows and the combine runs here.
    """

    def __init__(self, graph: Graph, combine_outside: bool = False) -> None:
        self.graph = graph
        self.combine_outside = combine_outside

    def predict_guided(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                       guidance_scale: torch.Tensor) -> torch.Tensor:
        if not self.combine_outside:
            return self.graph(sample, timestep, encoder_hidden_states, guidance_scale)
        eps = self.graph(torch.cat([sample, sample]), torch.cat([timestep, timestep]), encoder_hidden_states)
        uncond, cond = eps.chunk(2)
        return cfg_combine(uncond, cond, guidance_scale)


class GraphVaeDecoder:
    """:class:`~cfgswitch.runners.base.VaeDecoderRunner` on a ``vae_decoder`` graph."""

    def __init__(self, graph: Graph) -> None:
        self.graph = graph

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.graph(latents)
