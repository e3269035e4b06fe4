"""A/B of a bundle backend's load options (ONNX Runtime by default): each variant in its own processes, alternated.

    python tools/ort_options_ab.py BUNDLE --variant now: --variant dynamic:static_shapes=0 \\
        --variant spinning:stop_spinning=0 [--backend openvino] [--processes 3] [--rounds 8] [--batch 1] \\
        [--out FILE.json]

A variant is ``NAME:OPTION=VALUE,...`` (values ``0``/``1`` for booleans, integers for
``threads``), passed to ``Sampler.load(bundle, backend=BACKEND, **options)``. Each
variant runs in ``--processes`` fresh processes, alternated (A B C, C B A, ...), because the
thread pools of one process's sessions disturb each other and so must not mix across variants.
Each process loads, warms up, then times ``--rounds`` rounds of ``always`` and ``switch:0.5``
(order reversed every other round), 30 DDIM steps, one prompt per image, latents out.

Prints per variant the medians over all its rounds, the paired ``switch:0.5`` gain (round by
round), the speed of each variant against the first (ratio of medians), the largest
difference of its latents (seed 0, both plans) from the first variant's, and the medians of
direct ``cfg`` and ``late`` role calls (``benchmarks.measure.time_roles``, ten per round, after
the rounds) with the load average; ``--out`` writes every timing as JSON (the bundle by its folder name, no latents). Run it on a quiet machine (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

PLANS = ("always", "switch:0.5")


def parse_variant(text: str) -> "tuple[str, Dict[str, Any]]":
    """``NAME:OPT=VAL,...`` -> (name, options)."""
    name, _, rest = text.partition(":")
    if not name:
        raise SystemExit(f"--variant {text!r}: expected NAME:OPTION=VALUE,...")
    options: Dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--variant {text!r}: {item!r} is not OPTION=VALUE")
        options[key] = int(value) if key == "threads" else bool(int(value))
    return name, options


def child(bundle: str, options: Dict[str, Any], rounds: int, batch: int, backend: str = "onnxruntime") -> Dict[str, Any]:
    """One process's timings (runs in the child)."""
    from cfgswitch import Sampler

    sampler = Sampler.load(bundle, backend=backend, **options)
    prompts = ["a red circle on a blue background"] * batch
    kw = dict(steps=30, seed=0, output_type="latent")
    latents = {p: sampler.generate(prompts, plan=p, **kw).latents.flatten().tolist() for p in PLANS}
    for plan in PLANS:
        sampler.generate(prompts, plan=plan, **kw)
    times: Dict[str, List[float]] = {p: [] for p in PLANS}
    for r in range(rounds):
        for plan in (PLANS if r % 2 == 0 else PLANS[::-1]):
            start = time.perf_counter()
            sampler.generate(prompts, plan=plan, **kw)
            times[plan].append(time.perf_counter() - start)
    from cfgswitch.benchmarks.measure import role_inputs, time_roles

    size = sampler.spec.default_size  # what generate ran at
    inputs = role_inputs(sampler, prompts, 30, "ddim", 7.5, size, size)
    cfg_s, late_s = time_roles(sampler, inputs, repeat=10 * rounds)
    info = {k: v for k, v in sampler.runners.info.items() if k not in ("bundle", "cache_dirs")}
    return {"times_s": times, "role_calls_s": {"cfg": cfg_s, "late": late_s}, "latents": latents, "info": info}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle")
    parser.add_argument("--variant", action="append", required=True, help="NAME:OPTION=VALUE,...")
    parser.add_argument("--backend", default="onnxruntime", help="the bundle backend (default onnxruntime)")
    parser.add_argument("--processes", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.bundle, json.loads(args.child), args.rounds, args.batch, args.backend)))
        return 0
    variants = dict(parse_variant(v) for v in args.variant)
    names = list(variants)
    load_before = os.getloadavg()
    runs: Dict[str, List[Dict[str, Any]]] = {n: [] for n in names}
    for i in range(args.processes):
        for name in (names if i % 2 == 0 else names[::-1]):
            cmd = [sys.executable, __file__, args.bundle, "--variant", "x:", "--rounds", str(args.rounds),
                   "--batch", str(args.batch), "--backend", args.backend, "--child", json.dumps(variants[name])]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
    summary: Dict[str, Any] = {}
    for name in names:
        t = {p: [x for r in runs[name] for x in r["times_s"][p]] for p in PLANS}
        summary[name] = {"options": variants[name], "info": runs[name][0]["info"],
                         "median_s": {p: statistics.median(t[p]) for p in PLANS},
                         "switch_gain_paired": statistics.median([a / b for a, b in zip(t["always"], t["switch:0.5"])]),
                         "switch_gain_per_process": [statistics.median(r["times_s"]["always"]) /
                                                     statistics.median(r["times_s"]["switch:0.5"]) for r in runs[name]],
                         "role_call_median_s": {k: statistics.median([x for r in runs[name] for x in r["role_calls_s"][k]])
                                                for k in ("cfg", "late")}}
    ref = runs[names[0]][0]["latents"]
    for name in names:
        summary[name]["max_latent_diff_vs_first"] = max(abs(a - b) for r in runs[name] for p in PLANS
                                                        for a, b in zip(r["latents"][p], ref[p]))
    base = summary[names[0]]["median_s"]
    for name in names:
        s = summary[name]
        s["speed_vs_first"] = {p: base[p] / s["median_s"][p] for p in PLANS}
        print(f"{name:12s} always {s['median_s']['always'] * 1e3:7.1f} ms  switch:0.5 {s['median_s']['switch:0.5'] * 1e3:7.1f} ms"
              f"  gain {s['switch_gain_paired']:.3f}x paired (per process "
              + ", ".join(f"{g:.2f}" for g in s["switch_gain_per_process"]) + ")"
              f"  vs {names[0]}: always {s['speed_vs_first']['always']:.3f}x, switch {s['speed_vs_first']['switch:0.5']:.3f}x,"
              f" latents differ by {s['max_latent_diff_vs_first']:.1e};"
              f" direct calls: cfg {s['role_call_median_s']['cfg'] * 1e3:.2f} ms, late {s['role_call_median_s']['late'] * 1e3:.2f} ms"
              f" (late/cfg {s['role_call_median_s']['late'] / s['role_call_median_s']['cfg']:.3f})")
    load_after = os.getloadavg()
    print(f"load {tuple(round(x, 2) for x in load_before)} -> {tuple(round(x, 2) for x in load_after)}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        kept = {n: [{k: v for k, v in r.items() if k != "latents"} for r in rs] for n, rs in runs.items()}
        args.out.write_text(json.dumps({"bundle": Path(args.bundle).name, "backend": args.backend, "batch": args.batch,
                                        "processes": args.processes, "rounds": args.rounds, "load_before": load_before,
                                        "load_after": load_after, "summary": summary, "runs": kept}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
