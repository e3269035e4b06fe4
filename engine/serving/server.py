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
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from ..errors import BackendUnavailableError, InvalidArgumentError
from .admission import new_request_id, token_counter, validate_request, wire_error
from .batching import run_batch
from .front import DEFAULT_MAX_REQUEST_BYTES, GrpcSizeFront, RequestSizeFront
from .limits import ServeLimits
from .merger import RequestMerger
from .process import descendants, free_ports
from .protocol import INPUTS, MODEL_NAME, OUTPUTS
from .triton_env import apply_library_path

logger = logging.getLogger(__name__)

#: Default seconds a drain (first SIGTERM) waits for admitted requests.
DEFAULT_DRAIN_TIMEOUT_S = 20.0
#: Seconds between two log lines of the step engine's counters.
METRICS_LOG_S = 30.0
#: Attempts to start Triton and load the model before ``serve`` gives up.
START_ATTEMPTS = 3
#: Seconds of the drain timeout kept for what follows Triton's exit (PyTriton's stop, the front,
#: the interpreter's exit); Triton's unload gets the rest, then it is killed.
EXIT_RESERVE_S = 2.5


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
            more wait in Triton's queue. Each is one PyTriton proxy process and adds about 1 s to
            the unload at shutdown.
        drain_timeout_s (`float`, defaults to 20): how long the first SIGTERM waits for admitted requests.
        batching (`str`, defaults to ``"step"``): ``step`` feeds every admitted request to the
            step engine (requests share UNet calls step by step); ``request`` merges whole requests
            with the same settings (the earlier path).
        max_rows (`int`, optional): the step engine's UNet rows per call (default: twice
            ``--max-batch``, so the largest request fits guided).
        max_request_bytes (`int`, defaults to 1 MiB): the largest request body (HTTP) or message
            (gRPC). Fronts on ``http_port`` (:class:`~cfgswitch.serving.front.RequestSizeFront`, 413)
            and ``grpc_port`` (:class:`~cfgswitch.serving.front.GrpcSizeFront`, ``RESOURCE_EXHAUSTED``)
            refuse larger ones before reading them; Triton's HTTP and gRPC endpoints move to internal
            127.0.0.1 ports. ``0``: no fronts, Triton listens on both ports itself.
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
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES


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


#: Source patches for PyTriton 0.7's proxy files (copied into the model that Triton's Python backend
#: runs), each ``(old, new, count)``:
#:
#: - ``model.py``: the proxy raises an infer function's error from ``execute``. Triton's Python
#:   backend then leaks that execution's request/response state (triton-inference-server/server#7481:
#:   its shared memory stays, and the model can no longer be unloaded, so a drain after refused
#:   requests ended in "Exit timeout expired"). The documented workaround: return one error response
#:   per request. The client also gets the one-line reason alone, without the proxy's traceback frame.
#: - ``communication.py``: the proxy's request loop notices a shutdown only at its next 1 s poll,
#:   and Triton finalizes the instances one after another: poll every 0.2 s. The handshake that hands
#:   each instance its config waits 1 s, which a busy host can miss at start: wait up to 10 s.
_PROXY_PATCHES: Dict[str, List[Tuple[str, str, int]]] = {
    "model.py": [(
        "                if triton_responses_or_error is not None and isinstance(triton_responses_or_error, "
        "Exception):\n                    raise triton_responses_or_error\n",
        "                if triton_responses_or_error is not None and isinstance(triton_responses_or_error, "
        "Exception):\n                    return [pb_utils.InferenceResponse(error=pb_utils.TritonError("
        "str(triton_responses_or_error).strip())) for _ in triton_requests]  # cfgswitch: no raise (#7481)\n", 1)],
    "communication.py": [
        ("            flag_check_interval_s = 1.0\n", "            flag_check_interval_s = 0.2  # cfgswitch\n", 2),
        ("def get_config_from_handshake_server(socket_path: pathlib.Path, timeout_s: float = 1.0) -> dict:",
         "def get_config_from_handshake_server(socket_path: pathlib.Path, timeout_s: float = 10.0) -> dict:", 1),
        ('await asyncio.wait_for(reader.readuntil(b"\\n"), timeout=1.0)',
         'await asyncio.wait_for(reader.readuntil(b"\\n"), timeout=10.0)', 1),
    ],
}


def patch_proxy_source(name: str, source: bytes) -> Optional[bytes]:
    """PyTriton's proxy file ``name`` (``model.py``, ``communication.py``) with cfgswitch's patches applied.

    Returns ``source`` unchanged for a file without patches, and ``None`` when ``source`` is not the
    PyTriton 0.7 code the patches know (then nothing should be changed).
    """
    patches = _PROXY_PATCHES.get(name)
    if not patches:
        return source
    text = source.decode("utf-8")
    for old, new, count in patches:
        if text.count(old) != count:
            return None
        text = text.replace(old, new)
    return text.encode("utf-8")


def _patch_file(path: Path) -> None:
    if not path.is_file():
        return
    patched = patch_proxy_source(path.name, path.read_bytes())
    if patched is None:
        logger.warning("PyTriton's proxy %s is not the known 0.7 code: infer errors stay raised (Triton's Python "
                       "backend then leaks the state of each failed request)", path)
    else:
        path.write_bytes(patched)


def _answer_errors_as_responses(triton: Any) -> None:
    """Make every model bound to ``triton`` from now on load the patched proxy (see :func:`patch_proxy_source`).

    PyTriton writes the proxy into its model store when a model is added (local store) or sends
    it with the load request (remote store), and loads it at once when Triton is already running:
    both copies are patched as the model is added, before it loads.
    """
    manager = getattr(triton, "_model_manager", None)
    add_model = getattr(manager, "add_model", None)
    if add_model is None:
        logger.warning("PyTriton's model manager has no add_model: infer errors stay raised")
        return

    def add(model: Any, *args: Any, **kwargs: Any) -> Any:
        generate, files = getattr(model, "generate_model", None), getattr(model, "get_proxy_model_files", None)
        if generate is not None:
            def generate_patched(repository: Path) -> None:
                generate(repository)
                for name in _PROXY_PATCHES:
                    _patch_file(Path(repository) / model.model_name / str(model.model_version) / name)

            model.generate_model = generate_patched
        if files is not None:
            def files_patched() -> Dict[str, bytes]:
                out = dict(files())
                for key, content in out.items():
                    patched = patch_proxy_source(key.rsplit("/", 1)[-1], content)
                    if patched is None:
                        logger.warning("PyTriton's proxy %s is not the known 0.7 code: it runs unpatched", key)
                    out[key] = patched or content
                return out

            model.get_proxy_model_files = files_patched
        return add_model(model, *args, **kwargs)

    manager.add_model = add


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
                         ready: Optional[threading.Event], signalled: List[float]) -> bool:
    """Serve until ``stop`` (the first signal) or Triton's death, then drain (see :func:`_drain`).

    Returns True when every request Triton held was answered (False: Triton died, or the drain
    timeout passed with requests still running).
    """
    logger.info("serving model %r: http://%s:%d, grpc %s:%d, metrics http://%s:%d/metrics", config.model_name,
                config.host, config.http_port, config.host, config.grpc_port, config.host, config.metrics_port)
    if ready is not None:
        ready.set()
    last_log = time.monotonic()
    while not stop.wait(1.0):
        if not triton.is_alive():
            logger.error("the Triton server exited; stopping")
            return False
        if time.monotonic() - last_log >= METRICS_LOG_S:
            last_log = time.monotonic()
            _log_metrics(model)
    answered = _drain(triton, model, config, signalled[0] if signalled else time.monotonic())
    _log_metrics(model)
    return answered


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


def _kill_tree(pid: int) -> int:
    """SIGKILL ``pid`` and every process below it; the number killed."""
    pids = [pid] + descendants(pid)
    for p in pids:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return len(pids)


def _drain(triton: Any, model: SamplerModel, config: ServeConfig, signalled_at: float) -> bool:
    """Finish the requests Triton holds, then let Triton unload the model and exit, within the drain timeout.

    The timeout runs from the signal (``signalled_at``, a monotonic time) and is a budget:

    1. ``tritonserver`` gets SIGINT: it takes no new request and waits for the ones it holds
       (running here, or queued for a model instance), which this process keeps answering, until
       :data:`EXIT_RESERVE_S` before the deadline.
    2. Then PyTriton's handlers in this process are stopped (``Model.clean``, which first drops
       PyTriton's own observers). PyTriton 0.7 would stop them only after ``tritonserver`` exited,
       and Triton's unload waits on them: the exit timeout expires ("Non-graceful termination"),
       with a trivial PyTriton model too.
    3. Triton unloads the model (its instances finalize one after another, about 1 s each here with
       the patched proxy) and exits, with the time left less :data:`EXIT_RESERVE_S`. Past that,
       ``tritonserver`` and its model processes are killed, with a log line: the requests were
       answered already, and what is left is only the proxies' own clean-up.

    Returns:
        True when every request Triton held was answered.
    """
    start = time.monotonic()
    deadline = signalled_at + config.drain_timeout_s
    budget_end = max(start, deadline - EXIT_RESERVE_S)
    for pid in _processes("tritonserver/bin/tritonserver"):
        os.kill(pid, signal.SIGINT)
    idle = model.wait_idle(budget_end)
    if idle:
        logger.info("drained in %.1f s: every request Triton held was answered", time.monotonic() - start)
    else:
        logger.error("drain timeout (%.0f s): %d request(s) still running; stopping without them",
                     config.drain_timeout_s, model.active())
    models = list((getattr(getattr(triton, "_model_manager", None), "_models", None) or {}).values())  # PyTriton 0.7
    for m in models:
        try:
            m.clean()
        except Exception as e:  # noqa: BLE001 - the budget below still bounds the stop
            logger.warning("could not stop PyTriton's handlers of %s: %s", getattr(m, "model_name", m), e)
    while _processes("tritonserver/bin/tritonserver") and time.monotonic() < budget_end:
        time.sleep(0.05)
    left = _processes("tritonserver/bin/tritonserver")
    if left:
        killed = sum(_kill_tree(pid) for pid in left)
        logger.warning("Triton had not finished unloading %.1f s after the signal (drain timeout %.0f s, %.1f s kept "
                       "for the exit): killed tritonserver and its model processes (%d); %s",
                       time.monotonic() - signalled_at, config.drain_timeout_s, EXIT_RESERVE_S, killed,
                       "every request had been answered" if idle else "requests were still running")
        wait_until = time.monotonic() + 1.0
        while _processes("tritonserver/bin/tritonserver") and time.monotonic() < wait_until:
            time.sleep(0.02)
    else:
        logger.info("model unloaded and Triton exited in %.1f s", time.monotonic() - start)
    return idle


def serve(sampler: Any, config: ServeConfig, limits: ServeLimits, ready: Optional[threading.Event] = None,
          warmup: bool = True) -> bool:
    """Serve ``sampler`` until SIGINT or SIGTERM, then drain and stop (blocks).

    Returns True when the server stopped with every request it held answered (``cfgswitch serve``
    then exits 0; otherwise 1).

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

    def triton_config(http_host: str, http_port: int, grpc_host: str, grpc_port: int) -> Any:
        return TritonConfig(
            http_address=http_host, http_port=http_port, grpc_address=grpc_host, grpc_port=grpc_port,
            metrics_address=config.host, metrics_port=config.metrics_port,
            exit_timeout_secs=(config.exit_timeout_s if config.exit_timeout_s is not None
                               else int(math.ceil(config.drain_timeout_s))),
            allow_gpu_metrics=False,
        )

    # No Triton dynamic batcher: each execution holds one request, so each can fail alone.
    model_config = ModelConfig(batching=True, max_batch_size=model.limits.max_batch, batcher=None)
    stop = threading.Event()
    previous = {}
    signalled: List[float] = []

    def on_signal(signum, _frame):
        if stop.is_set():
            _stop_now(signum)
        signalled.append(time.monotonic())
        logger.info("signal %s: draining (no new requests; the ones in flight finish, then unload, within %.0f s)",
                    signal.Signals(signum).name, config.drain_timeout_s)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        previous[sig] = signal.signal(sig, on_signal)
    fronts: List[Any] = []
    answered = False
    try:
        for attempt in range(1, START_ATTEMPTS + 1):
            # With fronts, Triton's HTTP and gRPC endpoints are internal (127.0.0.1, free ports) and the fronts
            # own the public ports.
            if config.max_request_bytes:
                # two distinct free ports, neither a public one (a front must not forward to itself)
                http_in, grpc_in = [p for p in free_ports(4) if p not in (config.http_port, config.grpc_port)][:2]
                inner = ("127.0.0.1", http_in, "127.0.0.1", grpc_in)
            else:
                inner = (config.host, config.http_port, config.host, config.grpc_port)
            with Triton(config=triton_config(*inner)) as triton:
                try:
                    _answer_errors_as_responses(triton)
                    triton.bind(model_name=config.model_name, infer_func=[model.infer] * config.instances,
                                inputs=_tensors(INPUTS, True), outputs=_tensors(OUTPUTS, False), config=model_config,
                                strict=True)
                    triton.run()
                    if config.max_request_bytes:
                        for kind, public, internal in ((RequestSizeFront, config.http_port, inner[1]),
                                                       (GrpcSizeFront, config.grpc_port, inner[3])):
                            front = kind(config.host, public, internal, config.max_request_bytes)
                            front.start()
                            fronts.append(front)
                except Exception as e:  # noqa: BLE001 - PyTriton's model load raises several types
                    for front in fronts:
                        front.stop()
                    fronts.clear()
                    if attempt == START_ATTEMPTS or stop.is_set():
                        raise
                    # PyTriton's proxies hand their config over with 1 s timeouts: on a busy host one of
                    # several instances can miss it and the model load fails. A fresh start usually works.
                    logger.warning("Triton did not load the model (attempt %d of %d: %s); starting it again",
                                   attempt, START_ATTEMPTS, str(e).splitlines()[0][:200])
                    continue
                answered = _serve_until_stopped(triton, model, config, stop, ready, signalled)
            break
        model.merger.close()
    finally:
        for front in fronts:
            front.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    since = f" ({time.monotonic() - signalled[0]:.1f} s after the signal)" if signalled else ""
    logger.info("server stopped%s", since)
    return answered


__all__ = ["DEFAULT_DRAIN_TIMEOUT_S", "EXIT_RESERVE_S", "SamplerModel", "ServeConfig", "patch_proxy_source", "serve"]
