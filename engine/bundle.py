"""Reading and checking an exported bundle (``manifest.json`` and the files it names).

The runtime side of a bundle: it never imports the exporter. Every problem is a
:class:`~cfgswitch.errors.BundleError` that names the file and what is wrong; a
request the bundle cannot serve names the export flag that would allow it.

A bundle is sealed: every file its manifest names (graphs, external data, tokenizer,
scheduler config, TensorRT plans) must resolve, after symlinks, inside the bundle folder,
and the tokenizer files and the scheduler config are checked against the sha256 the
manifest records in ``files`` (the graphs and plans carry their own). A manifest without
``files`` was written before the seal and is refused with a re-export hint.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

from .errors import BundleError, InvalidArgumentError
from .io_specs import graph_specs
from .model_spec import ModelSpec

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
#: Manifest key of the sha256 and size of every tokenizer file and of the scheduler config.
FILES_KEY = "files"


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
    def dims(self) -> ModelSpec:
        """The model's :class:`~cfgswitch.model_spec.ModelSpec` as the manifest records it (what
        :mod:`cfgswitch.io_specs` builds the graph tables from)."""
        return ModelSpec.from_manifest(self.manifest, name=self.name)

    @property
    def family(self) -> str:
        """The model family the bundle was exported for (``sd1`` for manifests that predate the key)."""
        return str(self.manifest.get("family", "sd1"))

    @property
    def graph_names(self) -> List[str]:
        """The graphs of the bundle's family, in export order."""
        return list(graph_specs(self.dims))

    @property
    def tokenizer_keys(self) -> List[str]:
        """Manifest keys of the bundle's tokenizer folders (``tokenizer``; SDXL adds ``tokenizer_2``)."""
        return [k for k in ("tokenizer", "tokenizer_2") if k in self.manifest]

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
        factor = int(self.manifest["dims"]["vae_scale_factor"])
        h, w = self.image_sizes[0]
        sample = h // factor if h == w else int(self.manifest["sample_size"])
        return ModelSpec.from_manifest(self.manifest, name=self.name, sample_size=sample)

    def graph_entry(self, name: str) -> Dict[str, Any]:
        """The manifest entry of graph ``name``."""
        try:
            return self.manifest["graphs"][name]
        except KeyError:
            raise BundleError(f"bundle {self.path}: manifest.json has no graph {name!r} (re-export the bundle)") from None

    def graph_path(self, name: str) -> Path:
        """Path of graph ``name``'s ONNX file (checked to lie inside the bundle)."""
        return bundle_file(self.path, self.graph_entry(name)["file"], f"graphs.{name}.file")

    def scheduler_config(self) -> Dict[str, Any]:
        """The model's scheduler config, checked against its recorded sha256 before it is parsed."""
        rel = self.manifest["scheduler_config"]
        p = bundle_file(self.path, rel, "scheduler_config")
        try:
            data = p.read_bytes()
        except (FileNotFoundError, IsADirectoryError):
            raise BundleError(f"bundle {self.path}: missing {rel} (re-export the bundle)") from None
        check_recorded(self, rel, hashlib.sha256(data).hexdigest(), len(data), "scheduler config")
        try:
            return json.loads(data.decode("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BundleError(f"bundle {self.path}: {rel} is not valid JSON ({e})") from None

    def tokenizer_files(self, key: str = "tokenizer") -> Dict[str, Path]:
        """``{manifest path: file}`` of a tokenizer folder, each checked against its recorded sha256.

        Args:
            key (`str`, defaults to ``"tokenizer"``): the manifest key of the folder (SDXL bundles
                also have ``tokenizer_2``).

        Raises:
            BundleError: the folder is missing, a file is missing, changed, not recorded in the
                manifest, or resolves outside the bundle.
        """
        if key not in self.manifest:
            raise BundleError(f"bundle {self.path}: {MANIFEST_NAME} names no {key} folder (re-export the bundle)")
        rel = str(self.manifest[key])
        d = bundle_file(self.path, rel, key)
        if not d.is_dir():
            raise BundleError(f"bundle {self.path}: missing {key} folder {rel}/ (re-export the bundle)")
        prefix = rel.rstrip("/") + "/"
        recorded = {k for k in self.manifest[FILES_KEY] if k.startswith(prefix)}
        present: Dict[str, Path] = {}
        for f in sorted((self.path / rel).rglob("*")):
            if f.is_dir():
                continue
            key = prefix + f.relative_to(self.path / rel).as_posix()
            present[key] = bundle_file(self.path, key, f"tokenizer file {key}")
        for key in sorted(set(present) - recorded):
            raise BundleError(f"bundle {self.path}: tokenizer file {key} is not recorded in {MANIFEST_NAME} "
                              "(added after the export; re-export the bundle)")
        for key in sorted(recorded - set(present)):
            raise BundleError(f"bundle {self.path}: tokenizer file {key} is missing (re-export the bundle)")
        for key, f in present.items():
            check_recorded(self, key, sha256_file(f), f.stat().st_size, "tokenizer file")
        return present

    def load_tokenizer(self, key: str = "tokenizer"):
        """A CLIP tokenizer saved in the bundle (its files checked first, see :meth:`tokenizer_files`)."""
        from transformers import CLIPTokenizer

        self.tokenizer_files(key)
        d = self.path / self.manifest[key]
        try:
            return CLIPTokenizer.from_pretrained(d)
        except (OSError, ValueError) as e:
            raise BundleError(f"bundle {self.path}: cannot load the {key.replace('_', ' ')} from {d.name}/: {e}") from e

    def family_extras(self) -> Dict[str, Any]:
        """What the family's text recipe needs beside the runners and the first tokenizer
        (SDXL: ``tokenizer_2`` and ``force_zeros_for_empty_prompt``); empty for SD 1.x/2.x."""
        extras: Dict[str, Any] = {}
        if "tokenizer_2" in self.manifest:
            extras["tokenizer_2"] = self.load_tokenizer("tokenizer_2")
        if "force_zeros_for_empty_prompt" in self.manifest:
            extras["force_zeros_for_empty_prompt"] = bool(self.manifest["force_zeros_for_empty_prompt"])
        return extras

    def engines(self, layout: Optional[str] = None) -> Dict[str, Any]:
        """The TensorRT engines recorded by ``cfgswitch build`` (all layouts, or one)."""
        engines = self.manifest.get("engines") or {}
        return engines if layout is None else engines.get(layout, {})


# ---------------------------------------------------------------- reading
def read_manifest(path: "str | Path", family: Optional[str] = None) -> Bundle:
    """Read and check ``path/manifest.json``.

    Args:
        path (`str` or `Path`): the bundle directory.
        family (`str`, optional): the model family the caller expects (``sd1``, ``sd2``,
            ``sdxl``); a bundle exported for another is refused.

    Raises:
        BundleError: the directory is missing, the manifest is missing, not JSON, not a
            cfgswitch manifest, of an unknown schema version, lacks a required entry, was
            exported for another family than ``family``, or its graphs are not its family's.
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
    bundle = Bundle(p, check_manifest(manifest, p))
    check_paths(bundle)
    if family is not None:
        check_family(bundle, family)
    return bundle


def check_family(bundle: Bundle, family: str) -> None:
    """Refuse a bundle exported for another model family than ``family``.

    Raises:
        BundleError: the bundle's family is not ``family`` (the message names both).
    """
    if bundle.family != family:
        raise BundleError(f"bundle {bundle.path}: exported for the {bundle.family} family, loaded as {family} "
                          f"(refused; export the {family} model into its own bundle)")


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
    if not isinstance(manifest["dims"], dict):
        raise BundleError(f"bundle {where}: {MANIFEST_NAME} is malformed: dims is not an object")
    for key in ("latent_channels", "vae_scale_factor", "text_length", "text_width"):
        if not isinstance(manifest["dims"].get(key), int):
            raise BundleError(f"bundle {where}: {MANIFEST_NAME} is malformed: dims.{key} missing or not an integer")
    spec = _manifest_spec(manifest, where)
    bs, sizes = manifest["batch_sizes"], manifest["image_sizes"]
    if not (isinstance(bs, list) and bs and all(isinstance(b, int) and b >= 1 for b in bs)):
        raise BundleError(f"bundle {where}: {MANIFEST_NAME} is malformed: batch_sizes {bs!r}")
    if not (isinstance(sizes, list) and sizes and all(isinstance(s, list) and len(s) == 2 for s in sizes)):
        raise BundleError(f"bundle {where}: {MANIFEST_NAME} is malformed: image_sizes {sizes!r}")
    graphs = manifest["graphs"]
    if not isinstance(graphs, dict):
        raise BundleError(f"bundle {where}: {MANIFEST_NAME} is malformed: graphs is not an object")
    table = graph_specs(spec)
    for name, gspec in table.items():
        entry = graphs.get(name)
        if not isinstance(entry, dict) or not {"file", "sha256", "inputs", "outputs"} <= set(entry):
            raise BundleError(f"bundle {where}: {MANIFEST_NAME} is malformed: graph {name!r} missing or incomplete")
        _check_graph_family(entry, gspec, spec.family, where)
    extra = sorted(set(graphs) - set(table))
    if extra:
        raise BundleError(f"bundle {where}: {MANIFEST_NAME} records graphs {', '.join(extra)} that a {spec.family} "
                          f"bundle does not have (exported for another family; re-export the bundle)")
    files = manifest.get(FILES_KEY)
    if files is None:
        raise BundleError(
            f"bundle {where}: {MANIFEST_NAME} records no sha256 of the tokenizer and scheduler config (written by an "
            f"older cfgswitch, before bundles were sealed); re-export the bundle: cfgswitch export MODEL_DIR --out {where}"
        )
    if not (isinstance(files, dict) and all(isinstance(v, dict) and isinstance(v.get("sha256"), str) for v in files.values())):
        raise BundleError(f"bundle {where}: {MANIFEST_NAME} is malformed: {FILES_KEY} is not an object of sha256 records")
    for key in ("tokenizer_2",) if spec.family == "sdxl" else ():
        if key not in manifest:
            raise BundleError(f"bundle {where}: {MANIFEST_NAME} is malformed: a {spec.family} bundle needs {key}")
    if manifest["scheduler_config"] not in files:
        raise BundleError(f"bundle {where}: {MANIFEST_NAME} is malformed: {FILES_KEY} has no record of the scheduler "
                          f"config {manifest['scheduler_config']!r}")
    return manifest


def _manifest_spec(manifest: Dict[str, Any], where: Any) -> ModelSpec:
    """The manifest's :class:`ModelSpec`, refused when its family is unknown or its dims malformed."""
    from .families import FAMILIES

    family = manifest.get("family", "sd1")
    if family not in FAMILIES:
        raise BundleError(f"bundle {where}: {MANIFEST_NAME} names the model family {family!r}; this cfgswitch "
                          f"supports {', '.join(FAMILIES)} (re-export the bundle, or upgrade cfgswitch)")
    try:
        return ModelSpec.from_manifest(manifest)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise BundleError(f"bundle {where}: {MANIFEST_NAME} is malformed: dims ({type(e).__name__}: {e})") from None
    except InvalidArgumentError as e:  # pragma: no cover - the family name was checked above
        raise BundleError(f"bundle {where}: {e}") from None


def _check_graph_family(entry: Dict[str, Any], gspec: Any, family: str, where: Any) -> None:
    """The recorded inputs and outputs of one graph must be the family's (names in order)."""
    for side, want in (("inputs", gspec.input_names), ("outputs", gspec.output_names)):
        got = [t.get("name") for t in entry[side] if isinstance(t, dict)] if isinstance(entry[side], list) else None
        if got != want:
            raise BundleError(
                f"bundle {where}: graph {gspec.name!r} has {side} {got}, a {family} bundle's are {want} "
                f"(the manifest's family is {family!r}: exported for another family, or edited; re-export the bundle)"
            )


# ---------------------------------------------------------------- the seal
def bundle_file(root: Path, rel: Any, entry: str) -> Path:
    """``root / rel``, refused unless it resolves (after symlinks) inside ``root``.

    Args:
        root (`Path`): the bundle directory.
        rel (`str`): a path as the manifest records it (relative, ``/``-separated).
        entry (`str`): the manifest entry that names it (for the message).

    Raises:
        BundleError: ``rel`` is not a non-empty relative path, or it (or a symlink on the way)
            leads outside the bundle; the message names the entry.
    """
    if not isinstance(rel, str) or not rel or "\0" in rel:
        raise BundleError(f"bundle {root}: manifest entry {entry} is not a file path inside the bundle (got {rel!r})")
    if Path(rel).is_absolute():
        raise BundleError(f"bundle {root}: manifest entry {entry} names the absolute path {rel!r}; "
                          "a bundle names only files inside itself (refused)")
    base = root.resolve()
    target = (root / rel).resolve()
    if target != base and base not in target.parents:
        how = "" if ".." in Path(rel).parts else "through a symlink "
        raise BundleError(f"bundle {root}: manifest entry {entry} ({rel}) resolves {how}outside the bundle "
                          "(refused; a bundle names only files inside itself)")
    return root / rel


def _named_files(bundle: Bundle) -> List[Tuple[str, Any]]:
    """``(entry, path)`` of every file and folder the manifest names."""
    m = bundle.manifest
    named: List[Tuple[str, Any]] = [(k, m[k]) for k in bundle.tokenizer_keys] + [("scheduler_config", m["scheduler_config"])]
    for name, entry in m["graphs"].items():
        named.append((f"graphs.{name}.file", entry.get("file")))
        if entry.get("external_data"):
            named.append((f"graphs.{name}.external_data.file", entry["external_data"].get("file")))
    for role, entry in (m.get("roles") or {}).items():
        if isinstance(entry, dict) and "file" in entry:
            named.append((f"roles.{role}.file", entry["file"]))
    for layout, rec in (m.get("engines") or {}).items():
        for plan, entry in ((rec or {}).get("plans") or {}).items():
            named.append((f"engines.{layout}.plans.{plan}.file", (entry or {}).get("file")))
    named += [(f"{FILES_KEY}[{rel!r}]", rel) for rel in m[FILES_KEY]]
    return named


def check_paths(bundle: Bundle) -> None:
    """Refuse a manifest that names any file outside the bundle (see :func:`bundle_file`)."""
    for entry, rel in _named_files(bundle):
        bundle_file(bundle.path, rel, entry)


def check_recorded(bundle: Bundle, rel: str, digest: str, size: int, what: str) -> None:
    """Compare a file's sha256 and size with its record in the manifest's ``files``."""
    record = bundle.manifest[FILES_KEY].get(rel)
    if record is None:
        raise BundleError(f"bundle {bundle.path}: {what} {rel} has no sha256 in {MANIFEST_NAME} (re-export the bundle)")
    size_ok = record.get("bytes") is None or record["bytes"] == size
    if not size_ok or record["sha256"] != digest:
        raise BundleError(
            f"bundle {bundle.path}: {what} {rel} has sha256 {digest[:16]}..., the manifest records "
            f"{record['sha256'][:16]}... (edited or replaced; re-export the bundle)"
        )


def verify_graphs(bundle: Bundle, names: Optional[Iterable[str]] = None) -> None:
    """Check that each named graph (every graph of the bundle's family by default), and its
    external data, is there with its recorded size and sha256.

    Raises:
        BundleError: a file is missing, truncated or replaced; the message names it.
    """
    seen = set()  # unet and unet_cfg share one weights file: hash it once
    for name in (bundle.graph_names if names is None else names):
        entry = bundle.graph_entry(name)
        files = [(entry["file"], entry["sha256"], entry.get("bytes"))]
        ext = entry.get("external_data")
        if ext:
            files.append((ext["file"], ext["sha256"], ext.get("bytes")))
        for record in files:
            if record in seen:
                continue
            verify_file(bundle.path, *record, name)
            seen.add(record)


def verify_file(root: Path, rel: str, digest: str, size: Optional[int], graph: str) -> None:
    """Check one file of the bundle (``rel`` under ``root``, never outside it) against its recorded size and sha256."""
    f = bundle_file(root, rel, f"graph {graph!r} file")
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
    "BUNDLE_FORMAT", "Bundle", "FILES_KEY", "MANIFEST_NAME", "SCHEMA_VERSION", "bundle_file", "check_bundle_request",
    "check_family", "check_manifest", "check_paths", "check_recorded", "read_manifest", "sha256_file", "tensor_table", "verify_file",
    "verify_graphs",
]
