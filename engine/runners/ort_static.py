"""ONNX Runtime UNet sessions fixed to one input shape each: the CFG and late roles compiled per shape.

A bundle's UNet graphs have symbolic batch and latent dimensions (``B``, ``2B``, ``h``, ``w``).
Opened with those dimensions fixed (``SessionOptions.add_free_dimension_override_by_name``),
ONNX Runtime folds every shape computation of the graph into constants and plans its buffers
for that one shape: the embedded model's optimized UNet graph shrinks from about 1560 to 880
nodes (docs/export.md, "Static shapes (ONNX Runtime)", has the measured gain).

:class:`ShapeSessions` opens one such session per input shape, lazily, on the first call of
that shape (each batch size, and each row count the step engine calls with, gets its own), under a lock so
concurrent callers open it once. Each session lays out its own copy of the weights (at
``ORT_ENABLE_ALL`` ONNX Runtime reorders convolution weights per session anyway), which is why
the rule of :func:`use_static_shapes` keeps large UNets on the one dynamic session.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from ..errors import InvalidArgumentError
from .ort_sessions import copy_options

logger = logging.getLogger(__name__)

#: ``static_shapes=None`` fixes shapes when the UNet's graph and weights take at most this many bytes.
STATIC_MAX_UNET_BYTES = 256 * 2**20
#: The graphs that get per-shape sessions (the UNet roles; the text encoder and VAE run once per request).
STATIC_GRAPHS: Tuple[str, ...] = ("unet", "unet_cfg")


def unet_bytes(entry: Mapping[str, Any]) -> int:
    """Bytes of the UNet graph a session opens and of its weights, as the bundle's manifest entry records them
    (its ``ort_optimized`` record when it has one; the weights of the entry's ``external_data`` unless that
    record names its own)."""
    record = entry.get("ort_optimized") or entry
    ext = record.get("external_data") or entry.get("external_data")
    return int(record.get("bytes") or 0) + (int(ext.get("bytes") or 0) if isinstance(ext, dict) else 0)


def use_static_shapes(static_shapes: Optional[bool], providers: Sequence[str], weight_bytes: int) -> bool:
    """Whether the UNet roles get per-shape sessions.

    The rule for ``None``: on the CPU provider alone, when the UNet (graph and weights) takes
    at most :data:`STATIC_MAX_UNET_BYTES`; every shape's session holds its own weights, so a
    large UNet stays on one dynamic session. ``True`` and ``False`` force it either way.

    Raises:
        InvalidArgumentError: ``static_shapes`` is not ``None``, ``True`` or ``False``.
    """
    if static_shapes is not None and not isinstance(static_shapes, bool):
        raise InvalidArgumentError("static_shapes", "True, False or None (the documented rule)", static_shapes)
    if static_shapes is not None:
        return static_shapes
    return list(providers) == ["CPUExecutionProvider"] and weight_bytes <= STATIC_MAX_UNET_BYTES


def dimension_values(dims: Mapping[str, int]) -> Dict[str, int]:
    """The symbolic dimensions of a UNet graph's inputs for one call: ``B``, ``h``, ``w`` as given, and ``2B``."""
    out = {d: int(v) for d, v in dims.items() if d in ("B", "h", "w")}
    if "B" in out:
        out["2B"] = 2 * out["B"]
    return out


class ShapeSessions:
    """One ``InferenceSession`` of a graph per input shape, opened on first use.

    Args:
        ort: the ``onnxruntime`` module.
        path (`Path`): the ONNX file to open.
        options: ``SessionOptions`` to copy for each session (never changed).
        providers (`Sequence[str]`), provider_options (`Sequence[dict]`): as for ``InferenceSession``.
        model (`bytes`, optional): a serialized model to open instead of ``path`` (a graph with its
            context folded in, :mod:`cfgswitch.runners.folded_context`); ``path`` then names it in logs.
    """

    def __init__(self, ort: Any, path: Path, options: Any, providers: Sequence[str],
                 provider_options: Sequence[Dict[str, Any]], model: Optional[bytes] = None) -> None:
        self._ort = ort
        self.path = path
        self.model = model
        self._options = options
        self._providers = list(providers)
        self._provider_options = list(provider_options)
        self._sessions: Dict[Tuple[Tuple[str, int], ...], Any] = {}
        self._lock = threading.Lock()

    @property
    def shapes(self) -> List[Dict[str, int]]:
        """The dimension values of every session opened so far."""
        return [dict(key) for key in self._sessions]

    def session_for(self, dims: Mapping[str, int]) -> Any:
        """The session for these symbolic dimension values (``{"B": 1, "2B": 2, "h": 16, "w": 16}``), opened once."""
        key = tuple(sorted(dims.items()))
        found = self._sessions.get(key)
        if found is not None:
            return found
        with self._lock:
            found = self._sessions.get(key)
            if found is None:
                found = self._open(dict(key))
                self._sessions[key] = found
        return found

    def _open(self, dims: Dict[str, int]) -> Any:
        start = time.perf_counter()
        opts = copy_options(self._ort, self._options)
        for name, value in dims.items():
            opts.add_free_dimension_override_by_name(name, value)
        source = self.model if self.model is not None else str(self.path)
        session = self._ort.InferenceSession(source, opts, providers=self._providers,
                                             provider_options=self._provider_options)
        left = [i.name for i in session.get_inputs() if any(not isinstance(d, int) for d in i.shape)]
        if left:  # a dimension name the overrides did not cover: still correct, only less folded
            logger.warning("onnxruntime %s: inputs %s keep symbolic dimensions at %s", self.path.name, left, dims)
        logger.info("onnxruntime %s%s: session for %s opened in %.2f s", self.path.name,
                    " (context folded)" if self.model is not None else "", dims,
                    time.perf_counter() - start)
        return session


__all__ = ["STATIC_GRAPHS", "STATIC_MAX_UNET_BYTES", "ShapeSessions", "dimension_values", "unet_bytes",
           "use_static_shapes"]
