"""``cfgswitch serve``'s server: a :class:`~cfgswitch.Sampler` bound to Triton through PyTriton.

PyTriton starts a real Triton Inference Server (HTTP, gRPC, metrics) whose Python-backend
proxy forwards each dynamic batch to :meth:`SamplerModel.infer` in this process. Triton
rejects a missing input, a wrong dtype or a wrong shape itself; :mod:`.batching` rejects
bad values. Shutdown: SIGINT or SIGTERM stops Triton, which finishes in-flight requests
(up to ``exit_timeout_s``) and takes its backend processes down with it.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import numpy as np

from ..errors import BackendUnavailableError
from .batching import parse_batch, run_batch
from .limits import ServeLimits
from .protocol import INPUTS, MODEL_NAME, OUTPUTS
from .triton_env import apply_library_path

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeConfig:
    """Where and how the server listens.

    Attributes:
        host (`str`, defaults to ``"127.0.0.1"``): address of the HTTP, gRPC and metrics endpoints.
        http_port, grpc_port, metrics_port (`int`): their ports (8000, 8001, 8002).
        max_queue_delay_us (`int`, defaults to 2000): how long Triton's dynamic batcher waits
            for more requests before it runs a batch.
        exit_timeout_s (`int`, defaults to 30): how long shutdown waits for in-flight requests.
        model_name (`str`, defaults to ``"cfgswitch"``): the Triton model name.
    """

    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    max_queue_delay_us: int = 2000
    exit_timeout_s: int = 30
    model_name: str = MODEL_NAME


class SamplerModel:
    """The infer function PyTriton calls with each dynamic batch (a list of requests).

    Args:
        sampler (`Sampler`): the loaded sampler.
        limits (`ServeLimits`): per-request limits.
    """

    def __init__(self, sampler: Any, limits: ServeLimits) -> None:
        self.sampler = sampler
        self.limits = limits
        self._lock = threading.Lock()  # one generate at a time, whatever PyTriton's threading

    def infer(self, requests: List[Any]) -> List[Dict[str, np.ndarray]]:
        """Answer a dynamic batch: one output dict per request, in order."""
        spec = self.sampler.spec
        parsed = parse_batch(
            [dict(r.items()) for r in requests], limits=self.limits, default_size=spec.default_size,
            vae_factor=spec.vae_scale_factor, check_request=self.sampler.runners.check_request,
        )
        start = time.perf_counter()
        with self._lock:
            outputs = run_batch(self.sampler, parsed, self.limits.max_batch)
        logger.info("batch of %d request(s), %d image(s): %.3f s", len(parsed), sum(len(p) for p in parsed),
                    time.perf_counter() - start)
        return outputs

    def warmup(self) -> None:
        """Run one small generation so the first request does not pay for lazy initialisation."""
        size = self.sampler.spec.default_size
        self.sampler.generate(["warmup"], steps=2, seed=0, height=size, width=size, output_type="np", plan="switch:0.5")


def _tensors(infos, optional_ok: bool) -> list:
    from pytriton.model_config import Tensor

    return [Tensor(name=t.name, dtype=t.numpy_dtype if t.triton_dtype != "BYTES" else bytes, shape=t.dims,
                   **({"optional": t.optional} if optional_ok else {})) for t in infos]


def serve(sampler: Any, config: ServeConfig, limits: ServeLimits, ready: Optional[threading.Event] = None,
          warmup: bool = True) -> None:
    """Serve ``sampler`` until SIGINT or SIGTERM (blocks).

    Args:
        sampler (`Sampler`): the loaded sampler.
        config (`ServeConfig`): endpoints and batching.
        limits (`ServeLimits`): per-request limits.
        ready (`threading.Event`, optional): set once the model answers.
        warmup (`bool`, defaults to True): run one small generation before serving.
    """
    try:
        from pytriton.model_config import DynamicBatcher, ModelConfig
        from pytriton.triton import Triton, TritonConfig
    except ImportError as e:
        raise BackendUnavailableError(f"cfgswitch serve needs nvidia-pytriton ({e}); install 'cfgswitch[serve]'") from e

    apply_library_path()
    model = SamplerModel(sampler, limits)
    if warmup:
        model.warmup()
    triton_config = TritonConfig(
        http_address=config.host, http_port=config.http_port, grpc_address=config.host, grpc_port=config.grpc_port,
        metrics_address=config.host, metrics_port=config.metrics_port, exit_timeout_secs=config.exit_timeout_s,
        allow_gpu_metrics=False,
    )
    model_config = ModelConfig(
        batching=True, max_batch_size=limits.max_batch,
        batcher=DynamicBatcher(max_queue_delay_microseconds=config.max_queue_delay_us),
    )
    stop = threading.Event()
    previous = {}

    def on_signal(signum, _frame):
        logger.info("signal %s: shutting down (in-flight requests finish first)", signal.Signals(signum).name)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        previous[sig] = signal.signal(sig, on_signal)
    try:
        with Triton(config=triton_config) as triton:
            triton.bind(model_name=config.model_name, infer_func=model.infer, inputs=_tensors(INPUTS, True),
                        outputs=_tensors(OUTPUTS, False), config=model_config, strict=True)
            triton.run()
            logger.info("serving model %r: http://%s:%d, grpc %s:%d, metrics http://%s:%d/metrics", config.model_name,
                        config.host, config.http_port, config.host, config.grpc_port, config.host, config.metrics_port)
            if ready is not None:
                ready.set()
            while not stop.wait(1.0):
                if not triton.is_alive():
                    logger.error("the Triton server exited; stopping")
                    break
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    logger.info("server stopped")


__all__ = ["SamplerModel", "ServeConfig", "serve"]
