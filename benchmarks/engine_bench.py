"""The serving suite: the step engine against request-level batching under open-loop load.

Four systems run the same seeded Poisson arrival process, interleaved per offered rate:

- ``request_batching``: today's request-level batching (requests with the same steps, size,
  scheduler, plan and guidance run their whole trajectory together, up to ``max_batch``
  images), plan ``switch:0.5``;
- ``engine_always``: the step engine, every request on ``always``;
- ``engine_switch``: the step engine, every request on ``switch:0.5``;
- ``one_at_a_time``: ``generate`` per request, FIFO.

Reported per system and rate: throughput (images/s), p50/p90/p99 latency, queue wait, rows
per UNet call. The UNet's cost at every call size is measured in the same run, so the ideal
gain of switching at the call sizes actually reached is computed, not assumed.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

logger = logging.getLogger(__name__)

SYSTEMS = ("request_batching", "engine_always", "engine_switch", "one_at_a_time")
#: An extra system: the step engine with ``switch:0.5`` and one call per role (``unet_call="split"``).
SPLIT = "engine_switch_split"


@dataclass
class LoadSpec:
    """The offered load: arrivals, and what each request asks for."""

    rate: float  #: requests per second (Poisson)
    count: int  #: requests
    steps: Sequence[int] = (20, 30)  #: drawn per request
    seed: int = 0  #: of the arrival process and of each request's draw


@dataclass
class Arrival:
    """One request of the load."""

    at: float
    prompt: str
    steps: int
    seed: int


def arrivals(spec: LoadSpec, prompts: Sequence[str]) -> List[Arrival]:
    """The seeded open-loop arrival process: exponential gaps, per-request steps and seeds."""
    rng = np.random.default_rng(spec.seed)
    gaps = rng.exponential(1.0 / spec.rate, spec.count)
    at = np.cumsum(gaps) - gaps[0]
    return [Arrival(float(a), prompts[i % len(prompts)], int(rng.choice(list(spec.steps))), int(rng.integers(0, 2**31)))
            for i, a in enumerate(at)]


class CallRecorder:
    """Counts rows of every UNet call through a sampler's runners (both roles) while installed."""

    def __init__(self, runners: Any) -> None:
        self.runners = runners
        self.rows: List[int] = []
        self._saved: Dict[str, Any] = {}

    def __enter__(self) -> "CallRecorder":
        r = self.runners
        unet, cfg = r.unet, r.unet_cfg
        rows = self.rows

        class _Plain:
            def predict(self, sample, timestep, ehs):
                rows.append(int(sample.shape[0]))
                return unet.predict(sample, timestep, ehs)

        class _Cfg:
            def predict_guided(self, sample, timestep, ehs, w):
                rows.append(2 * int(sample.shape[0]))
                return cfg.predict_guided(sample, timestep, ehs, w)

        self._saved = {"unet": unet, "unet_cfg": cfg}
        r.unet, r.unet_cfg = _Plain(), _Cfg()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.runners.unet, self.runners.unet_cfg = self._saved["unet"], self._saved["unet_cfg"]


class RequestBatcher:
    """Request-level batching, as Triton's dynamic batcher feeds ``generate`` today.

    A worker takes the oldest waiting request and every waiting request with the same key,
    up to ``max_batch`` images, and runs their whole trajectories in one ``generate`` call.
    """

    def __init__(self, sampler: Any, max_batch: int, plan: str) -> None:
        self.sampler, self.max_batch, self.plan = sampler, max_batch, plan
        self._cv = threading.Condition()
        self._queue: List[tuple] = []
        self._closed = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def submit(self, a: Arrival, done) -> None:
        with self._cv:
            self._queue.append((a, time.perf_counter(), done))
            self._cv.notify()

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._thread.join()

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._closed:
                    self._cv.wait()
                if not self._queue:
                    return
                head = self._queue[0][0]
                group = [q for q in self._queue if q[0].steps == head.steps][: self.max_batch]
                for q in group:
                    self._queue.remove(q)
            start = time.perf_counter()
            self.sampler.generate([q[0].prompt for q in group], steps=head.steps, plan=self.plan,
                                  seed=[q[0].seed for q in group], output_type="np")
            for a, queued, done in group:
                done(a, start - queued)


def _serve(system: str, sampler: Any, load: List[Arrival], max_rows: int, max_batch: int,
           row_buckets: bool = False) -> Dict[str, Any]:
    finished: Dict[int, float] = {}
    waits: Dict[int, float] = {}
    lock = threading.Lock()
    t0 = time.perf_counter()

    def done(a: Arrival, wait: float) -> None:
        with lock:
            finished[id(a)] = time.perf_counter() - t0
            waits[id(a)] = wait

    engine = batcher = None
    pending: List[tuple] = []
    if system.startswith("engine"):
        engine = sampler.engine(max_rows=max_rows, max_queue=len(load) + 1, row_buckets=row_buckets or None,
                                unet_call="split" if system == SPLIT else "single")
    elif system == "request_batching":
        batcher = RequestBatcher(sampler, max_batch, "switch:0.5")
    plan = "always" if system == "engine_always" else "switch:0.5"
    serial: List[Arrival] = []
    with CallRecorder(sampler.runners) as rec:
        if system == "one_at_a_time":
            worker_queue: List[tuple] = []
            cv = threading.Condition()

            def worker() -> None:
                for _ in range(len(load)):
                    with cv:
                        while not worker_queue:
                            cv.wait()
                        a, q = worker_queue.pop(0)
                    s = time.perf_counter()
                    sampler.generate(a.prompt, steps=a.steps, plan=plan, seed=a.seed, output_type="np")
                    done(a, s - q)

            th = threading.Thread(target=worker, daemon=True)
            th.start()
        for a in load:
            delay = t0 + a.at - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            if engine is not None:
                fut = engine.submit(a.prompt, steps=a.steps, plan=plan, seed=a.seed, output_type="np")
                # the finish time is taken when the request finishes, not when this loop gets to it
                fut.add_done_callback(lambda f, a=a: done(a, f.result().timings.get("queue", 0.0)) if not f.exception()
                                      else None)
                pending.append((a, fut))
            elif batcher is not None:
                batcher.submit(a, done)
            else:
                with cv:
                    worker_queue.append((a, time.perf_counter()))
                    cv.notify()
                serial.append(a)
        if engine is not None:
            for a, fut in pending:
                fut.result(timeout=3600)
            limit = time.perf_counter() + 30  # done-callbacks run just after result() can return
            while len(finished) < len(load) and time.perf_counter() < limit:
                time.sleep(0.001)
            engine.close()
        elif batcher is not None:
            while len(finished) < len(load):
                time.sleep(0.005)
            batcher.close()
        else:
            th.join()
    lat = np.array([finished[id(a)] - a.at for a in load])
    end = max(finished.values())
    return {
        "system": system, "requests": len(load), "images": len(load), "elapsed_s": end,
        "throughput_img_s": len(load) / end,
        "latency_s": {k: float(np.percentile(lat, q)) for k, q in (("p50", 50), ("p90", 90), ("p99", 99))},
        "queue_wait_s": {"mean": float(np.mean(list(waits.values()))), "p99": float(np.percentile(list(waits.values()), 99))},
        "rows_per_call": rec.rows, "mean_rows_per_call": float(np.mean(rec.rows)) if rec.rows else 0.0,
    }


def unet_costs(sampler: Any, max_rows: int, repeat: int = 5) -> Dict[int, float]:
    """Median seconds of one plain-UNet call at each row count 1..``max_rows`` (the embedded model's shapes)."""
    spec = sampler.spec
    h = spec.sample_size
    text = torch.randn(max_rows, spec.text_length, spec.text_width)
    x = torch.randn(max_rows, spec.latent_channels, h, h)
    t = torch.full((max_rows,), 500.0)
    out: Dict[int, float] = {}
    for _ in range(2):
        sampler.runners.unet.predict(x[:1], t[:1], text[:1])
    times: Dict[int, List[float]] = {r: [] for r in range(1, max_rows + 1)}
    for _ in range(repeat):  # interleaved: every size once per round
        for r in range(1, max_rows + 1):
            s = time.perf_counter()
            sampler.runners.unet.predict(x[:r], t[:r], text[:r])
            times[r].append(time.perf_counter() - s)
    for r, v in times.items():
        out[r] = float(np.median(v))
    return out


def ideal_ratio(costs: Dict[int, float], calls_a: Sequence[int], images_a: int, calls_b: Sequence[int], images_b: int) -> float:
    """Predicted UNet seconds per image of system a over system b, from the measured cost per call size."""
    ta = sum(costs[min(r, max(costs))] for r in calls_a) / images_a
    tb = sum(costs[min(r, max(costs))] for r in calls_b) / images_b
    return ta / tb


@dataclass
class EngineBenchConfig:
    """What one run of the serving suite measures."""

    rates: Sequence[float] = (0.5, 0.7, 1.0, 1.5)  #: offered load as fractions of the estimated saturation
    count: int = 40  #: requests per system and rate
    steps: Sequence[int] = (20, 30)
    max_rows: int = 16
    max_batch: int = 8
    seed: int = 0
    systems: Sequence[str] = SYSTEMS
    cost_repeat: int = 5
    row_buckets: bool = False  #: pad engine calls to row buckets (CUDA graphs, static engines)
    extra: Dict[str, Any] = field(default_factory=dict)


def run_engine_bench(sampler: Any, cfg: EngineBenchConfig, prompts: Sequence[str], progress=None,
                     deadline: Optional[float] = None) -> Dict[str, Any]:
    """Run every system at every rate (interleaved per rate, order rotated), measure UNet costs, derive.

    ``deadline`` (a ``time.perf_counter()`` value): no new rate starts after it.
    """
    costs = unet_costs(sampler, cfg.max_rows, cfg.cost_repeat)
    mean_steps = float(np.mean(cfg.steps))
    # saturation estimate: full calls of max_rows rows, 1.5 rows per image and step (switch:0.5)
    sat = cfg.max_rows / (1.5 * mean_steps * costs[cfg.max_rows])
    runs: List[Dict[str, Any]] = []
    for k, frac in enumerate(cfg.rates):
        if deadline is not None and time.perf_counter() > deadline:
            logger.warning("time limit reached: rates from %.2f on were not run", frac)
            break
        rate = frac * sat
        load = arrivals(LoadSpec(rate=rate, count=cfg.count, steps=cfg.steps, seed=cfg.seed + k), prompts)
        order = list(cfg.systems[k % len(cfg.systems):]) + list(cfg.systems[:k % len(cfg.systems)])
        for system in order:
            r = _serve(system, sampler, load, cfg.max_rows, cfg.max_batch, cfg.row_buckets)
            r.update(rate_fraction=frac, offered_rate=rate)
            runs.append(r)
            if progress:
                progress(r)
    derived = derive(runs, costs, cfg)
    return {"config": {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in cfg.__dict__.items()},
            "saturation_estimate_req_s": sat, "unet_cost_s": costs, "runs": runs, "derived": derived}


def derive(runs: List[Dict[str, Any]], costs: Dict[int, float], cfg: EngineBenchConfig) -> Dict[str, Any]:
    """Gains at saturation (the highest offered rate) and p99 at 70% of saturation."""
    top = max(r["rate_fraction"] for r in runs)
    at = {r["system"]: r for r in runs if r["rate_fraction"] == top}
    out: Dict[str, Any] = {"at_rate_fraction": top}
    if {"engine_switch", "request_batching"} <= set(at):
        out["engine_switch_over_request_batching"] = at["engine_switch"]["throughput_img_s"] / at["request_batching"]["throughput_img_s"]
    if {"engine_switch", "engine_always"} <= set(at):
        s, a = at["engine_switch"], at["engine_always"]
        realized = s["throughput_img_s"] / a["throughput_img_s"]
        ideal = ideal_ratio(costs, a["rows_per_call"], a["images"], s["rows_per_call"], s["images"])
        out.update(switch_over_always_realized=realized, switch_over_always_ideal=ideal,
                   realized_over_ideal=realized / ideal)
    if SPLIT in at and "engine_switch" in at:
        out["split_over_single"] = at[SPLIT]["throughput_img_s"] / at["engine_switch"]["throughput_img_s"]
    near = min({r["rate_fraction"] for r in runs}, key=lambda f: abs(f - 0.7))
    p99 = {r["system"]: r["latency_s"]["p99"] for r in runs if r["rate_fraction"] == near}
    out["p99_at_rate_fraction"] = near
    out["p99_s"] = p99
    if {"engine_switch", "request_batching"} <= set(p99):
        out["p99_engine_switch_below_request_batching"] = p99["engine_switch"] < p99["request_batching"]
    return out


def report_lines(results: Dict[str, Any]) -> List[str]:
    """A markdown table of every run and the derived figures."""
    lines = ["| system | load (x sat.) | offered req/s | images/s | p50 s | p90 s | p99 s | queue wait s | rows/call |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in results["runs"]:
        lat = r["latency_s"]
        lines.append(f"| {r['system']} | {r['rate_fraction']:.2f} | {r['offered_rate']:.2f} | {r['throughput_img_s']:.2f} | "
                     f"{lat['p50']:.2f} | {lat['p90']:.2f} | {lat['p99']:.2f} | {r['queue_wait_s']['mean']:.2f} | "
                     f"{r['mean_rows_per_call']:.1f} |")
    d = results["derived"]
    lines.append("")
    for k, v in d.items():
        lines.append(f"- {k}: {v if not isinstance(v, float) else round(v, 3)}")
    costs = results["unet_cost_s"]
    lines.append("")
    lines.append("UNet ms per call by rows: " + ", ".join(f"{r}: {c * 1e3:.1f}" for r, c in sorted(costs.items())))
    return lines


def plot(results: Dict[str, Any], path) -> Optional[str]:
    """Latency against offered load per system, and a histogram of rows per call (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for system in SYSTEMS + (SPLIT,):
        rs = sorted((r for r in results["runs"] if r["system"] == system), key=lambda r: r["offered_rate"])
        if rs:
            ax1.plot([r["offered_rate"] for r in rs], [r["latency_s"]["p99"] for r in rs], marker="o", label=f"{system} p99")
            ax1.plot([r["offered_rate"] for r in rs], [r["latency_s"]["p50"] for r in rs], ls="--", alpha=0.5)
    ax1.set_xlabel("offered load (requests/s)")
    ax1.set_ylabel("latency (s): p99 solid, p50 dashed")
    ax1.set_yscale("log")
    ax1.legend(fontsize=7)
    top = max(r["rate_fraction"] for r in results["runs"])
    for system in ("request_batching", "engine_always", "engine_switch"):
        rows = [x for r in results["runs"] if r["system"] == system and r["rate_fraction"] == top for x in r["rows_per_call"]]
        if rows:
            ax2.hist(rows, bins=range(1, max(rows) + 2), alpha=0.5, label=system)
    ax2.set_xlabel(f"rows per UNet call (load {top:.2f}x saturation)")
    ax2.set_ylabel("calls")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


__all__ = ["EngineBenchConfig", "LoadSpec", "SPLIT", "SYSTEMS", "arrivals", "derive", "ideal_ratio", "plot", "report_lines",
           "run_engine_bench", "unet_costs"]

