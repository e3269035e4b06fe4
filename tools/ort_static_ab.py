"""A/B of ONNX Runtime's UNet sessions: fixed to each input shape against one dynamic session.

Loads the same bundle twice in one process, ``Sampler.load(bundle, backend="onnxruntime",
static_shapes=True)`` and ``static_shapes=False`` (both at the given threads, ONNX Runtime's
default when omitted), and times ``always`` and ``switch:0.5`` on both in interleaved rounds
(the order reverses every other round), one prompt per image, 30 DDIM steps, latents out:

    python tools/ort_static_ab.py BUNDLE [--batch 1] [--rounds 16] [--threads N] [--out FILE.json]

Prints the medians, the paired ratios (round by round) and the images' largest difference,
and writes every timing to ``--out`` as JSON. Run it on a quiet machine (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import time
from pathlib import Path
from typing import Dict, List

PLANS = ("always", "switch:0.5")
KINDS = {"static": True, "dynamic": False}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    import torch

    from cfgswitch import Sampler

    load_before = os.getloadavg()
    samplers = {k: Sampler.load(args.bundle, backend="onnxruntime", threads=args.threads, static_shapes=v)
                for k, v in KINDS.items()}
    prompts = ["a red circle on a blue background"] * args.batch
    kw = dict(steps=30, seed=0, output_type="latent")
    for s in samplers.values():  # warm-up: opens every per-shape session
        for plan in PLANS:
            s.generate(prompts, plan=plan, **kw)
    diff = max(float((samplers["static"].generate(prompts, plan=p, **kw).latents
                      - samplers["dynamic"].generate(prompts, plan=p, **kw).latents).abs().max()) for p in PLANS)
    cells = [(k, p) for k in KINDS for p in PLANS]
    times: Dict[str, List[float]] = {f"{k}/{p}": [] for k, p in cells}
    for r in range(args.rounds):
        for k, p in (cells if r % 2 == 0 else cells[::-1]):
            start = time.perf_counter()
            samplers[k].generate(prompts, plan=p, **kw)
            times[f"{k}/{p}"].append(time.perf_counter() - start)
    med = {c: statistics.median(v) for c, v in times.items()}

    def paired(a: str, b: str) -> float:
        return statistics.median([x / y for x, y in zip(times[a], times[b])])

    result = {
        "bundle": str(args.bundle), "batch": args.batch, "rounds": args.rounds, "threads": args.threads,
        "torch_threads": torch.get_num_threads(), "load_before": load_before, "load_after": os.getloadavg(),
        "max_latent_diff": diff, "median_s": med,
        "static_speedup_paired": {p: paired(f"dynamic/{p}", f"static/{p}") for p in PLANS},
        "switch_gain_paired": {k: paired(f"{k}/always", f"{k}/switch:0.5") for k in KINDS},
        "switch_gain_of_medians": {k: med[f"{k}/always"] / med[f"{k}/switch:0.5"] for k in KINDS},
        "times_s": times,
    }
    for c, m in med.items():
        print(f"{c:22s} median {m * 1e3:7.1f} ms")
    for p, v in result["static_speedup_paired"].items():
        print(f"static against dynamic, {p}: {v:.3f}x (paired)")
    for k in KINDS:
        print(f"{k}: switch:0.5 against always {result['switch_gain_paired'][k]:.3f}x paired, "
              f"{result['switch_gain_of_medians'][k]:.3f}x of medians")
    print(f"largest latent difference static/dynamic: {diff:.2e}; load {load_before} -> {result['load_after']}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
