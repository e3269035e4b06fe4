"""Runner adapters over any graph callable: ``graph(*tensors) -> tensor``.

ONNX Runtime sessions and Triton BLS engine models both expose one graph as such a
callable; these adapters give it the runner protocols of :mod:`cfgswitch.runners.base`.
"""

from __future__ import annotations

from typing import Callable, Optional

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
    """:class:`~cfgswitch.runners.base.GuidedUNetRunner`, with :meth:`predict_pair` for adaptive plans.

    With ``combine_outside=False`` the graph is ``unet_cfg`` (concat, UNet on 2B rows and the
    combine inside); with ``True`` it is the plain ``unet`` run on 2B rows and the combine runs here.

    Args:
        graph: the CFG role's graph callable.
        combine_outside (`bool`, defaults to False): ``graph`` is the plain UNet (the ``shared`` layout).
        pair_graph (optional): a plain ``unet`` graph for :meth:`predict_pair` when ``graph`` is
            ``unet_cfg`` (which only outputs the guided prediction).
        pair_split (`bool`, defaults to False): run ``pair_graph`` as two B-row calls (uncond
            rows, then cond rows), for engines whose profiles cover B rows (the ``late`` plan).
    """

    def __init__(self, graph: Graph, combine_outside: bool = False, pair_graph: Optional[Graph] = None,
                 pair_split: bool = False) -> None:
        self.graph = graph
        self.combine_outside = combine_outside
        self.pair_graph = pair_graph
        self.pair_split = pair_split

    def predict_guided(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                       guidance_scale: torch.Tensor) -> torch.Tensor:
        if not self.combine_outside:
            return self.graph(sample, timestep, encoder_hidden_states, guidance_scale)
        uncond, cond = self.predict_pair(sample, timestep, encoder_hidden_states).chunk(2)
        return cfg_combine(uncond, cond, guidance_scale)

    def predict_pair(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        """Both predictions of the CFG role, ``[eps_uncond (B); eps_cond (B)]``, for the adaptive plan's cosine.

        Args:
            sample (`torch.Tensor`): ``[B, C, h, w]`` latents.
            timestep (`torch.Tensor`): ``[B]`` timesteps.
            encoder_hidden_states (`torch.Tensor`): ``[2B, L, C]`` embeddings ``[uncond; cond]``.
        """
        if self.combine_outside:  # the plain UNet on 2B rows: the CFG role's own profile
            return self.graph(torch.cat([sample, sample]), torch.cat([timestep, timestep]), encoder_hidden_states)
        if self.pair_graph is not None:
            if self.pair_split:
                uncond, cond = encoder_hidden_states.chunk(2)
                return torch.cat([self.pair_graph(sample, timestep, uncond), self.pair_graph(sample, timestep, cond)])
            return self.pair_graph(torch.cat([sample, sample]), torch.cat([timestep, timestep]), encoder_hidden_states)
        # Only the guided graph: u + w (c - u) with both halves equal is that half's prediction, whatever w.
        uncond, cond = encoder_hidden_states.chunk(2)
        w = torch.ones_like(timestep)
        return torch.cat([self.graph(sample, timestep, torch.cat([uncond, uncond]), w),
                          self.graph(sample, timestep, torch.cat([cond, cond]), w)])


class GraphVaeDecoder:
    """:class:`~cfgswitch.runners.base.VaeDecoderRunner` on a ``vae_decoder`` graph."""

    def __init__(self, graph: Graph) -> None:
        self.graph = graph

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.graph(latents)
