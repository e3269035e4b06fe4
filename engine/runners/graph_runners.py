"""Runner adapters over any graph callable: ``graph(*tensors) -> tensor``.

ONNX Runtime sessions and Triton BLS engine models both expose one graph as such a
callable; these adapters give it the runner protocols of :mod:`cfgswitch.runners.base`.
A graph takes its inputs positionally in :mod:`cfgswitch.io_specs` order: the SD inputs,
then a family's added conditioning (SDXL: ``text_embeds``, ``time_ids``) in name order,
which is how the UNet adapters pass the ``added=`` dict. A graph with several outputs
(SDXL's ``text_encoder_2``) returns a tuple.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import torch

from ..kernels_bridge import cfg_combine

Graph = Callable[..., torch.Tensor]
Added = Optional[Dict[str, torch.Tensor]]


def added_inputs(added: Added) -> Tuple[torch.Tensor, ...]:
    """The added conditioning tensors in the order the graphs take them (by name)."""
    return tuple(added[k] for k in sorted(added)) if added else ()


def _halves(added: Added) -> Tuple[Added, Added]:
    """``(uncond rows, cond rows)`` of 2B-row added conditioning."""
    if not added:
        return None, None
    parts = {k: v.chunk(2) for k, v in added.items()}
    return {k: p[0] for k, p in parts.items()}, {k: p[1] for k, p in parts.items()}


def _twice(added: Added) -> Added:
    return {k: torch.cat([v, v]) for k, v in added.items()} if added else None


class GraphTextEncoder:
    """:class:`~cfgswitch.runners.base.TextEncoderRunner` on a ``text_encoder`` graph."""

    def __init__(self, graph: Graph) -> None:
        self.graph = graph

    def encode(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.graph(input_ids)


class GraphPooledTextEncoder:
    """:class:`~cfgswitch.runners.base.PooledTextEncoderRunner` on a two-output text-encoder graph
    (SDXL's ``text_encoder_2``: hidden states and pooled ``text_embeds``)."""

    def __init__(self, graph: Graph) -> None:
        self.graph = graph

    def encode_pooled(self, input_ids: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        hidden, pooled = self.graph(input_ids)
        return hidden, pooled

    def encode(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.encode_pooled(input_ids)[0]


class GraphUNet:
    """:class:`~cfgswitch.runners.base.UNetRunner` on a plain ``unet`` graph (any row count)."""

    def __init__(self, graph: Graph) -> None:
        self.graph = graph

    def predict(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                added: Added = None) -> torch.Tensor:
        return self.graph(sample, timestep, encoder_hidden_states, *added_inputs(added))


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
                       guidance_scale: torch.Tensor, added: Added = None) -> torch.Tensor:
        if not self.combine_outside:
            return self.graph(sample, timestep, encoder_hidden_states, guidance_scale, *added_inputs(added))
        uncond, cond = self.predict_pair(sample, timestep, encoder_hidden_states, added).chunk(2)
        return cfg_combine(uncond, cond, guidance_scale)

    def predict_pair(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                     added: Added = None) -> torch.Tensor:
        """Both predictions of the CFG role, ``[eps_uncond (B); eps_cond (B)]``, for the adaptive plan's cosine.

        Args:
            sample (`torch.Tensor`): ``[B, C, h, w]`` latents.
            timestep (`torch.Tensor`): ``[B]`` timesteps.
            encoder_hidden_states (`torch.Tensor`): ``[2B, L, C]`` embeddings ``[uncond; cond]``.
            added (`dict`, optional): the family's added conditioning, 2B rows each ``[uncond; cond]``.
        """
        x2, t2 = torch.cat([sample, sample]), torch.cat([timestep, timestep])
        if self.combine_outside:  # the plain UNet on 2B rows: the CFG role's own profile
            return self.graph(x2, t2, encoder_hidden_states, *added_inputs(added))
        if self.pair_graph is not None:
            if self.pair_split:
                uncond, cond = encoder_hidden_states.chunk(2)
                a_u, a_c = _halves(added)
                return torch.cat([self.pair_graph(sample, timestep, uncond, *added_inputs(a_u)),
                                  self.pair_graph(sample, timestep, cond, *added_inputs(a_c))])
            return self.pair_graph(x2, t2, encoder_hidden_states, *added_inputs(added))
        # Only the guided graph: u + w (c - u) with both halves equal is that half's prediction, whatever w.
        uncond, cond = encoder_hidden_states.chunk(2)
        a_u, a_c = _halves(added)
        w = torch.ones_like(timestep)
        return torch.cat([self.graph(sample, timestep, torch.cat([uncond, uncond]), w, *added_inputs(_twice(a_u))),
                          self.graph(sample, timestep, torch.cat([cond, cond]), w, *added_inputs(_twice(a_c)))])


class GraphVaeDecoder:
    """:class:`~cfgswitch.runners.base.VaeDecoderRunner` on a ``vae_decoder`` graph."""

    def __init__(self, graph: Graph) -> None:
        self.graph = graph

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.graph(latents)
