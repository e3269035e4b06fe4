"""The machine a benchmark ran on: CPU and GPU model, core count, library versions."""

from __future__ import annotations

import os
import platform
import sys
from importlib import metadata
from pathlib import Path
from typing import Any, Dict, Optional

#: Distributions whose versions every result records (absent ones are recorded as ``None``).
LIBRARIES = ("torch", "diffusers", "transformers", "numpy", "onnx", "onnxruntime", "tensorrt", "polygraphy", "matplotlib")


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, ``platform.processor()`` elsewhere)."""
    info = Path("/proc/cpuinfo")
    if info.is_file():
        for line in info.read_text(errors="replace").splitlines():
            if line.lower().startswith("model name") and ":" in line:
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown"


def library_versions() -> Dict[str, Optional[str]]:
    """Installed versions of :data:`LIBRARIES` and of cfgswitch."""
    out: Dict[str, Optional[str]] = {}
    for name in LIBRARIES + ("cfgswitch",):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    if out["cfgswitch"] is None:
        import cfgswitch

        out["cfgswitch"] = cfgswitch.__version__
    return out


def gpu_info() -> Optional[Dict[str, Any]]:
    """Name, memory and compute capability of CUDA device 0, or ``None`` without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    return {
        "name": props.name,
        "memory_gib": round(props.total_memory / 2**30, 1),
        "compute_capability": f"{props.major}.{props.minor}",
        "count": torch.cuda.device_count(),
        "cuda": torch.version.cuda,
    }


def machine_info() -> Dict[str, Any]:
    """The ``machine`` block of ``results.json``."""
    import torch

    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        affinity = os.cpu_count()
    mem_gib = None
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gib = round(int(line.split()[1]) / 2**20, 1)
    return {
        "cpu_model": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "cpu_cores_usable": affinity,
        "torch_threads": torch.get_num_threads(),
        "memory_gib": mem_gib,
        "gpu": gpu_info(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "libraries": library_versions(),
    }


__all__ = ["LIBRARIES", "cpu_model", "gpu_info", "library_versions", "machine_info"]
