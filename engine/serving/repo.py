"""``cfgswitch triton-repo``: a classic Triton model repository for a bundle.

Layouts (``--engines``):

``onnxruntime``
    ``cfgswitch_pipeline`` only: a Python-backend model that runs the whole bundle on ONNX
    Runtime in-process. Runs on any Triton with the Python backend, CPU-only included.
``tensorrt``
    The engines recorded by ``cfgswitch build`` as ``tensorrt_plan`` models
    (``text_encoder``, ``unet_cfg``, ``unet_late``, ``vae_decoder``; the ``shared`` layout has
    one ``unet`` model with all its optimization profiles) and ``cfgswitch_pipeline``, which
    tokenizes, runs the switching loop and calls them over BLS. Needs a GPU Triton.
``onnxruntime-bls``
    The ``tensorrt`` layout with each engine's ONNX graph served by a Python-backend ONNX
    Runtime model: the BLS pipeline on a CPU-only Triton (for testing and for hosts without
    TensorRT).

Every ``config.pbtxt`` is written through Triton's model-config protobuf and parsed back.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from ..bundle import Bundle, bundle_file, read_manifest, verify_graphs
from ..errors import BundleError, InvalidArgumentError
from ..io_specs import GRAPH_NAMES, LAYOUTS
from . import model_config as mcfg
from .limits import ServeLimits
from .protocol import INPUTS, OUTPUTS, PIPELINE_MODEL_NAME

logger = logging.getLogger(__name__)

ENGINES = ("onnxruntime", "tensorrt", "onnxruntime-bls")
_HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class RepoOptions:
    """How to write a repository.

    Attributes:
        engines (`str`): one of :data:`ENGINES`.
        layout (`str`, optional): TensorRT layout (``two-engines`` or ``shared``); default: the
            bundle's only built layout, else ``two-engines``.
        limits (`ServeLimits`): per-request limits of the pipeline model.
        max_queue_delay_us (`int`): the pipeline's dynamic-batching delay.
        instances (`int`): pipeline model instances.
        python_paths (`list[str]`): site folders the Python models add before importing cfgswitch.
        threads (`int`, optional): ONNX Runtime intra-op threads per session.
        batching (`str`, defaults to ``"step"``): how the pipeline model runs the requests of one
            Triton batch: ``step`` through the step engine (they share UNet calls step by step,
            each answered with its own error), ``request`` merged whole (the earlier path).
    """

    engines: str = "onnxruntime"
    layout: Optional[str] = None
    limits: ServeLimits = field(default_factory=ServeLimits)
    max_queue_delay_us: int = 2000
    instances: int = 1
    python_paths: Sequence[str] = ()
    threads: Optional[int] = None
    batching: str = "step"


def engine_model_names(layout: str) -> Dict[str, str]:
    """Component -> Triton model name, for a layout (``cfg`` and ``late`` share ``unet`` in ``shared``)."""
    if layout == "shared":
        return {"text_encoder": "text_encoder", "cfg": "unet", "late": "unet", "vae_decoder": "vae_decoder"}
    return {"text_encoder": "text_encoder", "cfg": "unet_cfg", "late": "unet_late", "vae_decoder": "vae_decoder"}


def _graph_of_model(layout: str) -> Dict[str, str]:
    """Triton model name -> bundle graph (and TensorRT plan) name."""
    if layout == "shared":
        return {"text_encoder": "text_encoder", "unet": "unet", "vae_decoder": "vae_decoder"}
    return {"text_encoder": "text_encoder", "unet_cfg": "unet_cfg", "unet_late": "unet", "vae_decoder": "vae_decoder"}


def _pick_layout(bundle: Bundle, layout: Optional[str], need_plans: bool) -> str:
    if layout is not None and layout not in LAYOUTS:
        raise InvalidArgumentError("--layout", f"one of {', '.join(LAYOUTS)}", layout)
    if not need_plans:
        return layout or "two-engines"
    built = [name for name, rec in bundle.engines().items() if (rec or {}).get("plans")]
    if layout is None:
        if not built:
            raise BundleError(f"bundle {bundle.path} has no TensorRT plans; build them first on the GPU host: "
                              f"cfgswitch build {bundle.path}")
        layout = "two-engines" if "two-engines" in built else built[0]
    elif layout not in built:
        raise BundleError(f"bundle {bundle.path} has no {layout!r} TensorRT plans (built: {', '.join(built) or 'none'}); "
                          f"build them: cfgswitch build {bundle.path} --layout {layout}")
    return layout


def _plan_file(bundle: Bundle, layout: str, plan: str) -> Path:
    entry = (bundle.engines(layout).get("plans") or {}).get(plan)
    if not entry or not entry.get("file"):
        raise BundleError(f"bundle {bundle.path}: the {layout!r} engines record no plan {plan!r} (rebuild: cfgswitch build)")
    path = bundle_file(bundle.path, entry["file"], f"engines.{layout}.plans.{plan}.file")
    if not path.is_file():
        raise BundleError(f"bundle {bundle.path}: plan file {entry['file']} is missing (rebuild: cfgswitch build)")
    return path


def _profile_count(bundle: Bundle, layout: str, plan: str) -> int:
    entry = (bundle.engines(layout).get("plans") or {}).get(plan) or {}
    profiles = entry.get("profiles")
    return len(profiles) if isinstance(profiles, list) and profiles else 1


def _engine_config(bundle: Bundle, model: str, graph: str, *, platform: Optional[str], backend: Optional[str],
                   kind: str, profiles: int, params: Optional[Dict[str, str]] = None):
    cfg = mcfg.new_config(model, platform=platform, backend=backend, max_batch_size=0)
    entry = bundle.graph_entry(graph)
    for kind_name, tensors in (("input", entry["inputs"]), ("output", entry["outputs"])):
        for t in tensors:
            dims = [d if isinstance(d, int) else -1 for d in t["shape"]]
            mcfg.add_tensor(cfg, kind_name, t["name"], mcfg.BUNDLE_TO_TRITON[t["dtype"]], dims)
    mcfg.add_instances(cfg, kind, 1, list(range(profiles)) if profiles > 1 else [])
    if params:
        mcfg.set_parameters(cfg, params)
    return cfg


def _destination(out: Path, path: Path) -> Path:
    """``path``, refused unless it resolves inside the repository folder ``out`` (checked before every write)."""
    base = out.resolve()
    target = path.resolve()
    if target != base and base not in target.parents:
        raise BundleError(f"triton-repo: refusing to write {path}: it resolves outside --out {out} "
                          "(a crafted manifest path?)")
    return path


def _copy_file(src: Path, dst: Path, out: Path) -> None:
    _destination(out, dst.parent).mkdir(parents=True, exist_ok=True)
    shutil.copy2(src, _destination(out, dst))


def _copy_bundle_subset(bundle: Bundle, dst: Path, with_graphs: bool, out: Path) -> None:
    """Copy the bundle (``with_graphs``) or only what the pipeline itself reads (manifest, tokenizer, scheduler).

    Every file is one the manifest names and that :func:`~cfgswitch.bundle.read_manifest` found
    inside the bundle; each destination is checked to lie inside ``out`` before it is written.
    """
    files = set()
    if with_graphs:
        for n in bundle.graph_names:
            entry = bundle.graph_entry(n)
            files.add(entry["file"])
            if entry.get("external_data"):
                files.add(entry["external_data"]["file"])
    bundle.scheduler_config()  # checks its sha256
    files |= {f for key in bundle.tokenizer_keys for f in bundle.tokenizer_files(key)}
    files.add(bundle.manifest["scheduler_config"])
    _copy_file(bundle.path / "manifest.json", dst / "manifest.json", out)
    for rel in sorted(files):
        _copy_file(bundle_file(bundle.path, rel, rel), dst / rel, out)


def write_repository(bundle_path: "str | Path", out: "str | Path", options: RepoOptions = RepoOptions(),
                     overwrite: bool = False) -> Dict[str, Path]:
    """Write a Triton model repository for a bundle; returns ``{model name: config.pbtxt path}``.

    Raises:
        InvalidArgumentError: bad options, or ``out`` exists without ``overwrite``.
        BundleError: the bundle is malformed, a graph fails its sha256, or (``tensorrt``) plans are missing.
    """
    if options.engines not in ENGINES:
        raise InvalidArgumentError("--engines", f"one of {', '.join(ENGINES)}", options.engines)
    if options.instances < 1:
        raise InvalidArgumentError("--instances", "an integer >= 1", options.instances)
    if options.max_queue_delay_us < 0:
        raise InvalidArgumentError("--max-queue-delay-us", "an integer >= 0", options.max_queue_delay_us)
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise InvalidArgumentError("--out", "an empty or new folder (or pass --overwrite)", str(out))
    bundle = read_manifest(bundle_path)
    if options.engines != "onnxruntime" and set(bundle.graph_names) != set(GRAPH_NAMES):
        raise InvalidArgumentError("--engines", f"onnxruntime for a {bundle.dims.family} bundle (its graphs "
                                   f"{', '.join(bundle.graph_names)}; the BLS and TensorRT repositories serve the four "
                                   "graphs of SD 1.x/2.x bundles)", options.engines)
    tensorrt = options.engines == "tensorrt"
    layout = _pick_layout(bundle, options.layout, need_plans=tensorrt)
    if not tensorrt:
        verify_graphs(bundle)
    if out.exists() and overwrite:
        shutil.rmtree(out)
    out.mkdir(parents=True)
    paths = os.pathsep.join(options.python_paths)
    written: Dict[str, Path] = {}

    # Engine models (tensorrt, onnxruntime-bls).
    if options.engines != "onnxruntime":
        for model, graph in _graph_of_model(layout).items():
            version = _destination(out, out / model / "1")
            version.mkdir(parents=True)
            if tensorrt:
                _copy_file(_plan_file(bundle, layout, graph), version / "model.plan", out)
                # One context per listed profile: ON_PROFILE_CHANGE sizes each for its own profile, not the largest.
                cfg = _engine_config(bundle, model, graph, platform="tensorrt_plan", backend=None, kind="KIND_GPU",
                                     profiles=_profile_count(bundle, layout, graph),
                                     params={"execution_context_allocation_strategy": "ON_PROFILE_CHANGE"})
            else:
                _copy_file(bundle.graph_path(graph), version / "model.onnx", out)
                ext = bundle.graph_entry(graph).get("external_data")
                if ext:
                    _copy_file(bundle_file(bundle.path, ext["file"], f"graphs.{graph}.external_data.file"),
                               version / Path(ext["file"]).name, out)
                shutil.copy2(_HERE / "graph_model.py", version / "model.py")
                params = {"python_paths": paths}
                if options.threads:
                    params["threads"] = str(options.threads)
                cfg = _engine_config(bundle, model, graph, platform=None, backend="python", kind="KIND_CPU", profiles=1,
                                     params=params)
            written[model] = mcfg.write_config(out / model, cfg)

    # The pipeline model.
    version = out / PIPELINE_MODEL_NAME / "1"
    version.mkdir(parents=True)
    shutil.copy2(_HERE / "pipeline_model.py", version / "model.py")
    _copy_bundle_subset(bundle, version / "bundle", with_graphs=options.engines == "onnxruntime", out=out)
    cfg = mcfg.new_config(PIPELINE_MODEL_NAME, backend="python", max_batch_size=options.limits.max_batch)
    mcfg.add_protocol(cfg, INPUTS, OUTPUTS)
    cfg.dynamic_batching.max_queue_delay_microseconds = options.max_queue_delay_us
    mcfg.add_instances(cfg, "KIND_CPU", options.instances)
    params = {"engines": options.engines, "bundle": "bundle", "limits": json.dumps(options.limits.to_json()),
              "python_paths": paths, "layout": layout, "batching": options.batching}
    if options.engines != "onnxruntime":
        params["models"] = json.dumps(engine_model_names(layout))
        params["exact_batch"] = "1" if tensorrt and bundle.engines(layout).get("static") else "0"
    if options.threads:
        params["threads"] = str(options.threads)
    mcfg.set_parameters(cfg, params)
    written[PIPELINE_MODEL_NAME] = mcfg.write_config(out / PIPELINE_MODEL_NAME, cfg)
    logger.info("repository %s: %s (%s engines%s)", out, ", ".join(sorted(written)), options.engines,
                f", {layout} layout" if options.engines != "onnxruntime" else "")
    return written


def check_repository(repo: "str | Path") -> Dict[str, List[str]]:
    """Parse every ``config.pbtxt`` of a repository and check the files each model names.

    Returns ``{model: [files it uses]}``.

    Raises:
        BundleError: a config does not parse, its name differs from its folder, or a file is missing.
    """
    repo = Path(repo)
    found: Dict[str, List[str]] = {}
    for cfg_path in sorted(repo.glob("*/config.pbtxt")):
        cfg = mcfg.read_config(cfg_path)
        model_dir = cfg_path.parent
        if cfg.name != model_dir.name:
            raise BundleError(f"{cfg_path}: name {cfg.name!r} differs from its folder {model_dir.name!r}")
        if cfg.platform == "tensorrt_plan":
            files = [cfg.default_model_filename or "model.plan"]
        elif cfg.backend == "python":
            files = ["model.py"]
        else:
            raise BundleError(f"{cfg_path}: unexpected platform/backend {cfg.platform or cfg.backend!r}")
        uses = [f"1/{f}" for f in files]
        if cfg.backend == "python" and cfg.name != PIPELINE_MODEL_NAME:
            uses.append("1/model.onnx")
        if cfg.name == PIPELINE_MODEL_NAME:
            params = {k: v.string_value for k, v in cfg.parameters.items()}
            uses.append(f"1/{params.get('bundle', 'bundle')}/manifest.json")
            for model in set(json.loads(params.get("models", "{}")).values()):
                if not (repo / model / "config.pbtxt").is_file():
                    raise BundleError(f"{cfg_path}: the pipeline calls model {model!r}, which the repository lacks")
        for rel in uses:
            if not (model_dir / rel).is_file():
                raise BundleError(f"{cfg_path}: model {cfg.name!r} needs {rel}, which is missing")
        found[cfg.name] = uses
    if PIPELINE_MODEL_NAME not in found:
        raise BundleError(f"{repo}: no {PIPELINE_MODEL_NAME} model")
    return found


__all__ = ["ENGINES", "RepoOptions", "check_repository", "engine_model_names", "write_repository"]
