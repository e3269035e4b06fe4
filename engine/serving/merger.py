"""Merging admitted requests into batches in-process, one answer per request, and draining.

Under ``cfgswitch serve`` Triton hands each request to its own model instance (no Triton
dynamic batcher: PyTriton can only fail a merged batch as a whole). Every instance submits
its admitted request here; one worker thread waits up to ``max_delay_s`` for more, runs
what it gathered through :func:`~cfgswitch.serving.batching.run_batch` (compatible images in
one ``generate`` call) and hands each request its own output or its own error.

:meth:`RequestMerger.drain` stops admitting and waits for what was admitted to finish.
The step engine (DESIGN.md section 2) will take this module's place.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import Future
from typing import Any, Callable, Deque, List, Sequence, Tuple

from ..errors import CfgSwitchError
from .admission import AdmittedRequest
from .batching import ImageJob

logger = logging.getLogger(__name__)

#: ``run(parsed) -> one output dict or exception per request`` (:func:`~cfgswitch.serving.batching.run_batch`).
RunFn = Callable[[Sequence[Sequence[ImageJob]]], List[Any]]


class ServerDrainingError(CfgSwitchError):
    """The server is shutting down and admits no new request."""


def wait_until(cond: threading.Condition, done: Callable[[], bool], timeout_s: float) -> bool:
    """Wait on ``cond`` until ``done()`` (checked under it) or ``timeout_s`` passed; ``done()``'s last value."""
    deadline = time.monotonic() + timeout_s
    with cond:
        while not done():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            cond.wait(min(left, 0.5))
    return True


class RequestMerger:
    """A queue of admitted requests and the worker that runs them in merged batches.

    Args:
        run (`callable`): runs a batch (see :data:`RunFn`).
        max_images (`int`): most images in one merged batch.
        max_delay_s (`float`): how long the worker waits for more requests after the first.
    """

    def __init__(self, run: RunFn, max_images: int, max_delay_s: float) -> None:
        self._run = run
        self._max_images = max_images
        self._max_delay_s = max_delay_s
        self._queue: Deque[Tuple[AdmittedRequest, Future]] = deque()
        self._cond = threading.Condition()
        self._admitting = True
        self._busy = 0  # requests taken by the worker and not yet answered
        self._stopped = False
        self._worker = threading.Thread(target=self._loop, name="cfgswitch-merger", daemon=True)
        self._worker.start()

    # ------------------------------------------------------------ clients
    def submit(self, request: AdmittedRequest) -> Future:
        """Queue ``request``; the future gets its output dict or its exception.

        Raises:
            ServerDrainingError: the server is draining (SIGTERM) and admits nothing new.
        """
        future: Future = Future()
        with self._cond:
            if not self._admitting:
                raise ServerDrainingError("the server is shutting down and admits no new request; retry on another server")
            self._queue.append((request, future))
            self._cond.notify_all()
        return future

    def pending(self) -> int:
        """Requests admitted and not yet answered."""
        with self._cond:
            return len(self._queue) + self._busy

    def drain(self, timeout_s: float) -> bool:
        """Stop admitting, wait up to ``timeout_s`` for every admitted request; True when all were answered."""
        with self._cond:
            self._admitting = False
        return wait_until(self._cond, lambda: not (self._queue or self._busy), timeout_s)

    def close(self) -> None:
        """Stop the worker; requests still queued get a :class:`ServerDrainingError`."""
        with self._cond:
            self._admitting = False
            self._stopped = True
            left = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        for _, future in left:
            future.set_exception(ServerDrainingError("the server stopped before this request ran"))
        self._worker.join(5)

    # ------------------------------------------------------------ worker
    def _take(self) -> List[Tuple[AdmittedRequest, Future]]:
        with self._cond:
            while not self._queue and not self._stopped:
                self._cond.wait(0.5)
            if self._stopped:
                return []
            deadline = time.monotonic() + self._max_delay_s
            while (sum(len(r.jobs) for r, _ in self._queue) < self._max_images and self._admitting
                   and not self._stopped and time.monotonic() < deadline):
                self._cond.wait(max(0.0, deadline - time.monotonic()))
            taken, images = [], 0
            while self._queue and (not taken or images + len(self._queue[0][0].jobs) <= self._max_images):
                item = self._queue.popleft()
                taken.append(item)
                images += len(item[0].jobs)
            self._busy = len(taken)
            return taken

    def _loop(self) -> None:
        while True:
            taken = self._take()
            if not taken:
                return
            start = time.perf_counter()
            logger.info("running %d request(s)", len(taken))
            try:
                answers = self._run([r.jobs for r, _ in taken])
            except Exception as e:  # noqa: BLE001 - run_batch answers per request; this is a last resort
                logger.exception("batch of %d request(s) failed", len(taken))
                answers = [e] * len(taken)
            for (request, future), answer in zip(taken, answers):
                if isinstance(answer, BaseException):
                    future.set_exception(answer)
                else:
                    future.set_result(answer)
            logger.info("batch of %d request(s), %d image(s): %.3f s (%s)", len(taken), sum(len(r.jobs) for r, _ in taken),
                        time.perf_counter() - start, ", ".join(r.request_id for r, _ in taken))
            with self._cond:
                self._busy = 0
                self._cond.notify_all()


__all__ = ["RequestMerger", "RunFn", "ServerDrainingError", "wait_until"]
