"""Serving on the step engine: admitted requests become step-engine requests, each answered alone.

:class:`EngineFeeder` has the interface of :class:`~cfgswitch.serving.merger.RequestMerger`
(``submit``, ``pending``, ``drain``, ``close``), so both serving paths (``cfgswitch serve``
and the Python-backend pipeline model of ``triton-repo``) can run on either. With it, Triton's
request-level batching no longer decides what runs together: every admitted request joins the
:class:`~cfgswitch.step_engine.StepEngine` at the next step boundary with free rows, shares each
UNet call with whatever else is in flight, and is answered the moment its own images are done,
with its own error if it has one. :meth:`EngineFeeder.metrics` gives rows per UNet call, active
requests, queue depth and queue wait.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from concurrent.futures import CancelledError, Future
from typing import Any, Dict, List, Tuple

import numpy as np

from ..errors import CfgSwitchError, EngineClosedError
from .admission import AdmittedRequest
from .batching import GroupKey, ImageJob, RequestError
from .merger import ServerDrainingError, wait_until

logger = logging.getLogger(__name__)


def _groups(jobs: List[ImageJob]) -> "OrderedDict[GroupKey, List[Tuple[int, ImageJob]]]":
    out: "OrderedDict[GroupKey, List[Tuple[int, ImageJob]]]" = OrderedDict()
    for row, job in enumerate(jobs):
        out.setdefault(job.key, []).append((row, job))
    return out


class EngineFeeder:
    """Admitted requests fed to a step engine; one future per request.

    Args:
        sampler (`Sampler`): the loaded sampler.
        max_rows (`int`): UNet rows per call at most (the engine's ``max_rows``).
        max_queue (`int`, defaults to 1024): engine requests waiting at most.
        row_buckets (`bool`, defaults to False): pad calls to row buckets (static engines).
        background (`bool`, defaults to True): the engine iterates in its own thread; ``False``
            only in :meth:`run_pending` (Triton's Python backend, which calls ``execute`` once at
            a time per instance: the engine runs inside it).
    """

    def __init__(self, sampler: Any, max_rows: int, max_queue: int = 1024, row_buckets: bool = False,
                 background: bool = True) -> None:
        self.engine = sampler.engine(max_rows=max_rows, max_queue=max_queue, row_buckets=row_buckets or None,
                                     background=background)
        self._cond = threading.Condition()
        self._admitting = True
        self._open: Dict[str, Future] = {}

    def submit(self, request: AdmittedRequest) -> Future:
        """Queue ``request``; the future gets its output dict or its exception.

        A request's images that share steps, size, scheduler, plan and guidance go to the engine
        as one request (its seeds per image); images with other settings as others.

        Raises:
            ServerDrainingError: the server is draining (SIGTERM) and admits nothing new.
        """
        answer: Future = Future()
        with self._cond:
            if not self._admitting:
                raise ServerDrainingError("the server is shutting down and admits no new request; retry on another server")
            self._open[request.request_id] = answer
        parts: List[Tuple[List[int], Future]] = []
        try:
            for key, members in _groups(request.jobs).items():
                jobs = [j for _, j in members]
                fut = self.engine.submit(
                    [j.prompt for j in jobs], key.negatives(jobs), steps=key.steps,
                    guidance_scale=key.guidance_scale, scheduler=key.scheduler, plan=key.plan,
                    seed=[j.seed for j in jobs], height=key.height, width=key.width, output_type="np",
                    max_image_side=max(key.height, key.width),  # checked against the server's own limit already
                    **key.size_kwargs(),
                )
                parts.append(([r for r, _ in members], fut))
        except Exception as e:  # noqa: BLE001 - refused by the engine (queue full, closed): this request alone
            for _, fut in parts:
                fut.cancel()
            self._finish(request.request_id, answer, error=e)
            return answer
        logger.info("step engine: request %s joined (%d image(s), %d engine request(s))", request.request_id,
                    len(request.jobs), len(parts))
        state = {"left": len(parts), "peers": 0, "start": time.perf_counter()}
        lock = threading.Lock()
        rows = len(request.jobs)
        result: Dict[str, Any] = {"image": [None] * rows, "cfg_steps": [0] * rows, "late_steps": [0] * rows}

        def done(fut: Future, members: List[int]) -> None:
            try:
                out = fut.result()
            except (CancelledError, EngineClosedError):  # the server stopped under it
                self._finish(request.request_id, answer,
                             error=ServerDrainingError("the server stopped before this request finished"))
                return
            except BaseException as e:  # noqa: BLE001 - the request's own error
                self._finish(request.request_id, answer, error=e)
                return
            from ..output import to_uint8

            with lock:
                state["peers"] = max(state["peers"], out.info.get("step_engine", {}).get("max_requests_per_call", 0))
                for row, image in zip(members, to_uint8(out.images)):
                    result["image"][row] = image
                    result["cfg_steps"][row] = out.cfg_steps
                    result["late_steps"][row] = out.late_steps
                state["left"] -= 1
                last = state["left"] == 0
            if last:
                logger.info("step engine: request %s done in %.3f s; its UNet calls held up to %d request(s)",
                            request.request_id, time.perf_counter() - state["start"], state["peers"])
                self._finish(request.request_id, answer, value={
                    "image": np.stack(result["image"]).astype(np.uint8),
                    "cfg_steps": np.asarray(result["cfg_steps"], dtype=np.int32).reshape(-1, 1),
                    "late_steps": np.asarray(result["late_steps"], dtype=np.int32).reshape(-1, 1),
                })

        for members, fut in parts:
            fut.add_done_callback(lambda f, m=members: done(f, m))
        return answer

    def _finish(self, rid: str, answer: Future, value: Any = None, error: "BaseException | None" = None) -> None:
        with self._cond:
            self._open.pop(rid, None)
            self._cond.notify_all()
        if answer.done():
            return
        if error is None:
            answer.set_result(value)
            return
        if not isinstance(error, CfgSwitchError):
            logger.error("request %s failed: %s: %s", rid, type(error).__name__, error)
            error = RequestError(f"generation failed ({type(error).__name__}); the server log has the details")
        answer.set_exception(error)

    def run_pending(self) -> None:
        """Run the engine in this thread until every submitted request is answered (``background=False``)."""
        self.engine.run_pending()

    def pending(self) -> int:
        """Requests admitted and not yet answered."""
        with self._cond:
            return len(self._open)

    def drain(self, timeout_s: float) -> bool:
        """Stop admitting, wait up to ``timeout_s`` for every admitted request; True when all were answered."""
        with self._cond:
            self._admitting = False
        return wait_until(self._cond, lambda: not self._open, timeout_s)

    def close(self) -> None:
        """Stop the engine; requests still unanswered get a :class:`ServerDrainingError`."""
        with self._cond:
            self._admitting = False
            left = list(self._open.items())
        self.engine.close(timeout=0.0, cancel_pending=True)
        for rid, answer in left:
            self._finish(rid, answer, error=ServerDrainingError("the server stopped before this request finished"))

    def metrics(self) -> Dict[str, Any]:
        """Rows per UNet call (histogram and mean), active requests, queue depth, queue wait, outcomes."""
        s = self.engine.stats()
        calls = max(1, s["calls"])
        s["mean_rows_per_call"] = s["rows"] / calls
        s["mean_queue_wait_s"] = s["queue_wait_s"] / max(1, s["admitted"])
        with self._cond:
            s["open_requests"] = len(self._open)
        return s


__all__ = ["EngineFeeder"]
