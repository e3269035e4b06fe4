"""The TensorRT plan cache: keys, atomic writes and a file lock.

A plan is cached under a key of everything that makes it what it is: the ONNX file's
sha256 and that of its external-data file (the weights of a graph over 2 GB: a base model
and its fine-tune can share an identical ``.onnx``), the optimization profiles (shapes),
the build flags (TF32 among them), the TensorRT flavour and version and the GPU's compute
capability. What the builder reported (:class:`BuiltPlan`) is kept beside the plan as
``<plan>.json``, written before the plan itself. Writes go to a temporary file that is renamed into
place while a :class:`filelock.FileLock` is held, so an interrupted or concurrent
build never leaves a half-written plan, and two builders of one key build it once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Mapping, Optional, Sequence

from cfgswitch.io_specs import Profile

logger = logging.getLogger(__name__)

#: Seconds a builder waits for another one holding the same lock (a UNet build takes minutes).
DEFAULT_LOCK_TIMEOUT = 3600.0


@dataclass
class BuiltPlan:
    """What a builder returns: the serialised plan and what TensorRT reported while building it.

    Attributes:
        data (`bytes`): the plan.
        report (`dict`): JSON-ready facts read from TensorRT before serialising (tensors,
            profiles, build seconds); kept beside the plan in the cache.
    """

    data: bytes
    report: Dict[str, Any] = field(default_factory=dict)


def plan_cache_key(onnx_sha256: str, profiles: Sequence[Profile], tensorrt_version: str, compute_capability: str,
                   build_flags: Optional[Mapping[str, Any]] = None, external_data_sha256: Optional[str] = None,
                   flavour: str = "tensorrt") -> str:
    """Hex sha256 of the canonical JSON of a plan's inputs.

    Args:
        onnx_sha256 (`str`): the ``.onnx`` file's sha256.
        profiles (`list[Profile]`): the plan's optimization profiles.
        tensorrt_version (`str`): the building TensorRT's version.
        compute_capability (`str`): the target GPU (``"portable"`` for TensorRT for RTX's default).
        build_flags (`dict`, optional): flags that change the plan (static, TF32, optimization level).
        external_data_sha256 (`str`, optional): sha256 of the graph's external-data file, if any.
        flavour (`str`, defaults to ``"tensorrt"``): ``tensorrt`` or ``tensorrt-rtx``.
    """
    payload = {
        "onnx_sha256": onnx_sha256,
        "external_data_sha256": external_data_sha256,
        "profiles": [p.to_json() for p in profiles],
        "tensorrt_flavour": str(flavour),
        "tensorrt_version": str(tensorrt_version),
        "compute_capability": str(compute_capability),
        "build_flags": dict(build_flags or {}),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a uniquely named temporary file renamed into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


@contextmanager
def locked(path: Path, timeout: float = DEFAULT_LOCK_TIMEOUT) -> Iterator[None]:
    """Hold ``<path>.lock`` (a :class:`filelock.FileLock`) for the duration of the block."""
    from filelock import FileLock

    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock", timeout=timeout):
        yield


class PlanCache:
    """Plans on disk under ``directory``, one file per (name, key): ``<name>-<key[:16]>.plan``.

    Args:
        directory (`Path`): where plans live (by default the bundle's ``engines/`` folder).
        lock_timeout (`float`): seconds to wait for another builder of the same plan.
    """

    def __init__(self, directory: Path, lock_timeout: float = DEFAULT_LOCK_TIMEOUT) -> None:
        self.directory = Path(directory)
        self.lock_timeout = lock_timeout

    def path_for(self, name: str, key: str) -> Path:
        """The plan file of ``name`` under ``key``."""
        return self.directory / f"{name}-{key[:16]}.plan"

    def get(self, name: str, key: str) -> Optional[Path]:
        """The cached plan, or ``None``."""
        p = self.path_for(name, key)
        return p if p.is_file() and p.stat().st_size > 0 else None

    def report_path(self, name: str, key: str) -> Path:
        """Where the builder's report of a plan is kept (``<plan file>.json``)."""
        return self.path_for(name, key).with_suffix(".json")

    def report(self, name: str, key: str) -> Dict[str, Any]:
        """The builder's report of a cached plan (empty when none was kept)."""
        p = self.report_path(name, key)
        try:
            return json.loads(p.read_text(encoding="utf-8"))
        except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
            return {}

    def get_or_build(self, name: str, key: str, build: Callable[[], "bytes | BuiltPlan"]) -> "tuple[Path, bool, Dict[str, Any]]":
        """``(path, built, report)``: the cached plan, or ``build()`` written atomically under the lock.

        A second process asking for the same key waits for the lock and then finds the plan.
        ``build`` returns plan bytes or a :class:`BuiltPlan`; its report is written before
        the plan, so a plan in the cache always has its report.
        """
        target = self.path_for(name, key)
        with locked(target, self.lock_timeout):
            if self.get(name, key) is not None:
                logger.info("plan %s: cache hit (%s)", name, target.name)
                return target, False, self.report(name, key)
            result = build()
            built = result if isinstance(result, BuiltPlan) else BuiltPlan(result)
            if not built.data:
                raise RuntimeError(f"plan {name}: the builder returned no bytes")
            if built.report:
                atomic_write_bytes(self.report_path(name, key), (json.dumps(built.report, indent=1) + "\n").encode())
            atomic_write_bytes(target, built.data)
            logger.info("plan %s: built and cached as %s (%.1f MB)", name, target.name, len(built.data) / 1e6)
            return target, True, dict(built.report)


def update_json_locked(path: Path, update: Callable[[Dict[str, Any]], None], timeout: float = DEFAULT_LOCK_TIMEOUT) -> Dict[str, Any]:
    """Read-modify-write a JSON file (the manifest) under its lock, written atomically."""
    with locked(path, timeout):
        data = json.loads(path.read_text(encoding="utf-8"))
        update(data)
        atomic_write_bytes(path, (json.dumps(data, indent=2) + "\n").encode("utf-8"))
        return data


__all__ = ["BuiltPlan", "DEFAULT_LOCK_TIMEOUT", "PlanCache", "atomic_write_bytes", "locked", "plan_cache_key", "update_json_locked"]
