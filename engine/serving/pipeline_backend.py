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
from .admission import AdmittedRequest, client_message, new_request_id, token_counter, validate_request
from .batching import RequestError, run_batch
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

    def __init__(self, sampler: Any, limits: ServeLimits, batching: str = "step", pb_utils: Any = None) -> None:
        self.sampler = sampler
        self.limits = limits.for_model(sampler.spec.default_size, sampler.spec.text_length)
        self._count_tokens = token_counter(sampler.tokenizer)
        if batching not in ("step", "request"):
            raise BundleError(f"cfgswitch_pipeline: parameter batching must be 'step' or 'request', got {batching!r}")
        self.feeder = None
        if batching == "step":
            from .engine_feed import EngineFeeder

            # Triton calls execute once at a time per instance: the engine runs inside it, in this thread
            self.feeder = EngineFeeder(sampler, max_rows=2 * self.limits.max_batch, background=False)
        self.metrics = EngineMetrics(pb_utils) if (pb_utils is not None and self.feeder is not None) else None

    @classmethod
    def from_parameters(cls, version_dir: Path, params: Dict[str, str], config: Optional[Dict[str, Any]] = None,
                        pb_utils: Any = None) -> "PipelineBackend":
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
        batching = params.get("batching", "step") or "step"
        logger.info("cfgswitch_pipeline: %s engines, bundle %s, %s batching", engines, bundle_dir, batching)
        return cls(sampler, limits, batching=batching, pb_utils=pb_utils)

    def execute(self, requests: List[Any], pb_utils: Any) -> List[Any]:
        """One response per request: images for good ones, a one-line error with a request id for bad ones.

        Each request is checked on its own (:func:`~cfgswitch.serving.admission.validate_request`)
        before any is merged; a traceback goes to the log under the request id, never to the client.
        """
        spec = self.sampler.spec
        responses: List[Any] = [None] * len(requests)
        good, admitted = [], []

        def refuse(i: int, rid: str, error: BaseException) -> None:
            if not isinstance(error, CfgSwitchError):
                logger.error("request %s: internal error", rid, exc_info=(type(error), error, error.__traceback__))
                error = RequestError("internal error; the server log has the details")
            logger.info("request %s refused: %s", rid, client_message(error, rid))
            responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(client_message(error, rid)))

        for i, request in enumerate(requests):
            data = {}
            for name in INPUT_NAMES:
                tensor = pb_utils.get_input_tensor_by_name(request, name)
                if tensor is not None:
                    data[name] = tensor.as_numpy()
            result = validate_request(data, limits=self.limits, default_size=spec.default_size,
                                      vae_factor=spec.vae_scale_factor, check_request=self.sampler.runners.check_request,
                                      count_tokens=self._count_tokens)
            if isinstance(result, AdmittedRequest):
                good.append(i)
                admitted.append(result)
            else:
                refuse(i, new_request_id(), result)
        if good and self.feeder is not None:  # the step engine: each request its own answer, as it finishes
            futures = []
            for a in admitted:
                try:
                    futures.append(self.feeder.submit(a))
                except Exception as e:  # noqa: BLE001 - refused (draining): this request alone
                    futures.append(e)
            self.feeder.run_pending()
            outputs = []
            for f in futures:
                try:
                    outputs.append(f if isinstance(f, BaseException) else f.result())
                except Exception as e:  # noqa: BLE001 - the request's own error
                    outputs.append(e)
            if self.metrics is not None:
                self.metrics.update(self.feeder.metrics())
        elif good:
            try:
                outputs = run_batch(self.sampler, [a.jobs for a in admitted], self.limits.max_batch)
            except Exception as e:  # noqa: BLE001 - run_batch answers per request; a last resort
                outputs = [e] * len(good)
        if good:
            for i, request, out in zip(good, admitted, outputs):
                if isinstance(out, BaseException):
                    refuse(i, request.request_id, out)
                else:
                    responses[i] = pb_utils.InferenceResponse(output_tensors=[
                        pb_utils.Tensor(t.name, np.ascontiguousarray(out[t.name]).astype(t.numpy_dtype)) for t in OUTPUTS
                    ])
        return responses

    def close(self) -> None:
        """Finish what the step engine holds, then release the sampler."""
        if self.feeder is not None:
            self.feeder.drain(30.0)
            self.feeder.close()
        self.sampler = None


class EngineMetrics:
    """The step engine's counters as Triton custom metrics (``/metrics``, Prometheus text).

    ``cfgswitch_unet_calls_total``, ``cfgswitch_unet_rows_total`` (their ratio is the rows per
    UNet call), ``cfgswitch_active_requests``, ``cfgswitch_queue_depth`` and
    ``cfgswitch_queue_wait_seconds_total``, each labelled with the model name.
    """

    def __init__(self, pb_utils: Any, model: str = "cfgswitch_pipeline") -> None:
        gauge = pb_utils.MetricFamily.GAUGE
        labels = {"model": model}
        self._families = []  # Triton requires a family to outlive its metrics
        self._metrics = {}
        for name, doc, key in (
            ("cfgswitch_unet_calls_total", "UNet calls of the step engine", "calls"),
            ("cfgswitch_unet_rows_total", "UNet rows of the step engine (padding excluded)", "rows"),
            ("cfgswitch_active_requests", "requests in flight in the step engine", "active"),
            ("cfgswitch_queue_depth", "requests waiting for rows", "queue_depth"),
            ("cfgswitch_queue_wait_seconds_total", "seconds requests waited before they joined", "queue_wait_s"),
        ):
            family = pb_utils.MetricFamily(name=name, description=doc, kind=gauge)
            self._families.append(family)
            self._metrics[key] = family.Metric(labels=labels)

    def update(self, stats: Dict[str, Any]) -> None:
        """Set every metric from :meth:`~cfgswitch.serving.engine_feed.EngineFeeder.metrics` (never raises)."""
        try:
            for key, metric in self._metrics.items():
                metric.set(float(stats.get(key, 0)))
        except Exception as e:  # noqa: BLE001 - metrics must never fail a request
            logger.warning("cfgswitch_pipeline: could not update the custom metrics: %s", e)


__all__ = ["EngineMetrics", "PIPELINE_ENGINES", "PipelineBackend"]
