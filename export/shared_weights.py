"""One copy of the UNet weights in a bundle: ``unet.onnx`` and ``unet_cfg.onnx`` share one external-data file.

The two UNet graphs carry the same weights (the guided graph is the plain UNet on 2B rows
plus the combine), but after constant folding the exporter may name the same tensor
differently in each. So initializers are matched by **content** (dtype and bytes), not by
name: every initializer of at least :data:`EXTERNAL_MIN_BYTES` bytes of either graph is
written once into :data:`SHARED_WEIGHTS_FILE`, and both graphs point at it through ONNX's
external data (``location``, ``offset``, ``length``). Smaller initializers (shapes, scalars)
stay inside each ``.onnx``. The rule is the same for every model size, so the tiny test
bundles exercise the layout a full SD 1.5 bundle has.

Tensors of at least :data:`PAGE_ALIGN_MIN_BYTES` start on a 4096-byte boundary (ONNX
Runtime memory-maps such external initializers on the CPU instead of reading them into its
heap); smaller ones on a 64-byte boundary (enough for any dtype view).
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

from cfgswitch.bundle import sha256_file

logger = logging.getLogger(__name__)

#: The graphs that share one weights file.
SHARED_GRAPHS: Tuple[str, ...] = ("unet", "unet_cfg")
#: File name of the shared UNet weights inside the bundle.
SHARED_WEIGHTS_FILE = "unet_weights.onnx.data"
#: Initializers of at least this many bytes go to the shared file (onnx's own default threshold).
EXTERNAL_MIN_BYTES = 1024
#: Initializers of at least this many bytes start on a page boundary (memory-mappable).
PAGE_ALIGN_MIN_BYTES = 65536
PAGE = 4096
SMALL_ALIGN = 64


def _tensor_bytes(tensor: Any, base: Path, files: Dict[str, Any]) -> Optional[bytes]:
    """The little-endian bytes of an initializer, wherever it keeps them (None: not a plain numeric tensor)."""
    from onnx import TensorProto, numpy_helper

    if tensor.data_type in (TensorProto.STRING, TensorProto.UNDEFINED):
        return None
    if tensor.data_location == TensorProto.EXTERNAL:
        info = {e.key: e.value for e in tensor.external_data}
        loc = info["location"]
        fh = files.get(loc)
        if fh is None:
            fh = files[loc] = open(base / loc, "rb")
        fh.seek(int(info.get("offset", 0)))
        length = info.get("length")
        return fh.read(int(length)) if length is not None else fh.read()
    if tensor.HasField("raw_data"):
        return tensor.raw_data
    arr = numpy_helper.to_array(tensor)
    return arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()


def _set_external(tensor: Any, location: str, offset: int, length: int) -> None:
    from onnx import TensorProto

    for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data"):
        tensor.ClearField(field)
    del tensor.external_data[:]
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


def _set_inline(tensor: Any, data: bytes) -> None:
    from onnx import TensorProto

    del tensor.external_data[:]
    tensor.data_location = TensorProto.DEFAULT
    tensor.raw_data = data


def external_locations(model: Any) -> List[str]:
    """The distinct external-data files the initializers of an ``onnx.ModelProto`` name."""
    from onnx import TensorProto

    seen: List[str] = []
    for t in model.graph.initializer:
        if t.data_location == TensorProto.EXTERNAL:
            loc = next(e.value for e in t.external_data if e.key == "location")
            if loc not in seen:
                seen.append(loc)
    return seen


class _SharedWriter:
    """Appends each distinct (dtype, bytes) once to the shared file, page-aligning the large ones."""

    def __init__(self, fh) -> None:
        self.fh = fh
        self.offset = 0
        self.index: Dict[Tuple[int, bytes], Tuple[int, int]] = {}
        self.logical = 0

    def place(self, data_type: int, data: bytes) -> Tuple[int, int]:
        self.logical += len(data)
        key = (data_type, hashlib.sha256(data).digest())
        found = self.index.get(key)
        if found is not None:
            return found
        align = PAGE if len(data) >= PAGE_ALIGN_MIN_BYTES else SMALL_ALIGN
        pad = -self.offset % align
        if pad:
            self.fh.write(b"\0" * pad)
            self.offset += pad
        self.fh.write(data)
        self.index[key] = (self.offset, len(data))
        self.offset += len(data)
        return self.index[key]


def share_unet_weights(root: Path, graphs: Dict[str, Dict[str, Any]],
                       names: Sequence[str] = SHARED_GRAPHS, check: bool = True) -> Optional[Path]:
    """Make the exported ``unet`` and ``unet_cfg`` graphs under ``root`` share one weights file.

    Each graph is read without its weights, its initializers (embedded or in its own
    external file) are streamed one at a time into ``root / SHARED_WEIGHTS_FILE``,
    deduplicated by content, and the graph is rewritten to point there; the graphs' former
    external-data files are removed. Both graphs are then checked by ``onnx.checker`` (by
    path, so the external data is checked too). Peak memory is one tensor.

    Args:
        root (`Path`): the bundle folder being written.
        graphs (`dict`): the manifest's graph entries by name (updated in place: ``sha256``
            and ``bytes`` of the rewritten ``.onnx``, and ``external_data`` = ``{file, sha256,
            bytes}`` of the shared file, the same record in both entries).
        names (`Sequence[str]`, defaults to ``("unet", "unet_cfg")``): the graphs to share.
        check (`bool`, defaults to True): run ``onnx.checker`` on the rewritten graphs (off for
            ONNX Runtime's optimized graphs, whose contrib operators onnx does not know).

    Returns:
        The shared file, or ``None`` when fewer than two of ``names`` were exported.
    """
    import onnx

    root = Path(root)
    present = [n for n in names if n in graphs]
    if len(present) < 2:
        return None
    target = root / SHARED_WEIGHTS_FILE
    partial = target.with_name(f".{target.name}.partial")
    old_files: List[Path] = []
    rewritten: List[Tuple[Path, Path]] = []
    files: Dict[str, Any] = {}
    try:
        with open(partial, "wb") as out:
            writer = _SharedWriter(out)
            for name in present:
                path = root / graphs[name]["file"]
                model = onnx.load(str(path), load_external_data=False)
                old_files += [path.parent / loc for loc in external_locations(model)]
                for tensor in model.graph.initializer:
                    data = _tensor_bytes(tensor, path.parent, files)
                    if data is None:
                        continue
                    if len(data) < EXTERNAL_MIN_BYTES:
                        _set_inline(tensor, data)
                        continue
                    offset, length = writer.place(tensor.data_type, data)
                    _set_external(tensor, os.path.relpath(target, path.parent), offset, length)
                staged = path.with_name(f".{path.name}.shared")
                onnx.save_model(model, str(staged))
                rewritten.append((staged, path))
                del model
            out.flush()
            os.fsync(out.fileno())
        for fh in files.values():
            fh.close()
        files.clear()
        os.replace(partial, target)
        _default_permissions(target)
        for staged, path in rewritten:
            os.replace(staged, path)
        for f in set(old_files):
            if f.resolve() != target.resolve():
                f.unlink(missing_ok=True)
    except BaseException:
        for fh in files.values():
            fh.close()
        partial.unlink(missing_ok=True)
        for staged, _ in rewritten:
            staged.unlink(missing_ok=True)
        raise
    record = {"file": target.relative_to(root).as_posix(), "sha256": sha256_file(target), "bytes": target.stat().st_size}
    for name in present:
        path = root / graphs[name]["file"]
        if check:
            onnx.checker.check_model(str(path))
        graphs[name].update(sha256=sha256_file(path), bytes=path.stat().st_size, external_data=dict(record))
    logger.info("unet weights stored once: %s, %.1f MB (%.1f MB referenced by %s)", target.name, record["bytes"] / 1e6,
                writer.logical / 1e6, " and ".join(present))
    return target


def _default_permissions(path: Path) -> None:
    from .onnx_export import _default_permissions as default_permissions

    default_permissions(path)


def shared_tensors(model_path: Path) -> Iterator[Tuple[str, str, int, int, int, Tuple[int, ...]]]:
    """``(name, location, offset, length, onnx data type, dims)`` of each external initializer of a graph file."""
    import onnx
    from onnx import TensorProto

    model = onnx.load(str(model_path), load_external_data=False)
    for t in model.graph.initializer:
        if t.data_location != TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in t.external_data}
        yield (t.name, info["location"], int(info.get("offset", 0)), int(info["length"]), t.data_type, tuple(t.dims))


__all__ = ["EXTERNAL_MIN_BYTES", "PAGE_ALIGN_MIN_BYTES", "SHARED_GRAPHS", "SHARED_WEIGHTS_FILE", "external_locations",
           "share_unet_weights", "shared_tensors"]
