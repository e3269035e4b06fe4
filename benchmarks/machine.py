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


def scrub_paths(obj: Any) -> Any:
    """``obj`` (dicts and lists of it) with absolute paths shortened to ``.../name``: results are meant to be shared."""
    if isinstance(obj, dict):
        return {k: scrub_paths(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [scrub_paths(v) for v in obj]
    if isinstance(obj, str) and obj.startswith("/") and len(obj) > 1:
        return f".../{Path(obj).name}"
    return obj


def usable_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def busy_machine_threads(threads: int, load: Optional[float] = None) -> "tuple[int, Optional[str]]":
    """Threads to time with, and why when fewer than ``threads``: no more than the idle cores.

    Idle cores are the usable cores minus the 1-minute load average, rounded to the nearest
    core (a load of 0.1 leaves both cores of a 2-core machine idle; truncating counted it as
    one busy core, so no run here ever timed the default threads), at least 1. On a busy
    machine, OpenMP threads that spin while they wait for each other take CPU time from the
    thread doing the work: with 2 threads, calls were 10-20x slower than with 1 on this project's
    shared 2-core machine (with ``OMP_WAIT_POLICY=PASSIVE`` set before start, only ~1.2x slower).

    Args:
        threads (`int`): the threads the run would use.
        load (`float`, optional): the 1-minute load average (read from the system when ``None``).
    """
    if load is None:
        try:
            load = os.getloadavg()[0]
        except OSError:  # pragma: no cover - not available
            return threads, None
    cores = usable_cores()
    idle = max(1, int(cores - load + 0.5))
    if idle >= threads:
        return threads, None
    return idle, (f"the machine was busy (1-min load average {load:.1f} on {cores} cores): timed with {idle} thread(s) "
                  f"instead of {threads}, since spinning OpenMP threads of a busy machine slow every call many times "
                  "over; pass --threads N to choose")


def machine_info() -> Dict[str, Any]:
    """The ``machine`` block of ``results.json``."""
    import torch

    affinity = usable_cores()
    mem_gib = None
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gib = round(int(line.split()[1]) / 2**20, 1)
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover - not available
        load = None
    return {
        "cpu_model": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "cpu_cores_usable": affinity,
        "torch_threads": torch.get_num_threads(),
        "memory_gib": mem_gib,
        "load_average_1_5_15min": load,
        "gpu": gpu_info(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "libraries": library_versions(),
    }


__all__ = ["LIBRARIES", "busy_machine_threads", "scrub_paths", "usable_cores", "cpu_model", "gpu_info", "library_versions", "machine_info"]
