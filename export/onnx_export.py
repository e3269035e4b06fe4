"""One torch module to one checked ONNX file (TorchScript exporter, external data over 2 GB)."""

from __future__ import annotations

import logging
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
    from onnx import numpy_helper  # noqa: F401  (import keeps onnx's helpers loaded)

    total = 0
    for t in model.graph.initializer:
        total += len(t.raw_data) if t.raw_data else 0
    return total


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
        weight_bytes = _initializer_bytes(model)
        external: Optional[Path] = None
        if weight_bytes > EXTERNAL_DATA_THRESHOLD:
            external = path.with_name(path.name + ".data")
            onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=external.name, size_threshold=1024)
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
