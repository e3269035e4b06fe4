"""ONNX Runtime's transformer fusions on a written bundle, with a CPU-safe option set.

``optimize_bundle(path)`` runs :func:`onnxruntime.transformers.optimizer.optimize_model` on each
graph of a bundle (model type ``clip`` for the text encoder, ``unet`` for ``unet`` and
``unet_cfg``, ``vae`` for the VAE decoder) and writes the fused graphs to the bundle's
``ort/`` subfolder. The exported graphs stay as they are: they remain the reference that
TensorRT and OpenVINO read. The manifest records, per graph,
``graphs.<name>.ort_optimized = {"file", "sha256", "bytes", "fusions", ...}`` and, at the top
level, ``ort_optimized`` (the options used, the ONNX Runtime version).

CPU-safe means: the fusions that produce operators with CUDA kernels only are off
(:data:`CPU_UNSAFE_FUSIONS`: ``NhwcConv``, ``GroupNorm``/``SkipGroupNorm``, packed QKV/KV
attention, ``BiasSplitGelu``, ``BiasAdd``), and ONNX Runtime's own graph optimizations are not
baked in (``opt_level=0``, no provider-specific nodes). Every fused graph is loaded on the CPU
provider and compared with its reference graph on the same inputs before anything is recorded.

The bundle stays valid at every instant: a previous ``ort_optimized`` record is first
dropped from the manifest, the new graphs are written to a temporary folder inside the
bundle, moved into ``ort/`` once complete, and only then is the manifest replaced
atomically (:func:`cfgswitch.export.manifest.write_json_atomic`). An optimize killed at any
point leaves a bundle that loads (at worst with unreferenced files under ``ort/``).
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import shutil
import sys
import uuid
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Union

import numpy as np

from cfgswitch.bundle import MANIFEST_NAME, read_manifest, sha256_file, verify_graphs
from cfgswitch.errors import BackendUnavailableError, BundleError, InvalidArgumentError
from cfgswitch.io_specs import resolve_shape, shape_env

from .manifest import write_json_atomic
from .shared_weights import share_unet_weights

logger = logging.getLogger(__name__)

#: Subfolder of the bundle that holds the fused graphs.
ORT_DIR = "ort"
#: ONNX Runtime optimizer model type per bundle graph.
MODEL_TYPES: Dict[str, str] = {"text_encoder": "clip", "text_encoder_2": "clip", "unet": "unet", "unet_cfg": "unet",
                               "vae_decoder": "vae"}
#: FusionOptions switched off: each produces an operator that only has a CUDA kernel.
CPU_UNSAFE_FUSIONS = ("enable_nhwc_conv", "enable_group_norm", "enable_skip_group_norm", "enable_packed_qkv",
                      "enable_packed_kv", "enable_bias_splitgelu", "enable_bias_add")
#: Default largest max abs difference between a fused graph and its reference, per bundle dtype.
DEFAULT_TOLERANCE: Dict[str, float] = {"float32": 1e-4, "float16": 1e-2}
#: Graphs whose initializers exceed this many bytes are saved with one external-data file.
EXTERNAL_DATA_BYTES = 1 << 30


def cpu_safe_options(model_type: str):
    """:class:`~onnxruntime.transformers.fusion_options.FusionOptions` for ``model_type`` without CUDA-only fusions."""
    from onnxruntime.transformers.fusion_options import FusionOptions

    opts = FusionOptions(model_type)
    for name in CPU_UNSAFE_FUSIONS:
        if hasattr(opts, name):
            setattr(opts, name, False)
    return opts


def _require_ort():
    try:
        import onnxruntime
        from onnxruntime.transformers import optimizer  # noqa: F401
    except ImportError as e:  # pragma: no cover - the cpu extra has it
        raise BackendUnavailableError(f"cfgswitch export --optimize needs onnxruntime: pip install 'cfgswitch[cpu]' ({e})") from e
    return onnxruntime


def _initializer_bytes(model) -> int:
    total = 0
    for t in model.graph.initializer:
        total += len(t.raw_data) if t.raw_data else 0
        for ext in t.external_data:
            if ext.key == "length":
                total += int(ext.value)
    return total


@contextmanager
def _quiet_optimizer() -> Iterator[None]:
    """ONNX Runtime's optimizer logs every fusion and draws a tqdm bar per graph: logs to ERROR, bar off.

    Its modules log under their bare names (``fusion_base``, ``onnx_model``, ...) and create the
    bar with ``tqdm.tqdm(...)`` inside the call, so the bar is turned off through a subclass put
    in ``tqdm.tqdm``'s place for the duration of the call only.
    """
    folder = str(Path(sys.modules["onnxruntime.transformers"].__file__).parent)
    loggers = [logging.getLogger(name) for name, mod in list(sys.modules.items())
               if str(getattr(mod, "__file__", "") or "").startswith(folder)]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(logging.ERROR, lg.level))
    try:
        import tqdm as _tqdm
    except ImportError:  # pragma: no cover - a dependency of cfgswitch
        _tqdm = None
    original = getattr(_tqdm, "tqdm", None)
    if original is not None:
        class _Silent(original):  # type: ignore[misc, valid-type]
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                kwargs["disable"] = True
                super().__init__(*args, **kwargs)

        _tqdm.tqdm = _Silent
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # numpy's, from the attention fusion
            yield
    finally:
        if original is not None:
            _tqdm.tqdm = original
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def optimize_graph(src: Path, dst: Path, model_type: str) -> Dict[str, Any]:
    """Fuse one ONNX graph (external data resolved beside ``src``) and save it at ``dst``.

    Args:
        src (`Path`): the reference graph.
        dst (`Path`): where the fused graph goes (``dst.name + ".data"`` beside it if its
            weights exceed :data:`EXTERNAL_DATA_BYTES`).
        model_type (`str`): ``clip``, ``unet`` or ``vae``.

    Returns:
        `dict`: ``fusions`` (fused operator types found), ``fused_ops`` (their counts) and
        ``external_data`` (the data file's path, or None).
    """
    import onnx
    from onnxruntime.transformers import optimizer

    model = onnx.load(str(src))  # external data resolved relative to the file
    big = _initializer_bytes(model) > EXTERNAL_DATA_BYTES
    with _quiet_optimizer():
        fused = optimizer.optimize_model(model, model_type=model_type, num_heads=0, hidden_size=0,
                                         optimization_options=cpu_safe_options(model_type), opt_level=0, use_gpu=False)
        stats = {op: int(n) for op, n in (fused.get_fused_operator_statistics() or {}).items() if n}
        fused.save_model_to_file(str(dst), use_external_data_format=big, all_tensors_to_one_file=True)
    data = dst.with_name(dst.name + ".data")
    return {"fusions": sorted(stats), "fused_ops": stats, "external_data": data if big and data.is_file() else None}


def _feeds(bundle, name: str, rng: np.random.Generator) -> Dict[str, np.ndarray]:
    """Small inputs for one graph: 2 images, the bundle's first image size, real token ids."""
    entry = bundle.graph_entry(name)
    height, width = bundle.image_sizes[0]
    factor = int(bundle.manifest["dims"]["vae_scale_factor"])
    env = shape_env(2, height, width, factor)
    feeds: Dict[str, np.ndarray] = {}
    for t in entry["inputs"]:
        try:
            shape = list(resolve_shape(t["shape"], env))
        except KeyError as e:
            raise BundleError(f"optimize: {name}.{t['name']}: {e.args[0]}") from None
        if t["name"] == "input_ids":
            tok = bundle.load_tokenizer()
            ids = tok(["a photo of a cat", "a large red circle"], padding="max_length", max_length=shape[1],
                      truncation=True, return_tensors="np")["input_ids"]
            feeds[t["name"]] = ids.astype(np.int64 if "64" in t["dtype"] else np.int32)
        elif t["name"] == "timestep":
            feeds[t["name"]] = rng.uniform(0, 999, size=shape).astype(t["dtype"])
        elif t["name"] == "guidance_scale":
            feeds[t["name"]] = np.full(shape, 7.5, dtype=t["dtype"])
        else:
            feeds[t["name"]] = rng.standard_normal(shape).astype(t["dtype"])
    return feeds


def compare_with_reference(bundle, name: str, fused_file: Path, threads: Optional[int] = None) -> float:
    """Max abs difference of a fused graph against the bundle's reference graph on the CPU provider.

    Loading the fused graph on ``CPUExecutionProvider`` is the check that no CUDA-only operator
    slipped in; the inputs are random latents, real token ids and a guidance scale of 7.5.
    """
    ort = _require_ort()
    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = int(threads)
    try:
        fused = ort.InferenceSession(str(fused_file), so, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - ORT raises its own untyped failures
        raise BundleError(f"bundle {bundle.path}: the fused {name} graph does not load on the CPU provider: {e}") from e
    ref = ort.InferenceSession(str(bundle.graph_path(name)), so, providers=["CPUExecutionProvider"])
    feeds = _feeds(bundle, name, np.random.default_rng(0))
    a, b = ref.run(None, feeds), fused.run(None, feeds)
    return max(float(np.max(np.abs(x.astype(np.float64) - y.astype(np.float64)))) for x, y in zip(a, b))


def _referenced_files(root: Path) -> set:
    """The ``ort/`` files the manifest on disk names (empty when it cannot be read)."""
    try:
        graphs = json.loads((root / MANIFEST_NAME).read_text(encoding="utf-8")).get("graphs", {})
    except (OSError, ValueError, AttributeError):
        return set()
    out = set()
    for entry in graphs.values():
        rec = entry.get("ort_optimized") if isinstance(entry, dict) else None
        if isinstance(rec, dict):
            out.add(rec.get("file"))
            if isinstance(rec.get("external_data"), dict):
                out.add(rec["external_data"].get("file"))
    return out


def _record(root: Path, path: Path) -> Dict[str, Any]:
    return {"file": path.relative_to(root).as_posix(), "sha256": sha256_file(path), "bytes": path.stat().st_size}


def optimize_bundle(path: Union[str, Path], graphs: Optional[Sequence[str]] = None, *, check: bool = True,
                    tolerance: Optional[float] = None, overwrite: bool = False,
                    threads: Optional[int] = None) -> Dict[str, Dict[str, Any]]:
    """Write ONNX Runtime's CPU-safe fused graphs of a bundle to ``ort/`` and record them in its manifest.

    Args:
        path (`str` or `Path`): a bundle written by ``cfgswitch export``.
        graphs (`list[str]`, optional): which graphs to fuse (default: every graph of the bundle).
        check (`bool`, defaults to True): load every fused graph on the CPU provider and compare
            it with its reference graph; a difference over ``tolerance`` raises and records nothing.
        tolerance (`float`, optional): the largest max abs difference accepted (default 1e-4 for
            float32 bundles, 1e-2 for float16 ones: :data:`DEFAULT_TOLERANCE`).
        overwrite (`bool`, defaults to False): replace an existing ``ort_optimized`` record.
        threads (`int`, optional): ONNX Runtime threads for the check.

    Returns:
        `dict`: the new ``graphs.<name>.ort_optimized`` records by graph name.

    Raises:
        BundleError: the bundle does not load, a fused graph does not load on the CPU or differs
            from its reference by more than ``tolerance``.
        InvalidArgumentError: an unknown graph name, a bad tolerance, or the bundle is already
            optimized and ``overwrite`` is off.
    """
    ort = _require_ort()
    if graphs is not None:
        unknown = [g for g in graphs if g not in MODEL_TYPES]
        if unknown or not graphs:
            raise InvalidArgumentError("graphs", f"a non-empty subset of {', '.join(MODEL_TYPES)}", list(graphs))
    if tolerance is not None and (isinstance(tolerance, bool) or not isinstance(tolerance, (int, float))
                                  or not tolerance > 0):
        raise InvalidArgumentError("tolerance", "a positive number", tolerance)
    root = Path(path)
    bundle = read_manifest(root)
    names = [g for g in bundle.manifest["graphs"] if g in MODEL_TYPES] if graphs is None else list(graphs)
    missing = [g for g in names if g not in bundle.manifest["graphs"]]
    if missing:
        raise InvalidArgumentError("graphs", f"graphs of this bundle ({', '.join(bundle.manifest['graphs'])})", missing)
    if tolerance is None:
        tolerance = DEFAULT_TOLERANCE.get(bundle.dtype, DEFAULT_TOLERANCE["float16"])
    verify_graphs(bundle, names)
    manifest = bundle.manifest
    already = [g for g in names if manifest["graphs"][g].get("ort_optimized")]
    if already and not overwrite:
        raise InvalidArgumentError("overwrite", "True to replace the fused graphs already recorded (or a bundle "
                                   "without them)", f"{', '.join(already)} already optimized in {root}")
    if already or manifest.get("ort_optimized"):
        # Phase 0: forget the old fused graphs first, so the manifest never names a file being replaced.
        for g in names:
            manifest["graphs"][g].pop("ort_optimized", None)
        if not any(e.get("ort_optimized") for e in manifest["graphs"].values()):
            manifest.pop("ort_optimized", None)
        write_json_atomic(root / MANIFEST_NAME, manifest)

    tmp = root / f".{ORT_DIR}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    records: Dict[str, Dict[str, Any]] = {}
    moved: List[Path] = []
    try:
        # Phase 1: every fused graph complete (and checked) in a private folder.
        for g in names:
            logger.info("optimize: fusing %s (model type %s)", g, MODEL_TYPES[g])
            dst = tmp / Path(bundle.graph_entry(g)["file"]).name
            info = optimize_graph(bundle.graph_path(g), dst, MODEL_TYPES[g])
            rec: Dict[str, Any] = {"fusions": info["fusions"], "fused_ops": info["fused_ops"], "model_type": MODEL_TYPES[g],
                                   "external_data": None, "check": None}
            if check:
                diff = compare_with_reference(bundle, g, dst, threads)
                rec["check"] = {"provider": "CPUExecutionProvider", "max_abs_diff": diff, "tolerance": float(tolerance),
                                "ok": diff <= tolerance}
                if not diff <= tolerance:
                    raise BundleError(f"bundle {root}: the fused {g} graph differs from its reference by {diff:.3g} "
                                      f"(tolerance {tolerance:g}); nothing recorded")
                logger.info("optimize: %s fused %s; max abs diff %.3g", g, ", ".join(info["fusions"]) or "nothing", diff)
            records[g] = rec
        # The fused unet and unet_cfg hold the same weights: store them once, as the bundle's own graphs do.
        shared = None
        if {"unet", "unet_cfg"} <= set(records):
            staged = {g: {"file": Path(bundle.graph_entry(g)["file"]).name} for g in ("unet", "unet_cfg")}
            shared = share_unet_weights(tmp, staged, check=False)  # contrib ops: onnx.checker does not know them
        # Phase 2: move the complete files into ort/ (not referenced by the manifest yet).
        out_dir = root / ORT_DIR
        out_dir.mkdir(exist_ok=True)
        for f in sorted(tmp.iterdir()):
            target = out_dir / f.name
            os.replace(f, target)
            moved.append(target)
        for g, rec in records.items():
            onnx_file = out_dir / Path(bundle.graph_entry(g)["file"]).name
            rec.update(_record(root, onnx_file))
            data = onnx_file.with_name(onnx_file.name + ".data")
            if shared is not None and g in ("unet", "unet_cfg"):
                data = out_dir / shared.name
            if data.is_file():
                rec["external_data"] = _record(root, data)
        # Phase 3: the manifest, replaced atomically.
        for g, rec in records.items():
            manifest["graphs"][g]["ort_optimized"] = {k: rec[k] for k in ("file", "sha256", "bytes", "fusions", "fused_ops",
                                                                        "model_type", "external_data", "check")}
        manifest["ort_optimized"] = {
            "tool": "onnxruntime.transformers.optimizer.optimize_model",
            "onnxruntime": ort.__version__,
            "opt_level": 0,
            "use_gpu": False,
            "disabled_fusions": list(CPU_UNSAFE_FUSIONS),
            "model_types": {g: MODEL_TYPES[g] for g in manifest["graphs"] if manifest["graphs"][g].get("ort_optimized")},
            "providers_checked": ["CPUExecutionProvider"] if check else [],
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        write_json_atomic(root / MANIFEST_NAME, manifest)
    except BaseException:
        keep = _referenced_files(root)  # an interrupt may come after the manifest was replaced
        for f in moved:  # unreferenced by the manifest on disk: tidy up (a hard kill leaves them, harmlessly)
            if f.relative_to(root).as_posix() not in keep:
                f.unlink(missing_ok=True)
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("optimize: %s: fused graphs of %s in %s/", root, ", ".join(records), ORT_DIR)
    return {g: manifest["graphs"][g]["ort_optimized"] for g in records}


__all__ = ["CPU_UNSAFE_FUSIONS", "DEFAULT_TOLERANCE", "MODEL_TYPES", "ORT_DIR", "compare_with_reference",
           "cpu_safe_options", "optimize_bundle", "optimize_graph"]
