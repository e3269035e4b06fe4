"""``Sampler.load(bundle, backend=...)``: a bundle's runners, tokenizer and scheduler config.

The backend is chosen once here; with ``backend=None`` the best installed one is
picked (TensorRT when it imports and the bundle has plans, else ONNX Runtime) and
logged. A backend whose package is missing raises
:class:`~cfgswitch.errors.BackendUnavailableError` naming the extra to install.
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

from .bundle import Bundle, read_manifest
from .errors import BackendUnavailableError, InvalidArgumentError

logger = logging.getLogger(__name__)

#: Options each bundle backend accepts (``Sampler.load(..., **options)``).
BACKEND_OPTIONS: Dict[str, Tuple[str, ...]] = {
    "onnxruntime": ("providers", "threads", "verify_files"),
    "tensorrt": ("cuda_graphs", "layout", "device", "verify_files"),
}


def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
        return True
    except Exception:  # noqa: BLE001 - a broken install (tensorrt without its libraries) raises OSError and others
        return False


def has_tensorrt_plans(bundle: Bundle) -> bool:
    """Whether ``cfgswitch build`` recorded plans in the bundle and their files are there."""
    for layout in bundle.engines().values():
        files = [e.get("file") for e in (layout.get("plans") or {}).values()]
        if files and all(f and (bundle.path / f).is_file() for f in files):
            return True
    return False


def pick_backend(bundle: Bundle, importable: Callable[[str], bool] = _importable) -> Tuple[str, str]:
    """``(backend, reason)``: the best installed backend for ``bundle``.

    Raises:
        BackendUnavailableError: neither ONNX Runtime nor TensorRT is installed.
    """
    plans = has_tensorrt_plans(bundle)
    if plans and importable("tensorrt"):
        return "tensorrt", "TensorRT is installed and the bundle has plans"
    if importable("onnxruntime"):
        reason = "the bundle has TensorRT plans but tensorrt does not import" if plans else "the bundle has no TensorRT plans"
        return "onnxruntime", reason
    raise BackendUnavailableError(
        "a bundle needs ONNX Runtime or TensorRT and neither is installed; "
        "install one with: pip install 'cfgswitch[cpu]' (ONNX Runtime) or pip install 'cfgswitch[gpu]' (TensorRT, CUDA)"
    )


def bundle_runners(bundle: Bundle, backend: str, **options: Any):
    """The :class:`~cfgswitch.runners.base.Runners` of ``bundle`` on ``backend``."""
    if backend not in BACKEND_OPTIONS:
        raise InvalidArgumentError(
            "backend", "'onnxruntime' or 'tensorrt' for a bundle (the torch backend runs a diffusers folder)", backend
        )
    unknown = sorted(set(options) - set(BACKEND_OPTIONS[backend]))
    if unknown:
        raise InvalidArgumentError(f"options of backend {backend!r}", f"some of {', '.join(BACKEND_OPTIONS[backend])}",
                                   ", ".join(unknown))
    if backend == "onnxruntime":
        from .runners.onnxruntime import onnxruntime_runners

        return onnxruntime_runners(bundle, **options)
    from .runners.tensorrt import tensorrt_runners

    return tensorrt_runners(bundle, **options)


def load_bundle_sampler(sampler_cls, path: "str | Path", backend: Optional[str] = None, **options: Any):
    """A ``sampler_cls`` over the bundle at ``path`` (called by :meth:`cfgswitch.Sampler.load`).

    Args:
        sampler_cls: :class:`cfgswitch.Sampler` (or a subclass).
        path (`str` or `Path`): the bundle directory.
        backend (`str`, optional): ``onnxruntime`` or ``tensorrt``; ``None`` picks and logs.
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
    runners = bundle_runners(bundle, backend, **options)
    tokenizer = bundle.load_tokenizer()
    return sampler_cls(runners, tokenizer, bundle.scheduler_config(), bundle.model_spec(), source=str(path))


__all__ = ["BACKEND_OPTIONS", "bundle_runners", "has_tensorrt_plans", "load_bundle_sampler", "pick_backend"]
