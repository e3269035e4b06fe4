"""Admitting one request: its id, its validation, and the error its client sees.

:func:`validate_request` takes one request's inputs and returns either an
:class:`AdmittedRequest` (its images as :class:`~cfgswitch.serving.batching.ImageJob`) or the
typed error that refuses it. It never raises for bad input and never looks at other
requests, so a bad value can fail only its own request; the serving paths (and later the
step engine) merge admitted requests only.

What a client sees of an error is one line, ``TypeName: message (request id ID)``; the
traceback, when there is one, goes to the server log under the same id.
"""

from __future__ import annotations

import copy
import logging
import secrets
import threading
from dataclasses import dataclass
from typing import Any, Callable, List, Mapping, Optional, Union

from ..errors import CfgSwitchError, InvalidArgumentError
from .batching import ImageJob, RequestError, parse_request
from .limits import ServeLimits

logger = logging.getLogger(__name__)


def new_request_id() -> str:
    """A short random id that ties a client's error to the server log's lines."""
    return secrets.token_hex(6)


@dataclass(frozen=True)
class AdmittedRequest:
    """A request whose every value was checked.

    Attributes:
        request_id (`str`): its id (in the server log and in any error its client gets).
        jobs (`list[ImageJob]`): its images, in order.
    """

    request_id: str
    jobs: List[ImageJob]


def token_counter(tokenizer: Any) -> Callable[[str], int]:
    """``text -> CLIP tokens`` (start and end tokens included, nothing truncated), safe to call from any thread.

    It counts with its own copy of ``tokenizer`` under its own lock: a fast (Rust) tokenizer
    used from two threads at once raises ``RuntimeError: Already borrowed``, and the model's
    tokenizer is busy in ``generate`` on the batching thread.
    """
    own = copy.deepcopy(tokenizer)
    lock = threading.Lock()

    def count(text: str) -> int:
        with lock:
            return len(own(text, truncation=False, add_special_tokens=True)["input_ids"])
    return count


def _check_tokens(jobs: List[ImageJob], limits: ServeLimits, count_tokens: Callable[[str], int]) -> None:
    limit = limits.max_prompt_tokens
    for i, job in enumerate(jobs):
        sfx = f"[{i}]" if len(jobs) > 1 else ""
        for name, text in (("prompt", job.prompt), ("negative_prompt", job.negative_prompt)):
            n = count_tokens(text)
            if n > limit:
                raise InvalidArgumentError(
                    name + sfx, f"at most {limit} tokens (the server's --max-prompt-tokens; the model reads "
                    f"{limit} tokens, start and end included)", f"{n} tokens")


def validate_request(data: Mapping[str, Any], *, limits: ServeLimits, default_size: int, vae_factor: int,
                     check_request: Optional[Callable[..., None]] = None,
                     count_tokens: Optional[Callable[[str], int]] = None,
                     request_id: Optional[str] = None) -> Union[AdmittedRequest, CfgSwitchError]:
    """Check one request's inputs; return it admitted or the error that refuses it (never raises for bad input).

    Args:
        data (`Mapping[str, np.ndarray]`): the request's input tensors by name (each ``[b, 1]``).
        limits (`ServeLimits`): the server's limits, model-derived ones filled in
            (:meth:`ServeLimits.for_model`).
        default_size (`int`): the model's native side (height and width when a request leaves them out).
        vae_factor (`int`): sizes must be multiples of it.
        check_request (`callable`, optional): the backend's ``check_request(batch=, height=, width=)``.
        count_tokens (`callable`, optional): ``text -> tokens`` (:func:`token_counter`); with it the
            prompt limit in tokens applies.
        request_id (`str`, optional): the request's id (a new one by default).

    Returns:
        :class:`AdmittedRequest`, or the typed error (:class:`~cfgswitch.errors.InvalidArgumentError`
        and its subclasses, :class:`~cfgswitch.errors.BundleError` for a size the bundle lacks); an
        unexpected failure of the checks themselves is logged with its traceback and returned as a
        :class:`~cfgswitch.serving.batching.RequestError`.
    """
    rid = request_id or new_request_id()
    try:
        jobs = parse_request(data, limits=limits, default_size=default_size, vae_factor=vae_factor,
                             check_request=check_request)
        if count_tokens is not None and limits.max_prompt_tokens is not None:
            _check_tokens(jobs, limits, count_tokens)
    except CfgSwitchError as e:
        e.__traceback__ = None  # its frames hold the request's inputs (a 200 MB prompt): keep none of them
        return e
    except Exception as e:  # noqa: BLE001 - a defect in a check must still answer only this request
        logger.exception("request %s: the checks failed unexpectedly", rid)
        return RequestError(f"the request could not be checked ({type(e).__name__}); the server log has the details")
    return AdmittedRequest(rid, jobs)


class _NoTraceback:
    # A raised exception records its traceback in C; attribute lookups find this property first,
    # so code that formats ``e.__traceback__`` (PyTriton does, into the error it sends) prints none.
    __traceback__ = property(lambda self: None, lambda self, value: None)


def client_message(error: BaseException, request_id: str) -> str:
    """``TypeName: message (request id ID)``: all a client learns of an error."""
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    return f"{type(error).__name__}: {text} (request id {request_id})"


def wire_error(error: BaseException, request_id: str) -> Exception:
    """An exception to raise toward the client: its type name and one-line message, the request id, no traceback.

    Typed errors keep their message; any other error is logged here with its traceback and
    reaches the client as ``RequestError: internal error``.
    """
    if not isinstance(error, CfgSwitchError):
        logger.error("request %s: internal error", request_id, exc_info=(type(error), error, error.__traceback__))
        error = RequestError("internal error; the server log has the details")
    name = type(error).__name__
    cls = type(name, (_NoTraceback, Exception), {"__module__": "builtins", "__qualname__": name})
    out = cls(client_message(error, request_id)[len(name) + 2:])
    out.__cause__ = None
    out.__suppress_context__ = True
    return out


__all__ = ["AdmittedRequest", "client_message", "new_request_id", "token_counter", "validate_request", "wire_error"]
