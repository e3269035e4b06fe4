"""The late role on a folded context: a UNet graph with the empty prompt's embedding built in.

After the switch, the default late role (``late="uncond"``) predicts from the unconditional
embedding, which for a request without a negative prompt is the empty prompt's embedding: the
same tensor for every request and every step. Built into the graph as a constant, the
cross-attention keys and values of every transformer block are computed once, when the backend
compiles the graph, instead of on every late call (the embedded model's one-row late call took
7-8% less time on ONNX Runtime and 5-11% less on OpenVINO; docs/export.md, "Folded context").

:class:`FoldedContextUNet` is the late runner of a backend that can fold. Its
:meth:`~FoldedContextUNet.predict` runs the folded graph when the call has no added
conditioning and every row of ``encoder_hidden_states`` equals the context exactly
(``torch.equal``); every other call (a negative prompt, ``late="cond"``, the step engine's
mixed rows, SDXL) runs the plain graph, as before. The folded graph computes the same
arithmetic, so results agree to float rounding (measured: at most 1e-6 on the latents).

The context is set once per sampler by :func:`cfgswitch.backends.assembly.assemble` from the
sampler's own text encoder (:meth:`FoldedContextUNet.set_context`); one folded graph is made
per row count, on its first call, by the backend's ``fold(context_rows)``.
:func:`onnx_without_input` is the ONNX Runtime backend's fold (the ONNX graph with the input
replaced by an initializer); OpenVINO's replaces the parameter in its own model.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from ..errors import InvalidArgumentError
from ..io_specs import GraphSpec
from .graph_runners import Added, Graph, GraphUNet

logger = logging.getLogger(__name__)

#: The UNet input a folded graph has built in.
CONTEXT_INPUT = "encoder_hidden_states"
#: Families whose late role can fold: one text embedding and no added conditioning.
FOLDING_FAMILIES = ("sd1", "sd2")


def check_fold_option(fold_uncond: Any) -> bool:
    """The ``fold_uncond`` backend option, checked.

    Raises:
        InvalidArgumentError: ``fold_uncond`` is not ``True`` or ``False``.
    """
    if not isinstance(fold_uncond, bool):
        raise InvalidArgumentError("fold_uncond", "True or False", fold_uncond)
    return fold_uncond


def folds(fold_uncond: bool, family: str) -> bool:
    """Whether a backend folds the late role's context: asked for, and a family of :data:`FOLDING_FAMILIES`."""
    return bool(fold_uncond) and family in FOLDING_FAMILIES


def spec_without_context(spec: GraphSpec) -> GraphSpec:
    """The interface of a folded ``unet`` graph: ``spec`` without :data:`CONTEXT_INPUT`."""
    return dataclasses.replace(spec, inputs=tuple(t for t in spec.inputs if t.name != CONTEXT_INPUT))


class FoldedContextUNet(GraphUNet):
    """:class:`~cfgswitch.runners.base.UNetRunner` that runs calls on its context through folded graphs.

    Args:
        graph: the plain ``unet`` graph callable (every call off the context).
        fold (`callable`): ``fold(context_rows) -> graph(sample, timestep)``, given the context
            repeated to a call's row count (``[rows, L, C]``, float32, on the CPU).
        precompile (`Sequence[int]`, optional): row counts to fold as soon as the context is set
            (the backend's ``precompile``: the bundle's batch sizes), instead of on their first call.
    """

    def __init__(self, graph: Graph, fold: Callable[[torch.Tensor], Graph], precompile: Sequence[int] = ()) -> None:
        super().__init__(graph)
        self._fold = fold
        self._precompile = tuple(int(r) for r in precompile)
        self.context: Optional[torch.Tensor] = None
        self._folded: Dict[int, Graph] = {}
        self._lock = threading.Lock()

    def set_context(self, context: torch.Tensor) -> None:
        """Fold ``context`` (``[1, L, C]``, the empty prompt's embedding) into later calls; drops older folds.

        Raises:
            InvalidArgumentError: ``context`` is not a one-row 3-d tensor.
        """
        if not isinstance(context, torch.Tensor) or context.dim() != 3 or context.shape[0] != 1:
            raise InvalidArgumentError("context", "a [1, tokens, channels] tensor",
                                       tuple(context.shape) if isinstance(context, torch.Tensor) else type(context).__name__)
        with self._lock:
            self.context = context.detach().to("cpu", torch.float32).contiguous()
            self._folded = {}
        for rows in self._precompile:
            self.folded_graph(rows)

    @property
    def folded_rows(self) -> List[int]:
        """The row counts a folded graph was made for so far."""
        return sorted(self._folded)

    def matches(self, encoder_hidden_states: torch.Tensor) -> bool:
        """Whether every row of ``encoder_hidden_states`` equals the context exactly."""
        ctx = self.context
        if ctx is None or encoder_hidden_states.dim() != 3 or encoder_hidden_states.shape[1:] != ctx.shape[1:]:
            return False
        x = encoder_hidden_states.detach()
        if x.device.type != "cpu" or x.dtype != torch.float32:
            x = x.to("cpu", torch.float32)
        return bool(torch.equal(x, ctx.expand_as(x)))

    def folded_graph(self, rows: int) -> Graph:
        """The folded graph for ``rows`` rows, made on first use (under a lock: concurrent callers make it once)."""
        found = self._folded.get(rows)
        if found is not None:
            return found
        with self._lock:
            found = self._folded.get(rows)
            if found is None:
                found = self._fold(self.context.expand(rows, -1, -1).contiguous())
                self._folded[rows] = found
                logger.info("late role: the empty prompt's embedding folded into the UNet for %d rows", rows)
        return found

    def predict(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                added: Added = None) -> torch.Tensor:
        if added or sample.dim() != 4 or not self.matches(encoder_hidden_states) \
                or encoder_hidden_states.shape[0] != sample.shape[0]:
            return super().predict(sample, timestep, encoder_hidden_states, added)
        return self.folded_graph(int(sample.shape[0]))(sample, timestep)


def onnx_without_input(path: Path, name: str = CONTEXT_INPUT) -> Callable[[np.ndarray], bytes]:
    """``model_bytes(value)``: the ONNX graph at ``path`` (weights included) with input ``name`` made an
    initializer holding ``value``; loaded once, on the first call.

    ONNX Runtime constant-folds everything that depends only on an initializer when it opens
    the session, so the cross-attention keys and values of a folded context are computed there.

    Raises:
        BackendUnavailableError: the ``onnx`` package is not installed (names the extra).
        InvalidArgumentError (from ``model_bytes``): the graph has no input ``name``.
    """
    from ..errors import BackendUnavailableError

    try:
        import onnx
        from onnx import numpy_helper
    except ImportError as e:
        raise BackendUnavailableError(f"folding the late role's context needs the onnx package ({e}); install it with: "
                                      "pip install 'cfgswitch[cpu]', or load with fold_uncond=False") from e
    state: Dict[str, Any] = {}
    lock = threading.Lock()

    def model_bytes(value: np.ndarray) -> bytes:
        with lock:
            if "model" not in state:
                model = onnx.load(str(path), load_external_data=True)
                inputs = [i for i in model.graph.input if i.name != name]
                if len(inputs) == len(model.graph.input):
                    raise InvalidArgumentError(f"{path.name} inputs", f"an input named {name!r}",
                                               [i.name for i in model.graph.input])
                del model.graph.input[:]
                model.graph.input.extend(inputs)
                state["model"] = model
            model = state["model"]
            model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
            try:
                return model.SerializeToString()
            finally:
                model.graph.initializer.pop()

    return model_bytes


__all__ = ["CONTEXT_INPUT", "FOLDING_FAMILIES", "FoldedContextUNet", "check_fold_option", "folds", "onnx_without_input",
           "spec_without_context"]
