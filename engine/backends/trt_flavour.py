"""Which TensorRT: full TensorRT (``tensorrt``) or TensorRT for RTX (``tensorrt_rtx``), through one code path.

Both modules have the same Builder, ONNX parser, optimization profiles, serialisation and
runtime API. What differs (NVIDIA's porting guide): TensorRT for RTX builds ahead of time
without a GPU and its engines are portable across the compute capabilities it targets
(by default Ampere and later, no Turing) and compiled just in time on the device; it has no
weak typing (``BuilderFlag.FP16`` / ``INT8`` do not exist: networks are strongly typed, as
cfgswitch always builds them). Polygraphy picks the module from the environment variable
``POLYGRAPHY_USE_TENSORRT_RTX`` when it is first imported, so :func:`import_flavour` sets it
(for polygraphy's tools used later in the process); cfgswitch's own builder and runtime call
the imported module directly, so one process can use either flavour.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from dataclasses import dataclass
from types import ModuleType
from typing import Dict, Optional, Tuple

from ..errors import BackendUnavailableError, InvalidArgumentError

logger = logging.getLogger(__name__)

#: Environment variable polygraphy reads to use TensorRT for RTX.
POLYGRAPHY_RTX_ENV = "POLYGRAPHY_USE_TENSORRT_RTX"


@dataclass(frozen=True)
class Flavour:
    """One TensorRT flavour.

    Attributes:
        name (`str`): the name in manifests and on the command line (``tensorrt``, ``tensorrt-rtx``).
        module (`str`): the Python module.
        extra (`str`): the cfgswitch extra that installs it.
        needs_gpu_to_build (`bool`): whether building an engine needs a GPU.
        plan_magic (`bytes`): the first bytes of a plan this flavour serialises (empty when not known).
    """

    name: str
    module: str
    extra: str
    needs_gpu_to_build: bool
    plan_magic: bytes = b""

    def install_hint(self) -> str:
        """The pip command that installs this flavour."""
        return f"pip install 'cfgswitch[{self.extra}]'"


#: The flavours, by name (the single place they are spelled).
FLAVOURS: Dict[str, Flavour] = {
    "tensorrt": Flavour("tensorrt", "tensorrt", "gpu", needs_gpu_to_build=True),  # header layout not checked here
    "tensorrt-rtx": Flavour("tensorrt-rtx", "tensorrt_rtx", "tensorrt-rtx", needs_gpu_to_build=False, plan_magic=b"vtrt"),
}
#: Values of ``cfgswitch build --trt``.
TRT_CHOICES: Tuple[str, ...] = (*FLAVOURS, "auto")
#: What a TensorRT for RTX plan built without an explicit target runs on (its documented default).
RTX_PORTABLE = "portable"


def _imports(module: str) -> bool:
    try:
        importlib.import_module(module)
        return True
    except Exception:  # noqa: BLE001 - a partial install raises OSError for missing libraries
        return False


def resolve_flavour(choice: Optional[str] = "auto") -> Flavour:
    """The flavour ``choice`` names; ``auto`` (or ``None``): full TensorRT when it imports, else TensorRT for RTX.

    Raises:
        InvalidArgumentError: an unknown name (lists the choices).
        BackendUnavailableError: ``auto`` and neither imports (names both extras).
    """
    choice = "auto" if choice is None else choice
    if choice not in TRT_CHOICES:
        raise InvalidArgumentError("--trt", f"one of {', '.join(TRT_CHOICES)}", choice)
    if choice != "auto":
        return FLAVOURS[choice]
    for flavour in FLAVOURS.values():
        if _imports(flavour.module):
            return flavour
    raise BackendUnavailableError(
        "no TensorRT imports here: install TensorRT on a CUDA host with "
        f"{FLAVOURS['tensorrt'].install_hint()}, or TensorRT for RTX (builds without a GPU) with "
        f"{FLAVOURS['tensorrt-rtx'].install_hint()}"
    )


def import_flavour(flavour: "Flavour | str", for_polygraphy: bool = True) -> ModuleType:
    """Import the flavour's module; with ``for_polygraphy`` also point polygraphy at it.

    Raises:
        BackendUnavailableError: the module does not import (names the extra), or polygraphy's
            TensorRT backend was already imported for the other flavour in this process.
    """
    flavour = FLAVOURS[flavour] if isinstance(flavour, str) else flavour
    try:
        module = importlib.import_module(flavour.module)
    except Exception as e:  # noqa: BLE001 - a partial install raises OSError for missing libraries
        raise BackendUnavailableError(
            f"{flavour.name} does not import here ({type(e).__name__}: {e}); install it with: {flavour.install_hint()}"
        ) from e
    if for_polygraphy:
        _point_polygraphy(flavour)
    return module


def _point_polygraphy(flavour: Flavour) -> None:
    rtx = flavour.name == "tensorrt-rtx"
    config = sys.modules.get("polygraphy.config")
    loaded = "polygraphy.backend.trt" in sys.modules
    current = bool(getattr(config, "USE_TENSORRT_RTX", os.environ.get(POLYGRAPHY_RTX_ENV, "0") != "0")) if config else None
    if loaded and current is not None and current != rtx:
        logger.warning("polygraphy's TensorRT backend was loaded for %s in this process; its tools keep using it "
                       "(cfgswitch's builder and runtime call %s directly)", "tensorrt-rtx" if current else "tensorrt",
                       flavour.module)
        return
    os.environ[POLYGRAPHY_RTX_ENV] = "1" if rtx else "0"
    if config is not None:
        config.USE_TENSORRT_RTX = rtx


def flavour_of_module(trt: ModuleType) -> Flavour:
    """The flavour of an imported TensorRT module."""
    name = trt.__name__.split(".")[0]
    for flavour in FLAVOURS.values():
        if flavour.module == name:
            return flavour
    raise InvalidArgumentError("TensorRT module", f"one of {', '.join(f.module for f in FLAVOURS.values())}", name)


def plan_header_version(data: bytes, flavour: "Flavour | str") -> Optional[str]:
    """``major.minor.patch`` written in a plan's header, or ``None`` when the header is not the flavour's.

    Checked on TensorRT for RTX 1.7 plans: bytes 0-3 are the magic ``vtrt`` and bytes 24-26 the
    library version (major, minor, patch). Full TensorRT's layout is not documented: ``None``.
    """
    flavour = FLAVOURS[flavour] if isinstance(flavour, str) else flavour
    if flavour.name != "tensorrt-rtx" or len(data) < 27 or not data.startswith(flavour.plan_magic):
        return None
    return f"{data[24]}.{data[25]}.{data[26]}"


__all__ = ["FLAVOURS", "Flavour", "POLYGRAPHY_RTX_ENV", "RTX_PORTABLE", "TRT_CHOICES", "flavour_of_module",
           "import_flavour", "plan_header_version", "resolve_flavour"]
