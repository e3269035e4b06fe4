"""Experiment 2: the switch sweep, ``switch_at(f)`` over a grid of ``f`` against always-CFG.

Each switched image is compared with the always-CFG image of the same prompt and seed
(L1, PSNR, low-frequency distance); the UNet rows saved, the measured loop time saved and
the UNet time saved by calibrated per-call times (:func:`unet_call_seconds`) are reported
beside it, and, when a scorer is given, the attribute accuracies.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from ..plans import LATE_MODES, GuidancePlan
from .frequency import DEFAULT_CUTOFF
from .metrics import image_distances

logger = logging.getLogger(__name__)

#: Default grid of switch fractions (1.0 is always-CFG, the reference itself).
DEFAULT_FRACTIONS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 1.0)


def _generate(sampler, prompts: List[str], plan: GuidancePlan, seeds: List[int], batch_size: int, **kw) -> Dict[str, Any]:
    images, rows, seconds, loop_s, cfg_steps = [], 0, 0.0, 0.0, 0
    for start in range(0, len(prompts), batch_size):
        out = sampler.generate(prompts[start : start + batch_size], plan=plan, seed=seeds[start : start + batch_size],
                               output_type="np", **kw)
        images.append(out.images)
        rows += out.unet_rows
        seconds += out.timings["total"]
        loop_s += out.timings["loop"]
        cfg_steps = out.cfg_steps
    return {"images": np.concatenate(images), "unet_rows": rows, "seconds": seconds, "loop_seconds": loop_s,
            "cfg_steps": cfg_steps}


def unet_call_seconds(sampler, batch: int, repeats: int = 5) -> Dict[str, float]:
    """Median seconds of one CFG-role call (B latents, 2B rows) and one late-role call (B rows).

    A calibration independent of the sweep's wall clock: the median of ``repeats`` calls
    after one warm-up, at a mid timestep, with the sampler's own runners.
    """
    import statistics
    import time

    import torch

    runners, spec = sampler.runners, sampler.spec
    g = torch.Generator().manual_seed(0)
    x = torch.randn((batch, spec.latent_channels, spec.sample_size, spec.sample_size), generator=g).to(runners.device, runners.dtype)
    t = torch.full((batch,), 500.0, device=runners.device)
    emb = torch.zeros((2 * batch, spec.text_length, spec.text_width), device=runners.device, dtype=runners.dtype)
    w = torch.full((batch,), 7.5, device=runners.device)

    def timed(fn) -> float:
        fn()
        out = []
        for _ in range(repeats):
            if runners.device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if runners.device.type == "cuda":
                torch.cuda.synchronize()
            out.append(time.perf_counter() - start)
        return statistics.median(out)

    cfg_s = timed(lambda: runners.unet_cfg.predict_guided(x, t, emb, w))
    late_s = timed(lambda: runners.unet.predict(x, t, emb[:batch]))
    return {"batch": batch, "cfg_call_seconds": cfg_s, "late_call_seconds": late_s}


def switch_sweep(
    sampler,
    prompts: Sequence[str],
    *,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    late_modes: Sequence[str] = LATE_MODES,
    steps: int = 30,
    guidance_scale: float = 7.5,
    scheduler: str = "ddim",
    seed: int = 0,
    cutoff: float = DEFAULT_CUTOFF,
    scorer: Optional[Any] = None,
    targets: Optional[Sequence[Any]] = None,
    batch_size: int = 16,
    progress: Optional[Any] = None,
) -> Dict[str, Any]:
    """Generate every prompt with each ``switch_at(f, late)`` and compare with always-CFG.

    Args:
        sampler (`Sampler`): the model, any backend.
        prompts (`Sequence[str]`): prompt ``i`` uses seed ``seed + i`` under every plan.
        fractions (`Sequence[float]`): switch fractions in [0, 1].
        late_modes (`Sequence[str]`, defaults to both): ``uncond`` and/or ``cond``.
        steps, guidance_scale, scheduler: as for ``Sampler.generate``.
        cutoff (`float`): low-pass radius of the low-frequency distance (fraction of Nyquist).
        scorer (optional): a :class:`~cfgswitch.analysis.scoring.AttributeScorer`; with ``targets``
            (one per prompt) each entry gets the scorer's attribute accuracies.
        batch_size (`int`, defaults to 16): images per ``generate`` call.
        progress (tqdm bar, optional): advanced by one per plan run.

    Returns:
        ``baseline`` (always-CFG rows, seconds, accuracies), ``unet_timing`` (median seconds of one
        CFG-role and one late-role call) and ``entries``: one per (late mode, fraction) with the mean
        distances, ``switch_step``, ``rows_saved`` (fraction of the baseline's UNet rows),
        ``time_saved`` (fraction of its measured loop time, noisy on a shared machine) and
        ``unet_time_saved`` (the UNet time saved, from the calibrated per-call times).
    """
    prompts = list(prompts)
    for f in fractions:
        GuidancePlan.switch_at(f)  # validates each fraction before any work
    for m in late_modes:
        GuidancePlan.switch_at(0.5, m)
    seeds = [seed + i for i in range(len(prompts))]
    kw = dict(steps=steps, guidance_scale=guidance_scale, scheduler=scheduler)
    use_scorer = scorer is not None and targets is not None
    base = _generate(sampler, prompts, GuidancePlan.always(), seeds, batch_size, **kw)
    if progress is not None:
        progress.update(1)
    baseline: Dict[str, Any] = {"plan": "always", "unet_rows": base["unet_rows"], "seconds": base["seconds"],
                                "loop_seconds": base["loop_seconds"]}
    if use_scorer:
        baseline["accuracy"] = scorer.accuracy(base["images"], targets)
    calib = unet_call_seconds(sampler, min(batch_size, len(prompts)))
    late_gain = 1.0 - calib["late_call_seconds"] / calib["cfg_call_seconds"] if calib["cfg_call_seconds"] > 0 else 0.0
    entries: List[Dict[str, Any]] = []
    examples: Dict[str, np.ndarray] = {"always": base["images"]}
    for late in late_modes:
        for f in fractions:
            plan = GuidancePlan.switch_at(float(f), late)
            run = _generate(sampler, prompts, plan, seeds, batch_size, **kw)
            d = image_distances(run["images"], base["images"], cutoff)
            entry: Dict[str, Any] = {
                "plan": str(plan), "fraction": float(f), "late": late,
                "switch_step": run["cfg_steps"],
                "l1": float(d["l1"].mean()), "psnr": float(d["psnr"].mean()),
                "lowfreq": float(d["lowfreq"].mean()), "lowfreq_max": float(d["lowfreq"].max()),
                "unet_rows": run["unet_rows"],
                "rows_saved": 1.0 - run["unet_rows"] / base["unet_rows"],
                "seconds": run["seconds"], "loop_seconds": run["loop_seconds"],
                "time_saved": 1.0 - run["loop_seconds"] / base["loop_seconds"] if base["loop_seconds"] > 0 else 0.0,
            }
            entry["unet_time_saved"] = (steps - entry["switch_step"]) / steps * late_gain
            if use_scorer:
                entry["accuracy"] = scorer.accuracy(run["images"], targets)
            entries.append(entry)
            examples[str(plan)] = run["images"]
            if progress is not None:
                progress.update(1)
            logger.debug("sweep %s: lowfreq %.4f, psnr %.1f dB, rows saved %.0f%%", plan, entry["lowfreq"],
                         entry["psnr"], 100 * entry["rows_saved"])
    return {
        "prompts": prompts, "seeds": seeds, "steps": steps, "guidance_scale": guidance_scale, "scheduler": scheduler,
        "cutoff": cutoff, "fractions": [float(f) for f in fractions], "late_modes": list(late_modes),
        "scored": use_scorer, "baseline": baseline, "unet_timing": calib, "entries": entries, "_images": examples,
    }


__all__ = ["DEFAULT_FRACTIONS", "switch_sweep", "unet_call_seconds"]
