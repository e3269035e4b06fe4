"""One torch module to one checked ONNX file (TorchScript exporter, external data over 2 GB)."""

from __future__ import annotations

import logging
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

import torch

from cfgswitch.io_specs import GraphSpec

logger = logging.getLogger(__name__)

#: Protobuf's hard limit: bigger graphs keep their weights in an external data file.
PROTOBUF_LIMIT = 2**31 - 1
#: Weights above this many bytes go to external data (leave room for the graph itself).
EXTERNAL_DATA_THRESHOLD = 2**31 - 2**26


@dataclass(frozen=True)
class ExportedGraph:
    """What was written for one graph.

    Attributes:
        onnx_file (`Path`): the ``.onnx`` file.
        external_data (`Path`, optional): its single external data file, when over 2 GB.
        weight_bytes (`int`): bytes of initializers.
    """

    onnx_file: Path
    external_data: Optional[Path]
    weight_bytes: int


def _initializer_bytes(model) -> int:
    return sum(len(t.raw_data) for t in model.graph.initializer if t.raw_data)


def _default_permissions(path: Path) -> None:
    """onnx writes external data as 0600; give it the mode any new file gets (umask), like the .onnx."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def _stamp_interface(model, spec: GraphSpec) -> None:
    """Write the io_specs shapes (ints and symbols) onto the graph's inputs and outputs.

    The exporter names some derived axes itself (CLIP's sequence axis comes out symbolic);
    the declared interface is the one runtimes and TensorRT profiles rely on.
    """
    declared = {t.name: t for t in spec.inputs + spec.outputs}
    for vi in list(model.graph.input) + list(model.graph.output):
        t = declared.get(vi.name)
        if t is None:
            continue
        dims = vi.type.tensor_type.shape.dim
        if len(dims) != len(t.shape):
            raise RuntimeError(f"{spec.name}.{vi.name}: exported with rank {len(dims)}, io_specs declares {len(t.shape)}")
        for d, want in zip(dims, t.shape):
            if isinstance(want, int):
                d.ClearField("dim_param")
                d.dim_value = want
            else:
                d.ClearField("dim_value")
                d.dim_param = want


def export_graph(module: torch.nn.Module, spec: GraphSpec, inputs: Tuple[torch.Tensor, ...], path: Path,
                 opset: int = 17) -> ExportedGraph:
    """Export ``module`` called on ``inputs`` to ``path`` with the names and dynamic axes of ``spec``.

    The TorchScript exporter (``dynamo=False``) is used: fast, and it handles the diffusers UNet.
    A graph whose weights exceed 2 GB is re-saved with all its weights in one external file
    ``<name>.onnx.data`` beside it. Every graph passes ``onnx.checker`` (by path, so external
    data is checked too).

    Args:
        module (`torch.nn.Module`): a wrapper from :mod:`cfgswitch.export.wrappers`.
        spec (`GraphSpec`): the graph's interface.
        inputs (`tuple[torch.Tensor]`): example inputs, in ``spec.inputs`` order.
        path (`Path`): the ``.onnx`` file to write (its folder must exist).
        opset (`int`, defaults to 17): ONNX opset.
    """
    import onnx

    raw_dir = path.parent / f".{spec.name}-raw"
    raw_dir.mkdir(parents=True, exist_ok=True)
    raw = raw_dir / path.name
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module, inputs, str(raw), input_names=spec.input_names, output_names=spec.output_names,
                dynamic_axes=spec.dynamic_axes(), opset_version=opset, do_constant_folding=True, dynamo=False,
            )
        model = onnx.load(str(raw), load_external_data=True)
        _stamp_interface(model, spec)
        weight_bytes = _initializer_bytes(model)
        external: Optional[Path] = None
        if weight_bytes > EXTERNAL_DATA_THRESHOLD:
            external = path.with_name(path.name + ".data")
            onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=external.name, size_threshold=1024)
            _default_permissions(external)
        else:
            onnx.save_model(model, str(path))
        del model
    finally:
        shutil.rmtree(raw_dir, ignore_errors=True)
    onnx.checker.check_model(str(path))
    logger.debug("exported %s (%.1f MB of weights%s)", path.name, weight_bytes / 1e6,
                 ", external data" if external else "")
    return ExportedGraph(path, external, weight_bytes)


__all__ = ["EXTERNAL_DATA_THRESHOLD", "ExportedGraph", "export_graph"]
