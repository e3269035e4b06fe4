"""Serving benchmark (not a test): requests per second of ``cfgswitch serve`` at concurrency 1 and 8,
and the served latency over the direct ``Sampler.generate`` latency at concurrency 1.

It starts ``cfgswitch serve`` as a subprocess on free loopback ports and sends
``--requests`` one-image requests at each ``--concurrency``. Direct ``generate`` latency is
measured in a fresh process that does nothing else (as the server's), in a worker thread
(as PyTriton runs the model), before and after the served runs, to bracket load drift on a
shared machine. Run::

    python -m cfgswitch.benchmarks.serving_bench --steps 20 --requests 32 --out serving.json

Without ``--model`` it builds the tiny random-weight model (16 px images) in a temporary
folder. The ratio target is < 1.1; on a tiny model the fixed per-request cost of Triton
(HTTP, the Python-backend proxy) weighs far more than on a real model.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

logger = logging.getLogger(__name__)


def _percentile(values: List[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def time_direct(sampler: Any, steps: int, plan: str, n: int, size: Optional[int]) -> List[float]:
    """Seconds of ``n`` one-image ``generate`` calls after one warm-up call, in a worker thread
    (as the server runs them: PyTriton calls the model from a thread)."""
    out: List[float] = []

    def work() -> None:
        sampler.generate(["warm up"], steps=steps, plan=plan, seed=[0], height=size, width=size, output_type="np")
        for i in range(n):
            t = time.perf_counter()
            sampler.generate([f"direct {i}"], steps=steps, plan=plan, seed=[i], height=size, width=size, output_type="np")
            out.append(time.perf_counter() - t)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    return out


def direct_in_subprocess(model: str, backend: Optional[str], steps: int, plan: str, n: int,
                         size: Optional[int]) -> List[float]:
    """:func:`time_direct` in a fresh process that does nothing else, as the server's process."""
    import subprocess

    cmd = [sys.executable, "-m", "cfgswitch.benchmarks.serving_bench", "--direct-worker", "--model", model,
           "--steps", str(steps), "--plan", plan, "--requests", str(n)]
    if backend:
        cmd += ["--backend", backend]
    if size:
        cmd += ["--size", str(size)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def time_served(url: str, protocol: str, steps: int, plan: str, n: int, concurrency: int,
                size: Optional[int]) -> Dict[str, Any]:
    """Latencies and throughput of ``n`` one-image requests from ``concurrency`` clients."""
    from cfgswitch.serving.client import ServingClient

    latencies: List[float] = []
    lock = threading.Lock()
    per_client = [n // concurrency + (1 if c < n % concurrency else 0) for c in range(concurrency)]
    barrier = threading.Barrier(concurrency + 1)
    errors: List[str] = []

    def worker(c: int) -> None:
        with ServingClient(url, protocol=protocol) as client:
            client.generate("warm up", seed=0, steps=steps, plan=plan, height=size, width=size)
            barrier.wait()
            for k in range(per_client[c]):
                t = time.perf_counter()
                try:
                    client.generate(f"served {c}-{k}", seed=1000 * c + k, steps=steps, plan=plan, height=size, width=size)
                except Exception as e:  # noqa: BLE001 - counted and reported
                    errors.append(repr(e))
                    continue
                with lock:
                    latencies.append(time.perf_counter() - t)

    threads = [threading.Thread(target=worker, args=(c,)) for c in range(concurrency)]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    return {"concurrency": concurrency, "requests": len(latencies), "errors": errors, "wall_s": wall,
            "requests_per_s": len(latencies) / wall, "latency_median_s": statistics.median(latencies),
            "latency_p90_s": _percentile(latencies, 0.9)}


def run(args: argparse.Namespace) -> Dict[str, Any]:
    """Run the benchmark; returns the report."""
    from cfgswitch.serving.process import start_serve

    work = Path(tempfile.mkdtemp(prefix="cfgswitch-serving-bench-"))
    model = args.model
    if model is None:
        from cfgswitch.tiny_model import save_tiny_model

        model = str(save_tiny_model(work / "tiny"))
    before = direct_in_subprocess(model, args.backend, args.steps, args.plan, args.requests, args.size)
    extra = ["--max-queue-delay-us", str(args.max_queue_delay_us), "--max-batch", str(args.max_batch)]
    if args.backend:
        extra += ["--backend", args.backend]
    server = start_serve(model, work, extra)
    try:
        server.wait_ready("cfgswitch", timeout_s=300)
        url = server.http_url if args.protocol == "http" else server.grpc_url
        served = [time_served(url, args.protocol, args.steps, args.plan, args.requests, c, args.size)
                  for c in args.concurrency]
    finally:
        code = server.stop()
    after = direct_in_subprocess(model, args.backend, args.steps, args.plan, args.requests, args.size)
    direct_median = statistics.median(before + after)
    c1 = next((s for s in served if s["concurrency"] == 1), None)
    report = {
        "model": "tiny random-weight model" if args.model is None else str(args.model),
        "backend": args.backend or "default", "steps": args.steps, "plan": args.plan, "size": args.size,
        "protocol": args.protocol, "max_batch": args.max_batch, "max_queue_delay_us": args.max_queue_delay_us,
        "direct_latency_median_s": direct_median, "direct_latency_median_before_s": statistics.median(before),
        "direct_latency_median_after_s": statistics.median(after),
        "served_over_direct_latency_c1": (c1["latency_median_s"] / direct_median) if c1 else None,
        "served": served, "server_exit_code": code, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
    }
    return report


def main(argv: Optional[List[str]] = None) -> int:
    """Command line entry."""
    # OpenMP threads that spin while waiting make torch on a busy (shared) CPU up to 50x slower
    # and the timings meaningless; this process and the server it starts both wait passively.
    # OpenMP reads the policy when torch loads (importing cfgswitch did), hence the re-exec.
    if "OMP_WAIT_POLICY" not in os.environ:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        args = sys.argv[1:] if argv is None else list(argv)
        os.execv(sys.executable, [sys.executable, "-m", "cfgswitch.benchmarks.serving_bench", *args])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="diffusers folder or bundle (default: the tiny random model)")
    p.add_argument("--backend", default=None, help="backend for the model (default: the best installed)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--plan", default="switch:0.5")
    p.add_argument("--size", type=int, default=None, help="image height and width (default: the model's)")
    p.add_argument("--requests", type=int, default=32, help="requests per concurrency level")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    p.add_argument("--protocol", choices=("http", "grpc"), default="http")
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--max-queue-delay-us", type=int, default=2000)
    p.add_argument("--out", default=None, help="write the report as JSON here")
    p.add_argument("--direct-worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.direct_worker:
        from cfgswitch import Sampler

        sampler = Sampler.load(args.model, backend=args.backend)
        print(json.dumps(time_direct(sampler, args.steps, args.plan, args.requests, args.size)))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    report = run(args)
    text = json.dumps(report, indent=2)
    if args.out:
        Path(args.out).write_text(text)
    print(text)
    print(f"direct generate latency (median, before and after serving): {report['direct_latency_median_s'] * 1e3:.1f} ms")
    for s in report["served"]:
        print(f"concurrency {s['concurrency']}: {s['requests_per_s']:.2f} req/s, median latency "
              f"{s['latency_median_s'] * 1e3:.1f} ms, p90 {s['latency_p90_s'] * 1e3:.1f} ms, errors {len(s['errors'])}")
    if report["served_over_direct_latency_c1"] is not None:
        print(f"served / direct latency at concurrency 1: {report['served_over_direct_latency_c1']:.3f} (target < 1.1)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
