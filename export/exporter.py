"""A diffusers Stable Diffusion model to a bundle: tokenizers, scheduler config, ONNX graphs, manifest.

The model's family (:mod:`cfgswitch.families`) says which graphs it has: SD 1.x/2.x four
(``text_encoder``, ``unet``, ``unet_cfg``, ``vae_decoder``), SDXL five (a second text encoder,
and ``text_embeds``/``time_ids`` inputs on both UNet graphs). An SDXL bundle also keeps its
second tokenizer (``tokenizer_2/``, sealed like the first) and, when exported in fp16 with a
VAE whose config asks for ``force_upcast``, a float32 ``vae_decoder`` graph.

The bundle is written into a temporary directory beside ``out`` and renamed into
place at the end, so an interrupted or failed export leaves no half-written bundle.
Each export holds a lock file beside its temporary directory (``.NAME.tmp-XXXX.lock``)
while it runs; the next export to the same ``out`` removes, with a log line, every
``.NAME.tmp-*`` and ``.NAME.old-*`` folder that no live export holds (left by a killed one).
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch

from cfgswitch.bundle import MANIFEST_NAME
from cfgswitch.errors import BundleError, InvalidArgumentError
from cfgswitch.io_specs import ALL_GRAPH_NAMES, graph_spec, graph_specs
from cfgswitch.model_spec import ModelSpec

from .manifest import (build_manifest, content_hash_dir, content_hash_modules, file_records, graph_entry,
                       write_json_atomic)
from .onnx_export import export_graph
from .shared_weights import share_unet_weights
from .verify import compare_graph
from .wrappers import example_inputs, graph_module

logger = logging.getLogger(__name__)

DTYPES = {"fp32": "float32", "float32": "float32", "fp16": "float16", "float16": "float16"}
MIN_OPSET, MAX_OPSET = 14, 20


@dataclass
class ExportOptions:
    """Checked options of :func:`export_bundle`.

    Attributes:
        height, width (`int`, optional): image size in pixels (default: the model's native size).
        batch_sizes (`list[int]`): images per request the bundle supports.
        dtype (`str`): ``float32`` or ``float16``.
        opset (`int`): ONNX opset.
        verify (`bool`): compare every graph with torch on ONNX Runtime.
        overwrite (`bool`): replace an existing bundle at ``out``.
        graphs (`tuple[str]`): which graphs to export (empty: all of the model family's; a subset
            is for experiments and leaves the bundle unloadable).
    """

    height: Optional[int] = None
    width: Optional[int] = None
    batch_sizes: List[int] = field(default_factory=lambda: [1, 2, 4])
    dtype: str = "float32"
    opset: int = 17
    verify: bool = False
    overwrite: bool = False
    graphs: Tuple[str, ...] = ()


def check_options(height: Optional[int] = None, width: Optional[int] = None, batch_sizes: Sequence[int] = (1, 2, 4),
                  dtype: str = "fp32", opset: int = 17, verify: bool = False, overwrite: bool = False,
                  graphs: Sequence[str] = ()) -> ExportOptions:
    """Check export arguments before any model is loaded (raises :class:`InvalidArgumentError`)."""
    for name, value in (("height", height), ("width", width)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 8192):
            raise InvalidArgumentError(name, "a positive multiple of the VAE factor (8 for Stable Diffusion)", value)
    bs = list(batch_sizes)
    if not bs or any(isinstance(b, bool) or not isinstance(b, int) or not 1 <= b <= 256 for b in bs):
        raise InvalidArgumentError("batch_sizes", "a non-empty list of integers in [1, 256]", batch_sizes)
    if not isinstance(dtype, str) or dtype.lower() not in DTYPES:
        raise InvalidArgumentError("dtype", "fp32 or fp16", dtype)
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= MAX_OPSET:
        raise InvalidArgumentError("opset", f"an integer in [{MIN_OPSET}, {MAX_OPSET}] (17 is tested)", opset)
    if isinstance(graphs, str) or any(g not in ALL_GRAPH_NAMES for g in graphs):
        raise InvalidArgumentError("graphs", f"a subset of {', '.join(ALL_GRAPH_NAMES)} (empty: all of the model's)",
                                   graphs if isinstance(graphs, str) else list(graphs))
    return ExportOptions(height, width, sorted(set(bs)), DTYPES[dtype.lower()], opset, verify, overwrite, tuple(graphs))


def _load(model: Union[str, Path, Any], dtype: torch.dtype):
    """``(name, content_hash, source, family, components)`` of a folder or pipeline object.

    The components are those of the model's family (``unet``, ``vae``, ``text_encoder``,
    ``tokenizer``, ``scheduler_config``; SDXL adds ``text_encoder_2``, ``tokenizer_2`` and
    ``force_zeros_for_empty_prompt``). The UNet is cast to ``dtype``, and the VAE too unless the
    family keeps it in float32 (SDXL's ``force_upcast``); the text encoders stay in float32
    (see :class:`~cfgswitch.export.wrappers.TextEncoderGraph`).
    """
    from cfgswitch.families import detect_folder, detect_pipeline, get_family

    cpu = torch.device("cpu")
    if isinstance(model, (str, Path)):
        p = Path(model)
        family = detect_folder(p) if (p / "model_index.json").is_file() else get_family("sd1")
        comps = family.load_folder(p, cpu, torch.float32)
        name, chash, source = p.resolve().name, content_hash_dir(p), p.resolve().name
    else:
        family = detect_pipeline(model)
        comps = family.from_pipeline(model, cpu, torch.float32)
        hashed = [k for k in ("text_encoder", "text_encoder_2", "unet", "vae") if k in comps]
        name = str(getattr(model, "name_or_path", None) or type(model).__name__)
        chash, source = content_hash_modules({k: comps[k] for k in hashed}), type(model).__name__
    upcast = family.vae_force_upcast(comps)
    for key in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if key not in comps:
            continue
        dt = dtype if key == "unet" or (key == "vae" and not upcast) else torch.float32
        m = comps[key]
        if m.dtype != dt:  # diffusers warns on a cast to the dtype a module already has
            m.to(dtype=dt)
        m.eval().requires_grad_(False)
    comps["scheduler_config"] = dict(comps["scheduler_config"])
    return name, chash, source, family, comps


def export_bundle(model: Union[str, Path, Any], out: Union[str, Path], options: Optional[ExportOptions] = None,
                  progress: bool = True) -> Path:
    """Export a Stable Diffusion model to a bundle at ``out`` and return its path.

    Args:
        model (`str`, `Path` or pipeline): a diffusers folder (safetensors) or a pipeline object
            (whose modules are moved to the CPU and cast in place: UNet and VAE to the export
            dtype, the text encoder to float32).
        out (`str` or `Path`): the bundle directory to create.
        options (`ExportOptions`, optional): see :func:`check_options` (defaults: native size,
            batch sizes 1, 2, 4, fp32, opset 17, no verify).
        progress (`bool`, defaults to True): a progress bar over the stages.

    Raises:
        InvalidArgumentError: a bad option, or ``out`` exists and ``overwrite`` is off.
        ModelLoadError: the model folder is not a loadable Stable Diffusion folder.
    """
    from tqdm.auto import tqdm

    opts = options or ExportOptions()
    out = Path(out)
    if out.exists() and not opts.overwrite:
        raise InvalidArgumentError("out", "a path that does not exist yet (or pass --overwrite)", str(out))
    tdtype = torch.float16 if opts.dtype == "float16" else torch.float32
    stages = ["load model", "tokenizer + scheduler"]  # then one per graph (and verify), and the manifest
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_exports(out)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    lock = _hold_lock(tmp)  # before the folder exists: a folder without a held lock is never a live export's
    tmp.mkdir()
    bar = tqdm(total=len(stages), desc="export", disable=not progress, unit="stage")
    try:
        bar.set_postfix_str(stages[0])
        name, chash, source, family, comps = _load(model, tdtype)
        dims: ModelSpec = family.model_spec(comps, "model")
        te, unet, vae, sched = comps["text_encoder"], comps["unet"], comps["vae"], comps["scheduler_config"]
        table = graph_specs(dims)
        wanted = tuple(opts.graphs) or tuple(table)
        unknown = [g for g in wanted if g not in table]
        if unknown:
            raise InvalidArgumentError("graphs", f"graphs of this {family.name} model ({', '.join(table)})", list(wanted))
        height = opts.height or dims.sample_size * dims.vae_scale_factor
        width = opts.width or dims.sample_size * dims.vae_scale_factor
        for arg, value in (("height", height), ("width", width)):
            if value % dims.vae_scale_factor:
                raise InvalidArgumentError(arg, f"a multiple of the model's VAE factor {dims.vae_scale_factor}", value)
        if dims.vae_force_upcast and opts.dtype == "float16":
            logger.info("export: the VAE asks for force_upcast: vae_decoder is exported in float32")
        bar.total = len(stages) + len(wanted) * (2 if opts.verify else 1) + 1
        bar.refresh()
        bar.update()

        bar.set_postfix_str(stages[1])
        tokenizers = [k for k in ("tokenizer", "tokenizer_2") if k in comps]
        for key in tokenizers:
            comps[key].save_pretrained(tmp / key)
        (tmp / "scheduler").mkdir()
        (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched, indent=2, default=str))
        from cfgswitch.calibration import CALIBRATION_FILE  # analyze's plan recommendations travel with the model

        if isinstance(model, (str, Path)) and (Path(model) / CALIBRATION_FILE).is_file():
            shutil.copyfile(Path(model) / CALIBRATION_FILE, tmp / CALIBRATION_FILE)
        bar.update()

        ex_rows = 2 if 2 <= opts.batch_sizes[-1] else 1
        graphs: Dict[str, Dict[str, Any]] = {}
        modules, inputs = {}, {}
        for g in wanted:
            bar.set_postfix_str(f"export {g}")
            spec = graph_spec(g, dims)
            modules[g] = graph_module(g, te, unet, vae, dims, comps)
            inputs[g] = example_inputs(spec, dims, opts.dtype, ex_rows, height, width, seed=1)
            exported = export_graph(modules[g], spec, inputs[g], tmp / spec.file, opts.opset)
            graphs[g] = graph_entry(spec, exported, tmp, opts.dtype)
            bar.update()
        if {"unet", "unet_cfg"} <= set(graphs):
            share_unet_weights(tmp, graphs)  # one copy of the UNet weights on disk
        if opts.verify:
            for g in wanted:
                bar.set_postfix_str(f"verify {g}")
                graphs[g]["verify"] = compare_graph(modules[g], graph_spec(g, dims), tmp / graphs[g]["file"], inputs[g], opts.dtype)
                bar.update()

        bar.set_postfix_str("manifest")
        manifest = build_manifest(
            name=name, content_hash=chash, source=source, dims=dims, vae_scaling_factor=dims.vae_scaling_factor,
            sample_size=dims.sample_size, model_dtype=opts.dtype, opset=opts.opset, batch_sizes=opts.batch_sizes,
            image_sizes=[(height, width)], graphs=graphs,
            files=file_records(tmp, tokenizers + ["scheduler/scheduler_config.json"]),
            created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            tokenizer_2_dir="tokenizer_2" if "tokenizer_2" in comps else None,
            force_zeros_for_empty_prompt=comps.get("force_zeros_for_empty_prompt"),
        ) if set(wanted) == set(table) else _partial_manifest(graphs, opts)
        write_json_atomic(tmp / MANIFEST_NAME, manifest)
        bar.update()
        _move_into_place(tmp, out, opts.overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        bar.close()
        lock.release()
        _lock_path(tmp).unlink(missing_ok=True)
    logger.info("bundle written to %s", out)
    return out


def _lock_path(tmp: Path) -> Path:
    return tmp.with_name(tmp.name + ".lock")


def _hold_lock(tmp: Path):
    from filelock import FileLock

    lock = FileLock(str(_lock_path(tmp)))
    lock.acquire(timeout=0)
    return lock


def remove_stale_exports(out: "str | Path") -> List[Path]:
    """Remove the temporary folders a killed export to ``out`` left beside it; return what was removed.

    A folder ``.NAME.tmp-*`` (or ``.NAME.old-*``, the previous bundle of an interrupted
    ``--overwrite``, only while ``out`` exists) is removed when no live export holds its lock
    file; one whose lock is held belongs to an export still running and is left alone. Each
    removal is logged.
    """
    from filelock import FileLock, Timeout

    out = Path(out)
    removed: List[Path] = []
    if not out.parent.is_dir():
        return removed
    for kind in ("tmp", "old"):
        for folder in sorted(out.parent.glob(f".{out.name}.{kind}-*")):
            if folder.name.endswith(".lock") or not folder.is_dir() or folder.is_symlink():
                continue
            if kind == "old" and not out.exists():
                logger.warning("export: kept %s: the previous bundle of an interrupted --overwrite, and %s is missing",
                               folder, out)
                continue
            lock = FileLock(str(_lock_path(folder)))
            try:
                lock.acquire(timeout=0)
            except Timeout:
                logger.info("export: %s belongs to an export still running; left alone", folder)
                continue
            try:
                shutil.rmtree(folder, ignore_errors=True)
                logger.warning("export: removed %s, left behind by an interrupted export to %s", folder, out)
                removed.append(folder)
            finally:
                lock.release()
                _lock_path(folder).unlink(missing_ok=True)
    for stale in out.parent.glob(f".{out.name}.tmp-*.lock"):  # locks whose folder is gone
        if not stale.with_name(stale.name[:-len(".lock")]).exists():
            lock = FileLock(str(stale))
            try:
                lock.acquire(timeout=0)
            except Timeout:
                continue
            lock.release()
            stale.unlink(missing_ok=True)
    return removed


def _partial_manifest(graphs: Dict[str, Dict[str, Any]], opts: ExportOptions) -> Dict[str, Any]:
    # A subset export (experiments, the SD-size measurement) is not a loadable bundle: say so.
    return {"format": "cfgswitch-partial-export", "graphs": graphs, "dtype": opts.dtype, "opset": opts.opset}


def _move_into_place(tmp: Path, out: Path, overwrite: bool) -> None:
    if out.exists():
        if not overwrite:  # appeared while exporting
            raise BundleError(f"bundle {out}: appeared during the export; not replaced (pass --overwrite)")
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def verify_failures(bundle_dir: Path) -> List[str]:
    """Graphs of a written bundle whose ``--verify`` record is not ok."""
    manifest = json.loads((bundle_dir / MANIFEST_NAME).read_text())
    return [g for g, e in manifest["graphs"].items() if e.get("verify") and not e["verify"].get("ok")]


__all__ = ["ExportOptions", "check_options", "export_bundle", "remove_stale_exports", "verify_failures"]
