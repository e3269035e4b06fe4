"""ONNX Runtime sessions of a bundle's graphs: the UNet weights once in memory, and optimized graphs cached.

**Weights once.** ``unet.onnx`` and ``unet_cfg.onnx`` point at one external-data file
(:mod:`cfgswitch.export.shared_weights`). :func:`open_sessions` maps each external-data file
once (``numpy.memmap``, read-only) and hands every session its external initializers as
``OrtValue`` views of that one map (``SessionOptions.add_initializer``: ONNX Runtime uses a
shared CPU initializer as it is, without a copy; ``add_external_initializers`` copies). This
is done where ONNX Runtime keeps the weights as they are: CPU provider only, on the cached
optimized graphs below (opened with ``ORT_DISABLE_ALL``), or when the session's level is at
most ``ORT_ENABLE_EXTENDED``. At ``ORT_ENABLE_ALL`` on an unoptimized graph each session lays
out its convolution weights again (NCHWc), so a shared map would only add to them; those
sessions load their weights the ONNX Runtime way. What ONNX Runtime still derives per session
from a shared weight (MLAS-prepacked GEMM operands) stays per session: its Python API has no
prepacked-weights container. docs/export.md ("Weights once") has the measured figures.

**Optimized graphs cached.** The first load of a graph group (the graphs that share one
weights file, or a single graph) also writes ONNX Runtime's session-optimized models
(``SessionOptions.optimized_model_filepath``) into the cfgswitch cache folder,
``<cache>/ort-optimized/<key>/``, under a key of the graphs' sha256 (and their weights'), the
ONNX Runtime version, the providers and their options, the optimization level and the CPU.
The group's optimized weights are deduplicated by content into one file there too. Later
loads open the cached graphs with optimizations off (``ORT_DISABLE_ALL``: they are done),
with the same one-map weight sharing. An entry is written in a temporary folder and renamed
into place, so a killed process never leaves an entry that is used; an entry whose files do
not have their recorded sizes is ignored and rebuilt. Only CPU-provider sessions are cached
(other providers compile at load; their own caches apply). ``CFGSWITCH_ORT_SESSION_CACHE=0``
turns the cache off.

**Fused graphs.** A graph entry with an ``ort_optimized`` record (``cfgswitch export
--optimize``) opens that file instead of ``file``, after checking its size and sha256.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shutil
import uuid
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from ..bundle import Bundle, bundle_file, verify_file

logger = logging.getLogger(__name__)

#: Sub-folder of the cfgswitch cache folder with ONNX Runtime's optimized graphs.
CACHE_SUBDIR = "ort-optimized"
#: Environment variable that turns the optimized-graph cache off (``0``).
CACHE_ENV = "CFGSWITCH_ORT_SESSION_CACHE"
#: Name of the record an entry of the cache carries (written last, before the rename).
ENTRY_RECORD = "entry.json"
#: Bump when the layout of a cache entry changes.
CACHE_FORMAT = 1

#: ``SessionOptions`` attributes copied to each session's own options.
_OPTION_ATTRS = ("graph_optimization_level", "intra_op_num_threads", "inter_op_num_threads", "execution_mode",
                 "execution_order", "log_severity_level", "log_verbosity_level", "enable_cpu_mem_arena",
                 "enable_mem_pattern", "enable_mem_reuse", "use_deterministic_compute", "enable_profiling",
                 "profile_file_prefix", "logid", "use_per_session_threads")
#: Session config entries copied when set (``SessionOptions`` cannot list its entries).
_CONFIG_KEYS = ("session.intra_op.allow_spinning", "session.inter_op.allow_spinning", "session.disable_prepacking",
                "session.use_env_allocators", "session.set_denormal_as_zero", "session.intra_op_thread_affinities",
                "session.dynamic_block_base", "session.disable_cpu_ep_fallback", "session.x64quantprecision",
                "session.use_device_allocator_for_initializers", "session.disable_aot_function_inlining",
                "session.graph_optimizations_loop_level", "session.qdqisint8allowed",
                "session.force_spinning_stop", "session.use_ort_model_bytes_directly",
                "optimization.enable_gelu_approximation", "session.disable_quant_qdq",
                "optimization.disable_specified_optimizers", "optimization.minimal_build_optimizations")
#: Of those, the entries that change what the graph optimizers write (part of the cache key).
_GRAPH_KEYS = ("optimization.enable_gelu_approximation", "session.disable_quant_qdq",
               "optimization.disable_specified_optimizers", "optimization.minimal_build_optimizations")


def open_plain_sessions(ort: Any, bundle: Bundle, names: Sequence[str], options: Any, providers: Sequence[str],
                        provider_options: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """One ``InferenceSession`` per graph, each opened by path with ONNX Runtime's own loading (no sharing, no cache)."""
    return {name: ort.InferenceSession(str(graph_file(bundle, name)), options, providers=list(providers),
                                       provider_options=list(provider_options))
            for name in names}


def graph_file(bundle: Bundle, name: str) -> Path:
    """The ONNX file to open for graph ``name``: its ``ort_optimized`` file when the manifest records one
    (checked against its size and sha256 first, and its ``external_data`` record too when it has one),
    else its ``file``.

    Raises:
        BundleError: the ``ort_optimized`` file is missing, outside the bundle, truncated or replaced.
    """
    entry = bundle.graph_entry(name)
    fused = entry.get("ort_optimized")
    if fused:
        rel = fused.get("file") if isinstance(fused, dict) else None
        bundle_file(bundle.path, rel, f"graphs.{name}.ort_optimized.file")
        verify_file(bundle.path, rel, fused.get("sha256"), fused.get("bytes"), name)
        ext = fused.get("external_data")
        if isinstance(ext, dict):  # the fused graph's own weights file, when it has one
            bundle_file(bundle.path, ext.get("file"), f"graphs.{name}.ort_optimized.external_data.file")
            verify_file(bundle.path, ext.get("file"), ext.get("sha256"), ext.get("bytes"), name)
        return bundle.path / rel
    return bundle.graph_path(name)


def open_sessions(ort: Any, bundle: Bundle, names: Sequence[str], options: Any, providers: Sequence[str],
                  provider_options: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """One ``onnxruntime.InferenceSession`` per graph name of ``bundle``, external weights mapped once.

    Graphs that name the same external-data file (``unet`` and ``unet_cfg``) get their
    initializers from one read-only memory map of it. On the CPU provider the session-optimized
    graphs are cached (see the module docstring).

    Args:
        ort: the ``onnxruntime`` module.
        bundle (`Bundle`): a checked bundle.
        names (`Sequence[str]`): the graphs to open.
        options: the ``SessionOptions`` every session uses (copied per session, never changed).
        providers (`Sequence[str]`): execution provider names in priority order.
        provider_options (`Sequence[dict]`): their options, one dict per provider.

    Raises:
        BundleError: an ``ort_optimized`` file fails its check (see :func:`graph_file`).
    """
    files = {name: graph_file(bundle, name) for name in names}
    cpu_only = list(providers) == ["CPUExecutionProvider"]
    cache_on = os.environ.get(CACHE_ENV, "1") != "0" and cpu_only
    maps = _Maps()
    sessions: Dict[str, Any] = {}
    for group in _groups(files):
        sources = {n: files[n] for n in group}
        cached = _cached_group(ort, bundle, sources, options, providers, provider_options) if cache_on else None
        level = None
        if cached is not None:
            sources, level = cached, ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        # One map serves the weights only where ONNX Runtime uses them as they are: on the CPU, in graphs it
        # does not lay out again (cached, or optimized no further than ORT_ENABLE_EXTENDED). At ORT_ENABLE_ALL
        # it reorders convolution weights per session and the map would only add to them (measured).
        share = cpu_only and (cached is not None or _level_value(options.graph_optimization_level)
                              <= _level_value(ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED))
        for name in group:
            opts = copy_options(ort, options)
            if level is not None:
                opts.graph_optimization_level = level
            keep = maps.add_initializers(ort, opts, sources[name]) if share else []
            sessions[name] = ort.InferenceSession(str(sources[name]), opts, providers=list(providers),
                                                  provider_options=list(provider_options))
            sessions[name]._cfgswitch_weights = keep  # the OrtValues (and their map) live as long as the session
    return sessions


def _level_value(level: Any) -> int:
    """ORT_DISABLE_ALL 0, BASIC 1, EXTENDED 2, (LAYOUT 3,) ALL 99."""
    return int(getattr(level, "value", level))


# ---------------------------------------------------------------- options and shared maps
def copy_options(ort: Any, options: Any) -> Any:
    """A new ``SessionOptions`` with ``options``' settings (attributes and the known session config entries)."""
    out = ort.SessionOptions()
    for attr in _OPTION_ATTRS:
        try:
            setattr(out, attr, getattr(options, attr))
        except (AttributeError, TypeError, RuntimeError):
            continue
    for key in _CONFIG_KEYS:
        try:
            value = options.get_session_config_entry(key)
        except RuntimeError:  # not set
            continue
        out.add_session_config_entry(key, value)
    return out


class _Maps:
    """One read-only ``numpy.memmap`` per external-data file, shared by every session that names it."""

    def __init__(self) -> None:
        self.maps: Dict[Path, Any] = {}

    def get(self, path: Path):
        import numpy as np

        key = path.resolve()
        if key not in self.maps:
            self.maps[key] = np.memmap(key, dtype=np.uint8, mode="r")
        return self.maps[key]

    def add_initializers(self, ort: Any, opts: Any, model_path: Path) -> List[Any]:
        """Add every external initializer of ``model_path`` to ``opts`` as a view of its file's map."""
        from onnx.helper import tensor_dtype_to_np_dtype

        from cfgswitch.export.shared_weights import shared_tensors

        names, values = [], []
        for name, loc, offset, length, data_type, dims in shared_tensors(model_path):
            mm = self.get(model_path.parent / loc)
            dtype = tensor_dtype_to_np_dtype(data_type)
            if offset % dtype.itemsize or offset + length > mm.shape[0]:
                continue  # not viewable in place: left to ONNX Runtime's own loading
            view = mm[offset:offset + length].view(dtype).reshape(dims)
            names.append(name)
            values.append(ort.OrtValue.ortvalue_from_numpy(view))
        for name, value in zip(names, values):
            opts.add_initializer(name, value)  # shared as is: ONNX Runtime neither copies nor owns it
        return values


def _external_files(model_path: Path) -> Tuple[str, ...]:
    import onnx

    from cfgswitch.export.shared_weights import external_locations

    model = onnx.load(str(model_path), load_external_data=False)
    return tuple(sorted(str((model_path.parent / loc).resolve()) for loc in external_locations(model)))


def _groups(files: Dict[str, Path]) -> List[List[str]]:
    """Graphs grouped by the external-data files they name (a graph without any is a group of its own)."""
    groups: List[List[str]] = []
    by_files: Dict[Tuple[str, ...], List[str]] = {}
    for name, path in files.items():
        ext = _external_files(path)
        if not ext:
            groups.append([name])
            continue
        if ext not in by_files:
            by_files[ext] = []
            groups.append(by_files[ext])
        by_files[ext].append(name)
    return groups


# ---------------------------------------------------------------- the optimized-graph cache
def _config(options: Any, keys: Sequence[str]) -> Dict[str, str]:
    out = {}
    for key in keys:
        try:
            out[key] = options.get_session_config_entry(key)
        except RuntimeError:
            continue
    return out


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "flags")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def session_cache_key(ort: Any, bundle: Bundle, sources: Dict[str, Path], options: Any, providers: Sequence[str],
                      provider_options: Sequence[Dict[str, Any]]) -> str:
    """Hex sha256 of what an optimized graph group depends on: each graph's recorded sha256 (of the file opened:
    ``file`` or ``ort_optimized``) and that of its weights, the ONNX Runtime version, providers and their options,
    the optimization level and the CPU."""
    graphs = {}
    for name, path in sorted(sources.items()):
        entry = bundle.graph_entry(name)
        fused = entry.get("ort_optimized") or {}
        ext = (fused.get("external_data") if fused else entry.get("external_data")) or {}
        graphs[name] = {"file": path.name, "sha256": fused.get("sha256") or entry["sha256"],
                        "external_sha256": ext.get("sha256") if isinstance(ext, dict) else None}
    payload = {"format": CACHE_FORMAT, "graphs": graphs, "onnxruntime": ort.__version__, "providers": list(providers),
               "provider_options": [dict(o) for o in provider_options],
               "level": _level_value(options.graph_optimization_level), "config": _config(options, _GRAPH_KEYS),
               "cpu": _cpu_name(), "machine": platform.machine()}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def cache_root() -> Path:
    """``<cfgswitch cache folder>/ort-optimized``."""
    from .onnxruntime import cache_folder

    return cache_folder() / CACHE_SUBDIR


def _entry_ok(entry: Path, names: Sequence[str]) -> Optional[Dict[str, Path]]:
    """The graph files of a complete cache entry, or None (missing, or a file without its recorded size)."""
    try:
        record = json.loads((entry / ENTRY_RECORD).read_text(encoding="utf-8"))
        for rel, size in record["files"].items():
            if (entry / rel).stat().st_size != size:
                return None
        return {n: entry / record["graphs"][n] for n in names}
    except (OSError, KeyError, ValueError, TypeError):
        return None


def _cached_group(ort: Any, bundle: Bundle, sources: Dict[str, Path], options: Any, providers: Sequence[str],
                  provider_options: Sequence[Dict[str, Any]]) -> Optional[Dict[str, Path]]:
    """The cached optimized files of a group (written now when missing), or None when the cache cannot be used."""
    if options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_DISABLE_ALL:
        return None  # nothing to save
    key = session_cache_key(ort, bundle, sources, options, providers, provider_options)
    root = cache_root()
    entry = root / key[:32]
    found = _entry_ok(entry, list(sources))
    if found is not None:
        logger.info("onnxruntime: optimized %s from the cache (%s)", ", ".join(sources), entry)
        return found
    try:
        return _write_entry(ort, bundle, sources, options, providers, provider_options, entry, key)
    except Exception as e:  # the cache is an optimisation: a failure to write it never stops a load
        logger.warning("onnxruntime: optimized graphs of %s not cached (%s: %s)", ", ".join(sources), type(e).__name__, e)
        return None


def _remove_dead_writers(entry: Path) -> None:
    """Remove the temporary folders of ``entry`` that killed writers left (their process is gone)."""
    for stale in entry.parent.glob(f".{entry.name}.tmp-*"):
        try:
            pid = int(stale.name[len(entry.name) + 6:].split("-")[0])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(stale, ignore_errors=True)
            logger.info("onnxruntime: removed %s, left by a killed process", stale)
        except (ValueError, PermissionError, OSError):
            continue


def _write_entry(ort: Any, bundle: Bundle, sources: Dict[str, Path], options: Any, providers: Sequence[str],
                 provider_options: Sequence[Dict[str, Any]], entry: Path, key: str) -> Optional[Dict[str, Path]]:
    from cfgswitch.export.shared_weights import share_unet_weights

    entry.parent.mkdir(parents=True, exist_ok=True)
    if entry.exists():  # an entry that failed its check (changed after it was written): replaced
        shutil.rmtree(entry, ignore_errors=True)
    _remove_dead_writers(entry)
    tmp = entry.parent / f".{entry.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        maps = _Maps()
        for name, src in sources.items():
            opts = copy_options(ort, options)
            opts.optimized_model_filepath = str(tmp / f"{name}.onnx")
            opts.add_session_config_entry("session.optimized_model_external_initializers_file_name", f"{name}.onnx.data")
            opts.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
            keep = maps.add_initializers(ort, opts, src)
            ort.InferenceSession(str(src), opts, providers=list(providers), provider_options=list(provider_options))
            del keep
        graphs = {n: {"file": f"{n}.onnx"} for n in sources}
        if len(sources) > 1:
            share_unet_weights(tmp, graphs, names=list(sources), check=False)
        files = {f.relative_to(tmp).as_posix(): f.stat().st_size for f in tmp.rglob("*") if f.is_file()}
        record = {"key": key, "graphs": {n: f"{n}.onnx" for n in sources}, "files": files,
                  "bundle": str(bundle.path), "sources": {n: str(p) for n, p in sources.items()}}
        (tmp / ENTRY_RECORD).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
        try:
            os.replace(tmp, entry)
        except OSError:  # another process renamed its entry first: use that one
            if _entry_ok(entry, list(sources)) is None:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("onnxruntime: optimized %s cached in %s", ", ".join(sources), entry)
    return _entry_ok(entry, list(sources))


__all__ = ["CACHE_ENV", "CACHE_SUBDIR", "cache_root", "copy_options", "graph_file", "open_plain_sessions",
           "open_sessions", "session_cache_key"]
