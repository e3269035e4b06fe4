"""The embedded default model: the one ``cfgswitch demo`` and ``--model default`` use.

Until a trained model ships inside the package (``cfgswitch/models/shapes``), the
default is a tiny random-weight model built offline and cached on disk; its images
are noise-like and say so in the logs.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)

#: Where a shipped, trained default model lives inside the package.
EMBEDDED_MODEL_DIR = Path(__file__).resolve().parent / "models" / "shapes"


def default_model_path() -> Path:
    """Path of the default diffusers folder: the shipped model, else a cached tiny random one."""
    if (EMBEDDED_MODEL_DIR / "model_index.json").is_file():
        return EMBEDDED_MODEL_DIR
    cache = Path(os.environ.get("CFGSWITCH_CACHE", Path.home() / ".cache" / "cfgswitch")) / "tiny-random"
    if not (cache / "model_index.json").is_file():
        from .tiny_model import save_tiny_model

        logger.warning("no trained model is shipped: building a tiny random-weight model at %s", cache)
        tmp = cache.with_name(cache.name + ".tmp")
        save_tiny_model(tmp)
        tmp.replace(cache) if not cache.exists() else None
    return cache


def resolve_model(path: "str | None") -> Path:
    """``None`` or ``"default"`` gives the default model; anything else is returned as a path."""
    if path in (None, "default"):
        return default_model_path()
    return Path(path)
