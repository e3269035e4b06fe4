"""One benchmark run: every (system, backend, plan, batch) cell timed in one process, interleaved.

Stages of :func:`run_benchmark`:

1. check the configuration, load one sampler per backend (and the diffusers pipeline);
2. time the UNet roles directly, as pseudo-cells of the same rotation (``ceil(role_repeat / repeat)``
   calls of each role per round);
3. run ``warmup + repeat`` rounds; each round calls every cell once, A B A B, starting at
   another cell each round; warm-up rounds are not recorded;
4. compare every cell's images with always-CFG's and score them (the shapes scorer, on a
   shapes-world model: cheap, so no speed is reported without its quality); ``quality`` adds
   the switch-point sweep;
5. return the raw results with their ``derived`` block (see :mod:`.derive`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from cfgswitch.backends.registry import get_backend
from .baseline import DiffusersBaseline, baseline_plans, baseline_switch_step
from .config import BenchConfig, check_config
from .derive import derive
from .machine import busy_machine_threads, machine_info, scrub_paths
from .measure import interleaved, role_inputs, sampler_call, time_roles
from .quality import compare, is_embedded_model, prompts_for, scorer_accuracy

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1


@dataclass
class Cell:
    """One measured configuration and what its calls gave."""

    system: str  # "cfgswitch" or "diffusers"
    backend: str
    plan: str
    batch: int
    sweep: bool = False
    calls: List[Dict[str, float]] = field(default_factory=list)
    images: Optional[np.ndarray] = None
    cfg_steps: int = 0
    late_steps: int = 0
    unet_rows: int = 0
    switch_step: Optional[int] = None

    @property
    def id(self) -> str:
        return f"{self.system}/{self.backend}/{self.plan}/b{self.batch}"

    def record(self, steps: int) -> Dict[str, Any]:
        """The cell's raw entry in ``results.json``."""
        return {
            "id": self.id, "system": self.system, "backend": self.backend, "role_backend": self.backend,
            "plan": self.plan, "batch": self.batch, "steps": steps, "sweep": self.sweep, "cfg_steps": self.cfg_steps,
            "late_steps": self.late_steps, "unet_rows": self.unet_rows, "switch_step": self.switch_step, "calls": self.calls,
        }


def load_samplers(cfg: BenchConfig, model_dir: Optional[Path], work_dir: Path, notes: List[str]) -> Dict[str, Any]:
    """One sampler per backend: torch runs the diffusers folder, the others the bundle.

    Without ``--bundle``, the others run a bundle exported from the model into ``work_dir``
    first (batch sizes and image size of the run; the export time is not part of any timing).
    """
    from cfgswitch.sampler import Sampler

    samplers = {}
    bundle = cfg.bundle
    for backend in cfg.backends:
        if backend == "torch":
            samplers[backend] = Sampler.from_diffusers(model_dir)
            continue
        if bundle is None:
            from cfgswitch.export.exporter import check_options, export_bundle

            start = time.perf_counter()
            bundle = str(export_bundle(model_dir, work_dir / "bundle", check_options(
                height=cfg.height, width=cfg.width, batch_sizes=cfg.batches), progress=False))
            notes.append(f"{backend}: ran a float32 ONNX bundle exported from the model for this run "
                         f"(batch sizes {cfg.batches}; export took {time.perf_counter() - start:.1f} s, not timed)")
        takes_threads = "threads" in get_backend(backend).options  # onnxruntime, openvino
        options = {"threads": cfg.threads} if takes_threads and cfg.threads is not None else {}
        samplers[backend] = Sampler.load(bundle, backend=backend, **options)
    for backend, sampler in samplers.items():
        logger.info("loaded %s on %s", _display_path(Path(sampler.source)), backend)
    return samplers


def _make_cells(cfg: BenchConfig, with_baseline: bool) -> List[Cell]:
    cells = [Cell("cfgswitch", b, p, n) for n in cfg.batches for b in cfg.backends for p in cfg.plans]
    top = max(cfg.batches)
    for plan in cfg.sweep_plans:
        for backend in cfg.backends:
            found = [c for c in cells if (c.backend, c.plan, c.batch) == (backend, plan, top)]
            if found:
                found[0].sweep = True
            else:
                cells.append(Cell("cfgswitch", backend, plan, top, sweep=True))
    if with_baseline:
        cells += [Cell("diffusers", "torch", p, n) for n in cfg.batches for p in baseline_plans(cfg.plans, cfg.steps)]
    return cells


def run_benchmark(cfg: BenchConfig, progress: bool = True, argv: Optional[List[str]] = None) -> "tuple[Dict[str, Any], Dict[str, np.ndarray]]":
    """Run the benchmark ``cfg`` describes; returns ``(results, images by cell id)``.

    Args:
        cfg (`BenchConfig`): what to measure (checked here before any model loads).
        progress (`bool`, defaults to True): show a progress bar over the calls.
        argv (`list[str]`, optional): the command line, recorded in the results.
    """
    cfg = check_config(cfg)
    threads_before = torch.get_num_threads()
    notes: List[str] = []
    if cfg.threads is None:
        threads, busy = busy_machine_threads(threads_before)
        if busy is not None:
            logger.warning(busy)
            notes.append(busy)
            cfg = dataclasses.replace(cfg, threads=threads)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    try:
        return _run(cfg, progress, argv, notes)
    finally:
        torch.set_num_threads(threads_before)


def _run(cfg: BenchConfig, progress: bool, argv: Optional[List[str]], notes: List[str]) -> "tuple[Dict[str, Any], Dict[str, np.ndarray]]":
    from cfgswitch.default_model import resolve_model

    started = time.perf_counter()
    # 1. Models.
    model_dir = resolve_model(cfg.model) if (cfg.model is not None or cfg.bundle is None) else None
    with tempfile.TemporaryDirectory(prefix="cfgswitch-bench-") as work:
        samplers = load_samplers(cfg, model_dir, Path(work), notes)
        return _measure(cfg, progress, argv, started, model_dir, samplers, notes)


def _measure(cfg: BenchConfig, progress: bool, argv: Optional[List[str]], started: float, model_dir: Optional[Path],
             samplers: Dict[str, Any], notes: List[str]) -> "tuple[Dict[str, Any], Dict[str, np.ndarray]]":
    from tqdm.auto import tqdm

    first = samplers[cfg.backends[0]]
    height = cfg.height or first.spec.default_size
    width = cfg.width or first.spec.default_size
    embedded = is_embedded_model(model_dir)
    shapes = cfg.shapes == "yes" or (cfg.shapes == "auto" and embedded)
    prompts, scenes, prompt_source = prompts_for(max(cfg.batches), shapes, cfg.seed)
    seeds = [cfg.seed + i for i in range(max(cfg.batches))]
    baseline = _make_baseline(cfg, samplers, model_dir, notes)
    cells = _make_cells(cfg, baseline is not None)
    skipped = [p for p in cfg.plans if baseline is not None and baseline_switch_step(p, cfg.steps) is None]
    if skipped:
        notes.append(f"diffusers baseline not run for {', '.join(skipped)}: its CFG cutoff only ends CFG once, at a step")

    # 2. Role costs: one pseudo-cell per backend and batch in the same rotation as the cells, so
    # drift hits the direct UNet timings as it hits the calls they are compared with.
    role_in = {(b, n): role_inputs(s, prompts[:n], cfg.steps, cfg.scheduler, cfg.guidance_scale, height, width, cfg.seed)
               for b, s in samplers.items() for n in cfg.batches}
    roles = {key: ([], []) for key in role_in}
    per_round = math.ceil(cfg.role_repeat / cfg.repeat)

    def call(cell: Any, rnd: int) -> None:
        if isinstance(cell, tuple):  # a role pseudo-cell (backend, batch)
            c, late = time_roles(samplers[cell[0]], role_in[cell], per_round, warmup=0)
            if rnd >= cfg.warmup:
                roles[cell][0].extend(c)
                roles[cell][1].extend(late)
            return
        n = cell.batch
        if cell.system == "diffusers":
            timings, images = baseline(prompts[:n], seeds[:n], cell.plan, cfg.steps, cfg.guidance_scale, height, width)
            k = baseline_switch_step(cell.plan, cfg.steps)
            cell.cfg_steps, cell.late_steps = k, cfg.steps - k
            cell.unet_rows, cell.switch_step = 2 * n * k + n * (cfg.steps - k), (k if k < cfg.steps else None)
        else:
            res = sampler_call(samplers[cell.backend], prompts[:n], seeds[:n], cell.plan, cfg.steps, cfg.scheduler,
                               cfg.guidance_scale, height, width)
            timings, images = res.timings, res.images
            if cell.calls and (res.cfg_steps, res.late_steps) != (cell.cfg_steps, cell.late_steps):
                notes.append(f"{cell.id}: CFG steps changed between calls ({cell.cfg_steps} -> {res.cfg_steps})")
            cell.cfg_steps, cell.late_steps, cell.unet_rows, cell.switch_step = (
                res.cfg_steps, res.late_steps, res.unet_rows, res.switch_step)
        cell.images = images
        if rnd >= cfg.warmup:
            cell.calls.append(timings)

    # 3. The interleaved rounds (the first ``warmup`` are not recorded).
    rotation: List[Any] = list(cells) + list(role_in)
    rounds = cfg.warmup + cfg.repeat
    with tqdm(total=rounds * len(rotation), desc="bench", unit="call", disable=not progress, file=sys.stderr) as bar:
        interleaved(rotation, rounds, call, bar)

    # 4. Quality.
    quality = _quality(cfg, cells, scenes, notes)
    results: Dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "kind": "cfgswitch-bench",
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "argv": scrub_paths(list(argv)) if argv is not None else None,
        "machine": machine_info(),
        "config": scrub_paths(cfg.to_dict()),
        "model": {
            "source": _display_path(Path(cfg.bundle) if model_dir is None else model_dir), "embedded": embedded,
            "spec": {k: getattr(first.spec, k) for k in ("latent_channels", "vae_scale_factor", "sample_size", "text_length", "text_width")},
            "height": height, "width": width, "backend_info": scrub_paths({b: dict(s.runners.info) for b, s in samplers.items()}),
        },
        "prompts": {"source": prompt_source, "prompts": prompts, "seeds": seeds},
        "role_costs": [{"backend": b, "batch": n, "cfg_s": c, "late_s": late} for (b, n), (c, late) in roles.items()],
        "cells": [c.record(cfg.steps) for c in cells],
        "sweep": _sweep_block(cfg, cells),
        "quality": quality,
        "notes": notes,
    }
    results["elapsed_s"] = time.perf_counter() - started
    results["derived"] = derive(results)
    return results, {c.id: c.images for c in cells if c.images is not None}


def _display_path(path: Path) -> str:
    """The model path as results show it: the embedded model by name, never this machine's absolute path."""
    from cfgswitch.default_model import EMBEDDED_MODEL_DIR

    if is_embedded_model(path):
        return "embedded:" + EMBEDDED_MODEL_DIR.name
    p = Path(path)
    return str(p) if not p.is_absolute() else f".../{p.name}"


def _make_baseline(cfg: BenchConfig, samplers: Dict[str, Any], model_dir: Optional[Path], notes: List[str]):
    if cfg.baseline != "diffusers":
        return None
    sampler = samplers.get("torch")
    if sampler is None and model_dir is not None:
        from cfgswitch.sampler import Sampler

        sampler = Sampler.from_diffusers(model_dir)
    if sampler is None or not sampler.modules:
        notes.append("diffusers baseline skipped: it needs the diffusers folder (--model DIR beside --bundle)")
        return None
    return DiffusersBaseline(sampler.modules, sampler.scheduler_config, cfg.scheduler)


def _sweep_block(cfg: BenchConfig, cells: List[Cell]) -> Optional[Dict[str, Any]]:
    if not cfg.quality:
        return None
    top = max(cfg.batches)
    points = []
    for f, plan in zip(cfg.sweep, cfg.sweep_plans):
        ids = {c.backend: c.id for c in cells if c.system == "cfgswitch" and c.plan == plan and c.batch == top}
        points.append({"fraction": f, "plan": plan, "cells": ids})
    return {"batch": top, "points": points,
            "always": {c.backend: c.id for c in cells if c.system == "cfgswitch" and c.plan == "always" and c.batch == top}}


def _quality(cfg: BenchConfig, cells: List[Cell], scenes: Optional[List[Any]], notes: List[str]) -> Dict[str, Any]:
    """Image comparisons: baseline parity, per-plan L1/PSNR against always-CFG and scorer accuracies (every run)."""
    refs = {(c.system, c.backend, c.batch): c for c in cells if c.plan == "always"}
    out: Dict[str, Any] = {"reference": "the always-CFG cell of the same system, backend and batch (same seeds)",
                           "parity": {}, "cells": {}, "scorer": {}}
    for c in cells:
        ours = refs.get(("cfgswitch", "torch", c.batch))
        if c.system == "diffusers" and ours is not None and ours.images is not None and c.images is not None:
            twin = next((o for o in cells if (o.system, o.backend, o.plan, o.batch) == ("cfgswitch", "torch", c.plan, c.batch)), None)
            if twin is not None and twin.images is not None:
                cmp = compare(twin.images, c.images)
                out["parity"][c.id] = {"against": twin.id, "l1_mean": cmp["l1_mean"], "max_abs": cmp["max_abs"]}
    top = max(cfg.batches)
    for c in cells:
        ref = refs.get((c.system, c.backend, c.batch))
        if ref is not None and c.images is not None and ref.images is not None:
            out["cells"][c.id] = compare(c.images, ref.images)
        if scenes is not None and c.batch == top and c.images is not None:
            acc, why = scorer_accuracy(c.images, scenes)
            if acc is None:
                if why not in notes:
                    notes.append(why)
            else:
                out["scorer"][c.id] = acc
    if scenes is None:
        notes.append("scorer accuracies: only for a shapes-world model (the embedded one, or --shapes yes)")
    return out


__all__ = ["Cell", "SCHEMA_VERSION", "load_samplers", "run_benchmark"]
