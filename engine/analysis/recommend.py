"""Experiment 4: the recommended switch point, from the switch sweep and a user tolerance.

Rule: for each late mode, a switch fraction ``f`` of the sweep is *within tolerance*
when the mean low-frequency distance of its images to the always-CFG images is at
most ``tolerance.lowfreq`` and, where the sweep was scored, the scorer's mean attribute
accuracy is at most ``tolerance.accuracy_points`` percentage points below always-CFG's.
The recommendation for a mode is the smallest ``f`` such that it and every larger ``f`` of the grid are within tolerance (one lucky
grid point does not count). Across modes the earliest wins; a tie goes to ``uncond``
(the paper's mode, and the one whose late phase needs no prompt at all). When no ``f``
below 1 qualifies, the plan is ``always``.

Adaptive rule (:func:`recommend_adaptive`): the threshold is the probes' mean cosine of
eps_cond and eps_uncond at the last guided step of the recommended switch plan (step
``k - 1``), rounded down to 4 decimals, so a typical image ends CFG where the sweep showed
it may, and an image whose predictions still differ keeps CFG longer. The plan also takes
the switch plan's fraction as its minimum share of CFG steps (``min=``) and its late mode,
so no threshold can end CFG earlier than the sweep validated. ``run_analysis`` then
generates the sweep's prompts with it and records its measured fidelity and savings.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional

from ..errors import InvalidArgumentError
from ..plans import GuidancePlan

#: Default bound on the mean low-frequency RMS distance to always-CFG (pixels in [0, 1]).
DEFAULT_LOWFREQ_TOLERANCE = 0.03
#: Default bound on the drop of the scorer's mean attribute accuracy, in percentage points.
DEFAULT_ACCURACY_POINTS = 1.0


@dataclass(frozen=True)
class Tolerance:
    """How far a switched run may drift from always-CFG.

    Attributes:
        lowfreq (`float`, defaults to 0.03): bound on the mean low-frequency RMS distance
            (pixel values in [0, 1]) to the always-CFG image of the same seed.
        accuracy_points (`float`, defaults to 1.0): bound on the drop of the scorer's mean
            attribute accuracy, in percentage points; unused without a scorer.
    """

    lowfreq: float = DEFAULT_LOWFREQ_TOLERANCE
    accuracy_points: float = DEFAULT_ACCURACY_POINTS

    def __post_init__(self) -> None:
        for name in ("lowfreq", "accuracy_points"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:  # nan fails too
                raise InvalidArgumentError(f"tolerance.{name}", "a number >= 0", value)


def _accuracy_drop(entry: Dict[str, Any], baseline: Dict[str, Any]) -> Optional[float]:
    if "accuracy" not in entry or "accuracy" not in baseline:
        return None
    return float(baseline["accuracy"]["mean"] - entry["accuracy"]["mean"])


def within_tolerance(entry: Dict[str, Any], baseline: Dict[str, Any], tolerance: Tolerance) -> bool:
    """Whether one sweep entry stays within ``tolerance`` of the baseline."""
    if entry["lowfreq"] > tolerance.lowfreq:
        return False
    drop = _accuracy_drop(entry, baseline)
    return drop is None or drop <= tolerance.accuracy_points + 1e-9


def earliest_within(entries: List[Dict[str, Any]], baseline: Dict[str, Any], tolerance: Tolerance) -> Optional[Dict[str, Any]]:
    """The entry of smallest fraction from which every entry (of one late mode) is within tolerance."""
    best = None
    for entry in sorted(entries, key=lambda e: e["fraction"], reverse=True):
        if not within_tolerance(entry, baseline, tolerance):
            break
        best = entry
    return best


def _earliest_plan(sweep: Dict[str, Any], tolerance: Tolerance) -> str:
    """The plan :func:`recommend` picks under ``tolerance`` (for the one-criterion alternatives)."""
    best: Optional[Dict[str, Any]] = None
    for late in ("uncond", "cond"):
        entry = earliest_within([e for e in sweep["entries"] if e["late"] == late], sweep["baseline"], tolerance)
        if entry is not None and entry["fraction"] < 1.0 and (best is None or entry["fraction"] < best["fraction"]):
            best = entry
    return "always" if best is None else best["plan"]


def recommend(sweep: Dict[str, Any], tolerance: Tolerance = Tolerance()) -> Dict[str, Any]:
    """The recommended plan for a sweep result (:func:`~cfgswitch.analysis.sweep.switch_sweep`).

    Returns a JSON-ready dict whose ``plan`` is a plan string that ``generate``, ``bench``
    and ``serve`` accept (``GuidancePlan.parse``), with the evidence behind it.
    """
    baseline = sweep["baseline"]
    per_mode: Dict[str, Any] = {}
    choice: Optional[Dict[str, Any]] = None
    for late in ("uncond", "cond"):
        entries = [e for e in sweep["entries"] if e["late"] == late]
        if not entries:
            continue
        best = earliest_within(entries, baseline, tolerance)
        per_mode[late] = None if best is None else best["plan"]
        if best is not None and best["fraction"] < 1.0 and (choice is None or best["fraction"] < choice["fraction"]):
            choice = best
    if choice is None:
        plan = GuidancePlan.always()
        evidence: Dict[str, Any] = {"fraction": 1.0, "late": None, "switch_step": sweep["steps"], "rows_saved": 0.0,
                                    "time_saved": 0.0, "unet_time_saved": 0.0, "lowfreq": 0.0, "psnr": None, "accuracy_drop_points": 0.0}
    else:
        plan = GuidancePlan.switch_at(choice["fraction"], choice["late"])
        evidence = {k: choice[k] for k in ("fraction", "late", "switch_step", "rows_saved", "time_saved", "lowfreq", "psnr")}
        evidence["unet_time_saved"] = choice.get("unet_time_saved")
        evidence["accuracy_drop_points"] = _accuracy_drop(choice, baseline)
    by_criterion = {"lowfreq_only": _earliest_plan(sweep, Tolerance(tolerance.lowfreq, math.inf))}
    if sweep.get("scored"):
        by_criterion["accuracy_only"] = _earliest_plan(sweep, Tolerance(math.inf, tolerance.accuracy_points))
    return {
        "plan": str(plan),
        **evidence,
        "steps": sweep["steps"],
        "scheduler": sweep["scheduler"],
        "guidance_scale": sweep["guidance_scale"],
        "tolerance": asdict(tolerance),
        "scored": bool(sweep.get("scored")),
        "earliest_per_late_mode": per_mode,
        "earliest_per_criterion": by_criterion,
        "rule": ("smallest switch fraction f such that f and every larger f of the grid keep the mean low-frequency "
                 "distance to always-CFG <= tolerance.lowfreq and, if scored, the mean attribute accuracy within "
                 "tolerance.accuracy_points of always-CFG; ties prefer late=uncond"),
    }


def recommend_adaptive(probes: Optional[Dict[str, Any]], recommendation: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """The recommended adaptive plan for a model, from its trajectory probes and switch recommendation.

    Args:
        probes (`dict`, optional): :func:`~cfgswitch.analysis.probes.trajectory_probes`'s result
            (``per_step.cosine``: mean cosine per step); ``None`` gives ``None``.
        recommendation (`dict`): :func:`recommend`'s result.

    Returns:
        ``None`` without probes, else a JSON-ready dict: ``plan`` (a plan string), ``threshold``,
        ``min_fraction``, ``late``, ``from_step`` and ``rule``. When the switch recommendation is
        ``always``, so is this one.
    """
    if not probes or "per_step" not in probes or not probes["per_step"].get("cosine"):
        return None
    rule = ("threshold = the probes' mean cosine(eps_cond, eps_uncond) at the last guided step of the recommended "
            "switch plan, rounded down to 4 decimals; min = that plan's fraction; late = its late mode")
    if recommendation["plan"] == "always":
        return {"plan": "always", "threshold": None, "min_fraction": 1.0, "late": None, "from_step": None, "rule": rule}
    cosines = probes["per_step"]["cosine"]
    k = int(recommendation["switch_step"])
    step = min(max(k - 1, 0), len(cosines) - 1)
    threshold = math.floor(float(cosines[step]) * 1e4) / 1e4
    threshold = max(-1.0, min(1.0, threshold))
    late = recommendation.get("late") or "uncond"
    plan = GuidancePlan.adaptive(threshold, late, float(recommendation["fraction"]))
    return {"plan": str(plan), "threshold": threshold, "min_fraction": plan.min_fraction, "late": late,
            "from_step": step, "rule": rule}


__all__ = ["DEFAULT_ACCURACY_POINTS", "recommend_adaptive", "DEFAULT_LOWFREQ_TOLERANCE", "Tolerance", "earliest_within", "recommend",
           "within_tolerance"]
