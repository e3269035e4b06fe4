"""``Sampler.load(bundle, backend=...)``: a bundle's runners, tokenizer and scheduler config.

The backend is chosen once here; with ``backend=None`` the best installed one is
picked (TensorRT when it imports, a GPU is visible and the bundle has plans, else OpenVINO when
it imports, else ONNX Runtime: docs/export.md section 2b) and
logged. Names, options and factories come from :mod:`cfgswitch.backends.registry`; the
sampler is put together by :func:`cfgswitch.backends.assembly.assemble`. A backend whose
package is missing raises :class:`~cfgswitch.errors.BackendUnavailableError` naming the
extra to install.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from .backends.assembly import assemble, bundle_runners, has_tensorrt_plans, pick_backend
from .backends.registry import BACKENDS
from .bundle import read_manifest

logger = logging.getLogger(__name__)

#: Options each bundle backend accepts (``Sampler.load(..., **options)``), read from the registry.
BACKEND_OPTIONS: Dict[str, Tuple[str, ...]] = {n: e.options for n, e in BACKENDS.items() if e.source == "bundle"}


def load_bundle_sampler(sampler_cls, path: "str | Path", backend: Optional[str] = None, **options: Any):
    """A ``sampler_cls`` over the bundle at ``path`` (called by :meth:`cfgswitch.Sampler.load`).

    Args:
        sampler_cls: :class:`cfgswitch.Sampler` (or a subclass).
        path (`str` or `Path`): the bundle directory.
        backend (`str`, optional): a bundle backend of the registry; ``None`` picks and logs.
        options: backend options (see :data:`BACKEND_OPTIONS`).

    Raises:
        BundleError: the bundle is missing, malformed, or a graph does not match its sha256.
        BackendUnavailableError: the backend's package is not installed.
        InvalidArgumentError: an unknown backend or option.
    """
    bundle = read_manifest(path)
    if backend is None:
        backend, reason = pick_backend(bundle)
        logger.info("backend: %s (%s)", backend, reason)
    return assemble(bundle, backend, sampler_cls=sampler_cls, source=str(path), **options)


__all__ = ["BACKEND_OPTIONS", "bundle_runners", "has_tensorrt_plans", "load_bundle_sampler", "pick_backend"]
