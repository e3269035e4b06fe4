"""``config.pbtxt`` files through Triton's own model-config protobuf (``tritonclient.grpc.model_config_pb2``).

Every file is written with ``google.protobuf.text_format`` from a ``ModelConfig`` message and
parsed back before it is kept, so a repository never holds a configuration Triton's parser
would refuse.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Iterable, Optional, Sequence

from ..errors import BackendUnavailableError, BundleError
from .protocol import TensorInfo

#: Triton dtype names (as clients write them) to model-config enum names.
_TYPE = {"BYTES": "TYPE_STRING", "INT64": "TYPE_INT64", "INT32": "TYPE_INT32", "FP32": "TYPE_FP32",
         "FP16": "TYPE_FP16", "UINT8": "TYPE_UINT8"}
#: Bundle dtype names to Triton dtype names.
BUNDLE_TO_TRITON = {"float32": "FP32", "float16": "FP16", "int64": "INT64", "int32": "INT32"}


def pb():
    """The ``model_config_pb2`` module and ``text_format`` (raises if tritonclient is missing)."""
    try:
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2
    except ImportError as e:
        raise BackendUnavailableError(f"writing a Triton repository needs tritonclient[grpc] ({e}); "
                                      "install 'cfgswitch[serve]'") from e
    return model_config_pb2, text_format


def new_config(name: str, *, backend: Optional[str] = None, platform: Optional[str] = None, max_batch_size: int = 0):
    """An empty ``ModelConfig`` message for model ``name``."""
    mc, _ = pb()
    cfg = mc.ModelConfig(name=name, max_batch_size=max_batch_size)
    if backend:
        cfg.backend = backend
    if platform:
        cfg.platform = platform
    return cfg


def add_tensor(cfg, kind: str, name: str, triton_dtype: str, dims: Sequence[int], optional: bool = False) -> None:
    """Add an ``input`` (``kind="input"``) or ``output`` entry."""
    mc, _ = pb()
    entry = (cfg.input if kind == "input" else cfg.output).add()
    entry.name = name
    entry.data_type = mc.DataType.Value(_TYPE[triton_dtype])
    entry.dims.extend(int(d) for d in dims)
    if optional and kind == "input":
        entry.optional = True


def add_protocol(cfg, inputs: Iterable[TensorInfo], outputs: Iterable[TensorInfo]) -> None:
    """Add the served model's inputs (optional where the protocol says) and outputs."""
    for t in inputs:
        add_tensor(cfg, "input", t.name, t.triton_dtype, t.dims, t.optional)
    for t in outputs:
        add_tensor(cfg, "output", t.name, t.triton_dtype, t.dims)


def add_instances(cfg, kind: str, count: int = 1, profiles: Sequence[int] = ()) -> None:
    """Add an ``instance_group`` (``kind``: ``KIND_CPU`` / ``KIND_GPU``; TensorRT ``profile`` indices)."""
    mc, _ = pb()
    group = cfg.instance_group.add()
    group.kind = mc.ModelInstanceGroup.Kind.Value(kind)
    group.count = count
    group.profile.extend(str(p) for p in profiles)


def set_parameters(cfg, params: Dict[str, Any]) -> None:
    """Set string ``parameters`` (Python-backend models read them in ``initialize``)."""
    for key, value in params.items():
        cfg.parameters[key].string_value = str(value)


def to_text(cfg) -> str:
    """The ``config.pbtxt`` text of a message."""
    _, text_format = pb()
    return text_format.MessageToString(cfg)


def parse_config(text: str):
    """Parse ``config.pbtxt`` text with Triton's protobuf (raises :class:`BundleError` on a bad file)."""
    mc, text_format = pb()
    try:
        return text_format.Parse(text, mc.ModelConfig())
    except text_format.ParseError as e:
        raise BundleError(f"config.pbtxt does not parse as a Triton ModelConfig: {e}") from None


def write_config(model_dir: Path, cfg) -> Path:
    """Write ``model_dir/config.pbtxt`` and check that it parses back to the same message."""
    text = to_text(cfg)
    if parse_config(text) != cfg:  # pragma: no cover - protobuf round trip
        raise BundleError(f"config of {cfg.name}: the written text does not parse back to the same configuration")
    model_dir.mkdir(parents=True, exist_ok=True)
    path = model_dir / "config.pbtxt"
    path.write_text(text)
    return path


def read_config(path: Path):
    """Parse a ``config.pbtxt`` file."""
    return parse_config(Path(path).read_text())


__all__ = ["BUNDLE_TO_TRITON", "add_instances", "add_protocol", "add_tensor", "new_config", "parse_config", "pb",
           "read_config", "set_parameters", "to_text", "write_config"]
