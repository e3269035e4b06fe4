"""Every number a report shows, computed from the raw timings a ``results.json`` stores.

Pure functions over plain dicts (no torch), so anyone can recompute a report's ratios
from its raw data. Definitions (medians are :func:`statistics.median`, the mean of the
two middle values for an even count):

- role cost ``C`` (one ``cfg`` call: 2B rows and the combine) and ``L`` (one ``late``
  call: B rows): medians of the directly timed calls of that backend and batch size.
- ideal speedup of a plan with ``n_cfg`` guided and ``n_late`` late steps out of ``N``:
  ``N*C / (n_cfg*C + n_late*L)``, the speedup over ``always`` if nothing but the UNet cost time.
- realized speedup: median total of the ``always`` cell of the same system, backend and
  batch, divided by this cell's median total; ``realized_fraction`` = realized / ideal.
  ``loop_*`` are the same on the denoising-loop time alone.
- expected time ``ideal_total_s``: the ``always`` cell's median total minus the UNet time the
  plan saves, ``n_late * (C - L)``; ``saved_fraction_of_ideal`` = time actually saved / that.
- host overhead per step: per call, ``(loop - unet_cfg - unet_late) / steps`` (scheduler
  update and Python work of the loop); its median over calls.
- ``speedup_vs_diffusers_always``: median total of diffusers' always-CFG pipeline at the same
  batch size divided by this cell's median total.
- time outside the UNet, ``outside_unet_median_s``: per call ``total`` minus the UNet time, its
  median. The UNet time is ``unet`` where a call holds it: the UNet module's forward, timed by
  the same hooks on cfgswitch's torch backend and on diffusers; otherwise ``unet_cfg +
  unet_late`` (the role calls, including the CFG combine).
- ``same_unet_ratio`` (torch ``always`` against diffusers ``always``, per batch):
  ``(U + O_d) / (U + O_c)``, with ``U`` the median UNet-forward time of the two cells' calls
  pooled and ``O_d``, ``O_c`` their times outside the UNet. Both systems call the same module on
  bit-equal inputs, so their UNet time differs only by the machine's noise; this ratio puts that
  shared part in once and compares what the systems actually do differently. Its noise is that
  of the outside-UNet medians (a few percent of tens of milliseconds), where a per-round ratio
  of totals carries the noise of the whole call.
- ``paired_vs_diffusers_always``: the same comparison paired by round. Every cell is called once
  per round, so call ``i`` of two cells ran seconds apart; the ratio of diffusers' total to this
  cell's total is taken per round, and its median (and quartiles) reported. Drift shared by
  the two calls of a round cancels in each pair; a ratio of two medians compares calls of
  different rounds.
"""

from __future__ import annotations

import statistics
from typing import Any, Dict, List, Optional

#: Stages a cfgswitch call reports (GenerationOutput.timings).
STAGES = ("text", "unet_cfg", "unet_late", "scheduler", "vae", "loop", "total")
#: Targets of the issue (reported, not asserted).
TARGET_REALIZED_FRACTION = 0.97
TARGET_VS_DIFFUSERS = 2.0
TARGET_HOST_OVERHEAD_S = 1e-3
TARGET_ELAPSED_S = 300.0
#: cfgswitch torch ``always`` against diffusers on the same modules: at most 1% slower
#: (on the same-UNet ratio where the calls carry the UNet's time, else paired by round).
TARGET_TORCH_VS_DIFFUSERS = 0.99


def role_key(backend: str, batch: int) -> str:
    """Key of a role-cost entry."""
    return f"{backend}/b{batch}"


def _median(values: List[float]) -> float:
    return float(statistics.median(values))


def _ratio(num: Optional[float], den: Optional[float]) -> Optional[float]:
    if num is None or den is None or den == 0:
        return None
    return float(num) / float(den)


def paired_ratio(reference: List[Dict[str, Any]], calls: List[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    """Per-round ``reference total / this total`` of two cells' calls: median, quartiles, rounds.

    ``None`` when the cells do not hold the same number of calls (they were not timed in the
    same rounds) or hold none.
    """
    if not calls or len(reference) != len(calls):
        return None
    ratios = sorted(r["total"] / c["total"] for r, c in zip(reference, calls))
    q = statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1 else [ratios[0]] * 3
    return {"median": _median(ratios), "p25": float(q[0]), "p75": float(q[2]), "rounds": len(ratios)}


def same_unet_ratio(reference: List[Dict[str, Any]], calls: List[Dict[str, Any]]) -> Optional[Dict[str, float]]:
    """``(U + O_ref) / (U + O)``: two systems' totals with their shared UNet time counted once.

    ``U`` is the median ``unet`` (UNet-forward seconds) of both cells' calls pooled; ``O_ref``
    and ``O`` the medians of ``total - unet`` of each. Also returns each cell's own UNet median,
    so a reader can see that the two agree within the noise. ``None`` unless every call of both
    cells holds ``unet``.
    """
    both = list(reference) + list(calls)
    if not calls or not reference or not all("unet" in c for c in both):
        return None
    pooled = _median([c["unet"] for c in both])
    o_ref = _median([c["total"] - c["unet"] for c in reference])
    o = _median([c["total"] - c["unet"] for c in calls])
    return {"ratio": (pooled + o_ref) / (pooled + o), "unet_pooled_s": pooled, "outside_reference_s": o_ref,
            "outside_s": o, "unet_reference_s": _median([c["unet"] for c in reference]),
            "unet_cfgswitch_s": _median([c["unet"] for c in calls])}


def derive_role_costs(raw: List[Dict[str, Any]]) -> Dict[str, Dict[str, float]]:
    """Median ``cfg`` and ``late`` call cost per backend and batch size."""
    out = {}
    for entry in raw:
        c, late = _median(entry["cfg_s"]), _median(entry["late_s"])
        out[role_key(entry["backend"], entry["batch"])] = {"cfg_median_s": c, "late_median_s": late, "late_over_cfg": late / c}
    return out


def ideal_speedup(steps: int, cfg_steps: int, late_steps: int, cfg_cost: float, late_cost: float) -> float:
    """``steps*C / (cfg_steps*C + late_steps*L)``: the plan's speedup if only the UNet took time."""
    return steps * cfg_cost / (cfg_steps * cfg_cost + late_steps * late_cost)


def _cell_stats(cell: Dict[str, Any]) -> Dict[str, Any]:
    calls = cell["calls"]
    totals = [c["total"] for c in calls]
    stats: Dict[str, Any] = {
        "total_median_s": _median(totals), "total_min_s": min(totals), "total_max_s": max(totals),
        "stage_median_s": {s: _median([c[s] for c in calls]) for s in STAGES if all(s in c for c in calls)},
    }
    stats["images_per_s"] = cell["batch"] / stats["total_median_s"]
    unet = [c["unet"] if "unet" in c else (c["unet_cfg"] + c["unet_late"] if "unet_cfg" in c and "unet_late" in c else None)
            for c in calls]
    if all(u is not None for u in unet):
        stats["outside_unet_median_s"] = _median([c["total"] - u for c, u in zip(calls, unet)])
    if all(k in c for c in calls for k in ("loop", "unet_cfg", "unet_late")):
        engine = [c["unet_cfg"] + c["unet_late"] for c in calls]
        host = [(c["loop"] - c["unet_cfg"] - c["unet_late"]) / cell["steps"] for c in calls]
        stats["engine_median_s"] = _median(engine)
        stats["host_overhead_per_step_s"] = _median(host)
    return stats


def derive(results: Dict[str, Any]) -> Dict[str, Any]:
    """The ``derived`` block of ``results.json``, from its raw ``cells``, ``role_costs`` and ``elapsed_s``."""
    roles = derive_role_costs(results.get("role_costs", []))
    cells = {cell["id"]: _cell_stats(cell) for cell in results["cells"]}
    by_id = {cell["id"]: cell for cell in results["cells"]}
    always = {(c["system"], c["backend"], c["batch"]): c["id"] for c in results["cells"] if c["plan"] == "always"}
    diffusers_always = {c["batch"]: c["id"] for c in results["cells"] if c["plan"] == "always" and c["system"] == "diffusers"}
    for cid, stats in cells.items():
        cell = by_id[cid]
        role = roles.get(role_key(cell.get("role_backend", cell["backend"]), cell["batch"]))
        stats["ideal_speedup"] = None
        if role is not None:
            stats["ideal_speedup"] = ideal_speedup(cell["steps"], cell["cfg_steps"], cell["late_steps"],
                                                   role["cfg_median_s"], role["late_median_s"])
        ref_id = always.get((cell["system"], cell["backend"], cell["batch"]))
        stats["reference"] = ref_id
        ref = cells.get(ref_id) if ref_id is not None else None
        stats["realized_speedup"] = _ratio(ref["total_median_s"], stats["total_median_s"]) if ref else None
        stats["realized_fraction"] = _ratio(stats["realized_speedup"], stats["ideal_speedup"])
        ref_loop = ref["stage_median_s"].get("loop") if ref else None
        stats["loop_speedup"] = _ratio(ref_loop, stats["stage_median_s"].get("loop"))
        stats["loop_realized_fraction"] = _ratio(stats["loop_speedup"], stats["ideal_speedup"])
        # Expected time: the always cell's time minus the UNet time the plan saves, late * (C - L).
        saved = cell["late_steps"] * (role["cfg_median_s"] - role["late_median_s"]) if role is not None else None
        stats["ideal_saved_s"] = saved
        stats["ideal_total_s"] = ref["total_median_s"] - saved if ref is not None and saved is not None else None
        realized_saved = ref["total_median_s"] - stats["total_median_s"] if ref is not None else None
        stats["saved_fraction_of_ideal"] = _ratio(realized_saved, saved) if saved else None
        d_id = diffusers_always.get(cell["batch"])
        d_total = cells[d_id]["total_median_s"] if d_id is not None else None
        stats["speedup_vs_diffusers_always"] = _ratio(d_total, stats["total_median_s"])
        stats["paired_vs_diffusers_always"] = paired_ratio(by_id[d_id]["calls"], cell["calls"]) if d_id is not None else None
    return {"role_costs": roles, "cells": cells, "targets": _targets(results, cells)}


def _targets(results: Dict[str, Any], cells: Dict[str, Dict[str, Any]]) -> Dict[str, Any]:
    """The issue's targets, measured: each with its value and whether it is met."""
    ours = [c for c in results["cells"] if c["system"] == "cfgswitch"]
    switch = [c for c in ours if c["plan"] == "switch:0.5"]
    fractions = {c["id"]: cells[c["id"]]["realized_fraction"] for c in switch}
    vs = {c["id"]: cells[c["id"]]["speedup_vs_diffusers_always"] for c in switch}
    host = {c["id"]: cells[c["id"]].get("host_overhead_per_step_s") for c in ours}
    out: Dict[str, Any] = {}
    vals = [v for v in fractions.values() if v is not None]
    out["switch_realized_fraction"] = {"target": TARGET_REALIZED_FRACTION, "values": fractions,
                                       "min": min(vals) if vals else None, "met": bool(vals) and min(vals) >= TARGET_REALIZED_FRACTION}
    # "fastest CPU backend": per batch size, the best of our backends against diffusers.
    best: Dict[str, float] = {}
    for c in switch:
        v = vs[c["id"]]
        if v is not None:
            best[f"b{c['batch']}"] = max(best.get(f"b{c['batch']}", 0.0), v)
    out["switch_vs_diffusers_always"] = {"target": TARGET_VS_DIFFUSERS, "values": vs, "best_per_batch": best,
                                         "met": bool(best) and min(best.values()) >= TARGET_VS_DIFFUSERS}
    hvals = [v for v in host.values() if v is not None]
    out["host_overhead_per_step_s"] = {"target": TARGET_HOST_OVERHEAD_S, "values": host, "max": max(hvals) if hvals else None,
                                       "met": bool(hvals) and max(hvals) < TARGET_HOST_OVERHEAD_S}
    torch_always = [c for c in ours if c["plan"] == "always" and c["backend"] == "torch"]
    d_always = {c["batch"]: c["id"] for c in results["cells"] if c["plan"] == "always" and c["system"] == "diffusers"}
    paired = {f"b{c['batch']}": cells[c["id"]]["paired_vs_diffusers_always"] for c in torch_always}
    paired = {k: v for k, v in paired.items() if v is not None}
    by_id = {c["id"]: c for c in results["cells"]}
    compared = [c for c in torch_always if c["batch"] in d_always]
    same_unet, forward = {}, {}
    for c in compared:
        ratio = same_unet_ratio(by_id[d_always[c["batch"]]]["calls"], c["calls"])
        if ratio is not None:
            same_unet[f"b{c['batch']}"] = ratio["ratio"]
            forward[f"b{c['batch']}"] = {"cfgswitch": ratio["unet_cfgswitch_s"], "diffusers": ratio["unet_reference_s"]}
    # The basis: the same-UNet ratio where every batch has one (both systems' calls carry the
    # UNet's forward time), else the per-round paired ratio.
    basis = "same_unet_ratio" if same_unet and len(same_unet) == len(compared) else "paired_median"
    values = same_unet if basis == "same_unet_ratio" else {k: v["median"] for k, v in paired.items()}
    out["torch_always_vs_diffusers"] = {
        "target": TARGET_TORCH_VS_DIFFUSERS, "paired_median": {k: v["median"] for k, v in paired.items()},
        "paired_quartiles": {k: [v["p25"], v["p75"]] for k, v in paired.items()},
        "ratio_of_medians": {f"b{c['batch']}": cells[c["id"]]["speedup_vs_diffusers_always"] for c in torch_always},
        "outside_unet_s": {f"b{c['batch']}": {"cfgswitch": cells[c["id"]].get("outside_unet_median_s"),
                                             "diffusers": cells[d_always[c["batch"]]].get("outside_unet_median_s")}
                           for c in compared},
        "unet_forward_median_s": forward, "same_unet_ratio": same_unet, "basis": basis,
        "met": bool(values) and min(values.values()) >= TARGET_TORCH_VS_DIFFUSERS,
    }
    elapsed = results.get("elapsed_s")
    out["elapsed_s"] = {"target": TARGET_ELAPSED_S, "value": elapsed, "met": elapsed is not None and elapsed < TARGET_ELAPSED_S}
    return out


__all__ = ["STAGES", "derive", "derive_role_costs", "ideal_speedup", "paired_ratio", "role_key", "same_unet_ratio"]
