"""Model families: one module per layout (``sd1``, ``sd2``, ``sdxl``), found through one registry.

A family knows how to recognise its diffusers folder or pipeline object, how to load its
components, and its text-encoding recipe (what :class:`~cfgswitch.conditioning.Conditioning`
its UNet takes). Adding a family is one new module and one entry in :data:`FAMILIES`.
Folders of other layouts (SD3, Flux, inpainting UNets) are refused with a typed error that
names what was found and what is supported.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any, Dict, Tuple

from ..errors import InvalidArgumentError, ModelLoadError
from .base import Family

#: Family name -> module (each module defines ``FAMILY``). The one place family names are spelled.
FAMILIES: Dict[str, str] = {"sd1": ".sd1", "sd2": ".sd2", "sdxl": ".sdxl"}


def family_names() -> Tuple[str, ...]:
    """Every registered family's name."""
    return tuple(FAMILIES)


def get_family(name: str) -> Family:
    """The :class:`Family` called ``name``."""
    if name not in FAMILIES:
        raise InvalidArgumentError("family", f"one of {', '.join(FAMILIES)}", name)
    return importlib.import_module(FAMILIES[name], __name__).FAMILY


def _supported() -> str:
    return "; ".join(f"{n} ({', '.join(get_family(n).pipeline_classes)})" for n in FAMILIES)


def detect_folder(path: "str | Path") -> Family:
    """The family of a diffusers folder, from its ``model_index.json`` and UNet config.

    Raises:
        ModelLoadError: no ``model_index.json``, or a layout no family supports.
    """
    p = Path(path)
    index_file = p / "model_index.json"
    if not index_file.is_file():
        raise ModelLoadError(f"model: {str(path)!r} is not a diffusers folder: missing model_index.json")
    try:
        index = json.loads(index_file.read_text())
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"model: {str(path)!r}: model_index.json is not valid JSON ({e})") from e
    cls = str(index.get("_class_name", ""))
    unet_cfg: Dict[str, Any] = {}
    if (p / "unet" / "config.json").is_file():
        try:
            unet_cfg = json.loads((p / "unet" / "config.json").read_text())
        except (OSError, ValueError):
            unet_cfg = {}
    for name in FAMILIES:
        fam = get_family(name)
        if fam.matches(cls, unet_cfg):
            fam.check_unet(unet_cfg, str(path))
            return fam
    raise ModelLoadError(f"model: {str(path)!r} is a {cls or 'unknown'} folder; cfgswitch supports {_supported()}")


def detect_pipeline(pipe: Any) -> Family:
    """The family of a live diffusers pipeline object."""
    cls = type(pipe).__name__
    unet = getattr(pipe, "unet", None)
    unet_cfg = dict(getattr(unet, "config", {}) or {})
    for name in FAMILIES:
        fam = get_family(name)
        if fam.matches(cls, unet_cfg) or fam.matches_object(pipe):
            fam.check_unet(unet_cfg, cls)
            return fam
    raise ModelLoadError(f"model: a {cls} object; cfgswitch supports {_supported()}")


__all__ = ["FAMILIES", "Family", "detect_folder", "detect_pipeline", "family_names", "get_family"]
