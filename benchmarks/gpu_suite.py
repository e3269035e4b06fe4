"""GPU suite: full-size random-weight UNets (SD 1.5 at 512 px, SDXL at 1024 px) in fp16, one prepared script.

For each model it times the denoising loop (UNet, CFG combine, DDIM step; no text encoder or
VAE) of: diffusers' loop written as its pipeline runs it (eager, always-CFG and with the
CFG cutoff), and cfgswitch's loop (:func:`cfgswitch.loop.denoise`) on the runtime's torch runners in each mode
(``eager``, ``graphs``: one CUDA graph per shape, ``compile``: ``torch.compile(mode="reduce-overhead")``);
plans ``always`` and ``switch:0.5``, batch 1 and 4, calls interleaved. It writes
``results.json``, ``report.md`` and plots per model, like ``cfgswitch bench``.

Run on a GPU machine from the repository root (diffusers must be importable; bring its wheel
along if the machine lacks it, e.g. ``pip install --no-deps --target .gpu_deps diffusers==0.42.1``
and ``PYTHONPATH=.gpu_deps``)::

    python benchmarks/gpu_suite.py --out benchmarks/results/gpu-h100

``--dry-run`` runs the same code on tiny UNets on the CPU in seconds (CI does). A time budget
(``--budget-s``) skips what would not fit and says so in the notes.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Dict, List, Optional

logger = logging.getLogger("cfgswitch.benchmarks.gpu_suite")


def _bootstrap() -> None:
    """Make ``cfgswitch`` importable from a bare checkout (engine/ is the package; kernels/, export/ and
    benchmarks/ are its subpackages), as on a GPU machine that got the working tree but no install."""
    try:
        import cfgswitch.benchmarks  # noqa: F401
        return
    except ImportError:
        pass
    root = Path(__file__).resolve().parents[1]
    for name, folder in (("cfgswitch", root / "engine"), ("cfgswitch.kernels", root / "kernels"),
                         ("cfgswitch.export", root / "export"), ("cfgswitch.benchmarks", root / "benchmarks")):
        spec = importlib.util.spec_from_file_location(name, folder / "__init__.py", submodule_search_locations=[str(folder)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)


if __name__ == "__main__":  # pragma: no cover - direct script use
    _bootstrap()

import torch  # noqa: E402

from cfgswitch.benchmarks.derive import derive  # noqa: E402
from cfgswitch.benchmarks.gpu_models import (  # noqa: E402
    MODELS, TINY_MODELS, added_conditioning, build_unet, count_parameters)
from cfgswitch.benchmarks.machine import machine_info, scrub_paths  # noqa: E402
from cfgswitch.benchmarks.measure import RoleInputs, interleaved, time_roles  # noqa: E402

VARIANTS = ("diffusers", "eager", "graphs", "compile")
PLANS = ("always", "switch:0.5")


#: ``torch.compile`` options of the ``compile`` variant: Inductor kernels replayed under CUDA graphs.
COMPILE_OPTIONS = {"mode": "reduce-overhead"}


def _runners(unet: Any, device: torch.device, dtype: torch.dtype, mode: str = "eager"):
    """The runtime's own torch runners (:class:`cfgswitch.runners.torch_runners.TorchUNet`) in ``mode``."""
    from cfgswitch.runners.base import Runners
    from cfgswitch.runners.torch_modes import check_mode
    from cfgswitch.runners.torch_runners import TorchGuidedUNet, TorchUNet

    plain = TorchUNet(unet, check_mode(mode, device), COMPILE_OPTIONS if mode == "compile" else None)
    return Runners(text_encoder=None, unet_cfg=TorchGuidedUNet(plain), unet=plain, vae_decoder=None,
                   backend="torch", device=device, dtype=dtype)


def diffusers_loop(unet: Any, scheduler_config: Dict, plan: str, latents0: torch.Tensor, cond: torch.Tensor,
                   uncond: torch.Tensor, steps: int, guidance: float,
                   added: Optional[Dict[str, torch.Tensor]] = None) -> Dict[str, float]:
    """The loop of diffusers' pipelines (cat, UNet, chunk, combine, step), CFG cut off as its callback does.

    ``added`` is SDXL's added conditioning of the B images (the same for both halves, as the
    suite draws it), passed as ``added_cond_kwargs`` the way ``StableDiffusionXLPipeline`` does.
    """
    from cfgswitch.benchmarks.baseline import baseline_switch_step
    from cfgswitch.schedulers import make_scheduler

    device = latents0.device
    sched = make_scheduler("ddim", scheduler_config)
    sched.set_timesteps(steps, device=device)
    k = baseline_switch_step(plan, steps)
    embeds = torch.cat([uncond, cond])
    added_both = {n: torch.cat([t, t]) for n, t in (added or {}).items()}
    latents = latents0 * sched.init_noise_sigma
    _sync(device)
    start = time.perf_counter()
    with torch.no_grad():
        for i, t in enumerate(sched.timesteps):
            cfg = i < k
            x = torch.cat([latents] * 2) if cfg else latents
            x = sched.scale_model_input(x, t)
            kwargs = {"added_cond_kwargs": added_both if cfg else dict(added)} if added else {}
            eps = unet(x, t, encoder_hidden_states=embeds if cfg else uncond, return_dict=False, **kwargs)[0]
            if cfg:
                u, c = eps.chunk(2)
                eps = u + guidance * (c - u)
            latents = sched.step(eps, t, latents, eta=0.0, return_dict=False)[0]
    _sync(device)
    total = time.perf_counter() - start
    return {"loop": total, "total": total}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_model(name: str, args: argparse.Namespace, device: torch.device, dtype: torch.dtype, deadline: float,
              notes: List[str]) -> Dict[str, Any]:
    """Every variant, plan and batch of one model, interleaved; the raw results with ``derived``."""
    from cfgswitch.conditioning import TEXT, Conditioning
    from cfgswitch.loop import LoopRequest, denoise
    from cfgswitch.plans import GuidancePlan
    from cfgswitch.timing import StageTimer
    from cfgswitch.tiny_model import SD_SCHEDULER_CONFIG

    started = time.perf_counter()
    table = TINY_MODELS if args.dry_run else MODELS
    config, pooled, side = table[name]
    unet = build_unet(config, device, dtype)
    factor = 8
    lat = side // factor
    variants = [v for v in args.variants if v in VARIANTS]
    if "compile" in variants and name not in args.compile_models.split(","):
        variants.remove("compile")
        notes.append(f"{name}: variant compile not run (not in --compile-models {args.compile_models})")
    if device.type != "cuda":
        for v in ("graphs", "compile"):
            if v in variants:
                variants.remove(v)
                notes.append(f"{name}: variant {v} needs CUDA: not run on {device.type}")
    modes = ["eager"] + [v for v in ("graphs", "compile") if v in variants]
    runners = {v: _runners(unet, device, dtype, mode=v) for v in modes}
    text_width, gen = config["cross_attention_dim"], torch.Generator("cpu").manual_seed(0)
    max_b = max(args.batch)
    cond_all = torch.randn((max_b, 77, text_width), generator=gen).to(device, dtype)
    uncond_all = torch.randn((max_b, 77, text_width), generator=gen).to(device, dtype)
    latents_all = torch.randn((max_b, 4, lat, lat), generator=gen).to(device, dtype)
    added_all = added_conditioning(pooled, max_b, side, side, device, dtype)  # SDXL: text_embeds, time_ids

    def conditioning(b: int) -> Conditioning:
        """The B images' conditioning, as the runtime carries it (added names beside the text)."""
        extra = {n: t[:b] for n, t in added_all.items()}
        return Conditioning({TEXT: uncond_all[:b], **extra}, {TEXT: cond_all[:b], **extra})

    cells: List[Dict[str, Any]] = []
    for b in args.batch:
        for v in variants:
            for plan in PLANS:
                system = "diffusers" if v == "diffusers" else "cfgswitch"
                backend = "torch-eager" if v in ("diffusers", "eager") else f"torch-{v}"
                cells.append({"id": f"{system}/{backend}/{plan}/b{b}", "system": system, "backend": backend, "variant": v,
                              "role_backend": "torch-eager" if v == "diffusers" else backend, "plan": plan, "batch": b,
                              "steps": args.steps, "sweep": False, "calls": []})

    def call(cell: Dict[str, Any], rnd: int) -> None:
        b = cell["batch"]
        if time.perf_counter() > deadline:
            cell.setdefault("skipped_rounds", 0)
            cell["skipped_rounds"] += 1
            return
        if cell["variant"] == "diffusers":
            timings = diffusers_loop(unet, SD_SCHEDULER_CONFIG, cell["plan"], latents_all[:b], cond_all[:b],
                                     uncond_all[:b], args.steps, args.guidance,
                                     {n: t[:b] for n, t in added_all.items()})
        else:
            timer = StageTimer(device)
            req = LoopRequest(conditioning=conditioning(b), steps=args.steps, guidance_scale=args.guidance,
                              scheduler="ddim", plan=GuidancePlan.parse(cell["plan"]), seeds=list(range(b)),
                              latent_shape=(4, lat, lat))
            start = time.perf_counter()
            res = denoise(runners[cell["variant"]], SD_SCHEDULER_CONFIG, req, timer)
            _sync(device)
            timings = timer.totals()
            timings["total"] = time.perf_counter() - start
        k = sum(GuidancePlan.parse(cell["plan"]).schedule(list(range(args.steps))))
        cell.update(cfg_steps=k, late_steps=args.steps - k, unet_rows=2 * b * k + b * (args.steps - k),
                    switch_step=k if k < args.steps else None)
        if rnd >= args.warmup:
            cell["calls"].append({key: float(val) for key, val in timings.items()})

    from tqdm.auto import tqdm

    rounds = args.warmup + args.repeat
    with tqdm(total=rounds * len(cells), desc=name, unit="call", disable=args.no_progress, file=sys.stderr) as bar:
        interleaved(cells, rounds, call, bar)
    role_costs = []
    mid = torch.tensor(500.0, device=device)
    for v, r in runners.items():
        for b in args.batch:
            cb = conditioning(b)
            both, late = cb.both(), cb.late("uncond")
            inputs = RoleInputs(sample=latents_all[:b], timestep=mid.expand(b), both=both[TEXT], late=late[TEXT],
                                weights=torch.full((b,), args.guidance, device=device),
                                added_both={n: t for n, t in both.items() if n != TEXT} or None,
                                added_late={n: t for n, t in late.items() if n != TEXT} or None)
            n = args.role_repeat if time.perf_counter() < deadline else 2  # past the budget: a short check only
            c, late = time_roles(SimpleNamespace(runners=r), inputs, n)
            role_costs.append({"backend": f"torch-{v}", "batch": b, "cfg_s": c, "late_s": late})
    dropped = [c["id"] for c in cells if not c["calls"]]
    if dropped:
        notes.append(f"{name}: out of time budget, not measured: {', '.join(dropped)}")
    cells = [c for c in cells if c["calls"]]
    results = {
        "schema_version": 1, "kind": "cfgswitch-gpu-suite", "created_utc": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime()),
        "argv": ["python", "benchmarks/gpu_suite.py"] + scrub_paths(list(args.argv)), "machine": machine_info(),
        "config": {"model": name, "backends": sorted({c["backend"] for c in cells}), "plans": list(PLANS), "steps": args.steps,
                   "batches": list(args.batch), "scheduler": "ddim", "repeat": args.repeat, "warmup": args.warmup,
                   "guidance_scale": args.guidance, "seed": 0, "dtype": str(dtype).replace("torch.", ""),
                   "dry_run": bool(args.dry_run), "variants": variants},
        "model": {"source": f"random-weight {name} UNet{' (tiny dry-run stand-in)' if args.dry_run else ''}",
                  "parameters": count_parameters(config), "height": side, "width": side, "embedded": False},
        "prompts": {"source": "random text embeddings (UNet-only loop: no text encoder, no VAE)"},
        "role_costs": role_costs, "cells": cells, "sweep": None, "quality": None,
        "notes": [n for n in notes if n.startswith(name)],
    }
    results["elapsed_s"] = time.perf_counter() - started
    results["derived"] = derive(results)
    return results


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """The suite's arguments."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="benchmarks/results/gpu", help="output folder (one subfolder per model)")
    p.add_argument("--models", default="sd15,sdxl")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"subset of {','.join(VARIANTS)}")
    p.add_argument("--batch", default="1,4")
    p.add_argument("--steps", type=int, default=None, help="default 20, so both models fit the budget (2 with --dry-run)")
    p.add_argument("--compile-models", default="sd15", dest="compile_models",
                   help="models that also run the torch.compile variant (compiling SDXL takes minutes)")
    p.add_argument("--repeat", type=int, default=None, help="timed calls per cell (default 3; 1 with --dry-run)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--role-repeat", type=int, default=10, dest="role_repeat")
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--budget-s", type=float, default=480.0, dest="budget_s", help="stop timing new calls after this many seconds")
    p.add_argument("--dry-run", action="store_true", help="tiny UNets, CPU, fp32, a few steps: checks the suite runs")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    args.models = [m for m in args.models.split(",") if m]
    args.variants = [v for v in args.variants.split(",") if v]
    bad = [m for m in args.models if m not in MODELS] + [v for v in args.variants if v not in VARIANTS]
    if bad:
        p.error(f"unknown model or variant: {', '.join(bad)} (models: {', '.join(MODELS)}; variants: {', '.join(VARIANTS)})")
    args.batch = [int(b) for b in args.batch.split(",")]
    args.steps = args.steps or (2 if args.dry_run else 20)
    args.repeat = args.repeat or (1 if args.dry_run else 3)
    if args.dry_run:
        args.role_repeat = min(args.role_repeat, 2)
    return args


def main(argv: Optional[List[str]] = None) -> int:
    """Run the suite; returns 0, 1 when a model failed, 2 when a full (non dry) run finds no CUDA device."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.dry_run:
        print("gpu_suite: no CUDA device (use --dry-run to check the suite on a CPU)", file=sys.stderr)
        return 2
    device = torch.device("cuda" if cuda and not args.dry_run else "cpu")
    threads_before = torch.get_num_threads()
    if args.dry_run:
        torch.set_num_threads(1)  # a check, not a measurement: one thread stays fast on a shared CPU
    try:
        return _run_models(args, device)
    finally:
        torch.set_num_threads(threads_before)


def _run_models(args: argparse.Namespace, device: torch.device) -> int:
    from cfgswitch.benchmarks.report import headline_table, write_results

    dtype = torch.float16 if device.type == "cuda" else torch.float32
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    deadline = time.perf_counter() + args.budget_s
    notes: List[str] = []
    failed = 0
    for name in args.models:
        if time.perf_counter() > deadline:
            logger.warning("%s: skipped, time budget spent", name)
            continue
        try:
            results = run_model(name, args, device, dtype, deadline, notes)
        except Exception as e:  # a failing model must not lose the other's results
            logger.exception("%s failed", name)
            notes.append(f"{name}: failed: {type(e).__name__}: {e}")
            failed += 1
            continue
        files = write_results(results, {}, Path(args.out) / name)
        print(f"\n{name} ({results['model']['parameters'] / 1e6:.0f} M parameters, {results['elapsed_s']:.0f} s):")
        print(headline_table(results))
        logger.info("%s: %s", name, files["report"])
        if device.type == "cuda":
            torch.cuda.empty_cache()
    for n in notes:
        logger.info("note: %s", n)
    return 1 if failed else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
