"""The runtime's single door to ``cfgswitch.kernels`` (compiled ops with torch fallbacks)."""

from __future__ import annotations

from cfgswitch.kernels import HAS_COMPILED, cfg_combine

__all__ = ["HAS_COMPILED", "cfg_combine"]
