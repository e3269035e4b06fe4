"""Building the manifest of a bundle: graph entries, role entries, versions, content hash."""

from __future__ import annotations

import hashlib
import json
import os
import platform
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from cfgswitch.bundle import BUNDLE_FORMAT, SCHEMA_VERSION, sha256_file
from cfgswitch.io_specs import GraphSpec, graph_spec, resolve_shape, role_binding, shape_env
from cfgswitch.model_spec import ModelSpec

from .onnx_export import ExportedGraph

#: Model folder parts whose files make the content hash.
_HASHED_PARTS = ("model_index.json", "unet", "vae", "text_encoder", "scheduler", "tokenizer", "text_encoder_2",
                 "tokenizer_2")


def content_hash_dir(path: Path) -> str:
    """``sha256:<hex>`` over the relative paths and bytes of a diffusers folder's model files."""
    h = hashlib.sha256()
    files: List[Path] = []
    for part in _HASHED_PARTS:
        p = path / part
        if p.is_file():
            files.append(p)
        elif p.is_dir():
            files.extend(f for f in p.rglob("*") if f.is_file())
    for f in sorted(files, key=lambda f: f.relative_to(path).as_posix()):
        h.update(f.relative_to(path).as_posix().encode() + b"\0")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
    return "sha256:" + h.hexdigest()


def content_hash_modules(modules: Dict[str, Any]) -> str:
    """``sha256:<hex>`` over the state dicts (names, dtypes, shapes, bytes) of in-memory modules."""
    import torch

    h = hashlib.sha256()
    for name in sorted(modules):
        for key, t in sorted(modules[name].state_dict().items()):
            t = t.detach().cpu().contiguous()
            h.update(f"{name}.{key}:{t.dtype}:{tuple(t.shape)}\0".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return "sha256:" + h.hexdigest()


def versions() -> Dict[str, str]:
    """Versions of the exporter and the libraries it used."""
    import diffusers
    import onnx
    import torch
    import transformers

    import cfgswitch

    return {
        "cfgswitch": cfgswitch.__version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
        "transformers": transformers.__version__, "onnx": onnx.__version__, "python": platform.python_version(),
        "exporter": "torch.onnx TorchScript (dynamo=False)",
    }


def tensor_entries(tensors, model_dtype: str) -> List[Dict[str, Any]]:
    """The manifest's list form of tensor specs (symbolic shapes kept)."""
    return [{"name": t.name, "dtype": t.resolved_dtype(model_dtype), "shape": list(t.shape)} for t in tensors]


def graph_entry(spec: GraphSpec, exported: ExportedGraph, root: Path, model_dtype: str) -> Dict[str, Any]:
    """The manifest entry of one exported graph (file, sha256, size, tensors)."""
    entry: Dict[str, Any] = {
        "file": exported.onnx_file.relative_to(root).as_posix(),
        "sha256": sha256_file(exported.onnx_file),
        "bytes": exported.onnx_file.stat().st_size,
        "external_data": None,
        "weight_bytes": exported.weight_bytes,
        "inputs": tensor_entries(spec.inputs, model_dtype),
        "outputs": tensor_entries(spec.outputs, model_dtype),
        "dynamic_axes": {k: {str(a): s for a, s in v.items()} for k, v in spec.dynamic_axes().items()},
        "verify": None,
    }
    if exported.external_data is not None:
        entry["external_data"] = {
            "file": exported.external_data.relative_to(root).as_posix(),
            "sha256": sha256_file(exported.external_data),
            "bytes": exported.external_data.stat().st_size,
        }
    return entry


def file_records(root: Path, parts: Iterable[str]) -> Dict[str, Dict[str, Any]]:
    """``{relative path: {"sha256", "bytes"}}`` of each file under ``root`` named by ``parts`` (files or folders).

    What the runtime checks the tokenizer and the scheduler config against before it reads
    them (:func:`cfgswitch.bundle.Bundle.tokenizer_files`, :meth:`~cfgswitch.bundle.Bundle.scheduler_config`).
    """
    records: Dict[str, Dict[str, Any]] = {}
    for part in parts:
        p = root / part
        found = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
        for f in found:
            records[f.relative_to(root).as_posix()] = {"sha256": sha256_file(f), "bytes": f.stat().st_size}
    return records


def role_entries(dims: ModelSpec, graphs: Dict[str, Dict[str, Any]], model_dtype: str, batch_sizes: Sequence[int],
                 image_sizes: Sequence[Tuple[int, int]]) -> Dict[str, Dict[str, Any]]:
    """Per role (``cfg``, ``late``): its graph, file, sha256, tensors and concrete shapes per supported request."""
    roles = {}
    for role in ("cfg", "late"):
        binding = role_binding(role, "two-engines")
        spec = graph_spec(binding.graph, dims)
        g = graphs[binding.graph]
        shapes = []
        for h, w in image_sizes:
            for b in sorted(batch_sizes):
                env = shape_env(b, h, w, dims.vae_scale_factor)
                shapes.append({
                    "batch": b, "height": h, "width": w,
                    "inputs": {t.name: list(resolve_shape(t.shape, env)) for t in spec.inputs},
                    "outputs": {t.name: list(resolve_shape(t.shape, env)) for t in spec.outputs},
                })
        roles[role] = {
            "graph": binding.graph, "file": g["file"], "sha256": g["sha256"], "rows_per_image": 2 if role == "cfg" else 1,
            "inputs": g["inputs"], "outputs": g["outputs"], "shapes": shapes,
        }
    return roles


def build_manifest(*, name: str, content_hash: str, source: str, dims: ModelSpec, vae_scaling_factor: float,
                   sample_size: int, model_dtype: str, opset: int, batch_sizes: Iterable[int],
                   image_sizes: Iterable[Tuple[int, int]], graphs: Dict[str, Dict[str, Any]],
                   files: Dict[str, Dict[str, Any]],
                   tokenizer_dir: str = "tokenizer", scheduler_config: str = "scheduler/scheduler_config.json",
                   created: Optional[str] = None, tokenizer_2_dir: Optional[str] = None,
                   force_zeros_for_empty_prompt: Optional[bool] = None) -> Dict[str, Any]:
    """The whole manifest (schema version :data:`cfgswitch.bundle.SCHEMA_VERSION`).

    ``files`` holds the sha256 records of the tokenizer files and the scheduler config
    (:func:`file_records`); the runtime refuses a bundle whose manifest lacks them. ``family``
    names the model family; ``dims`` is :meth:`ModelSpec.dims_json` (SDXL adds its text encoders
    and added conditioning). An SDXL bundle also records ``tokenizer_2`` (its second tokenizer's
    folder) and ``force_zeros_for_empty_prompt``.
    """
    bs = sorted(set(int(b) for b in batch_sizes))
    sizes = [[int(h), int(w)] for h, w in image_sizes]
    family: Dict[str, Any] = {}
    if tokenizer_2_dir is not None:
        family["tokenizer_2"] = tokenizer_2_dir
    if force_zeros_for_empty_prompt is not None:
        family["force_zeros_for_empty_prompt"] = bool(force_zeros_for_empty_prompt)
    return {
        "format": BUNDLE_FORMAT,
        "schema_version": SCHEMA_VERSION,
        "created": created,
        "model": {"name": name, "content_hash": content_hash, "source": source},
        "family": dims.family,
        "dims": dims.dims_json(),
        "vae_scaling_factor": float(vae_scaling_factor),
        "sample_size": int(sample_size),
        "dtype": model_dtype,
        "opset": int(opset),
        "batch_sizes": bs,
        "image_sizes": sizes,
        "tokenizer": tokenizer_dir,
        **family,
        "scheduler_config": scheduler_config,
        "files": files,
        "graphs": graphs,
        "roles": role_entries(dims, graphs, model_dtype, bs, [tuple(s) for s in sizes]),
        "versions": versions(),
        "engines": {},
    }


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to ``path`` through a temporary file renamed into place."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


__all__ = ["build_manifest", "content_hash_dir", "content_hash_modules", "file_records", "graph_entry", "role_entries",
           "versions", "write_json_atomic"]
