"""``cfgswitch serve``'s server: a :class:`~cfgswitch.Sampler` bound to Triton through PyTriton.

PyTriton starts a real Triton Inference Server (HTTP, gRPC, metrics). Triton rejects a
missing input, a wrong dtype or a wrong shape itself. Everything else is per request:

- Triton gives each request to one of ``instances`` model instances (no Triton dynamic
  batcher: PyTriton answers a merged batch with one error for all of its requests);
  :func:`~cfgswitch.serving.admission.validate_request` checks its values against the
  limits; admitted requests are merged in-process by :class:`~cfgswitch.serving.merger.RequestMerger`
  and each gets its own output or its own one-line error with a request id (the traceback,
  if any, goes to this server's log under that id).
- SIGTERM or SIGINT drains: Triton takes no new request, the ones it holds finish, the model
  is unloaded and the server exits, all within the drain timeout. A second signal stops at once.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import numpy as np

from ..errors import BackendUnavailableError, InvalidArgumentError
from .admission import new_request_id, token_counter, validate_request, wire_error
from .batching import run_batch
from .limits import ServeLimits
from .merger import RequestMerger
from .process import descendants
from .protocol import INPUTS, MODEL_NAME, OUTPUTS
from .triton_env import apply_library_path

logger = logging.getLogger(__name__)

#: Default seconds a drain (first SIGTERM) waits for admitted requests.
DEFAULT_DRAIN_TIMEOUT_S = 20.0
#: Seconds between two log lines of the step engine's counters.
METRICS_LOG_S = 30.0
#: Attempts to start Triton and load the model before ``serve`` gives up.
START_ATTEMPTS = 3


@dataclass(frozen=True)
class ServeConfig:
    """Where and how the server listens.

    Attributes:
        host (`str`, defaults to ``"127.0.0.1"``): address of the HTTP, gRPC and metrics endpoints.
        http_port, grpc_port, metrics_port (`int`): their ports (8000, 8001, 8002).
        max_queue_delay_us (`int`, defaults to 2000): how long the in-process merger waits for more
            requests after the first before it runs a batch.
        exit_timeout_s (`int`, optional): Triton's own exit timeout; default: the drain timeout (Triton
            waits for the requests it holds, then unloads, within it).
        model_name (`str`, defaults to ``"cfgswitch"``): the Triton model name.
        instances (`int`, defaults to 4): Triton model instances, i.e. requests run (merged) at once;
            more wait in Triton's queue. Each is one PyTriton proxy process and adds about 2 s to
            the unload at shutdown.
        drain_timeout_s (`float`, defaults to 20): how long the first SIGTERM waits for admitted requests.
        batching (`str`, defaults to ``"step"``): ``step`` feeds every admitted request to the
            step engine (requests share UNet calls step by step); ``request`` merges whole requests
            with the same settings (the earlier path).
        max_rows (`int`, optional): the step engine's UNet rows per call (default: twice
            ``--max-batch``, so the largest request fits guided).
    """

    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    max_queue_delay_us: int = 2000
    exit_timeout_s: Optional[int] = None
    model_name: str = MODEL_NAME
    instances: int = 4
    drain_timeout_s: float = DEFAULT_DRAIN_TIMEOUT_S
    batching: str = "step"
    max_rows: Optional[int] = None


class SamplerModel:
    """The infer function every PyTriton model instance calls with its request(s).

    Args:
        sampler (`Sampler`): the loaded sampler.
        limits (`ServeLimits`): per-request limits (model-derived ones are filled in here).
        max_queue_delay_us (`int`, defaults to 2000): the merger's wait for more requests.
        batching (`str`, defaults to ``"step"``): ``step`` (the step engine) or ``request``.
        max_rows (`int`, optional): the step engine's rows per call (default ``2 * max_batch``).
    """

    def __init__(self, sampler: Any, limits: ServeLimits, max_queue_delay_us: int = 2000, batching: str = "step",
                 max_rows: Optional[int] = None) -> None:
        spec = sampler.spec
        self.sampler = sampler
        self.limits = limits.for_model(spec.default_size, spec.text_length)
        self._count_tokens = token_counter(sampler.tokenizer)
        self._lock = threading.Lock()  # one generate at a time (warm-up and the merger's worker)
        self._active_cond = threading.Condition()
        self._active = 0

        def run(parsed):
            with self._lock:
                return run_batch(self.sampler, parsed, self.limits.max_batch)

        if batching == "step":
            from .engine_feed import EngineFeeder

            self.merger = EngineFeeder(sampler, max_rows=max_rows or 2 * self.limits.max_batch)
        elif batching == "request":
            self.merger = RequestMerger(run, self.limits.max_batch, max_queue_delay_us / 1e6)
        else:
            raise InvalidArgumentError("batching", "'step' or 'request'", batching)
        self.batching = batching

    def metrics(self) -> Dict[str, Any]:
        """The step engine's counters (rows per UNet call, active requests, queue depth and wait), or ``{}``."""
        return self.merger.metrics() if hasattr(self.merger, "metrics") else {}

    def active(self) -> int:
        """Executions in progress (requests Triton gave this process and that are not answered yet)."""
        with self._active_cond:
            return self._active

    def wait_idle(self, deadline: float, settle_s: float = 0.5) -> bool:
        """Wait until no execution is in progress for ``settle_s`` (or ``deadline``, a monotonic time)."""
        quiet_since = None
        while time.monotonic() < deadline:
            with self._active_cond:
                busy = self._active > 0 or self.merger.pending() > 0
            if busy:
                quiet_since = None
            elif quiet_since is None:
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since >= settle_s:
                return True
            time.sleep(0.05)
        return False

    def infer(self, requests: List[Any]) -> List[Dict[str, np.ndarray]]:
        """Answer the request(s) of one Triton execution (see :meth:`_infer`)."""
        with self._active_cond:
            self._active += 1
        try:
            return self._infer(requests)
        finally:
            with self._active_cond:
                self._active -= 1

    def _infer(self, requests: List[Any]) -> List[Dict[str, np.ndarray]]:
        """Answer the request(s) of one Triton execution: an output dict per request, in order.

        Raises:
            Exception: the request's own one-line error (``TypeName: message (request id ID)``).
                Triton gives each execution one request (the model has no Triton dynamic
                batcher), so an error here answers that request alone.
        """
        spec = self.sampler.spec
        admitted = []
        for request in requests:
            rid = new_request_id()
            result = validate_request(dict(request.items()), limits=self.limits, default_size=spec.default_size,
                                      vae_factor=spec.vae_scale_factor, check_request=self.sampler.runners.check_request,
                                      count_tokens=self._count_tokens, request_id=rid)
            if not hasattr(result, "jobs"):
                logger.info("request %s refused: %s: %s", rid, type(result).__name__, result)
                del request, requests  # the refused inputs (a 200 MB prompt) go as soon as PyTriton lets them
                raise wire_error(result, rid)
            admitted.append(result)
        futures = []
        for request in admitted:
            try:
                futures.append((request.request_id, self.merger.submit(request)))
            except Exception as e:  # noqa: BLE001 - draining: typed; answered as one line
                raise wire_error(e, request.request_id) from None
        outputs = []
        for rid, future in futures:
            try:
                outputs.append(future.result())
            except Exception as e:  # noqa: BLE001 - the request's own error
                logger.info("request %s failed: %s: %s", rid, type(e).__name__, str(e).splitlines()[0] if str(e) else "")
                raise wire_error(e, rid) from None
        return outputs

    def warmup(self) -> None:
        """Run one small generation so the first request does not pay for lazy initialisation."""
        size = self.sampler.spec.default_size
        with self._lock:
            self.sampler.generate(["warmup"], steps=2, seed=0, height=size, width=size, output_type="np",
                                  plan="switch:0.5")


def _tensors(infos, optional_ok: bool) -> list:
    from pytriton.model_config import Tensor

    return [Tensor(name=t.name, dtype=t.numpy_dtype if t.triton_dtype != "BYTES" else bytes, shape=t.dims,
                   **({"optional": t.optional} if optional_ok else {})) for t in infos]


def _stop_now(signum: int) -> None:
    """Second signal: SIGKILL every process this server started, then exit without waiting."""
    pids = descendants(os.getpid())
    logger.warning("second %s: stopping at once (killing %d child process(es))", signal.Signals(signum).name, len(pids))
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    logging.shutdown()
    os._exit(128 + signum)


def _serve_until_stopped(triton: Any, model: SamplerModel, config: ServeConfig, stop: threading.Event,
                         ready: Optional[threading.Event]) -> None:
    """Serve until ``stop`` (the first signal) or Triton's death, then drain (see :func:`_drain`)."""
    logger.info("serving model %r: http://%s:%d, grpc %s:%d, metrics http://%s:%d/metrics", config.model_name,
                config.host, config.http_port, config.host, config.grpc_port, config.host, config.metrics_port)
    if ready is not None:
        ready.set()
    last_log = time.monotonic()
    while not stop.wait(1.0):
        if not triton.is_alive():
            logger.error("the Triton server exited; stopping")
            return
        if time.monotonic() - last_log >= METRICS_LOG_S:
            last_log = time.monotonic()
            _log_metrics(model)
    _drain(triton, model, config)
    _log_metrics(model)


def _log_metrics(model: "SamplerModel") -> None:
    """The step engine's counters in the server log (PyTriton has no custom Triton metrics)."""
    m = model.metrics()
    if m.get("calls"):
        logger.info("step engine: %d UNet calls, %.1f rows per call, %d active, %d queued, mean queue wait %.3f s, "
                    "%d completed, %d failed", m["calls"], m["mean_rows_per_call"], m["active"], m["queue_depth"],
                    m["mean_queue_wait_s"], m["completed"], m["failed"])


def _processes(name: str) -> List[int]:
    """PIDs of the processes below this one whose command line contains ``name``."""
    out = []
    for pid in descendants(os.getpid()):
        try:
            if name in open(f"/proc/{pid}/cmdline", "rb").read().decode(errors="replace"):
                out.append(pid)
        except OSError:
            continue
    return out


def _drain(triton: Any, model: SamplerModel, config: ServeConfig) -> None:
    """Finish the requests Triton holds, then let Triton unload the model and exit, within the drain timeout.

    1. ``tritonserver`` gets SIGINT: it takes no new request and waits for the ones it holds
       (running here, or queued for a model instance), which this process keeps answering.
    2. Once none is left, PyTriton's handlers in this process are stopped (``Model.clean``,
       which first drops PyTriton's own observers). PyTriton 0.7 would stop them only after
       ``tritonserver`` exited, and Triton's unload waits on them: the exit timeout expires
       ("Non-graceful termination"), with a trivial PyTriton model too.
    3. Triton unloads the model (each proxy finalizes, about 2 s each here) and exits.
    """
    start = time.monotonic()
    deadline = start + config.drain_timeout_s
    for pid in _processes("tritonserver/bin/tritonserver"):
        os.kill(pid, signal.SIGINT)
    idle = model.wait_idle(deadline)
    if idle:
        logger.info("drained in %.1f s: every request Triton held was answered", time.monotonic() - start)
    else:
        logger.warning("drain timeout (%.0f s): %d request(s) still running", config.drain_timeout_s, model.active())
    models = list((getattr(getattr(triton, "_model_manager", None), "_models", None) or {}).values())  # PyTriton 0.7
    for m in models:
        try:
            m.clean()
        except Exception as e:  # noqa: BLE001 - Triton's exit timeout still bounds the stop
            logger.warning("could not stop PyTriton's handlers of %s: %s", getattr(m, "model_name", m), e)
    while _processes("tritonserver/bin/tritonserver") and time.monotonic() < deadline + 1.0:
        time.sleep(0.1)
    left = _processes("tritonserver/bin/tritonserver")
    if left:
        logger.warning("Triton did not exit within the drain timeout; stopping it")
    else:
        logger.info("model unloaded and Triton exited in %.1f s", time.monotonic() - start)


def serve(sampler: Any, config: ServeConfig, limits: ServeLimits, ready: Optional[threading.Event] = None,
          warmup: bool = True) -> None:
    """Serve ``sampler`` until SIGINT or SIGTERM, then drain and stop (blocks).

    Args:
        sampler (`Sampler`): the loaded sampler.
        config (`ServeConfig`): endpoints, instances, drain.
        limits (`ServeLimits`): per-request limits.
        ready (`threading.Event`, optional): set once the model answers.
        warmup (`bool`, defaults to True): run one small generation before serving.
    """
    try:
        from pytriton.model_config import ModelConfig
        from pytriton.triton import Triton, TritonConfig
    except ImportError as e:
        raise BackendUnavailableError(f"cfgswitch serve needs nvidia-pytriton ({e}); install 'cfgswitch[serve]'") from e

    apply_library_path()
    model = SamplerModel(sampler, limits, config.max_queue_delay_us, batching=config.batching, max_rows=config.max_rows)
    logger.info("limits: %s", model.limits.describe())
    if warmup:
        model.warmup()
    triton_config = TritonConfig(
        http_address=config.host, http_port=config.http_port, grpc_address=config.host, grpc_port=config.grpc_port,
        metrics_address=config.host, metrics_port=config.metrics_port,
        exit_timeout_secs=(config.exit_timeout_s if config.exit_timeout_s is not None
                           else int(math.ceil(config.drain_timeout_s))),
        allow_gpu_metrics=False,
    )
    # No Triton dynamic batcher: each execution holds one request, so each can fail alone.
    model_config = ModelConfig(batching=True, max_batch_size=model.limits.max_batch, batcher=None)
    stop = threading.Event()
    previous = {}

    def on_signal(signum, _frame):
        if stop.is_set():
            _stop_now(signum)
        logger.info("signal %s: draining (no new requests; the ones in flight finish, then unload, within %.0f s)",
                    signal.Signals(signum).name, config.drain_timeout_s)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        previous[sig] = signal.signal(sig, on_signal)
    try:
        for attempt in range(1, START_ATTEMPTS + 1):
            with Triton(config=triton_config) as triton:
                try:
                    triton.bind(model_name=config.model_name, infer_func=[model.infer] * config.instances,
                                inputs=_tensors(INPUTS, True), outputs=_tensors(OUTPUTS, False), config=model_config,
                                strict=True)
                    triton.run()
                except Exception as e:  # noqa: BLE001 - PyTriton's model load raises several types
                    if attempt == START_ATTEMPTS or stop.is_set():
                        raise
                    # PyTriton's proxies hand their config over with 1 s timeouts: on a busy host one of
                    # several instances can miss it and the model load fails. A fresh start usually works.
                    logger.warning("Triton did not load the model (attempt %d of %d: %s); starting it again",
                                   attempt, START_ATTEMPTS, str(e).splitlines()[0][:200])
                    continue
                _serve_until_stopped(triton, model, config, stop, ready)
            break
        model.merger.close()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    logger.info("server stopped")


__all__ = ["DEFAULT_DRAIN_TIMEOUT_S", "SamplerModel", "ServeConfig", "serve"]
