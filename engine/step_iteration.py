"""The stages of a step-engine iteration around the shared calls: text, UNet and step, decode.

Each stage runs once for every request that needs it (one text-encoder call for all newly
admitted prompts, one UNet call per latent size, one VAE call for requests that finish
together). When a shared call raises, the stage is retried request by request, so only the
request that breaks it fails.
"""

from __future__ import annotations

import concurrent.futures
import logging
import time
from collections import OrderedDict
from typing import Any, Dict, List, Sequence, Tuple

import torch

from .conditioning import Conditioning
from .errors import CfgSwitchError, RequestFailedError
from .output import GenerationOutput, to_uint8
from .step_batch import Flight, Part, fused_step, row_set, run_plain, run_split, single_step
from .steppers import FusedStepper
from .tokenizer import tokenize, truncation_warnings

logger = logging.getLogger(__name__)


def fail_future(fut: Any, error: BaseException) -> None:
    """Fail a request's future with ``error``; a future cancelled meanwhile stays cancelled."""
    try:
        fut.set_exception(error)
    except concurrent.futures.InvalidStateError:  # cancelled meanwhile
        pass


def resolve_future(fut: Any, value: Any) -> bool:
    """Give a request's future its result; False when it was cancelled meanwhile."""
    try:
        fut.set_result(value)
        return True
    except concurrent.futures.InvalidStateError:  # cancelled meanwhile
        return False


def _wrap(rid: int, stage: str, error: BaseException) -> BaseException:
    if isinstance(error, CfgSwitchError):
        return error
    logger.error("request %d failed in %s: %s: %s", rid, stage, type(error).__name__, error)
    return RequestFailedError(f"request {rid}: {stage} failed: {type(error).__name__}: {error}")


# ------------------------------------------------------------------ text
def _encode(sampler: Any, flights: Sequence[Flight]) -> None:
    """SD 1.x/2.x: one text-encoder call for every prompt and negative prompt of ``flights``;
    other families (SDXL) follow their own recipe per request."""
    if getattr(sampler.spec, "family", "sd1") not in ("sd1", "sd2"):
        for f in flights:
            f.conditioning, f.warnings = sampler.encode_conditioning(
                f.args.prompts, f.args.negatives, f.args.images_per_prompt, negative_none=f.args.negative_none,
                sizes=f.args.sizes)
        return
    spec, tok = sampler.spec, sampler.tokenizer
    cond_tok = [tokenize(tok, f.args.prompts, spec.text_length) for f in flights]
    unc_tok = [tokenize(tok, f.args.negatives, spec.text_length) for f in flights]
    ids = torch.cat([t.input_ids for t in cond_tok] + [t.input_ids for t in unc_tok])
    emb = sampler.runners.text_encoder.encode(ids)
    n_cond = sum(t.input_ids.shape[0] for t in cond_tok)
    cond_all, unc_all = emb[:n_cond], emb[n_cond:]
    oc = ou = 0
    for f, tc, tu in zip(flights, cond_tok, unc_tok):
        nc, nu = tc.input_ids.shape[0], tu.input_ids.shape[0]
        f.conditioning = Conditioning.from_text(unc_all[ou:ou + nu], cond_all[oc:oc + nc]).repeat_interleave(
            f.args.images_per_prompt)
        f.warnings = truncation_warnings(f.args.prompts, tc, "prompt") + truncation_warnings(f.args.negatives, tu,
                                                                                             "negative prompt")
        oc, ou = oc + nc, ou + nu


def encode_admitted(sampler: Any, admitted: Sequence[Tuple[Flight, Any]]) -> List[Tuple[Flight, Any]]:
    """Text-encode every newly admitted request in one call; returns those that succeeded."""
    start = time.perf_counter()
    try:
        _encode(sampler, [f for f, _ in admitted])
        ok = list(admitted)
    except Exception:  # noqa: BLE001 - isolate the request that breaks the shared call
        ok = []
        for f, fut in admitted:
            try:
                _encode(sampler, [f])
                ok.append((f, fut))
            except Exception as e:  # noqa: BLE001
                fail_future(fut, _wrap(f.rid, "text encoding", e))
    seconds = time.perf_counter() - start
    for f, _ in ok:
        f.add_time("text", seconds)
    return ok


# ------------------------------------------------------------------ UNet and step
def _unet(runners: Any, parts: List[Part], unet_call: str, buckets) -> List[Tuple[str, int, int]]:
    if unet_call == "split":
        return run_split(runners, parts, buckets)
    real, padded = run_plain(runners.unet, parts, buckets)
    return [("plain", real, padded)]


def iterate(runners: Any, flights: Sequence[Flight], unet_call: str, buckets) -> Tuple[List[Tuple[str, int, int]], Dict[int, BaseException]]:
    """Advance every flight one step. Returns the UNet calls made and the requests that failed."""
    calls: List[Tuple[str, int, int]] = []
    failed: Dict[int, BaseException] = {}
    groups: "OrderedDict[tuple, List[Flight]]" = OrderedDict()
    for f in flights:
        groups.setdefault(tuple(f.latents.shape[1:]), []).append(f)
    for group in groups.values():
        parts: List[Part] = []
        for f in group:
            try:
                parts.append(row_set(f))
            except Exception as e:  # noqa: BLE001
                failed[f.rid] = _wrap(f.rid, f"step {f.step}", e)
        if not parts:
            continue
        start = time.perf_counter()
        try:
            calls += _unet(runners, parts, unet_call, buckets)
        except Exception:  # noqa: BLE001 - retry alone: only the request that breaks the call fails
            alive = []
            for p in parts:
                try:
                    calls += _unet(runners, [p], unet_call, buckets)
                    alive.append(p)
                except Exception as e:  # noqa: BLE001
                    failed[p.flight.rid] = _wrap(p.flight.rid, f"the UNet at step {p.flight.step}", e)
            parts = alive
        seconds = time.perf_counter() - start
        rows = sum(p.rows for p in parts)
        for p in parts:
            p.flight.add_time("unet_cfg" if any(p.guided) else "unet_late", seconds)
            p.flight.peers = max(p.flight.peers, len(parts))
            p.flight.rows_seen = max(p.flight.rows_seen, rows)
        start = time.perf_counter()
        try:
            rest = fused_step(parts)
        except Exception:  # noqa: BLE001 - nothing was advanced: step each request alone
            logger.debug("shared fused step failed; stepping requests one by one", exc_info=True)
            rest = parts
        for p in rest:
            try:
                single_step(p)
            except Exception as e:  # noqa: BLE001
                failed[p.flight.rid] = _wrap(p.flight.rid, f"step {p.flight.step}", e)
        seconds = time.perf_counter() - start
        for p in parts:
            f = p.flight
            if f.rid in failed:
                continue
            f.add_time("scheduler", seconds)
            if not bool(torch.isfinite(f.latents).all()):
                failed[f.rid] = RequestFailedError(f"request {f.rid}: latents are not finite after step {f.step}")
                continue
            f.counts.add(f.step, p.guided)
            f.step += 1
    return calls, failed


# ------------------------------------------------------------------ decode and output
def _decode(sampler: Any, flights: Sequence[Flight]) -> List[Any]:
    images = sampler.decode_latents(torch.cat([f.latents for f in flights]))
    out, offset = [], 0
    for f in flights:
        out.append(images[offset:offset + f.batch])
        offset += f.batch
    return out


def _output(sampler: Any, f: Flight, images: Any) -> GenerationOutput:
    from PIL import Image

    if f.args.output_type == "pil":
        images = [Image.fromarray(img) for img in to_uint8(images)]
    timings = {k: 0.0 for k in ("queue", "text", "unet_cfg", "unet_late", "scheduler", "vae", "loop")}
    timings.update(f.timings)
    now = time.perf_counter()
    timings["loop"] = now - (f.started or now)
    timings["total"] = now - f.submitted
    plan = f.args.plan
    return GenerationOutput(
        images=images, latents=f.latents, timings=timings, cfg_steps=f.counts.cfg_steps,
        late_steps=f.counts.late_steps, unet_rows=f.counts.unet_rows, warnings=list(f.warnings), plan=str(plan),
        late_mode=plan.late, backend=sampler.backend,
        step_kernel="fused" if isinstance(f.stepper, FusedStepper) else "reference",
        switch_step=f.counts.switch_step, seeds=list(f.args.seeds),
        info={**sampler.runners.info, "step_engine": {"max_requests_per_call": f.peers, "max_rows_per_call": f.rows_seen}},
    )


def decode_finished(sampler: Any, finished: Sequence[Tuple[Flight, Any]]) -> List[Any]:
    """Decode the requests that finished in one iteration (one VAE call per latent size).

    Returns, per request, its :class:`GenerationOutput` or the exception it failed with.
    """
    flights = [f for f, _ in finished]
    results: Dict[int, Any] = {}
    groups: "OrderedDict[tuple, List[Flight]]" = OrderedDict()
    for f in flights:
        if f.args.output_type == "latent":
            results[f.rid] = None
        else:
            groups.setdefault(tuple(f.latents.shape[1:]), []).append(f)
    for group in groups.values():
        start = time.perf_counter()
        try:
            for f, images in zip(group, _decode(sampler, group)):
                results[f.rid] = images
        except Exception:  # noqa: BLE001 - decode alone: only the request that breaks it fails
            for f in group:
                try:
                    results[f.rid] = _decode(sampler, [f])[0]
                except Exception as e:  # noqa: BLE001
                    results[f.rid] = _wrap(f.rid, "VAE decode", e)
        seconds = time.perf_counter() - start
        for f in group:
            f.add_time("vae", seconds)
    out = []
    for f in flights:
        r = results[f.rid]
        if isinstance(r, BaseException):
            out.append(r)
            continue
        try:
            out.append(_output(sampler, f, r))
        except Exception as e:  # noqa: BLE001
            out.append(_wrap(f.rid, "output", e))
    return out


__all__ = ["decode_finished", "encode_admitted", "iterate"]
