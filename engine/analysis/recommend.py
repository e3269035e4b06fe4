"""Experiment 4: the recommended switch point, from the switch sweep and a user tolerance.

Rule: for each late mode, a switch fraction ``f`` of the sweep is *within tolerance*
when the mean low-frequency distance of its images to the always-CFG images is at
most ``tolerance.lowfreq`` and, where the sweep was scored, the scorer's mean attribute
accuracy is at most ``tolerance.accuracy_points`` percentage points below always-CFG's.
The recommendation for a mode is the smallest ``f`` such that it and every larger ``f`` of the grid are within tolerance (one lucky
grid point does not count). Across modes the earliest wins; a tie goes to ``uncond``
(the paper's mode, and the one whose late phase needs no prompt at all). When no ``f``
below 1 qualifies, the plan is ``always``.
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


__all__ = ["DEFAULT_ACCURACY_POINTS", "DEFAULT_LOWFREQ_TOLERANCE", "Tolerance", "earliest_within", "recommend",
           "within_tolerance"]
