"""A bundle's ONNX graphs to TensorRT plans, with full TensorRT or TensorRT for RTX, through one code path.

What is built is decided by :func:`cfgswitch.io_specs.plan_specs` (plans and profiles
per layout) and :func:`cfgswitch.export.cache.plan_cache_key`; this module only asks
TensorRT for it. Which TensorRT builds is chosen once (``--trt``, see
:mod:`cfgswitch.backends.trt_flavour`); the code is the same for both. Networks are parsed
strongly typed, so precision comes from the graph: an fp16 export gives fp16 engines on
TensorRT 10, 11 and TensorRT for RTX alike (none of them needs ``BuilderFlag.FP16``). fp32
layers may use TF32 (TensorRT's own default, on here too; ``--no-tf32`` turns it off).
Plans are cached (atomic write under a file lock) and recorded in the manifest with the
flavour and version of TensorRT that built them and the GPU they target; what TensorRT's
builder held just before serialising (network tensors, every profile's min/opt/max) is
recorded beside each plan for :mod:`cfgswitch.export.plan_check`.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from cfgswitch.backends.trt_flavour import FLAVOURS, RTX_PORTABLE, TRT_CHOICES, Flavour, import_flavour, resolve_flavour
from cfgswitch.bundle import MANIFEST_NAME, Bundle, read_manifest, sha256_file, verify_graphs
from cfgswitch.errors import BackendUnavailableError, BundleError, InvalidArgumentError
from cfgswitch.io_specs import COMPONENTS, LAYOUTS, PlanSpec, Profile, plan_specs, role_binding

from .cache import BuiltPlan, PlanCache, plan_cache_key, update_json_locked

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BuildTarget:
    """The TensorRT and GPU a plan is built for (recorded, and checked again at load time).

    Attributes:
        tensorrt_version (`str`): the building module's ``__version__``.
        compute_capability (`str`): ``"major.minor"`` of the target GPU, or ``"portable"`` for a
            TensorRT for RTX build without a target (its default set: Ampere and later).
        gpu_name (`str`): the building GPU, or a note that none was used.
        flavour (`str`, defaults to ``"tensorrt"``): a name of :data:`~cfgswitch.backends.trt_flavour.FLAVOURS`.
    """

    tensorrt_version: str
    compute_capability: str
    gpu_name: str
    flavour: str = "tensorrt"


@dataclass(frozen=True)
class BuildOptions:
    """Options of :func:`build_bundle`.

    Attributes:
        layout (`str`): ``two-engines`` (default) or ``shared``.
        static (`bool`): one static profile per batch size (fastest) or one dynamic min..max profile.
        timing_cache (`Path`, optional): TensorRT timing cache to load and update.
        builder_optimization_level (`int`, optional): 0..5 (TensorRT's default 3 when ``None``).
        cache_dir (`Path`, optional): where plans are cached (default ``BUNDLE/engines``); a plan
            from a cache outside the bundle is linked (or copied) into ``BUNDLE/engines``.
        trt (`str`, defaults to ``"auto"``): ``tensorrt``, ``tensorrt-rtx`` or ``auto`` (full
            TensorRT when it imports, else TensorRT for RTX).
        tf32 (`bool`, defaults to True): let fp32 layers use TF32 tensor cores (TensorRT's default).
        compute_capabilities (`tuple[str]`, defaults to ``()``): TensorRT for RTX only: the GPUs an
            ahead-of-time plan targets (``"7.5"`` for Turing, which its default set leaves out;
            ``"8.6"``, ``"8.9"``, ``"12.0"``...); empty: its portable default (Ampere and later).
        row_buckets (`tuple[int]`, defaults to ``()``): the plain UNet's profiles are one per
            row count instead of the bundle's batch sizes: the buckets the step engine pads its
            calls to (``sampler.engine(row_buckets=...)``); empty: the batch sizes.
    """

    layout: str = "two-engines"
    static: bool = True
    timing_cache: Optional[Path] = None
    builder_optimization_level: Optional[int] = None
    cache_dir: Optional[Path] = None
    trt: str = "auto"
    tf32: bool = True
    compute_capabilities: Tuple[str, ...] = ()
    row_buckets: Tuple[int, ...] = ()

    def check(self) -> "BuildOptions":
        """Raise :class:`InvalidArgumentError` for a bad option; return self."""
        if self.layout not in LAYOUTS:
            raise InvalidArgumentError("--layout", f"one of {', '.join(LAYOUTS)}", self.layout)
        level = self.builder_optimization_level
        if level is not None and (isinstance(level, bool) or not isinstance(level, int) or not 0 <= level <= 5):
            raise InvalidArgumentError("--builder-optimization-level", "an integer in [0, 5]", level)
        if self.trt not in TRT_CHOICES:
            raise InvalidArgumentError("--trt", f"one of {', '.join(TRT_CHOICES)}", self.trt)
        if not isinstance(self.tf32, bool):
            raise InvalidArgumentError("tf32", "True or False", self.tf32)
        rb = self.row_buckets
        if rb and (any(isinstance(b, bool) or not isinstance(b, int) or not 1 <= b <= 4096 for b in rb)
                   or list(rb) != sorted(set(rb))):
            raise InvalidArgumentError("--row-buckets", "increasing row counts in [1, 4096], e.g. 1,2,4,8,16", rb)
        bad = [c for c in self.compute_capabilities if c not in RTX_TARGETS]
        if bad or (self.compute_capabilities and self.trt == "tensorrt"):
            raise InvalidArgumentError("--compute-capability",
                                       f"TensorRT for RTX targets among {', '.join(RTX_TARGETS)} (with --trt tensorrt-rtx; "
                                       "full TensorRT builds for the GPU it runs on)", ",".join(self.compute_capabilities))
        return self

    def flags(self) -> Dict[str, Any]:
        """The flags that change a plan (part of its cache key)."""
        return {"strongly_typed": True, "static": self.static, "builder_optimization_level": self.builder_optimization_level,
                "tf32": self.tf32, **({"row_buckets": list(self.row_buckets)} if self.row_buckets else {})}


#: ``builder(onnx_path, profiles, options, flavour) -> plan bytes`` or a :class:`BuiltPlan` (bytes + report).
PlanBuilder = Callable[[Path, Sequence[Profile], BuildOptions, Flavour], "bytes | BuiltPlan"]


#: Compute capabilities a TensorRT for RTX ahead-of-time build can target, and their enum names.
RTX_TARGETS: Dict[str, str] = {"7.5": "SM75", "8.0": "SM80", "8.6": "SM86", "8.9": "SM89", "12.0": "SM120", "12.1": "SM121"}


def detect_target(flavour: "Flavour | str" = "tensorrt", device: int = 0, compute_capabilities: Sequence[str] = ()) -> BuildTarget:
    """The TensorRT flavour and version, and the GPU, plans are built for on this machine.

    Full TensorRT builds for the GPU it runs on (one is needed). TensorRT for RTX builds ahead
    of time without one; its plan is then ``portable`` (its documented default targets), or
    targets ``compute_capabilities`` (recorded comma-separated).

    Raises:
        BackendUnavailableError: the flavour does not import, or full TensorRT finds no GPU.
    """
    flavour = FLAVOURS[flavour] if isinstance(flavour, str) else flavour
    trt = import_flavour(flavour)
    if not flavour.needs_gpu_to_build:
        cc = ",".join(compute_capabilities) or RTX_PORTABLE
        return BuildTarget(trt.__version__, cc, "none (ahead-of-time build)", flavour.name)
    import torch

    if not torch.cuda.is_available():
        raise BackendUnavailableError(
            "cfgswitch build --trt tensorrt needs a CUDA GPU visible to torch; none is "
            "(TensorRT for RTX builds without one: cfgswitch build BUNDLE --trt tensorrt-rtx)"
        )
    major, minor = torch.cuda.get_device_capability(device)
    return BuildTarget(trt.__version__, f"{major}.{minor}", torch.cuda.get_device_name(device), flavour.name)


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


_LOGGERS: Dict[str, Any] = {}


def trt_logger(trt: Any) -> Any:
    """One logger per TensorRT module (TensorRT keeps the first one registered in a process).

    It forwards warnings and errors to :mod:`logging` and keeps the errors (``.errors``), so a
    failed build can name TensorRT's first error.
    """
    if trt.__name__ not in _LOGGERS:
        class _Logger(trt.ILogger):
            def __init__(self) -> None:
                trt.ILogger.__init__(self)
                self.errors: List[str] = []

            def log(self, severity, msg):  # noqa: D401 - TensorRT's callback
                if severity in (trt.ILogger.INTERNAL_ERROR, trt.ILogger.ERROR):
                    self.errors.append(str(msg))
                    logger.error("TensorRT: %s", msg)
                elif severity == trt.ILogger.WARNING:
                    logger.warning("TensorRT: %s", msg)

        _LOGGERS[trt.__name__] = _Logger()
    return _LOGGERS[trt.__name__]


def parse_network(trt: Any, onnx_path: Path, graph: str):
    """``(builder, network, parser)`` of a strongly typed network parsed from ``onnx_path``.

    Raises:
        BundleError: TensorRT's ONNX parser rejects the graph (names it and the parser's first error).
    """
    log = trt_logger(trt)
    builder = trt.Builder(log)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, log)
    if not parser.parse_from_file(str(onnx_path)):
        first = parser.get_error(0) if parser.num_errors else None
        detail = "no error recorded" if first is None else (
            f"{first.code()}: {first.desc()}" + (f" (node {first.node()} {first.node_name()!r}, {first.node_operator()})"
                                                  if first.node() >= 0 else ""))
        raise BundleError(f"graph {graph!r} ({onnx_path.name}): TensorRT's ONNX parser rejected it: {detail}"
                          + (f" (and {parser.num_errors - 1} more errors)" if parser.num_errors > 1 else ""))
    return builder, network, parser


def make_config(trt: Any, builder: Any, network: Any, profiles: Sequence[Profile], options: BuildOptions):
    """``(config, trt_profiles)``: an ``IBuilderConfig`` with the profiles, TF32 and optimization level.

    The same calls on full TensorRT and TensorRT for RTX (no weak-typing flags: networks are
    strongly typed). Each ``add_optimization_profile`` result is checked.

    Raises:
        BundleError: TensorRT refuses a profile (names the plan's graph and the profile).
    """
    config = builder.create_builder_config()
    if options.tf32:
        config.set_flag(trt.BuilderFlag.TF32)
    else:
        config.clear_flag(trt.BuilderFlag.TF32)
    if options.builder_optimization_level is not None:
        config.builder_optimization_level = options.builder_optimization_level
    if options.compute_capabilities:  # TensorRT for RTX: the ahead-of-time targets (porting guide)
        config.num_compute_capabilities = len(options.compute_capabilities)
        for i, cc in enumerate(options.compute_capabilities):
            config.set_compute_capability(getattr(trt.ComputeCapability, RTX_TARGETS[cc]), i)
    if options.timing_cache is not None:
        raw = Path(options.timing_cache).read_bytes() if Path(options.timing_cache).is_file() else b""
        config.set_timing_cache(config.create_timing_cache(raw), ignore_mismatch=False)
    added = []
    for k, p in enumerate(profiles):
        prof = builder.create_optimization_profile()
        for name, (lo, opt, hi) in p.shapes.items():
            prof.set_shape(name, tuple(lo), tuple(opt), tuple(hi))
        if config.add_optimization_profile(prof) < 0:
            raise BundleError(f"graph {network.name!r}: TensorRT refused optimization profile {k} ({p.to_json()['shapes']})")
        added.append(prof)
    return config, added


def inspect_build(trt: Any, network: Any, config: Any, trt_profiles: Sequence[Any]) -> Dict[str, Any]:
    """What TensorRT's builder holds just before serialising: the network's I/O tensors and every profile.

    Read back through TensorRT's own API (``INetworkDefinition`` inputs and outputs,
    ``IBuilderConfig.num_optimization_profiles``, ``IOptimizationProfile.get_shape`` of the
    profiles added to the config), not from the profiles cfgswitch asked for, so a wrong
    profile given to the builder shows here (see :mod:`cfgswitch.export.plan_check`).
    """
    def tensor(t, mode):
        return {"name": t.name, "mode": mode, "dtype": _dtype_name(trt, t.dtype), "shape": list(t.shape)}

    inputs = [network.get_input(i) for i in range(network.num_inputs)]
    profiles = [{t.name: [list(s) for s in prof.get_shape(t.name)] for t in inputs} for prof in trt_profiles]
    return {"tensors": [tensor(t, "input") for t in inputs]
            + [tensor(network.get_output(i), "output") for i in range(network.num_outputs)],
            "num_profiles": int(config.num_optimization_profiles), "profiles": profiles,
            "tf32": bool(config.get_flag(trt.BuilderFlag.TF32))}


def _dtype_name(trt: Any, dtype: Any) -> str:
    table = {trt.float32: "float32", trt.float16: "float16", trt.int64: "int64", trt.int32: "int32"}
    return table.get(dtype, str(dtype).replace("DataType.", "").lower())


def build_plan(onnx_path: Path, profiles: Sequence[Profile], options: BuildOptions, flavour: Flavour) -> BuiltPlan:
    """Build one plan with ``flavour``: strongly typed network, the given profiles, ``build_serialized_network``.

    The TensorRT API is called directly (the same calls polygraphy's loaders make): polygraphy
    fixes its TensorRT module process-wide at first import, which would tie a process to one
    flavour.

    Returns:
        A :class:`BuiltPlan`: the serialised plan and what the builder held (:func:`inspect_build`),
        with the build's wall time in seconds.

    Raises:
        BundleError: the parser rejects the graph, a profile is refused, or no engine is built.
    """
    trt = import_flavour(flavour)
    start = time.perf_counter()
    graph = Path(onnx_path).stem
    builder, network, parser = parse_network(trt, Path(onnx_path), graph)
    config, trt_profiles = make_config(trt, builder, network, profiles, options)
    report = inspect_build(trt, network, config, trt_profiles)
    log = trt_logger(trt)
    seen = len(log.errors)
    data = builder.build_serialized_network(network, config)
    if not data:
        first = log.errors[seen] if len(log.errors) > seen else "no error logged"
        raise BundleError(f"graph {graph!r}: TensorRT ({flavour.name}) built no engine: {first}")
    if options.timing_cache is not None:
        from .cache import atomic_write_bytes

        atomic_write_bytes(Path(options.timing_cache), bytes(config.get_timing_cache().serialize()))
    report["build_seconds"] = round(time.perf_counter() - start, 3)
    return BuiltPlan(bytes(data), report)


def engines_entry(target: BuildTarget, options: BuildOptions, plans: Sequence[PlanSpec],
                  files: Dict[str, Dict[str, Any]]) -> Dict[str, Any]:
    """The manifest's ``engines[layout]`` record: target, flags, plans and which profiles serve each role."""
    by_name = {p.name: p for p in plans}
    roles = {}
    # the model's text encoders (SDXL: text_encoder_2 too), then the UNet roles and the VAE
    text = [p.name for p in plans if p.name in ("text_encoder", "text_encoder_2")]
    for component in text + [c for c in COMPONENTS if c != "text_encoder"]:
        binding = role_binding(component, options.layout)
        plan = next(p for p in plans if p.graph == binding.graph and p.profile_indices(component))
        roles[component] = {"plan": plan.name, "profiles": plan.profile_indices(component),
                            "combine_outside": binding.combine_outside}
    return {
        "tensorrt_flavour": target.flavour,
        "tensorrt_version": target.tensorrt_version,
        "compute_capability": target.compute_capability,
        "gpu_name": target.gpu_name,
        "static": options.static,
        "row_buckets": list(options.row_buckets),
        "build_flags": options.flags(),
        "built": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "plans": {name: {**files[name], "graph": by_name[name].graph,
                         "profiles": [p.to_json() for p in by_name[name].profiles]} for name in files},
        "roles": roles,
    }


def graph_digests(bundle: Bundle, graph: str) -> "tuple[str, Optional[str]]":
    """``(onnx sha256, external data sha256 or None)`` of a graph, as recorded (and verified) in the manifest."""
    entry = bundle.graph_entry(graph)
    ext = entry.get("external_data") or None
    return entry["sha256"], (ext["sha256"] if ext else None)


def _inside_bundle(path: Path, root: Path) -> Path:
    """``path`` if it lies in the bundle, else its copy in ``BUNDLE/engines/`` (a hard link when the file
    system allows, else an atomic copy): a sealed bundle names only files inside itself."""
    try:
        path.resolve().relative_to(root.resolve())
        return path
    except ValueError:
        pass
    from .cache import atomic_write_bytes, locked

    dst = root / "engines" / path.name
    with locked(dst):
        if dst.is_file() and dst.stat().st_size == path.stat().st_size and sha256_file(dst) == sha256_file(path):
            return dst
        tmp = dst.with_name(f".{dst.name}.link")
        try:
            tmp.unlink(missing_ok=True)
            os.link(path, tmp)
            os.replace(tmp, dst)
        except OSError:
            tmp.unlink(missing_ok=True)
            atomic_write_bytes(dst, path.read_bytes())
    return dst


def build_bundle(bundle_path: "str | Path", options: BuildOptions = BuildOptions(), target: Optional[BuildTarget] = None,
                 builder: PlanBuilder = build_plan, progress: bool = True) -> Dict[str, Any]:
    """Build (or take from the cache) every plan of ``options.layout`` and record them in the manifest.

    Args:
        bundle_path: the bundle (made by ``cfgswitch export``).
        options (`BuildOptions`): layout, static/dynamic, flavour, TF32, timing cache, optimization level.
        target (`BuildTarget`, optional): defaults to this machine and ``options.trt`` (:func:`detect_target`).
        builder (`callable`, defaults to :func:`build_plan`): what turns a graph and its profiles
            into plan bytes (or a :class:`BuiltPlan` with the builder's report).
        progress (`bool`): a progress bar over the plans.

    Returns:
        The ``engines[layout]`` record written into ``manifest.json``.
    """
    from tqdm.auto import tqdm

    options.check()
    bundle = read_manifest(bundle_path)
    plans = plan_specs(bundle.dims, bundle.batch_sizes, bundle.image_sizes, options.layout, options.static,
                       options.row_buckets)
    verify_graphs(bundle, sorted({p.graph for p in plans}))
    target = target or detect_target(resolve_flavour(options.trt), compute_capabilities=options.compute_capabilities)
    flavour = FLAVOURS[target.flavour]
    if options.compute_capabilities and flavour.needs_gpu_to_build:
        raise InvalidArgumentError("--compute-capability", "only with --trt tensorrt-rtx (full TensorRT builds for the GPU "
                                   "it runs on)", ",".join(options.compute_capabilities))
    cache = PlanCache(options.cache_dir or bundle.path / "engines")
    files: Dict[str, Dict[str, Any]] = {}
    for plan in tqdm(plans, desc=f"build {options.layout}", disable=not progress, unit="plan"):
        onnx_sha, data_sha = graph_digests(bundle, plan.graph)
        key = plan_cache_key(onnx_sha, plan.profiles, target.tensorrt_version, target.compute_capability, options.flags(),
                             external_data_sha256=data_sha, flavour=target.flavour)
        path, built, report = cache.get_or_build(
            plan.name, key, lambda plan=plan: builder(bundle.graph_path(plan.graph), plan.profiles, options, flavour))
        rel = _inside_bundle(path, bundle.path).relative_to(bundle.path).as_posix()
        files[plan.name] = {"file": rel, "sha256": sha256_file(path), "bytes": path.stat().st_size,
                            "onnx_sha256": onnx_sha, "external_data_sha256": data_sha, "cache_key": key,
                            "built_now": built, "builder_report": report}
        if built and report and "build_seconds" in report:
            logger.info("plan %s built by %s %s in %.1f s", plan.name, target.flavour, target.tensorrt_version,
                        report["build_seconds"])
    entry = engines_entry(target, options, plans, files)
    update_json_locked(bundle.path / MANIFEST_NAME,
                       lambda m: m.setdefault("engines", {}).__setitem__(options.layout, entry))
    logger.info("%s plans of %s recorded in its manifest (%s %s, %s, sm %s)", options.layout, bundle.path,
                target.flavour, target.tensorrt_version, target.gpu_name, target.compute_capability)
    return entry


__all__ = ["RTX_TARGETS", "BuildOptions", "BuildTarget", "build_bundle", "build_plan", "detect_target", "engines_entry",
           "graph_digests", "inspect_build", "make_config", "parse_network", "polygraphy_profiles"]
