"""Requests to images: parse and check each request, group compatible images, run each group once.

A dynamic batch holds several requests (each of one or more images). Images that share
steps, size, scheduler, plan and guidance scale run as one :meth:`Sampler.generate` call
with one seed per image, so an image does not depend on the batch it ran in (see
DESIGN.md section 4: one generator per image). Used by both serving paths: the PyTriton
infer function and the Python-backend pipeline model of a repository.
"""

from __future__ import annotations

import logging
import math
import secrets
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from ..errors import CfgSwitchError, InvalidArgumentError
from ..calibration import AUTO_PLAN
from ..plans import GuidancePlan
from ..schedulers import scheduler_class_name
from ..validation import MAX_SEED, check_size
from .limits import ServeLimits
from .protocol import INPUTS, SIZE_INPUTS

logger = logging.getLogger(__name__)

_OPTIONAL = {t.name for t in INPUTS if t.optional}
_KNOWN = {t.name for t in INPUTS}
_KIND = {"BYTES": "a UTF-8 string (BYTES)", "INT64": "an integer (INT64)", "INT32": "an integer (INT32)", "FP32": "a float (FP32)"}
_DTYPE = {t.name: t.triton_dtype for t in INPUTS}
_WIDTH = {t.name: t.dims[0] for t in INPUTS}


class RequestError(CfgSwitchError):
    """A request of a dynamic batch is invalid; the message names the request and the input."""


@dataclass(frozen=True)
class GroupKey:
    """What images must share to run in one ``generate`` call."""

    steps: int
    height: int
    width: int
    scheduler: str
    plan: str
    guidance_scale: float
    #: SDXL's size conditioning given by the request: ``((name, (a, b)), ...)`` (empty: the defaults)
    sizes: Tuple[Tuple[str, Tuple[int, int]], ...] = ()
    #: no negative prompt was sent: ``generate`` gets ``None`` (SDXL then uses zero embeddings,
    #: ``force_zeros_for_empty_prompt``, as diffusers does; SD 1.x/2.x encode ``""`` either way)
    no_negative: bool = False

    def size_kwargs(self) -> Dict[str, Tuple[int, int]]:
        """The size conditioning as ``generate`` / ``submit`` keywords."""
        return dict(self.sizes)

    def negatives(self, jobs: Sequence["ImageJob"]) -> Optional[List[str]]:
        """The negative prompts of a group's images for ``generate`` / ``submit`` (``None``: none sent)."""
        return None if self.no_negative else [j.negative_prompt for j in jobs]


@dataclass(frozen=True)
class ImageJob:
    """One image of a request: its texts, seed and the settings it runs with."""

    prompt: str
    negative_prompt: str
    seed: int
    key: GroupKey


def _column(data: Mapping[str, Any], name: str, rows: Optional[int]) -> Optional[np.ndarray]:
    """Input ``name`` as a ``[rows]`` array, or ``[rows, 2]`` for a size input (``None`` when an optional input is absent)."""
    arr = data.get(name)
    width = _WIDTH[name]
    if arr is None:
        if name in _OPTIONAL:
            return None
        raise InvalidArgumentError(name, f"an input {name!r} ({_KIND[_DTYPE[name]]}, shape [batch, {width}])", "no such input")
    arr = np.asarray(arr)
    if arr.ndim != 2 or arr.shape[1] != width or arr.shape[0] < 1 or (rows is not None and arr.shape[0] != rows):
        want = f"[{rows}, {width}]" if rows is not None else f"[batch, {width}]"
        raise InvalidArgumentError(name, f"shape {want}", list(arr.shape))
    kind = _DTYPE[name]
    ok = (arr.dtype.kind in "OSU") if kind == "BYTES" else (
        arr.dtype == np.float32 if kind == "FP32" else arr.dtype.kind in "iu")
    if not ok:
        raise InvalidArgumentError(name, _KIND[kind], f"dtype {arr.dtype}")
    return arr[:, 0] if width == 1 else arr


def _text(name: str, value: Any, limits: ServeLimits) -> str:
    if isinstance(value, str):
        raw = value.encode("utf-8")
    elif isinstance(value, (bytes, np.bytes_)):
        raw = bytes(value)
    else:
        raise InvalidArgumentError(name, "a UTF-8 string (BYTES)", type(value).__name__)
    if len(raw) > limits.max_prompt_bytes:
        raise InvalidArgumentError(name, f"at most {limits.max_prompt_bytes} bytes (the server's --max-prompt-bytes)",
                                   f"{len(raw)} bytes")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidArgumentError(name, "UTF-8 text", raw[:40]) from None


def _int(name: str, value: Any, lo: int, hi: int, hint: str = "") -> int:
    v = int(value)
    if not lo <= v <= hi:
        raise InvalidArgumentError(name, f"an integer in [{lo}, {hi}]{hint}", v)
    return v


def _check_size_supported(check_request: Callable[..., None], height: int, width: int, max_batch: int) -> None:
    """Raise the backend's error when no batch size up to ``max_batch`` runs ``height`` x ``width``."""
    first: Optional[CfgSwitchError] = None
    for n in range(1, max_batch + 1):
        try:
            check_request(batch=n, height=height, width=width)
            return
        except CfgSwitchError as e:
            first = first or e
    assert first is not None
    raise first


def parse_request(data: Mapping[str, Any], *, limits: ServeLimits, default_size: int, vae_factor: int,
                  check_request: Optional[Callable[..., None]] = None) -> List[ImageJob]:
    """Check one request's inputs (``{name: array [b, 1]}``) and return its images.

    Args:
        data (`Mapping[str, np.ndarray]`): the request's input tensors by name.
        limits (`ServeLimits`): the server's limits and defaults.
        default_size (`int`): height and width when a request leaves them out.
        vae_factor (`int`): sizes must be multiples of it.
        check_request (`callable`, optional): the backend's ``check_request(batch=, height=, width=)``.

    Raises:
        InvalidArgumentError: an input is missing, of the wrong dtype or shape, or out of range;
            the message names the input.
    """
    if limits.max_image_side is None:  # the model's native side times the operator's factor
        limits = limits.for_model(default_size, limits.max_prompt_tokens or 1)
    unknown = sorted(set(data) - _KNOWN)
    if unknown:
        raise InvalidArgumentError("inputs", f"only {', '.join(sorted(_KNOWN))}", unknown)
    prompts = _column(data, "prompt", None)
    rows = len(prompts)
    if rows > limits.max_batch:
        raise InvalidArgumentError("prompt", f"at most {limits.max_batch} images per request (--max-batch)", f"{rows} images")
    cols = {name: _column(data, name, rows) for name in _KNOWN if name != "prompt"}
    jobs = []
    for i in range(rows):
        def get(name: str, default: Any) -> Any:
            col = cols[name]
            return default if col is None else col[i]

        sfx = f"[{i}]" if rows > 1 else ""
        prompt = _text("prompt" + sfx, prompts[i], limits)
        negative_raw = get("negative_prompt", None)
        negative = "" if negative_raw is None else _text("negative_prompt" + sfx, negative_raw, limits)
        seed = get("seed", None)
        seed = secrets.randbelow(2**31) if seed is None else _int("seed" + sfx, seed, 0, MAX_SEED)
        steps = _int("steps" + sfx, get("steps", limits.default_steps), 1, limits.max_steps, " (the server's --max-steps)")
        guidance = float(get("guidance_scale", 7.5))
        if not math.isfinite(guidance) or guidance < 0:
            raise InvalidArgumentError("guidance_scale" + sfx, "a finite number >= 0", guidance)
        plan_text = _text("plan" + sfx, get("plan", limits.default_plan.encode()), limits)
        # "auto": the model's own recommendation, resolved where the request runs (generate / the engine)
        plan = AUTO_PLAN if plan_text.strip().lower() == AUTO_PLAN else str(GuidancePlan.parse(plan_text))
        scheduler = _text("scheduler" + sfx, get("scheduler", b"ddim"), limits).strip().lower()
        scheduler_class_name(scheduler)
        side = " (the server's --max-image-side)"
        height = _int("height" + sfx, get("height", default_size), vae_factor, limits.max_image_side, side)
        width = _int("width" + sfx, get("width", default_size), vae_factor, limits.max_image_side, side)
        check_size("height" + sfx, height, vae_factor)
        check_size("width" + sfx, width, vae_factor)
        if check_request is not None and not jobs:
            _check_size_supported(check_request, height, width, limits.max_batch)
        if jobs and (height, width) != (jobs[0].key.height, jobs[0].key.width):
            raise InvalidArgumentError("height" + sfx, f"the size of image 0 ({jobs[0].key.height}x{jobs[0].key.width}): "
                                       "the images of one request share a size", f"{height}x{width}")
        sizes = []
        for name in SIZE_INPUTS:
            pair = get(name, None)
            if pair is not None:
                lo = 0 if name == "crops_coords_top_left" else 1
                sizes.append((name, (_int(f"{name}{sfx}[0]", pair[0], lo, 1 << 20), _int(f"{name}{sfx}[1]", pair[1], lo, 1 << 20))))
        key = GroupKey(steps, height, width, scheduler, plan, guidance, tuple(sizes), negative_raw is None)
        jobs.append(ImageJob(prompt, negative, seed, key))
    return jobs


def parse_batch(requests: Sequence[Mapping[str, Any]], **kwargs: Any) -> List[List[ImageJob]]:
    """:func:`parse_request` over a dynamic batch; the first invalid request fails it.

    Raises:
        CfgSwitchError: the request's own error when the batch holds one request, else a
            :class:`RequestError` that names the request's index in the batch.
    """
    parsed = []
    for index, request in enumerate(requests):
        try:
            parsed.append(parse_request(request, **kwargs))
        except CfgSwitchError as e:
            if len(requests) == 1:
                raise
            raise RequestError(f"request {index} of a dynamic batch of {len(requests)}: {e}") from e
    return parsed


def _chunks(count: int, max_batch: int, fits: Optional[Callable[[int], bool]]) -> List[int]:
    """Sizes that split ``count`` images: the largest size that ``fits`` (up to ``max_batch``) first."""
    sizes = []
    while count > 0:
        n = min(count, max_batch)
        if fits is not None:
            n = next((m for m in range(n, 0, -1) if fits(m)), n)
        sizes.append(n)
        count -= n
    return sizes


def group_jobs(parsed: Sequence[Sequence[ImageJob]], max_batch: int,
               check_request: Optional[Callable[..., None]] = None) -> List[Tuple[GroupKey, List[Tuple[int, int, ImageJob]]]]:
    """Images of a batch grouped by :class:`GroupKey` (first-seen order), in chunks of at most ``max_batch``.

    With ``check_request`` (the backend's), chunks take the largest batch size it accepts
    (a bundle exported for batch sizes 1, 2, 4 runs 3 images as 2 + 1).

    Returns a list of ``(key, [(request index, row, job), ...])``.
    """
    groups: "OrderedDict[GroupKey, List[Tuple[int, int, ImageJob]]]" = OrderedDict()
    for r, jobs in enumerate(parsed):
        for row, job in enumerate(jobs):
            groups.setdefault(job.key, []).append((r, row, job))
    out = []
    for key, members in groups.items():
        fits = None
        if check_request is not None:
            def fits(n: int, key: GroupKey = key) -> bool:
                try:
                    check_request(batch=n, height=key.height, width=key.width)
                    return True
                except CfgSwitchError:
                    return False
        start = 0
        for n in _chunks(len(members), max_batch, fits):
            out.append((key, members[start:start + n]))
            start += n
    return out


def run_batch(sampler: Any, parsed: Sequence[Sequence[ImageJob]], max_batch: int) -> List[Any]:
    """Generate every image of a parsed batch and return one answer per request.

    Each group runs as one ``sampler.generate`` call with per-image seeds. A group that fails
    fails only its own requests: their answer is the exception (a typed error as raised, any
    other error logged with its traceback and replaced by a :class:`RequestError`); the other
    requests get their output dict.
    """
    from ..output import to_uint8

    results: List[Dict[str, Any]] = [
        {"image": [None] * len(jobs), "cfg_steps": [0] * len(jobs), "late_steps": [0] * len(jobs)} for jobs in parsed
    ]
    failed: Dict[int, Exception] = {}
    for key, members in group_jobs(parsed, max_batch, sampler.runners.check_request):
        members = [m for m in members if m[0] not in failed]
        if not members:
            continue
        jobs = [m[2] for m in members]
        try:
            out = sampler.generate(
                [j.prompt for j in jobs], key.negatives(jobs), steps=key.steps,
                guidance_scale=key.guidance_scale, scheduler=key.scheduler, plan=key.plan, seed=[j.seed for j in jobs],
                height=key.height, width=key.width, output_type="np",
                max_image_side=max(key.height, key.width),  # checked against the server's own limit already
                **key.size_kwargs(),
            )
        except CfgSwitchError as e:
            for r, _, _ in members:
                failed[r] = e
            continue
        except Exception as e:  # noqa: BLE001 - a bug must not take the other groups' requests down with it
            logger.exception("group %s failed", key)
            err = RequestError(f"generation failed ({type(e).__name__}); the server log has the details")
            for r, _, _ in members:
                failed[r] = err
            continue
        images = to_uint8(out.images)
        logger.debug("group of %d image(s): %s", len(jobs), key)
        for (r, row, _), image in zip(members, images):
            results[r]["image"][row] = image
            results[r]["cfg_steps"][row] = out.cfg_steps
            results[r]["late_steps"][row] = out.late_steps
    return [
        failed[r] if r in failed else {
            "image": np.stack(res["image"]).astype(np.uint8),
            "cfg_steps": np.asarray(res["cfg_steps"], dtype=np.int32).reshape(-1, 1),
            "late_steps": np.asarray(res["late_steps"], dtype=np.int32).reshape(-1, 1),
        }
        for r, res in enumerate(results)
    ]


__all__ = ["GroupKey", "ImageJob", "RequestError", "group_jobs", "parse_batch", "parse_request", "run_batch"]
