"""What the ``cfgswitch_pipeline`` Python-backend model does inside Triton.

``onnxruntime`` repositories run the bundle in-process (``Sampler.load(bundle,
backend="onnxruntime")``); ``tensorrt`` repositories run the same switching loop with
runners that call the repository's engine models over BLS (:mod:`.bls_runners`).
Each request is checked on its own: a bad one gets its own error response and the rest
of the dynamic batch runs.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from ..errors import BundleError, CfgSwitchError
from .batching import parse_request, run_batch
from .limits import ServeLimits
from .protocol import INPUT_NAMES, OUTPUTS

logger = logging.getLogger(__name__)

#: ``engines`` values of the pipeline model's parameters.
PIPELINE_ENGINES = ("onnxruntime", "tensorrt", "onnxruntime-bls")


class PipelineBackend:
    """A sampler and the server's limits, answering Triton requests.

    Args:
        sampler (`Sampler`): runs the images.
        limits (`ServeLimits`): per-request limits and defaults.
    """

    def __init__(self, sampler: Any, limits: ServeLimits) -> None:
        self.sampler = sampler
        self.limits = limits

    @classmethod
    def from_parameters(cls, version_dir: Path, params: Dict[str, str], config: Optional[Dict[str, Any]] = None) -> "PipelineBackend":
        """Build from the model's ``parameters`` (``engines``, ``bundle``, ``limits``, ``models``, ``threads``).

        Args:
            version_dir (`Path`): the model's version folder (holds ``model.py`` and ``bundle/``).
            params (`dict`): the string parameters of ``config.pbtxt``.
            config (`dict`, optional): the whole model configuration (for logs).
        """
        engines = params.get("engines", "")
        if engines not in PIPELINE_ENGINES:
            raise BundleError(f"cfgswitch_pipeline: parameter engines must be one of {', '.join(PIPELINE_ENGINES)}, "
                              f"got {engines!r}")
        bundle_dir = version_dir / params.get("bundle", "bundle")
        limits = ServeLimits.from_json(json.loads(params.get("limits", "{}")))
        if engines == "onnxruntime":
            from ..sampler import Sampler

            threads = int(params["threads"]) if params.get("threads") else None
            sampler = Sampler.load(bundle_dir, backend="onnxruntime", threads=threads)
        else:
            from .bls_runners import bls_sampler

            sampler = bls_sampler(bundle_dir, json.loads(params.get("models", "{}")), params.get("layout", "two-engines"),
                                  backend=engines, exact_batch=params.get("exact_batch") == "1")
        logger.info("cfgswitch_pipeline: %s engines, bundle %s", engines, bundle_dir)
        return cls(sampler, limits)

    def execute(self, requests: List[Any], pb_utils: Any) -> List[Any]:
        """One response per request: images for good ones, an error for bad ones."""
        spec = self.sampler.spec
        responses: List[Any] = [None] * len(requests)
        good, parsed = [], []
        for i, request in enumerate(requests):
            data = {}
            for name in INPUT_NAMES:
                tensor = pb_utils.get_input_tensor_by_name(request, name)
                if tensor is not None:
                    data[name] = tensor.as_numpy()
            try:
                parsed.append(parse_request(data, limits=self.limits, default_size=spec.default_size,
                                            vae_factor=spec.vae_scale_factor, check_request=self.sampler.runners.check_request))
                good.append(i)
            except CfgSwitchError as e:
                responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(f"{type(e).__name__}: {e}"))
        if good:
            try:
                outputs = run_batch(self.sampler, parsed, self.limits.max_batch)
            except CfgSwitchError as e:
                outputs = [e] * len(good)
            for i, out in zip(good, outputs):
                if isinstance(out, Exception):
                    responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(f"{type(out).__name__}: {out}"))
                else:
                    responses[i] = pb_utils.InferenceResponse(output_tensors=[
                        pb_utils.Tensor(t.name, np.ascontiguousarray(out[t.name]).astype(t.numpy_dtype)) for t in OUTPUTS
                    ])
        return responses

    def close(self) -> None:
        """Release the sampler."""
        self.sampler = None


__all__ = ["PIPELINE_ENGINES", "PipelineBackend"]
