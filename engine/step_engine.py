"""The step engine: many requests in flight, one shared row set per iteration.

Iteration-level scheduling (as Orca and vLLM do for language models) fitted to guidance
switching: every iteration advances each active request by one denoising step, and all of
them share one UNet call. An image in its CFG phase brings 2 rows, an image in its late phase
1 row, so when a request passes its switch step the rows it frees go to the next request.

- **Admission** at step boundaries, FIFO: the head of the queue joins as soon as the rows it
  may still need fit under ``max_rows`` beside what the active requests may still need (their
  peak over the remaining steps, so ``max_rows`` is never exceeded, even by interval plans
  whose CFG phase starts late). A later request never overtakes the head, so none starves.
- **Exit**: a request leaves the moment its last step ran; requests that finish together are
  VAE-decoded in one call.
- **Output equals solo** ``generate``: per-image seeds, a scheduler per request, the same
  plan accounting (:class:`~cfgswitch.loop.StepCounts`); images agree within the batch
  invariance of the backend (1e-5 on the tiny test models).
- **Faults stay with their request**: bad arguments are refused by :meth:`StepEngine.submit`
  with ``generate``'s typed errors; a request whose latents turn non-finite, or whose step
  raises, fails alone (:class:`~cfgswitch.errors.RequestFailedError`); a failed shared UNet
  call is retried request by request so only the request that breaks it fails.

Example::

    engine = sampler.engine(max_rows=16)
    fut = engine.submit(["a red circle"], steps=30, plan="switch:0.5", seed=0)
    out = fut.result(timeout=60)        # a GenerationOutput, as generate() returns
    engine.close()
"""

from __future__ import annotations

import concurrent.futures
import itertools
import logging
import threading
import time
from collections import deque
from typing import Any, Deque, Dict, List, Optional, Sequence, Union

from .errors import DeadlineExceededError, EngineClosedError, InvalidArgumentError, QueueFullError
from .plans import GuidancePlan
from .request import check_request
from .step_batch import UNET_CALLS, Flight, new_flight, start_flight
from .step_iteration import decode_finished, encode_admitted, fail_future, iterate, resolve_future

logger = logging.getLogger(__name__)


class EngineFuture(concurrent.futures.Future):
    """The result of one submitted request: a :class:`~cfgswitch.GenerationOutput`.

    ``cancel()`` works on a queued and on a running request (the engine drops it at the next
    step boundary); ``result(timeout)`` raises ``CancelledError`` after it.
    """

    def __init__(self, request_id: int) -> None:
        super().__init__()
        self.request_id = request_id


def default_buckets(max_rows: int) -> List[int]:
    """Row buckets 1, 2, 4, 8, ... below ``max_rows``, then ``max_rows`` itself."""
    out, b = [], 1
    while b < max_rows:
        out.append(b)
        b *= 2
    return out + [max_rows]


class StepEngine:
    """Many in-flight requests over one :class:`~cfgswitch.Sampler`'s runners.

    Args:
        sampler (`Sampler`): the model and backend every request runs on.
        max_rows (`int`, defaults to 16): UNet rows per iteration at most (padding included).
        max_queue (`int`, defaults to 256): requests waiting at most; more are refused with
            :class:`~cfgswitch.errors.QueueFullError`.
        unet_call (`str`, defaults to ``"single"``): ``single`` runs the plain UNet once per
            iteration over every row; ``split`` runs the CFG role for guided requests and the
            plain UNet for the rest (two calls).
        row_buckets (`bool` or `list[int]`, optional): pad each call's rows up to the next bucket
            (fixed-shape engines, CUDA graphs); ``True`` gives 1, 2, 4, ... up to ``max_rows``.
            Padding rows are never counted as work and never reach an output.
        background (`bool`, defaults to True): iterate in a worker thread of the engine (started by
            the first submit); ``False`` iterates only inside :meth:`run_pending`, in the caller's thread.
    """

    def __init__(self, sampler: Any, max_rows: int = 16, max_queue: int = 256, unet_call: str = "single",
                 row_buckets: Union[None, bool, Sequence[int]] = None, background: bool = True) -> None:
        if isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1:
            raise InvalidArgumentError("max_rows", "a positive integer", max_rows)
        if isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue < 1:
            raise InvalidArgumentError("max_queue", "a positive integer", max_queue)
        if unet_call not in UNET_CALLS:
            raise InvalidArgumentError("unet_call", " or ".join(map(repr, UNET_CALLS)), unet_call)
        if row_buckets is True:
            buckets: Optional[List[int]] = default_buckets(max_rows)
        elif row_buckets in (None, False):
            buckets = None
        else:
            try:
                buckets = sorted({int(b) for b in row_buckets})  # type: ignore[union-attr]
            except (TypeError, ValueError):
                raise InvalidArgumentError("row_buckets", "True or a list of positive row counts", row_buckets) from None
            if not buckets or buckets[0] < 1 or buckets[-1] > max_rows or max_rows not in buckets:
                raise InvalidArgumentError("row_buckets", f"positive row counts up to and including max_rows={max_rows}",
                                           row_buckets)
        self.sampler = sampler
        self.max_rows = max_rows
        self.max_queue = max_queue
        self.unet_call = unet_call
        self.row_buckets = buckets
        self._background = bool(background)
        self._ids = itertools.count()
        self._cv = threading.Condition()
        self._queue: Deque[tuple] = deque()
        self._active: List[tuple] = []
        self._closing = False
        self._stats: Dict[str, Any] = {"calls": 0, "rows": 0, "padded_rows": 0, "rows_per_call": {}, "iterations": 0,
                                       "submitted": 0, "completed": 0, "failed": 0, "cancelled": 0, "expired": 0,
                                       "queue_wait_s": 0.0, "admitted": 0}
        # started by the first submit, so an engine that never gets work runs no thread
        self._thread = threading.Thread(target=self._run, name="cfgswitch-step-engine", daemon=True)

    # ------------------------------------------------------------------ public
    def submit(
        self,
        prompts: Union[str, Sequence[str]],
        negative_prompts: Union[None, str, Sequence[str]] = None,
        *,
        steps: int = 30,
        guidance_scale: float = 7.5,
        scheduler: str = "ddim",
        plan: Union[str, GuidancePlan] = "always",
        seed: Union[None, int, Sequence[int]] = 0,
        height: Optional[int] = None,
        width: Optional[int] = None,
        num_images_per_prompt: int = 1,
        output_type: str = "pil",
        step_kernel: str = "auto",
        deadline: Optional[float] = None,
        max_image_side: Optional[int] = None,
        guidance_rescale: float = 0.0,
        **size_conditioning: Any,
    ) -> EngineFuture:
        """Queue one request; its arguments are those of :meth:`cfgswitch.Sampler.generate`.

        Every argument is checked here, before admission, and raises ``generate``'s typed
        errors. ``deadline`` (`float`, optional) is seconds from now after which the request
        is dropped with :class:`~cfgswitch.errors.DeadlineExceededError`. SDXL requests may
        carry ``generate``'s size conditioning (``original_size``, ``target_size``, ...).

        Raises:
            EngineClosedError: after :meth:`close`.
            QueueFullError: ``max_queue`` requests are waiting already.
            InvalidArgumentError: a bad argument, or a request larger than ``max_rows`` rows.
        """
        args = check_request(
            self.sampler, prompts, negative_prompts, steps=steps, guidance_scale=guidance_scale, scheduler=scheduler,
            plan=plan, seed=seed, height=height, width=width, num_images_per_prompt=num_images_per_prompt,
            output_type=output_type, step_kernel=step_kernel, max_image_side=max_image_side,
            size_conditioning=size_conditioning, guidance_rescale=guidance_rescale,
        )
        if deadline is not None and (isinstance(deadline, bool) or not isinstance(deadline, (int, float)) or not deadline > 0):
            raise InvalidArgumentError("deadline", "a positive number of seconds (or None)", deadline)
        rid = next(self._ids)
        flight = new_flight(rid, args, self.sampler.scheduler_config, self.sampler.runners.device,
                            None if deadline is None else time.perf_counter() + float(deadline))
        if flight.peak_rows() > self.max_rows:
            raise InvalidArgumentError(
                "num_images_per_prompt", f"a request of at most {self.max_rows} UNet rows (max_rows; a guided image "
                f"takes 2), this one needs {flight.peak_rows()}", num_images_per_prompt)
        fut = EngineFuture(rid)
        with self._cv:
            if self._closing:
                raise EngineClosedError("submit: the step engine is closed; make a new one with sampler.engine()")
            if len(self._queue) >= self.max_queue:
                raise QueueFullError(f"submit: the queue holds max_queue={self.max_queue} requests; retry later")
            self._queue.append((flight, fut))
            self._stats["submitted"] += 1
            if self._background and self._thread.ident is None:
                self._thread.start()
            self._cv.notify_all()
        return fut

    def close(self, timeout: Optional[float] = None, cancel_pending: bool = False) -> None:
        """Refuse new work, finish what is queued and in flight, stop the worker.

        Args:
            timeout (`float`, optional): seconds to wait; requests still unfinished then fail
                with :class:`~cfgswitch.errors.EngineClosedError`.
            cancel_pending (`bool`, defaults to False): also cancel queued requests that have
                not started.
        """
        with self._cv:
            self._closing = True
            if cancel_pending:
                while self._queue:
                    _, fut = self._queue.popleft()
                    fut.cancel()
            self._cv.notify_all()
        if not self._background:
            if timeout is None:  # finish what was accepted, here
                self._drain_here()
            else:
                with self._cv:
                    left = list(self._queue) + list(self._active)
                    self._queue.clear()
                    self._active.clear()
                for _, fut in left:
                    fail_future(fut, EngineClosedError("close: the engine stopped before the request finished"))
            return
        if self._thread.ident is not None:
            self._thread.join(timeout)
        if self._thread.is_alive():
            with self._cv:
                left = list(self._queue) + list(self._active)
                self._queue.clear()
                self._abort = True
                self._cv.notify_all()
            for _, fut in left:
                fail_future(fut, EngineClosedError(f"close: the request did not finish within {timeout} s"))

    def stats(self) -> Dict[str, Any]:
        """Counters: UNet calls, real and padded rows, rows per call (histogram), requests by
        outcome, queue depth, active requests and total queue wait."""
        with self._cv:
            out = dict(self._stats)
            out["rows_per_call"] = dict(self._stats["rows_per_call"])
            out["queue_depth"] = len(self._queue)
            out["active"] = len(self._active)
        return out

    def __enter__(self) -> "StepEngine":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ worker
    _abort = False

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._active and not self._closing:
                    self._cv.wait()
                if self._abort or (self._closing and not self._queue and not self._active):
                    return
            self._iteration()

    def run_pending(self) -> None:
        """Run iterations in the calling thread until nothing is queued or in flight.

        For an engine made with ``background=False`` (a host that calls it from its own thread,
        such as Triton's Python backend): submit, then call this; every future is then done.
        """
        if self._background:
            raise InvalidArgumentError("run_pending", "an engine made with background=False", "a background engine")
        self._drain_here()

    def _drain_here(self) -> None:
        while True:
            with self._cv:
                if not self._queue and not self._active:
                    return
            self._iteration()

    def _iteration(self) -> None:
        with self._cv:
            self._drop_queued_locked()
            admitted = self._admit_locked()
        try:
            self._step(admitted)
        except Exception as e:  # noqa: BLE001 - a defect must not kill the worker silently
            logger.exception("step engine iteration failed")
            with self._cv:
                broken = list(self._active)
                self._active.clear()
            for _, fut in broken:
                fail_future(fut, e)

    def _drop_queued_locked(self) -> None:
        now = time.perf_counter()
        kept: Deque[tuple] = deque()
        for flight, fut in self._queue:
            if fut.cancelled():
                self._stats["cancelled"] += 1
            elif flight.deadline is not None and now > flight.deadline:
                self._stats["expired"] += 1
                fail_future(fut, DeadlineExceededError(f"request {flight.rid}: deadline passed before it started"))
            else:
                kept.append((flight, fut))
        self._queue = kept

    def _admit_locked(self) -> List[tuple]:
        reserved = sum(f.peak_rows() for f, _ in self._active)
        admitted = []
        while self._queue:
            flight, fut = self._queue[0]
            if reserved + flight.peak_rows() > self.max_rows:
                break  # FIFO: nobody overtakes the head
            self._queue.popleft()
            reserved += flight.peak_rows()
            wait = time.perf_counter() - flight.submitted
            flight.add_time("queue", wait)
            self._stats["queue_wait_s"] += wait
            self._stats["admitted"] += 1
            admitted.append((flight, fut))
        return admitted

    def _step(self, admitted: List[tuple]) -> None:
        sampler = self.sampler
        if admitted:
            ok = encode_admitted(sampler, admitted)
            for flight, fut in ok:
                spec = sampler.spec
                factor = spec.vae_scale_factor
                start_flight(flight, sampler.runners,
                             (spec.latent_channels, flight.args.height // factor, flight.args.width // factor))
            with self._cv:
                self._active.extend(ok)
        with self._cv:
            active = [(f, fut) for f, fut in self._active if self._keep(f, fut)]
            self._active = active
        if not active:
            return
        calls, failed = iterate(sampler.runners, [f for f, _ in active], self.unet_call, self.row_buckets)
        finished = []
        with self._cv:
            self._stats["iterations"] += 1
            for role, real, padded in calls:
                self._stats["calls"] += 1
                self._stats["rows"] += real
                self._stats["padded_rows"] += padded - real
                hist = self._stats["rows_per_call"]
                hist[real] = hist.get(real, 0) + 1
            still = []
            for flight, fut in self._active:
                if flight.rid in failed:
                    self._stats["failed"] += 1
                    fail_future(fut, failed[flight.rid])
                elif flight.done:
                    finished.append((flight, fut))
                else:
                    still.append((flight, fut))
            self._active = still
        if finished:
            outcomes = decode_finished(sampler, finished)
            with self._cv:
                for (flight, fut), outcome in zip(finished, outcomes):
                    if isinstance(outcome, BaseException):
                        self._stats["failed"] += 1
                        fail_future(fut, outcome)
                    elif resolve_future(fut, outcome):
                        self._stats["completed"] += 1

    def _keep(self, flight: Flight, fut: EngineFuture) -> bool:
        if fut.cancelled():
            self._stats["cancelled"] += 1
            return False
        if flight.deadline is not None and time.perf_counter() > flight.deadline:
            self._stats["expired"] += 1
            fail_future(fut, DeadlineExceededError(f"request {flight.rid}: deadline passed at step {flight.step}"))
            return False
        return True


__all__ = ["EngineFuture", "StepEngine", "default_buckets"]
