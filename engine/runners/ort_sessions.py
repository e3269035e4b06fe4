"""ONNX Runtime sessions of a bundle's graphs."""

from __future__ import annotations

from typing import Any, Dict, Sequence

from ..bundle import Bundle


def open_sessions(ort: Any, bundle: Bundle, names: Sequence[str], options: Any, providers: Sequence[str],
                  provider_options: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """One ``onnxruntime.InferenceSession`` per graph name of ``bundle``.

    Args:
        ort: the ``onnxruntime`` module.
        bundle (`Bundle`): a checked bundle.
        names (`Sequence[str]`): the graphs to open.
        options: the ``SessionOptions`` every session uses.
        providers (`Sequence[str]`): execution provider names in priority order.
        provider_options (`Sequence[dict]`): their options, one dict per provider.
    """
    return {name: ort.InferenceSession(str(bundle.graph_path(name)), options, providers=list(providers),
                                       provider_options=list(provider_options))
            for name in names}


__all__ = ["open_sessions"]
