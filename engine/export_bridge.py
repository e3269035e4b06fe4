"""The runtime's one optional door to the exporter, for user commands that export on demand.

The serving and sampling runtime never needs :mod:`cfgswitch.export`; a command such as
``cfgswitch demo`` may use it when it is installed, through this module only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence


def export_bundle_if_available(model_dir: Path, out: Path, batch_sizes: Sequence[int],
                               overwrite: bool = False) -> Optional[Path]:
    """Export ``model_dir`` to ``out`` (atomically) and return it; ``None`` when the exporter is absent.

    An existing ``out`` is returned as it is, or replaced with ``overwrite``.
    """
    try:
        from cfgswitch.export.exporter import ExportOptions, export_bundle
    except ImportError:
        return None
    if out.exists() and not overwrite:
        return out
    return export_bundle(model_dir, out, ExportOptions(batch_sizes=list(batch_sizes), overwrite=overwrite), progress=True)
