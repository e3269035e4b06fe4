"""Reading and checking an exported bundle (``manifest.json`` and the files it names).

The runtime side of a bundle: it never imports the exporter. Every problem is a
:class:`~cfgswitch.errors.BundleError` that names the file and what is wrong; a
request the bundle cannot serve names the export flag that would allow it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

from .errors import BundleError
from .io_specs import GRAPH_NAMES, ModelDims
from .runners.base import ModelSpec

logger = logging.getLogger(__name__)

#: File name of a bundle's manifest.
MANIFEST_NAME = "manifest.json"
#: The ``format`` field every manifest carries.
BUNDLE_FORMAT = "cfgswitch-bundle"
#: The manifest schema this runtime reads.
SCHEMA_VERSION = 1
#: Top-level keys a manifest must have.
REQUIRED_KEYS = ("format", "schema_version", "model", "dims", "vae_scaling_factor", "sample_size", "dtype",
                 "batch_sizes", "image_sizes", "tokenizer", "scheduler_config", "graphs", "roles")
_DTYPES = ("float32", "float16")


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in 4 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class Bundle:
    """A bundle whose manifest has been read and checked.

    Attributes:
        path (`Path`): the bundle directory.
        manifest (`dict`): the parsed ``manifest.json``.
    """

    path: Path
    manifest: Dict[str, Any]

    # ------------------------------------------------------------ facts
    @property
    def dims(self) -> ModelDims:
        """The model's constant dimensions."""
        d = self.manifest["dims"]
        return ModelDims(int(d["latent_channels"]), int(d["vae_scale_factor"]), int(d["text_length"]), int(d["text_width"]))

    @property
    def dtype(self) -> str:
        """Export dtype of the graphs' floating tensors (``float32`` or ``float16``)."""
        return str(self.manifest["dtype"])

    @property
    def batch_sizes(self) -> List[int]:
        """Batch sizes (images per request) the bundle was exported for, ascending."""
        return sorted(int(b) for b in self.manifest["batch_sizes"])

    @property
    def image_sizes(self) -> List[Tuple[int, int]]:
        """``(height, width)`` pixel sizes the bundle was exported for."""
        return [(int(h), int(w)) for h, w in self.manifest["image_sizes"]]

    @property
    def name(self) -> str:
        """The model's display name."""
        return str(self.manifest["model"].get("name", self.path.name))

    def model_spec(self) -> ModelSpec:
        """The :class:`ModelSpec` the loop needs; the default size is the first exported one when square."""
        d = self.dims
        h, w = self.image_sizes[0]
        sample = h // d.vae_scale_factor if h == w else int(self.manifest["sample_size"])
        return ModelSpec(
            latent_channels=d.latent_channels, vae_scale_factor=d.vae_scale_factor,
            vae_scaling_factor=float(self.manifest["vae_scaling_factor"]), sample_size=sample,
            text_length=d.text_length, text_width=d.text_width, name=self.name,
        )

    def graph_entry(self, name: str) -> Dict[str, Any]:
        """The manifest entry of graph ``name``."""
        try:
            return self.manifest["graphs"][name]
        except KeyError:
            raise BundleError(f"bundle {self.path}: manifest.json has no graph {name!r} (re-export the bundle)") from None

    def graph_path(self, name: str) -> Path:
        """Path of graph ``name``'s ONNX file."""
        return self.path / self.graph_entry(name)["file"]

    def scheduler_config(self) -> Dict[str, Any]:
        """The model's scheduler config."""
        p = self.path / self.manifest["scheduler_config"]
        try:
            return json.loads(p.read_text())
        except FileNotFoundError:
            raise BundleError(f"bundle {self.path}: missing {self.manifest['scheduler_config']} (re-export the bundle)") from None
        except json.JSONDecodeError as e:
            raise BundleError(f"bundle {self.path}: {self.manifest['scheduler_config']} is not valid JSON ({e})") from None

    def load_tokenizer(self):
        """The CLIP tokenizer saved in the bundle."""
        from transformers import CLIPTokenizer

        d = self.path / self.manifest["tokenizer"]
        if not d.is_dir():
            raise BundleError(f"bundle {self.path}: missing tokenizer folder {self.manifest['tokenizer']}/ (re-export the bundle)")
        try:
            return CLIPTokenizer.from_pretrained(d)
        except (OSError, ValueError) as e:
            raise BundleError(f"bundle {self.path}: cannot load the tokenizer from {d.name}/: {e}") from e

    def engines(self, layout: Optional[str] = None) -> Dict[str, Any]:
        """The TensorRT engines recorded by ``cfgswitch build`` (all layouts, or one)."""
        engines = self.manifest.get("engines") or {}
        return engines if layout is None else engines.get(layout, {})


# ---------------------------------------------------------------- reading
def read_manifest(path: "str | Path") -> Bundle:
    """Read and check ``path/manifest.json``.

    Raises:
        BundleError: the directory is missing, the manifest is missing, not JSON, not a
            cfgswitch manifest, of an unknown schema version, or lacks a required entry.
    """
    p = Path(path)
    if not p.exists():
        raise BundleError(f"bundle: expected an existing bundle directory, got {str(path)!r} (no such path)")
    if not p.is_dir():
        raise BundleError(f"bundle: expected a bundle directory, got {str(path)!r} (a file)")
    mf = p / MANIFEST_NAME
    if not mf.is_file():
        raise BundleError(f"bundle {p}: no {MANIFEST_NAME} (not a bundle; make one with: cfgswitch export MODEL_DIR --out {p})")
    try:
        manifest = json.loads(mf.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"bundle {p}: {MANIFEST_NAME} is malformed ({e}); re-export the bundle") from None
    return Bundle(p, check_manifest(manifest, p))


def check_manifest(manifest: Any, where: "str | Path" = "bundle") -> Dict[str, Any]:
    """Check the structure of a parsed manifest and return it (raises :class:`BundleError`)."""
    if not isinstance(manifest, dict):
        raise BundleError(f"bundle {where}: {MANIFEST_NAME} is malformed (expected a JSON object, got {type(manifest).__name__})")
    if manifest.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"bundle {where}: {MANIFEST_NAME} is not a cfgswitch manifest (format {manifest.get('format')!r}, "
                          f"expected {BUNDLE_FORMAT!r})")
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise BundleError(
            f"bundle {where}: unknown manifest schema version {version!r} (this cfgswitch reads version {SCHEMA_VERSION}); "
            "re-export the bundle with this version of cfgswitch"
        )
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if missing:
        raise BundleError(f"bundle {where}: {MANIFEST_NAME} is malformed: missing {', '.join(missing)}")
    if manifest["dtype"] not in _DTYPES:
        raise BundleError(f"bundle {where}: {MANIFEST_NAME} is malformed: dtype {manifest['dtype']!r} is not one of {_DTYPES}")
    for key in ("latent_channels", "vae_scale_factor", "text_length", "text_width"):
        if not isinstance(manifest["dims"].get(key), int):
            raise BundleError(f"bundle {where}: {MANIFEST_NAME} is malformed: dims.{key} missing or not an integer")
    bs, sizes = manifest["batch_sizes"], manifest["image_sizes"]
    if not (isinstance(bs, list) and bs and all(isinstance(b, int) and b >= 1 for b in bs)):
        raise BundleError(f"bundle {where}: {MANIFEST_NAME} is malformed: batch_sizes {bs!r}")
    if not (isinstance(sizes, list) and sizes and all(isinstance(s, list) and len(s) == 2 for s in sizes)):
        raise BundleError(f"bundle {where}: {MANIFEST_NAME} is malformed: image_sizes {sizes!r}")
    graphs = manifest["graphs"]
    if not isinstance(graphs, dict):
        raise BundleError(f"bundle {where}: {MANIFEST_NAME} is malformed: graphs is not an object")
    for name in GRAPH_NAMES:
        entry = graphs.get(name)
        if not isinstance(entry, dict) or not {"file", "sha256", "inputs", "outputs"} <= set(entry):
            raise BundleError(f"bundle {where}: {MANIFEST_NAME} is malformed: graph {name!r} missing or incomplete")
    return manifest


def verify_graphs(bundle: Bundle, names: Iterable[str] = GRAPH_NAMES) -> None:
    """Check that each named graph (and its external data) is there with its recorded size and sha256.

    Raises:
        BundleError: a file is missing, truncated or replaced; the message names it.
    """
    for name in names:
        entry = bundle.graph_entry(name)
        files = [(entry["file"], entry["sha256"], entry.get("bytes"))]
        ext = entry.get("external_data")
        if ext:
            files.append((ext["file"], ext["sha256"], ext.get("bytes")))
        for rel, digest, size in files:
            verify_file(bundle.path, rel, digest, size, name)


def verify_file(root: Path, rel: str, digest: str, size: Optional[int], graph: str) -> None:
    """Check one file of the bundle (``rel`` under ``root``) against its recorded size and sha256."""
    f = root / rel
    if not f.is_file():
        raise BundleError(f"bundle {root}: graph {graph!r} file {rel} is missing (re-export the bundle)")
    actual_size = f.stat().st_size
    if size is not None and actual_size != size:
        raise BundleError(
            f"bundle {root}: graph {graph!r} file {rel} has {actual_size} bytes, the manifest records {size} "
            "(truncated or replaced; re-export the bundle)"
        )
    actual = sha256_file(f)
    if actual != digest:
        raise BundleError(
            f"bundle {root}: graph {graph!r} file {rel} has sha256 {actual[:16]}..., the manifest records {digest[:16]}... "
            "(replaced or corrupted; re-export the bundle)"
        )


# ---------------------------------------------------------------- requests
def check_bundle_request(bundle: Bundle, batch: int, height: int, width: int, exact_batch: bool = False,
                         build_hint: Optional[str] = None) -> None:
    """Reject a request the bundle was not exported for.

    Args:
        bundle (`Bundle`): the bundle.
        batch (`int`): images in the request.
        height, width (`int`): image size in pixels.
        exact_batch (`bool`, defaults to False): only the exported batch sizes (static engines);
            otherwise any batch between the smallest and the largest (dynamic graphs).
        build_hint (`str`, optional): the build flag that would also allow it (TensorRT).

    Raises:
        BundleError: the batch or the size is outside what the bundle supports; the message
            names ``--batch-sizes`` or ``--height/--width`` of ``cfgswitch export``.
    """
    bs = bundle.batch_sizes
    ok = batch in bs if exact_batch else bs[0] <= batch <= bs[-1]
    if not ok:
        allowed = ", ".join(map(str, bs)) if exact_batch else f"{bs[0]}..{bs[-1]}"
        hint = f" or {build_hint}" if build_hint else ""
        raise BundleError(
            f"batch size {batch} is not supported by bundle {bundle.path.name} (supported: {allowed}); "
            f"re-export with cfgswitch export --batch-sizes including {batch}{hint}"
        )
    if (height, width) not in bundle.image_sizes:
        allowed = ", ".join(f"{h}x{w}" for h, w in bundle.image_sizes)
        raise BundleError(
            f"image size {height}x{width} is not supported by bundle {bundle.path.name} (supported: {allowed}); "
            f"re-export with cfgswitch export --height {height} --width {width}"
        )


def tensor_table(entries: Iterable[Mapping[str, Any]]) -> Dict[str, Mapping[str, Any]]:
    """``{name: entry}`` of a manifest's tensor list."""
    return {e["name"]: e for e in entries}


__all__ = [
    "BUNDLE_FORMAT", "Bundle", "MANIFEST_NAME", "SCHEMA_VERSION", "check_bundle_request", "check_manifest",
    "read_manifest", "sha256_file", "tensor_table", "verify_file", "verify_graphs",
]
