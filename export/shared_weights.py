"""One copy of the UNet weights in a bundle: ``unet.onnx`` and ``unet_cfg.onnx`` share one external-data file.

(Placeholder: :func:`share_unet_weights` leaves the graphs as they are.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict


def share_unet_weights(root: Path, graphs: Dict[str, Dict[str, Any]]) -> None:
    """Make the exported ``unet`` and ``unet_cfg`` graphs under ``root`` share one weights file.

    Args:
        root (`Path`): the bundle folder being written.
        graphs (`dict`): the manifest's graph entries by name (updated in place).
    """
    return None


__all__ = ["share_unet_weights"]
