"""Writers of a run's files: ``results.json``, ``report.md`` (aligned markdown tables) and plots."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

logger = logging.getLogger(__name__)


def md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table padded to aligned columns, so it reads in a terminal as on GitHub."""
    cells = [[str(h) for h in header]] + [[("" if v is None else str(v)) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["| " + " | ".join(v.ljust(w) for v, w in zip(r, widths)) + " |" for r in cells]
    lines.insert(1, "| " + " | ".join("-" * w for w in widths) + " |")
    return "\n".join(lines)


def _ms(x: Optional[float]) -> Optional[str]:
    return None if x is None else f"{x * 1e3:.1f}"


def _x(x: Optional[float], digits: int = 2) -> Optional[str]:
    return None if x is None else f"{x:.{digits}f}x"


def _pct(x: Optional[float]) -> Optional[str]:
    return None if x is None else f"{x * 100:.1f}%"


def cell_quality(results: Dict[str, Any], cell_id: str) -> Optional[str]:
    """A cell's quality in one short string: the scorer's accuracy (all attributes) where scored,
    else the mean PSNR against always-CFG of the same seeds; ``None`` when neither was measured."""
    q = results.get("quality") or {}
    acc = (q.get("scorer") or {}).get(cell_id)
    if acc is not None and acc.get("all_attributes") is not None:
        return f"{100 * acc['all_attributes']:.1f}%"
    cmp = (q.get("cells") or {}).get(cell_id)
    if cmp is not None:
        return "identical" if cmp.get("psnr_mean_db") is None else f"{cmp['psnr_mean_db']:.1f} dB"
    return None


def headline_rows(results: Dict[str, Any]) -> List[List[Any]]:
    """Per backend and batch: always vs ``switch:0.5`` end to end, ideal vs realized, against diffusers, and quality."""
    d = results["derived"]["cells"]
    rows = []
    for cell in results["cells"]:
        if cell["plan"] != "switch:0.5":
            continue
        ref = d[cell["id"]]["reference"]
        s, a = d[cell["id"]], d.get(ref, {})
        label = "diffusers pipeline" if cell["system"] == "diffusers" else f"cfgswitch {cell['backend']}"
        rows.append([label, cell["batch"], _ms(a.get("total_median_s")), _ms(s["total_median_s"]), _x(s["ideal_speedup"]),
                     _x(s["realized_speedup"]), _pct(s["realized_fraction"]), _pct(s["loop_realized_fraction"]),
                     _x(s["speedup_vs_diffusers_always"]), cell_quality(results, ref), cell_quality(results, cell["id"])])
    return rows


HEADLINE_HEADER = ["system", "batch", "always ms", "switch:0.5 ms", "ideal", "realized", "realized/ideal",
                   "loop realized/ideal", "vs diffusers always", "always quality", "switch:0.5 quality"]
#: What the quality columns hold (printed under every speed table).
QUALITY_NOTE = ("quality = the shapes scorer's accuracy over all attributes (a shapes-world model, the largest batch), "
                "else the mean PSNR against always-CFG of the same seeds; empty where not measured")


def plans_table(results: Dict[str, Any]) -> str:
    """Every plan of the run at the largest batch: time, speedup and quality side by side."""
    d = results["derived"]["cells"]
    top = max(results["config"]["batches"])
    rows = []
    for c in results["cells"]:
        if c["system"] != "cfgswitch" or c["batch"] != top or c["plan"] not in results["config"]["plans"]:
            continue
        s = d[c["id"]]
        rows.append([c["backend"], c["plan"], c["batch"], c["unet_rows"], _ms(s["total_median_s"]), _x(s["realized_speedup"]),
                     cell_quality(results, c["id"])])
    return md_table(["backend", "plan", "batch", "UNet rows", "median ms", "speedup", "quality"], rows)


def headline_table(results: Dict[str, Any]) -> str:
    """The headline table as markdown."""
    return md_table(HEADLINE_HEADER, headline_rows(results))


def cells_table(results: Dict[str, Any], sweep: bool = False) -> str:
    """Every cell: counts, wall times, stages, host overhead and ratios."""
    d = results["derived"]["cells"]
    rows = []
    for c in results["cells"]:
        if c["sweep"] and c["plan"] not in results["config"]["plans"] and not sweep:
            continue
        s = d[c["id"]]
        st = s["stage_median_s"]
        rows.append([c["system"], c["backend"], c["plan"], c["batch"], f"{c['cfg_steps']}/{c['late_steps']}", c["unet_rows"],
                     _ms(s["total_median_s"]), _ms(s["total_min_s"]), _ms(s["total_max_s"]), f"{s['images_per_s']:.2f}",
                     _ms(st.get("text")), _ms(st.get("unet_cfg")), _ms(st.get("unet_late")), _ms(st.get("scheduler")),
                     _ms(st.get("vae")), None if s.get("host_overhead_per_step_s") is None else f"{s['host_overhead_per_step_s'] * 1e3:.3f}",
                     _x(s["ideal_speedup"]), _x(s["realized_speedup"]), _pct(s["realized_fraction"]),
                     _pct(s["saved_fraction_of_ideal"]), _x(s["speedup_vs_diffusers_always"]), cell_quality(results, c["id"])])
    header = ["system", "backend", "plan", "batch", "cfg/late", "UNet rows", "median ms", "min ms", "max ms", "img/s",
              "text ms", "unet_cfg ms", "unet_late ms", "sched ms", "vae ms", "host ms/step", "ideal", "realized",
              "real/ideal", "saved/ideal saved", "vs diffusers", "quality"]
    return md_table(header, rows)


def _torch_vs_diffusers(targets: Dict[str, Any]) -> str:
    """Per batch: the same-UNet ratio, the paired ratio, the ratio of medians, and the time outside the UNet."""
    t = targets.get("torch_always_vs_diffusers")
    if not t or not (t["paired_median"] or t.get("same_unet_ratio")):
        return "n/a"
    parts = []
    for k in sorted(set(t["paired_median"]) | set(t.get("same_unet_ratio", {})), key=lambda b: int(b[1:])):
        out = t.get("outside_unet_s", {}).get(k, {})
        bits = []
        if k in t.get("same_unet_ratio", {}):
            bits.append(f"same-UNet {_x(t['same_unet_ratio'][k], 3)}")
        if k in t["paired_median"]:
            bits.append(f"paired {_x(t['paired_median'][k], 3)}")
        bits.append(f"ratio of medians {_x(t['ratio_of_medians'].get(k), 3)}")
        if out.get("cfgswitch") is not None and out.get("diffusers") is not None:
            bits.append(f"outside the UNet {_ms(out['cfgswitch'])} vs {_ms(out['diffusers'])} ms")
        parts.append(f"{k}: " + "; ".join(bits))
    basis = {"same_unet_ratio": "same-UNet ratio", "paired_median": "paired ratio"}.get(t.get("basis", "paired_median"))
    return f"({basis} decides) " + ", ".join(parts)


def _targets_table(results: Dict[str, Any]) -> str:
    t = results["derived"]["targets"]
    rows = [
        ["switch:0.5 realized/ideal >= 97% (every backend, batch)",
         None if t["switch_realized_fraction"]["min"] is None else f"min {_pct(t['switch_realized_fraction']['min'])}",
         "yes" if t["switch_realized_fraction"]["met"] else "no"],
        ["fastest backend switch:0.5 >= 2x diffusers always", ", ".join(f"{k}: {_x(v)}" for k, v in t["switch_vs_diffusers_always"]["best_per_batch"].items()) or "n/a",
         "yes" if t["switch_vs_diffusers_always"]["met"] else "no"],
        ["host overhead per step < 1 ms", None if t["host_overhead_per_step_s"]["max"] is None else f"max {t['host_overhead_per_step_s']['max'] * 1e3:.3f} ms",
         "yes" if t["host_overhead_per_step_s"]["met"] else "no"],
        ["torch always >= 0.99x diffusers always (same modules)", _torch_vs_diffusers(t),
         "yes" if t.get("torch_always_vs_diffusers", {}).get("met") else "no"],
        ["run < 5 min", f"{t['elapsed_s']['value']:.0f} s" if t["elapsed_s"]["value"] is not None else None,
         "yes" if t["elapsed_s"]["met"] else "no"],
    ]
    return md_table(["target", "measured", "met"], rows)


def _quality_tables(results: Dict[str, Any]) -> List[str]:
    q = results.get("quality") or {}
    parts = []
    if q.get("parity"):
        rows = [[cid, p["against"], f"{p['l1_mean']:.2e}", f"{p['max_abs']:.2e}"] for cid, p in q["parity"].items()]
        parts.append("### Baseline parity (diffusers pipeline vs cfgswitch torch, same plan and seeds)\n\n"
                     + md_table(["diffusers cell", "cfgswitch cell", "mean L1", "max abs"], rows))
    if q.get("cells"):
        rows = []
        main_plans = set(results["config"]["plans"])
        plan_of = {c["id"]: c["plan"] for c in results["cells"]}
        for cid, v in q["cells"].items():
            if plan_of.get(cid) not in main_plans:
                continue  # sweep-only cells: see the sweep table
            acc = q.get("scorer", {}).get(cid)
            rows.append([cid, f"{v['l1_mean']:.4f}", "identical" if v["psnr_mean_db"] is None else f"{v['psnr_mean_db']:.1f}",
                         None if acc is None else f"{acc['all_attributes']:.2f}",
                         None if acc is None else " ".join(f"{k}={acc[k]:.2f}" for k in ("colour", "shape", "size", "position", "background") if k in acc)])
        parts.append("### Quality against always-CFG (same seeds)\n\n"
                     + md_table(["cell", "mean L1", "mean PSNR dB", "scorer all", "scorer per attribute"], rows))
    return parts


def _role_table(results: Dict[str, Any]) -> str:
    rows = [[k.split("/")[0], k.split("/")[1][1:], _ms(v["cfg_median_s"]), _ms(v["late_median_s"]), f"{v['late_over_cfg']:.3f}"]
            for k, v in results["derived"]["role_costs"].items()]
    return md_table(["backend", "batch", "cfg call ms (2B rows)", "late call ms (B rows)", "late/cfg"], rows)


def report_markdown(results: Dict[str, Any], plots: Sequence[str] = ()) -> str:
    """The whole ``report.md``."""
    m, c = results["machine"], results["config"]
    gpu = m.get("gpu")
    libs = ", ".join(f"{k} {v}" for k, v in m["libraries"].items() if v)
    lines = [
        f"# cfgswitch benchmark: {results['model']['source']}",
        "",
        f"- machine: {m['cpu_model']}, {m['cpu_cores']} cores (torch threads: {m['torch_threads']}), "
        f"{m.get('memory_gib')} GiB; GPU: {gpu['name'] if gpu else 'none'}; load average at the end "
        f"{m.get('load_average_1_5_15min')} (1/5/15 min)",
        f"- libraries: {libs}",
        f"- run: {results['created_utc']}, {results['elapsed_s']:.1f} s; command: `{' '.join(results['argv'] or ['(library call)'])}`",
        f"- model: {results['model']['source']}"
        + (f" ({results['model']['parameters']:,} UNet parameters)" if results["model"].get("parameters") else "")
        + f", {results['model']['height']}x{results['model']['width']} px; "
        f"steps {c['steps']}, scheduler {c['scheduler']}, guidance {c['guidance_scale']}, batches {c['batches']}, "
        f"repeat {c['repeat']} (warm-up {c['warmup']}), calls interleaved across all cells",
        f"- prompts: {results['prompts']['source']}; image i has seed {c['seed']} + i",
        "",
        "## Headline: switch:0.5 against always-CFG",
        "",
        headline_table(results),
        "",
        "ideal = speedup if only the UNet took time, from the directly timed cfg and late calls; realized = end to end; "
        "loop realized/ideal = the same on the denoising loop alone. Every ratio is recomputable from `results.json` "
        "(raw timings per call; see cfgswitch.benchmarks.derive). " + QUALITY_NOTE + ".",
        "",
        "## Every plan: speed and quality",
        "",
        plans_table(results),
        "",
        "## Targets",
        "",
        _targets_table(results),
        "",
        "## UNet role costs (medians of direct calls)",
        "",
        _role_table(results),
        "",
        "## Every cell (medians over the timed calls)",
        "",
        cells_table(results),
        "",
    ]
    for part in _quality_tables(results):
        lines += [part, ""]
    if results.get("sweep"):
        lines += ["## Switch-point sweep", "", _sweep_table(results), ""]
    for p in plots:
        lines += [f"![{Path(p).stem}]({p})", ""]
    if results.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in results["notes"]] + [""]
    return "\n".join(lines)


def _sweep_table(results: Dict[str, Any]) -> str:
    d = results["derived"]["cells"]
    q = (results.get("quality") or {}).get("cells", {})
    sc = (results.get("quality") or {}).get("scorer", {})
    rows = []
    for point in results["sweep"]["points"]:
        for backend, cid in point["cells"].items():
            s = d[cid]
            acc = sc.get(cid)
            psnr = q.get(cid, {}).get("psnr_mean_db")
            rows.append([point["fraction"], backend, _ms(s["total_median_s"]), _ms(s["ideal_total_s"]), _x(s["ideal_speedup"]),
                         _x(s["realized_speedup"]), None if cid not in q else f"{q[cid]['l1_mean']:.4f}",
                         None if psnr is None else f"{psnr:.1f}", None if acc is None else f"{acc['all_attributes']:.2f}"])
    return md_table(["switch at", "backend", "median ms", "expected ms", "ideal", "realized", "L1", "PSNR dB", "scorer all"], rows)


def write_results(results: Dict[str, Any], images: Dict[str, Any], out_dir: "str | Path") -> Dict[str, Path]:
    """Write ``results.json``, the plots and ``report.md`` into ``out_dir``; returns the files by kind."""
    from .plots import write_plots

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {"results": out / "results.json", "report": out / "report.md"}
    files["results"].write_text(json.dumps(results, indent=1, allow_nan=False))
    plots = write_plots(results, images, out)
    files.update({f"plot:{p.stem}": p for p in plots})
    files["report"].write_text(report_markdown(results, [p.name for p in plots]))
    logger.info("wrote %s", ", ".join(str(p) for p in files.values()))
    return files


__all__ = ["HEADLINE_HEADER", "cells_table", "headline_rows", "headline_table", "md_table", "report_markdown", "write_results"]
