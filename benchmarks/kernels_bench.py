"""Microbenchmark of the step kernels: fused ``guide_and_step`` vs the reference stepping.

Host time per step: a whole trajectory of ``--steps`` steps, with synthetic UNet outputs (the
UNet is not what is measured), through :class:`~cfgswitch.steppers.ReferenceStepper` (torch
combine + diffusers' ``scheduler.step``) and :class:`~cfgswitch.steppers.FusedStepper`, for
CFG steps (2B rows), adaptive CFG steps (2B rows + cosine) and late steps (B rows).

On a CUDA device it also times one call of the CUDA kernel against the same work done by torch
ops (CUDA events), at SD 1.5 (4x64x64) and SDXL (4x128x128) latent sizes in float16 and
float32, and reports the kernel's max difference from the float32 torch oracle.

Usage: ``python -m cfgswitch.benchmarks.kernels_bench [--device cpu|cuda] [--json PATH]``
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from typing import Dict, List

import torch

logger = logging.getLogger(__name__)

SIZES = {"sd15": (4, 64, 64), "sdxl": (4, 128, 128)}
SCHEDULERS = ("ddim", "euler", "dpmpp_2m")


def _fresh_scheduler(name: str, steps: int, device):
    from cfgswitch.schedulers import make_scheduler, set_timesteps
    from cfgswitch.tiny_model import SD_SCHEDULER_CONFIG

    sch = make_scheduler(name, SD_SCHEDULER_CONFIG)
    set_timesteps(sch, steps, device)
    return sch


def _trajectory_seconds(kind: str, name: str, role: str, batch: int, shape, steps: int, device, dtype) -> float:
    """Seconds per step of the update alone over one trajectory."""
    from cfgswitch.steppers import FusedStepper, ReferenceStepper

    sch = _fresh_scheduler(name, steps, device)
    weights = torch.full((batch,), 7.5, device=device)
    if kind == "fused":
        stepper = FusedStepper(sch, weights, torch.device(device))
    else:
        stepper = ReferenceStepper(sch, weights, [torch.Generator().manual_seed(i) for i in range(batch)])
    gen = torch.Generator(device=device).manual_seed(0)
    rows = 2 * batch if role != "late" else batch
    preds = torch.randn((rows,) + shape, generator=gen, device=device, dtype=dtype) * 0.1
    x = torch.randn((batch,) + shape, generator=gen, device=device, dtype=dtype) * float(sch.init_noise_sigma)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    total = 0.0
    for t in sch.timesteps:
        x_in = sch.scale_model_input(x, t)  # as the loop does; not timed (same for both)
        del x_in
        sync()
        start = time.perf_counter()
        if role == "late":
            x = stepper.step(preds, t, x)
        else:
            x, cos = stepper.guide_and_step(preds, t, x, want_cosine=(role == "adaptive"))
            if cos is not None:
                cos.tolist()  # the plan reads it on the host
        sync()
        total += time.perf_counter() - start
    return total / steps


def host_time_per_step(device: str, steps: int, repeats: int, batches: List[int], sizes: List[str]) -> List[Dict]:
    """Median host seconds per step, reference vs fused, per scheduler, role, batch and size."""
    from cfgswitch.kernels import compiled_available

    dtype = torch.float32
    if not compiled_available(device, dtype):
        raise SystemExit(f"no compiled guide_and_step for float32 on {device}: build it with tools/dev_install.py")
    rows = []
    for size in sizes:
        for batch in batches:
            for name in SCHEDULERS:
                for role in ("cfg", "adaptive", "late"):
                    row = {"size": size, "batch": batch, "scheduler": name, "role": role}
                    for kind in ("reference", "fused"):
                        times = [
                            _trajectory_seconds(kind, name, role, batch, SIZES[size], steps, device, dtype)
                            for _ in range(repeats)
                        ]
                        row[f"{kind}_us"] = statistics.median(times) * 1e6
                    row["speedup"] = row["reference_us"] / row["fused_us"]
                    rows.append(row)
                    logger.info("%s", row)
    return rows


def loop_scheduler_stage(device: str, steps: int, repeats: int) -> List[Dict]:
    """The loop's ``scheduler`` stage per step (host work between UNet calls), tiny random UNet.

    The tiny model runs at SD 1.5's latent size (4x64x64); the stage holds ``scale_model_input``,
    the update (and, for the adaptive plan, the cosine read by the host).
    """
    from cfgswitch import Sampler
    from cfgswitch.loop import LoopRequest, denoise
    from cfgswitch.plans import GuidancePlan
    from cfgswitch.timing import StageTimer
    from cfgswitch.tiny_model import tiny_pipeline

    sampler = Sampler.from_diffusers(tiny_pipeline(seed=0), device=device)
    cond, uncond, _ = sampler._encode(["a red fox in the snow"], [""], 1)
    rows = []
    for name in SCHEDULERS:
        for plan in ("switch:0.5", "adaptive:0.99999"):
            row = {"scheduler": name, "plan": plan}
            for kind in ("reference", "fused"):
                times = []
                for _ in range(repeats + 1):  # the first run fills the coefficient cache
                    req = LoopRequest(cond=cond, uncond=uncond, steps=steps, guidance_scale=7.5, scheduler=name,
                                      plan=GuidancePlan.parse(plan), seeds=[0], latent_shape=(4, 64, 64),
                                      step_kernel=kind)
                    timer = StageTimer(sampler.device)
                    denoise(sampler.runners, sampler.scheduler_config, req, timer)
                    times.append(timer.totals()["scheduler"] / steps)
                row[f"{kind}_us"] = statistics.median(times[1:]) * 1e6
            row["speedup"] = row["reference_us"] / row["fused_us"]
            rows.append(row)
            logger.info("%s", row)
    return rows


def cuda_kernel_timings(repeats: int = 200) -> List[Dict]:
    """Per-call time of the CUDA kernel vs torch ops, and its max difference from the oracle."""
    from cfgswitch.kernels import StepForm, guide_and_step, guide_and_step_reference, pack_params, pack_rows

    dev = torch.device("cuda")
    results = []
    for size, shape in SIZES.items():
        for dtype in (torch.float16, torch.float32):
            for batch in (1, 4):
                gen = torch.Generator(device=dev).manual_seed(0)
                pred = torch.randn((2 * batch,) + shape, generator=gen, device=dev).to(dtype)
                x = (torch.randn((batch,) + shape, generator=gen, device=dev) * 3).to(dtype)
                prev = torch.randn((batch,) + shape, generator=gen, device=dev).to(dtype)
                coeffs = (0.95, 0.31, 0.55, -0.21, 1.7, -0.105)
                rows = pack_rows(list(range(batch)), list(range(batch, 2 * batch)), [StepForm.MULTISTEP_2] * batch).to(dev)
                params = pack_params([7.5] * batch, [coeffs] * batch).to(dev)
                w = torch.full((batch, 1, 1, 1), 7.5, device=dev, dtype=dtype)

                def fused():
                    return guide_and_step(pred, x, rows, params, prev, want_x0=True, want_cosine=True, impl="compiled")

                def torch_ops():
                    u, c = pred.chunk(2)
                    e = u + w * (c - u)
                    x0 = (x - coeffs[0] * e) / coeffs[1]
                    out = (coeffs[2] * x - coeffs[3] * x0) - coeffs[5] * (coeffs[4] * (x0 - prev))
                    cos = torch.nn.functional.cosine_similarity(u.flatten(1).float(), c.flatten(1).float(), dim=1)
                    return out, x0, cos

                row = {"size": size, "dtype": str(dtype).replace("torch.", ""), "batch": batch}
                for label, fn in (("fused_us", fused), ("torch_us", torch_ops)):
                    for _ in range(10):
                        fn()
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    torch.cuda.synchronize()
                    start.record()
                    for _ in range(repeats):
                        fn()
                    end.record()
                    torch.cuda.synchronize()
                    row[label] = start.elapsed_time(end) * 1e3 / repeats
                got = fused()
                want = guide_and_step_reference(pred.float(), x.float(), rows, params, prev.float(), want_x0=True,
                                                want_cosine=True)
                row["max_abs_diff_latents"] = float((got.latents.float() - want[0]).abs().max())
                row["max_abs_diff_x0"] = float((got.x0.float() - want[1]).abs().max())
                row["max_abs_diff_cosine"] = float((got.cosine - want[2]).abs().max())
                results.append(row)
                logger.info("%s", row)
    return results


def _table(rows: List[Dict]) -> str:
    if not rows:
        return ""
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        lines.append("| " + " | ".join(f"{r[k]:.2f}" if isinstance(r[k], float) else str(r[k]) for k in keys) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    """Run the microbenchmark and print Markdown tables (and JSON with ``--json``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batches", default="1,4", help="comma-separated batch sizes")
    parser.add_argument("--sizes", default="sd15,sdxl", help="comma-separated: sd15, sdxl")
    parser.add_argument("--loop", action="store_true", help="also time the loop's scheduler stage (tiny UNet)")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    batches = [int(b) for b in args.batches.split(",")]
    sizes = [s.strip() for s in args.sizes.split(",")]
    unknown = [s for s in sizes if s not in SIZES]
    if unknown:
        parser.error(f"--sizes: expected names from {', '.join(SIZES)}, got {', '.join(unknown)}")
    result = {"device": args.device, "torch": torch.__version__, "threads": torch.get_num_threads()}
    result["host_time_per_step"] = host_time_per_step(args.device, args.steps, args.repeats, batches, sizes)
    print(f"## Host time per step (us), {args.device}, {args.steps}-step trajectories, median of {args.repeats}\n")
    print(_table(result["host_time_per_step"]))
    if args.loop:
        result["loop_scheduler_stage"] = loop_scheduler_stage(args.device, args.steps, args.repeats)
        print(f"\n## The loop's scheduler stage per step (us), tiny UNet at 4x64x64, batch 1\n")
        print(_table(result["loop_scheduler_stage"]))
    if args.device == "cuda":
        result["cuda_kernel"] = cuda_kernel_timings()
        print("\n## CUDA kernel per call vs torch ops (us), max differences from the float32 oracle\n")
        print(_table(result["cuda_kernel"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
