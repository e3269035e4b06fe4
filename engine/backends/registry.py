"""The backend registry: every backend's name, factory, options, extra and description, spelled once.

The CLI ``--backend`` choices, :meth:`cfgswitch.Sampler.load`, the benchmarks, serving and the
GPU suite all read this table; nothing else lists backend names.

Adding a backend
----------------
1. Write its module (for example ``engine/backends/openvino.py``) with a factory
   ``openvino_runners(bundle, **options) -> Runners`` (``bundle`` is a
   :class:`cfgswitch.bundle.Bundle`; the options are keyword arguments).
2. Add ONE :class:`BackendEntry` to :data:`_ENTRIES` below, for example::

       BackendEntry(
           name="openvino",
           factory="cfgswitch.backends.openvino:openvino_runners",
           options=("device", "verify_files"),
           extra="openvino",
           module="openvino",
           description="OpenVINO on the bundle's ONNX graphs (CPU, Intel GPU)",
       ),

The factory is a ``"module:function"`` string and is imported only when the backend is
used, so importing :mod:`cfgswitch` never imports a backend's package (no hardware probing
at import time).
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

from ..errors import BackendUnavailableError, InvalidArgumentError

logger = logging.getLogger(__name__)

#: What a backend runs: an exported bundle (``manifest.json``) or a diffusers folder.
SOURCES: Tuple[str, ...] = ("bundle", "diffusers")


@dataclass(frozen=True)
class BackendEntry:
    """One backend of the registry.

    Attributes:
        name (`str`): the name users pass (``Sampler.load(..., backend=name)``, ``--backend``).
        factory (`str`): ``"module:function"`` of the function that makes its
            :class:`~cfgswitch.runners.base.Runners`; bundle backends take ``(bundle, **options)``.
        options (`tuple[str]`): the keyword options the factory accepts (anything else is refused
            with an :class:`~cfgswitch.errors.InvalidArgumentError` that lists these).
        extra (`str`, optional): the ``pip install 'cfgswitch[EXTRA]'`` extra that brings its package
            (``None``: the base install).
        module (`str`, optional): the Python package it needs (to pick the best installed backend);
            ``None`` when the base install suffices.
        description (`str`): one line for ``--help`` and docs.
        source (`str`, defaults to ``"bundle"``): ``bundle`` or ``diffusers`` (what it loads).
        auto_rank (`int`, defaults to 100): lower ranks are preferred when ``backend=None``.
        needs_plans (`bool`, defaults to False): chosen automatically only when the bundle has
            TensorRT plans.
        title (`str`, optional): the package's name in messages (``"TensorRT"``); ``module`` when empty.
        needs_cuda (`bool`, defaults to False): chosen automatically only when torch sees a CUDA GPU.
    """

    name: str
    factory: str
    options: Tuple[str, ...]
    extra: Optional[str]
    module: Optional[str]
    description: str
    source: str = "bundle"
    auto_rank: int = 100
    needs_plans: bool = False
    title: str = ""
    needs_cuda: bool = False

    def install_hint(self) -> str:
        """The pip command that installs this backend's package."""
        return f"pip install 'cfgswitch[{self.extra}]'" if self.extra else "pip install cfgswitch"

    def load_factory(self) -> Callable[..., Any]:
        """Import and return the factory (raises :class:`BackendUnavailableError` naming the extra)."""
        module_name, _, func = self.factory.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise BackendUnavailableError(
                f"backend {self.name!r} could not be imported ({e}); install it with: {self.install_hint()}"
            ) from e
        return getattr(module, func)


_ENTRIES: Tuple[BackendEntry, ...] = (
    BackendEntry(
        name="torch",
        factory="cfgswitch.runners.torch_runners:torch_runners",
        options=("device", "dtype", "mode", "compile_options"),
        extra=None,
        module="torch",
        description="PyTorch on a diffusers folder (eager, torch.compile or CUDA graphs): the reference",
        source="diffusers",
        title="PyTorch",
    ),
    BackendEntry(
        name="onnxruntime",
        factory="cfgswitch.runners.onnxruntime:onnxruntime_runners",
        options=("providers", "threads", "verify_files", "static_shapes", "stop_spinning", "precompile", "fold_uncond"),
        extra="cpu",
        module="onnxruntime",
        description="ONNX Runtime on a bundle's graphs (CPU; CUDA and TensorRT providers with onnxruntime-gpu)",
        auto_rank=50,
        title="ONNX Runtime",
    ),
    BackendEntry(
        name="tensorrt",
        factory="cfgswitch.runners.tensorrt:tensorrt_runners",
        options=("cuda_graphs", "layout", "device", "verify_files"),
        extra="gpu",
        module="tensorrt",
        description="TensorRT (or TensorRT for RTX) plans built by cfgswitch build, on a CUDA GPU",
        auto_rank=10,
        needs_plans=True,
        title="TensorRT",
        needs_cuda=True,
    ),
    BackendEntry(
        name="openvino",
        factory="cfgswitch.backends.openvino:openvino_runners",
        options=("device", "threads", "precision", "hint", "cache_dir", "precompile", "verify_files", "fold_uncond"),
        extra="openvino",
        module="openvino",
        description="OpenVINO on a bundle's ONNX graphs, each role compiled for static shapes (CPU)",
        auto_rank=40,
        title="OpenVINO",
    ),
)

#: name -> entry, in registration order.
BACKENDS: Dict[str, BackendEntry] = {e.name: e for e in _ENTRIES}


def register(entry: BackendEntry) -> None:
    """Add a backend at run time (plugins, tests). Names are unique.

    Raises:
        InvalidArgumentError: the name is taken or the source is unknown.
    """
    if entry.name in BACKENDS:
        raise InvalidArgumentError("backend name", "a name not yet registered", entry.name)
    if entry.source not in SOURCES:
        raise InvalidArgumentError("source", f"one of {', '.join(SOURCES)}", entry.source)
    BACKENDS[entry.name] = entry


def backend_names(source: Optional[str] = None) -> Tuple[str, ...]:
    """Registered backend names (all, or those loading ``source``: ``bundle`` or ``diffusers``)."""
    return tuple(n for n, e in BACKENDS.items() if source is None or e.source == source)


def get_backend(name: str, source: Optional[str] = None) -> BackendEntry:
    """The entry of ``name``.

    Raises:
        InvalidArgumentError: an unknown name, or one that does not load ``source``.
    """
    names = backend_names(source)
    if not isinstance(name, str) or name not in names:
        what = {"bundle": " for a bundle", "diffusers": " for a diffusers folder"}.get(source or "", "")
        hint = ""
        if isinstance(name, str) and name in BACKENDS:
            other = BACKENDS[name].source
            hint = (f" (the {name} backend runs a diffusers folder)" if other == "diffusers"
                    else f" (the {name} backend runs a bundle: cfgswitch export MODEL_DIR --out BUNDLE first)")
        listed = f"one of {', '.join(names)}" if source is None else spell_names(names)
        raise InvalidArgumentError("backend", f"{listed}{what}{hint}", name)
    return BACKENDS[name]


def spell_names(names: Tuple[str, ...]) -> str:
    """``'a'``, ``'a' or 'b'``, ``'a', 'b' or 'c'``: names for an error message."""
    quoted = [repr(n) for n in names]
    if len(quoted) <= 1:
        return "".join(quoted) or "(none registered)"
    return ", ".join(quoted[:-1]) + " or " + quoted[-1]


def check_options(name: str, options: Mapping[str, Any]) -> None:
    """Refuse options the backend does not take, listing the valid ones.

    Raises:
        InvalidArgumentError: names the unknown options and the valid ones.
    """
    entry = get_backend(name)
    unknown = sorted(set(options) - set(entry.options))
    if unknown:
        raise InvalidArgumentError(
            f"options of backend {name!r}", f"some of {', '.join(entry.options)}", ", ".join(unknown)
        )


def importable(module: Optional[str]) -> bool:
    """Whether ``module`` imports (a broken install, e.g. tensorrt without its libraries, counts as no)."""
    if module is None:
        return True
    try:
        importlib.import_module(module)
        return True
    except Exception:  # noqa: BLE001 - OSError for missing shared libraries, and others
        return False


def load_options(model: "str | Path", backend: Optional[str], threads: Optional[int] = None,
                 **extra: Any) -> Tuple[str, Dict[str, Any]]:
    """``(backend, options)`` for loading ``model`` from a command line (``generate``, ``serve``).

    The backend is ``backend``, else for a bundle the automatic pick
    (:func:`cfgswitch.backends.assembly.pick_backend`), else ``torch``. ``threads`` is passed
    only to a backend that takes it (every backend honours the process's torch threads
    otherwise); each of ``extra`` that is not ``None`` (``device``, ``dtype``, ``mode``) must be
    an option of that backend.

    Raises:
        InvalidArgumentError: an option the backend does not take (named as its flag ``--NAME``).
    """
    from pathlib import Path

    path = Path(model)
    resolved = backend
    if resolved is None:
        if (path / "manifest.json").is_file():
            from ..bundle import read_manifest
            from .assembly import pick_backend

            resolved = pick_backend(read_manifest(path))[0]
        else:
            resolved = "torch"
    entry = get_backend(resolved)
    options: Dict[str, Any] = {}
    if threads is not None and "threads" in entry.options:
        options["threads"] = threads
    for name, value in extra.items():
        if value is None:
            continue
        if name not in entry.options:
            raise InvalidArgumentError(f"--{name}", f"the torch backend (backend {resolved!r} takes "
                                       f"{', '.join(entry.options)})", value)
        options[name] = value
    return resolved, options


__all__ = ["BACKENDS", "BackendEntry", "SOURCES", "backend_names", "check_options", "get_backend", "importable",
           "load_options",
           "register", "spell_names"]
