"""Backends: the registry of names, options and factories, and the one assembly path.

See :mod:`cfgswitch.backends.registry` for how to add a backend, and
:func:`~cfgswitch.backends.assembly.assemble` for the one path from a bundle to a Sampler. The
runner modules of torch, ONNX Runtime and TensorRT live in :mod:`cfgswitch.runners` (their
import paths are public); new backends (``openvino``) live here. The TensorRT flavour
(full TensorRT or TensorRT for RTX) is chosen in :mod:`cfgswitch.backends.trt_flavour`.
"""

from .assembly import assemble, bundle_runners, pick_backend
from .registry import BACKENDS, BackendEntry, backend_names, check_options, get_backend, register

__all__ = ["BACKENDS", "BackendEntry", "assemble", "backend_names", "bundle_runners", "check_options", "get_backend",
           "pick_backend", "register"]
