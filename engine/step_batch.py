"""One iteration of the step engine: every active request advances one step, sharing the UNet.

Each request keeps its own scheduler, generators, latents and plan state (:class:`Flight`).
An iteration builds one row set from all of them (:func:`row_set`): 2 rows per image in its
CFG phase (uncond, cond), 1 row per image in its late phase (the embeddings its plan's late
mode names), each row with its own timestep. The UNet runs once over the row set
(``unet_call="single"``, the plain ``unet`` role), or once per role (``"split"``: guided images
through the CFG role, the rest through the plain UNet). Then one fused ``guide_and_step``
(:func:`fused_step`) updates every image whose scheduler the fused op covers, with per-image
weights, coefficients and update forms; the other requests step through diffusers' own
``scheduler.step``. Adaptive plans switch per image.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from .conditioning import TEXT, Conditioning
from .kernels_bridge import guide_and_step
from .loop import StepCounts, adaptive_rows, initial_latents, make_generators, plan_may_switch
from .request import RequestArgs
from .schedulers import make_scheduler, set_timesteps
from .steppers import FusedStepper, make_stepper

#: How the UNet runs in one iteration.
UNET_CALLS = ("single", "split")


@dataclass
class Flight:
    """One request in flight: its arguments, scheduler state, latents and accounting."""

    rid: int
    args: RequestArgs
    scheduler: Any
    static: List[bool]
    submitted: float
    deadline: Optional[float]
    conditioning: Optional[Conditioning] = None
    warnings: List[str] = field(default_factory=list)
    latents: Optional[torch.Tensor] = None
    stepper: Any = None
    weights: Optional[torch.Tensor] = None
    step: int = 0
    switched: List[bool] = field(default_factory=list)
    counts: Optional[StepCounts] = None
    timings: Dict[str, float] = field(default_factory=dict)
    started: Optional[float] = None
    #: the most requests and rows of any UNet call this request took part in
    peers: int = 0
    rows_seen: int = 0

    @property
    def batch(self) -> int:
        """Images in the request."""
        return self.args.batch

    @property
    def done(self) -> bool:
        """Whether every step has run."""
        return self.step >= len(self.static)

    def guided_now(self) -> List[bool]:
        """Per image: whether this step runs guided."""
        g = self.static[self.step]
        return [g and not s for s in self.switched]

    def peak_rows(self) -> int:
        """The most rows any remaining step of this request can need (what admission reserves)."""
        future = self.static[self.step:]
        if not any(future):
            return self.batch
        open_images = self.switched.count(False) if self.switched else self.batch
        return self.batch + open_images

    def add_time(self, stage: str, seconds: float) -> None:
        """Add ``seconds`` to this request's ``stage``."""
        self.timings[stage] = self.timings.get(stage, 0.0) + seconds


def new_flight(rid: int, args: RequestArgs, scheduler_config: Dict[str, Any], device, deadline: Optional[float]) -> Flight:
    """A request's scheduler and plan schedule, built when it is submitted (cheap, and it checks the config)."""
    scheduler = make_scheduler(args.scheduler, scheduler_config)
    set_timesteps(scheduler, args.steps, device)
    static = args.plan.schedule(scheduler.timesteps)
    return Flight(rid=rid, args=args, scheduler=scheduler, static=static, submitted=time.perf_counter(),
                  deadline=deadline, switched=[False] * args.batch, counts=StepCounts(args.batch))


def start_flight(flight: Flight, runners: Any, latent_shape: Tuple[int, int, int]) -> None:
    """Initial noise (one generator per image), the stepper and the weights of an admitted request."""
    device, dtype = runners.device, runners.dtype
    generators = make_generators(flight.args.seeds)
    flight.latents = initial_latents(generators, latent_shape, device, dtype) * flight.scheduler.init_noise_sigma
    flight.weights = torch.full((flight.batch,), flight.args.guidance_scale, dtype=torch.float32, device=device)
    flight.stepper = make_stepper(flight.scheduler, flight.weights, generators, device, dtype, flight.args.step_kernel)
    flight.started = time.perf_counter()


@dataclass
class Part:
    """One request's share of an iteration: its input rows and how its images read the output."""

    flight: Flight
    t: torch.Tensor
    guided: List[bool]
    sample: torch.Tensor
    timestep: torch.Tensor
    text: torch.Tensor
    rows_a: List[int]
    rows_b: List[int]
    #: "pairs" (rows for the fused combine) or "cfg" (one already guided row per image, split mode)
    kind: str = "pairs"
    pred: Optional[torch.Tensor] = None
    #: a family's added conditioning rows by name (SDXL), aligned with ``text``
    added: Dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def rows(self) -> int:
        return int(self.sample.shape[0])


def row_set(flight: Flight) -> Part:
    """The rows ``flight`` adds to this iteration (scales its model input on the way)."""
    sch = flight.scheduler
    t = sch.timesteps[flight.step]
    x_in = sch.scale_model_input(flight.latents, t)
    guided = flight.guided_now()
    picks, rows_a, rows_b = adaptive_rows(guided, flight.args.plan.late)
    index = torch.tensor([b for b, _ in picks], dtype=torch.long, device=x_in.device)
    t_row = t.to(device=x_in.device, dtype=torch.float32)
    rows = flight.conditioning.rows(picks)
    text = rows.pop(TEXT)
    return Part(flight=flight, t=t, guided=guided, sample=x_in.index_select(0, index),
                timestep=t_row.expand(len(picks)), text=text, rows_a=rows_a, rows_b=rows_b, added=rows)


def pad_to(rows: int, buckets: Optional[Sequence[int]]) -> int:
    """The bucket ``rows`` is padded up to (``rows`` itself without buckets)."""
    if not buckets:
        return rows
    for b in buckets:
        if b >= rows:
            return b
    raise ValueError(f"rows: {rows} exceed the largest row bucket {buckets[-1]}")


def run_plain(unet: Any, parts: Sequence[Part], buckets: Optional[Sequence[int]]) -> Tuple[int, int]:
    """One plain-UNet call over the rows of ``parts`` (padded to a bucket); sets each part's ``pred``.

    Padding rows repeat the first real row, so they are finite, and are cut off before any
    output is read. Returns ``(real rows, padded rows)``.
    """
    sample = torch.cat([p.sample for p in parts])
    timestep = torch.cat([p.timestep for p in parts])
    text = torch.cat([p.text for p in parts])
    added = {k: torch.cat([p.added[k] for p in parts]) for k in parts[0].added}
    real = int(sample.shape[0])
    padded = pad_to(real, buckets)
    if padded > real:
        sample, timestep, text = (_pad(x, padded) for x in (sample, timestep, text))
        added = {k: _pad(v, padded) for k, v in added.items()}
    pred = unet.predict(sample, timestep, text, **({"added": added} if added else {}))
    offset = 0
    for p in parts:
        p.pred = pred[offset:offset + p.rows]
        offset += p.rows
    return real, padded


def _pad(x: torch.Tensor, rows: int) -> torch.Tensor:
    """``x`` with its first row repeated up to ``rows`` rows."""
    extra = rows - x.shape[0]
    return torch.cat([x, x[:1].expand(extra, *x.shape[1:])])


def run_split(runners: Any, parts: Sequence[Part], buckets: Optional[Sequence[int]]) -> List[Tuple[str, int, int]]:
    """The CFG role for wholly guided, non-adaptive requests and the plain UNet for the rest.

    Returns one ``(role, real rows, padded rows)`` per call made.
    """
    calls: List[Tuple[str, int, int]] = []
    cfg = [p for p in parts if all(p.guided) and not p.flight.args.plan.is_adaptive and not p.flight.args.guidance_rescale]
    plain = [p for p in parts if p not in cfg]
    if cfg:
        x = torch.cat([p.sample[:p.flight.batch] for p in cfg])
        t = torch.cat([p.timestep[:p.flight.batch] for p in cfg])
        uncond = torch.cat([p.text[:p.flight.batch] for p in cfg])
        cond = torch.cat([p.text[p.flight.batch:] for p in cfg])
        w = torch.cat([p.flight.weights for p in cfg])
        added = {k: torch.cat([p.added[k][:p.flight.batch] for p in cfg] + [p.added[k][p.flight.batch:] for p in cfg])
                 for k in cfg[0].added}
        eps = runners.unet_cfg.predict_guided(x, t, torch.cat([uncond, cond]), w, **({"added": added} if added else {}))
        offset = 0
        for p in cfg:
            b = p.flight.batch
            p.pred, p.kind = eps[offset:offset + b], "cfg"
            p.rows_a, p.rows_b = list(range(b)), [-1] * b
            offset += b
        calls.append(("cfg", 2 * x.shape[0], 2 * x.shape[0]))
    if plain:
        real, padded = run_plain(runners.unet, plain, buckets)
        calls.append(("plain", real, padded))
    return calls


def fused_step(parts: Sequence[Part]) -> List[Part]:
    """One ``guide_and_step`` call over every part whose stepper is fused; returns the others.

    Per image: its own rows into the concatenated predictions, update form, weight and
    coefficients (from its own scheduler), and previous x0 for second-order DPM-Solver++.
    """
    fused, rest = [], []
    for p in parts:
        stepper = p.flight.stepper
        shared = isinstance(stepper, FusedStepper) and not p.flight.args.guidance_rescale  # rescale: its own call
        share = stepper.prepare(p.t, p.flight.latents, p.pred) if shared else None
        (fused if share is not None else rest).append((p, share) if share is not None else p)
    if not fused:
        return list(rest)
    rows, params, prevs, preds, samples = [], [], [], [], []
    offset = 0
    want_x0 = any(s.multistep for _, s in fused)
    want_cos = any(p.flight.args.plan.is_adaptive for p, _ in fused)
    need_prev = any(s.prev is not None for _, s in fused)
    for p, s in fused:
        for a, b in zip(p.rows_a, p.rows_b):
            rows.append([a + offset, b + offset if b >= 0 else -1, int(s.form), 0])
        offset += int(p.pred.shape[0])
        params.append(s.params)
        preds.append(p.pred)
        samples.append(p.flight.latents)
        if need_prev:
            prevs.append(s.prev if s.prev is not None else torch.zeros_like(p.flight.latents))
    device = samples[0].device
    result = guide_and_step(
        torch.cat(preds), torch.cat(samples), torch.tensor(rows, dtype=torch.int32).to(device), torch.cat(params),
        torch.cat(prevs) if need_prev else None, want_x0=want_x0, want_cosine=want_cos, impl="compiled",
        check_rows=False,
    )
    start = 0
    for p, s in fused:
        b = p.flight.batch
        p.flight.latents = result.latents[start:start + b]
        p.flight.stepper.finish(result.x0[start:start + b] if s.multistep else None)
        if p.flight.args.plan.is_adaptive:
            _adaptive_update(p, result.cosine[start:start + b])
        start += b
    return list(rest)


def single_step(p: Part) -> None:
    """Step one part alone through its own stepper (reference or a fused one that cannot share)."""
    adaptive = p.flight.args.plan.is_adaptive
    latents, cos = p.flight.stepper.step_rows(p.pred, p.rows_a, p.rows_b, p.t, p.flight.latents, want_cosine=adaptive,
                                              guidance_rescale=p.flight.args.guidance_rescale)
    p.flight.latents = latents
    if adaptive:
        _adaptive_update(p, cos)


def _adaptive_update(p: Part, cos: torch.Tensor) -> None:
    f = p.flight
    values = [float(c) for c in cos.tolist()]
    for b, g in enumerate(p.guided):
        if g and plan_may_switch(f.args.plan, values[b], f.step, len(f.static)):
            f.switched[b] = True


__all__ = ["Flight", "Part", "UNET_CALLS", "fused_step", "new_flight", "pad_to", "row_set", "run_plain", "run_split",
           "single_step", "start_flight"]
