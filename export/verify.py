"""``--verify``: each exported graph against its torch module, on ONNX Runtime's CPU provider."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, Tuple

import numpy as np
import torch

from cfgswitch.io_specs import GraphSpec

from .wrappers import example_feed

logger = logging.getLogger(__name__)

#: Max abs difference accepted per export dtype (fp32: kernel reordering; fp16: half rounding).
VERIFY_TOLERANCE = {"float32": 1e-3, "float16": 5e-2}


def compare_graph(module: torch.nn.Module, spec: GraphSpec, onnx_file: Path, inputs: Tuple[torch.Tensor, ...],
                  model_dtype: str, threads: int = 0) -> Dict[str, Any]:
    """Run ``module`` and ``onnx_file`` on ``inputs``; return the verify record for the manifest.

    Every output is compared (SDXL's ``text_encoder_2`` has two); the record holds the largest difference.

    Returns:
        ``{"max_abs_diff", "max_abs_reference", "tolerance", "ok", "input_shapes", "provider"}``;
        ``ok`` is False (and ``error`` says why) when ONNX Runtime cannot run the graph.
    """
    import onnxruntime as ort

    record: Dict[str, Any] = {
        "tolerance": VERIFY_TOLERANCE[model_dtype], "provider": "CPUExecutionProvider",
        "input_shapes": {t.name: list(x.shape) for t, x in zip(spec.inputs, inputs)},
    }
    with torch.no_grad():
        out = module(*inputs)
    refs = [o.float().numpy() for o in (out if isinstance(out, (tuple, list)) else (out,))]
    ref = refs[0]
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    try:
        sess = ort.InferenceSession(str(onnx_file), opts, providers=["CPUExecutionProvider"])
        gots = [g.astype(np.float32) for g in sess.run(spec.output_names[:len(refs)], example_feed(spec, inputs))]
    except Exception as e:  # ORT raises its own exception types (e.g. NOT_IMPLEMENTED for fp16 kernels)
        record.update(ok=False, max_abs_diff=None, max_abs_reference=float(np.abs(ref).max()),
                      error=f"{type(e).__name__}: {str(e).splitlines()[0][:300]}")
        logger.warning("verify %s: ONNX Runtime could not run it: %s", spec.name, record["error"])
        return record
    diff = max(float(np.abs(g - r).max()) for g, r in zip(gots, refs))
    finite = all(bool(np.isfinite(g).all()) for g in gots)
    record.update(max_abs_diff=diff, max_abs_reference=max(float(np.abs(r).max()) for r in refs),
                  ok=finite and diff <= record["tolerance"])
    log = logger.info if record["ok"] else logger.warning
    log("verify %s: max abs diff %.3g (tolerance %.0e)%s", spec.name, diff, record["tolerance"],
        "" if record["ok"] else " FAILED")
    return record


__all__ = ["VERIFY_TOLERANCE", "compare_graph"]
