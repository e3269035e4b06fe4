"""A bundle's ONNX graphs to TensorRT plans, through polygraphy's API.

What is built is decided by :func:`cfgswitch.io_specs.plan_specs` (plans and profiles
per layout) and :func:`cfgswitch.export.cache.plan_cache_key`; this module only asks
TensorRT for it. Networks are parsed strongly typed, so precision comes from the
graph: an fp16 export gives fp16 engines on TensorRT 10 and 11 alike (11 removed
``BuilderFlag.FP16``). Plans are cached (atomic write under a file lock) and recorded
in the manifest, with the TensorRT version and the GPU they were built for.
"""

from __future__ import annotations

import datetime as _dt
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from cfgswitch.bundle import MANIFEST_NAME, read_manifest, sha256_file, verify_graphs
from cfgswitch.errors import BackendUnavailableError, InvalidArgumentError
from cfgswitch.io_specs import COMPONENTS, LAYOUTS, PlanSpec, Profile, plan_specs, role_binding

from .cache import PlanCache, plan_cache_key, update_json_locked

logger = logging.getLogger(__name__)

#: ``builder(onnx_path, profiles, timing_cache, builder_optimization_level) -> plan bytes``
PlanBuilder = Callable[[Path, Sequence[Profile], Optional[Path], Optional[int]], bytes]


@dataclass(frozen=True)
class BuildTarget:
    """The TensorRT and GPU a plan is built for (recorded, and checked again at load time)."""

    tensorrt_version: str
    compute_capability: str
    gpu_name: str


@dataclass(frozen=True)
class BuildOptions:
    """Options of :func:`build_bundle`.

    Attributes:
        layout (`str`): ``two-engines`` (default) or ``shared``.
        static (`bool`): one static profile per batch size (fastest) or one dynamic min..max profile.
        timing_cache (`Path`, optional): TensorRT timing cache to load and update.
        builder_optimization_level (`int`, optional): 0..5 (TensorRT's default 3 when ``None``).
        cache_dir (`Path`, optional): where plans go (default ``BUNDLE/engines``).
    """

    layout: str = "two-engines"
    static: bool = True
    timing_cache: Optional[Path] = None
    builder_optimization_level: Optional[int] = None
    cache_dir: Optional[Path] = None

    def check(self) -> "BuildOptions":
        """Raise :class:`InvalidArgumentError` for a bad option; return self."""
        if self.layout not in LAYOUTS:
            raise InvalidArgumentError("--layout", f"one of {', '.join(LAYOUTS)}", self.layout)
        level = self.builder_optimization_level
        if level is not None and (isinstance(level, bool) or not isinstance(level, int) or not 0 <= level <= 5):
            raise InvalidArgumentError("--builder-optimization-level", "an integer in [0, 5]", level)
        return self

    def flags(self) -> Dict[str, Any]:
        """The flags that change a plan (part of its cache key)."""
        return {"strongly_typed": True, "static": self.static, "builder_optimization_level": self.builder_optimization_level}


def detect_target(device: int = 0) -> BuildTarget:
    """TensorRT version and GPU of this machine (raises :class:`BackendUnavailableError` without them)."""
    from cfgswitch.runners.tensorrt import import_tensorrt

    trt = import_tensorrt()
    import torch

    if not torch.cuda.is_available():
        raise BackendUnavailableError("cfgswitch build needs a CUDA GPU visible to torch; none is")
    major, minor = torch.cuda.get_device_capability(device)
    return BuildTarget(trt.__version__, f"{major}.{minor}", torch.cuda.get_device_name(device))


def polygraphy_profiles(profiles: Sequence[Profile]) -> List[Any]:
    """polygraphy ``Profile`` objects of io_specs profiles (min, opt, max per input)."""
    from polygraphy.backend.trt import Profile as PgProfile

    out = []
    for p in profiles:
        prof = PgProfile()
        for name, (lo, opt, hi) in p.shapes.items():
            prof.add(name, min=list(lo), opt=list(opt), max=list(hi))
        out.append(prof)
    return out


def build_plan_bytes(onnx_path: Path, profiles: Sequence[Profile], timing_cache: Optional[Path] = None,
                     builder_optimization_level: Optional[int] = None) -> bytes:
    """Build one plan with TensorRT through polygraphy (strongly typed network, the given profiles)."""
    from polygraphy.backend.trt import CreateConfig, engine_bytes_from_network, network_from_onnx_path

    network = network_from_onnx_path(str(onnx_path), strongly_typed=True)
    load_cache = str(timing_cache) if timing_cache is not None and Path(timing_cache).is_file() else None
    config = CreateConfig(profiles=polygraphy_profiles(profiles), load_timing_cache=load_cache,
                          builder_optimization_level=builder_optimization_level)
    data = engine_bytes_from_network(network, config=config,
                                     save_timing_cache=str(timing_cache) if timing_cache is not None else None)
    return bytes(data)


def engines_entry(target: BuildTarget, options: BuildOptions, plans: Sequence[PlanSpec],
                  files: Dict[str, Dict[str, Any]]) -> Dict[str, Any]:
    """The manifest's ``engines[layout]`` record: target, flags, plans and which profiles serve each role."""
    by_name = {p.name: p for p in plans}
    roles = {}
    for component in COMPONENTS:
        binding = role_binding(component, options.layout)
        plan = next(p for p in plans if p.graph == binding.graph and p.profile_indices(component))
        roles[component] = {"plan": plan.name, "profiles": plan.profile_indices(component),
                            "combine_outside": binding.combine_outside}
    return {
        "tensorrt_version": target.tensorrt_version,
        "compute_capability": target.compute_capability,
        "gpu_name": target.gpu_name,
        "static": options.static,
        "build_flags": options.flags(),
        "built": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "plans": {name: {**files[name], "graph": by_name[name].graph,
                         "profiles": [p.to_json() for p in by_name[name].profiles]} for name in files},
        "roles": roles,
    }


def build_bundle(bundle_path: "str | Path", options: BuildOptions = BuildOptions(), target: Optional[BuildTarget] = None,
                 builder: PlanBuilder = build_plan_bytes, progress: bool = True) -> Dict[str, Any]:
    """Build (or take from the cache) every plan of ``options.layout`` and record them in the manifest.

    Args:
        bundle_path: the bundle (made by ``cfgswitch export``).
        options (`BuildOptions`): layout, static/dynamic, timing cache, optimization level.
        target (`BuildTarget`, optional): defaults to this machine (:func:`detect_target`).
        builder (`callable`, defaults to :func:`build_plan_bytes`): what turns a graph and its
            profiles into plan bytes (TensorRT through polygraphy).
        progress (`bool`): a progress bar over the plans.

    Returns:
        The ``engines[layout]`` record written into ``manifest.json``.
    """
    from tqdm.auto import tqdm

    options.check()
    bundle = read_manifest(bundle_path)
    plans = plan_specs(bundle.dims, bundle.batch_sizes, bundle.image_sizes, options.layout, options.static)
    verify_graphs(bundle, sorted({p.graph for p in plans}))
    target = target or detect_target()
    cache = PlanCache(options.cache_dir or bundle.path / "engines")
    files: Dict[str, Dict[str, Any]] = {}
    for plan in tqdm(plans, desc=f"build {options.layout}", disable=not progress, unit="plan"):
        onnx_sha = bundle.graph_entry(plan.graph)["sha256"]
        key = plan_cache_key(onnx_sha, plan.profiles, target.tensorrt_version, target.compute_capability, options.flags())
        path, built = cache.get_or_build(
            plan.name, key,
            lambda plan=plan: builder(bundle.graph_path(plan.graph), plan.profiles, options.timing_cache,
                                      options.builder_optimization_level),
        )
        try:
            rel = path.relative_to(bundle.path).as_posix()
        except ValueError:
            rel = str(path)  # a cache outside the bundle: recorded by absolute path
        files[plan.name] = {"file": rel, "sha256": sha256_file(path), "bytes": path.stat().st_size,
                            "onnx_sha256": onnx_sha, "cache_key": key, "built_now": built}
    entry = engines_entry(target, options, plans, files)
    update_json_locked(bundle.path / MANIFEST_NAME,
                       lambda m: m.setdefault("engines", {}).__setitem__(options.layout, entry))
    logger.info("%s plans of %s recorded in its manifest (TensorRT %s, %s, sm %s)", options.layout, bundle.path,
                target.tensorrt_version, target.gpu_name, target.compute_capability)
    return entry


__all__ = ["BuildOptions", "BuildTarget", "build_bundle", "build_plan_bytes", "detect_target", "engines_entry",
           "polygraphy_profiles"]
