"""``cfgswitch bench --suite serving``: the step engine under open-loop load (see :mod:`.engine_bench`)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

logger = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The serving suite's options (beside ``bench``'s own ``--model``, ``--bundle``, ``--backend``, ``--threads``, ``--out``)."""
    g = p.add_argument_group("serving suite (--suite serving)")
    g.add_argument("--rates", default="0.5,0.7,1.0,1.5",
                   help="offered loads as fractions of the estimated saturation, comma-separated")
    g.add_argument("--requests", type=int, default=40, help="requests per system and rate")
    g.add_argument("--request-steps", default="20,30", dest="request_steps", help="steps drawn per request")
    g.add_argument("--max-rows", type=int, default=16, dest="max_rows", help="step engine: UNet rows per call at most")
    g.add_argument("--max-batch", type=int, default=8, dest="max_batch", help="request batching: images per batch at most")
    g.add_argument("--no-split", action="store_true", dest="no_split",
                   help="leave out the step engine with one UNet call per role (unet_call='split')")


def run(args: argparse.Namespace) -> int:
    """Run the serving suite and write ``serving.json``, ``serving.md`` and ``serving.png`` into ``--out``."""
    import torch

    from cfgswitch.benchmarks.config import parse_float_list, parse_int_list
    from cfgswitch.demo import load_demo_sampler
    from cfgswitch.errors import InvalidArgumentError
    from cfgswitch.shapes.captions import sample_captioned

    from .engine_bench import SPLIT, SYSTEMS, EngineBenchConfig, plot, report_lines, run_engine_bench
    from .machine import machine_info

    rates = parse_float_list("rates", args.rates)
    steps = parse_int_list("request-steps", args.request_steps, 1, 10_000)
    for name, v in (("requests", args.requests), ("max-rows", args.max_rows), ("max-batch", args.max_batch)):
        if v < 1:
            raise InvalidArgumentError(name, "a positive integer", v)
    threads = args.threads or 1
    torch.set_num_threads(threads)
    backend = (args.backend or "onnxruntime").split(",")[0]
    sampler = load_demo_sampler(model=args.model or "default", bundle=args.bundle, backend=backend,
                                batch=args.max_batch, threads=threads)
    prompts = [c for _, c in sample_captioned(2026, 64)]
    systems = SYSTEMS if args.no_split else SYSTEMS + (SPLIT,)
    cfg = EngineBenchConfig(rates=rates, count=args.requests, steps=steps, max_rows=args.max_rows,
                            max_batch=args.max_batch, seed=args.seed, systems=systems)

    def progress(r):
        logger.info("%-17s load %.2fx: %.2f images/s, p99 %.2f s, %.1f rows/call", r["system"], r["rate_fraction"],
                    r["throughput_img_s"], r["latency_s"]["p99"], r["mean_rows_per_call"])

    start = time.perf_counter()
    results = run_engine_bench(sampler, cfg, prompts, progress=None if args.no_progress else progress)
    results.update(backend=sampler.backend, threads=threads, machine=machine_info(), elapsed_s=time.perf_counter() - start,
                   load_average=list(os.getloadavg()))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "serving.json").write_text(json.dumps(results, indent=1, default=str))
    lines = report_lines(results)
    (out / "serving.md").write_text("\n".join(["# Serving suite: step engine against request-level batching", ""] + lines) + "\n")
    plot(results, out / "serving.png")
    print("\n".join(lines))
    return 0


__all__ = ["add_arguments", "run"]
