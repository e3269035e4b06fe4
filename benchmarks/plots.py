"""PNG plots of a run (matplotlib, Agg backend): speed per plan, the switch-point sweep, an image sheet."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

logger = logging.getLogger(__name__)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_speed(results: Dict[str, Any], path: Path) -> Path:
    """Median end-to-end time per plan, one panel per batch size, with the ideal time of each plan."""
    plt = _pyplot()
    d = results["derived"]["cells"]
    batches = results["config"]["batches"]
    fig, axes = plt.subplots(1, len(batches), figsize=(6 * len(batches), 4.2), squeeze=False)
    for ax, batch in zip(axes[0], batches):
        cells = [c for c in results["cells"] if c["batch"] == batch and (not c["sweep"] or c["plan"] in results["config"]["plans"])]
        labels = [f"{'diffusers' if c['system'] == 'diffusers' else c['backend']}\n{c['plan']}" for c in cells]
        med = [d[c["id"]]["total_median_s"] * 1e3 for c in cells]
        lo = [m - d[c["id"]]["total_min_s"] * 1e3 for m, c in zip(med, cells)]
        hi = [d[c["id"]]["total_max_s"] * 1e3 - m for m, c in zip(med, cells)]
        x = np.arange(len(cells))
        colours = ["tab:gray" if c["system"] == "diffusers" else "tab:blue" for c in cells]
        ax.bar(x, med, yerr=[lo, hi], color=colours, capsize=3, label="median (min-max)")
        ideal = [(i, d[c["id"]]["ideal_total_s"] * 1e3) for i, c in enumerate(cells) if d[c["id"]]["ideal_total_s"] is not None]
        if ideal:
            ax.scatter([i for i, _ in ideal], [v for _, v in ideal], marker="_", s=400, color="tab:red", zorder=3,
                       label="expected: always minus the UNet time saved")
        ax.set_ylim(0, 1.6 * max(med))  # outliers of a shared machine would flatten the bars
        ax.set_xticks(x)
        ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
        ax.set_ylabel("ms per call (end to end)")
        ax.set_title(f"batch {batch}, {results['config']['steps']} steps")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _sweep_series(results: Dict[str, Any], backend: str) -> Dict[str, List[Optional[float]]]:
    d = results["derived"]["cells"]
    q = (results.get("quality") or {}).get("cells", {})
    sc = (results.get("quality") or {}).get("scorer", {})
    always_id = results["sweep"]["always"][backend]
    pts = [(p["fraction"], p["cells"][backend]) for p in results["sweep"]["points"] if backend in p["cells"]]
    pts.append((1.0, always_id))  # switching at the end is always-CFG
    return {
        "f": [f for f, _ in pts],
        "time": [d[c]["total_median_s"] * 1e3 for _, c in pts],
        "ideal_time": [None if d[c]["ideal_total_s"] is None else d[c]["ideal_total_s"] * 1e3 for _, c in pts],
        "ideal_speedup": [d[c]["ideal_speedup"] for _, c in pts],
        "l1": [q.get(c, {}).get("l1_mean") for _, c in pts],
        "psnr": [q.get(c, {}).get("psnr_mean_db") for _, c in pts],
        "scorer": [sc.get(c, {}).get("all_attributes") for _, c in pts],
    }


def _xy(xs, ys):
    pairs = [(x, y) for x, y in zip(xs, ys) if y is not None]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def plot_sweep_time(results: Dict[str, Any], path: Path) -> Path:
    """Time per call against the switch point (1.0 = always-CFG), measured and ideal."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for backend in results["sweep"]["always"]:
        s = _sweep_series(results, backend)
        ax.plot(*_xy(s["f"], s["time"]), "o-", label=f"{backend}: measured")
        ax.plot(*_xy(s["f"], s["ideal_time"]), "--", label=f"{backend}: expected (always minus UNet time saved)")
    ax.set_xlabel("switch point (fraction of steps with CFG)")
    ax.set_ylabel("ms per call (end to end)")
    ax.set_title(f"time vs switch point, batch {results['sweep']['batch']}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_sweep_quality(results: Dict[str, Any], path: Path) -> Path:
    """Quality against the switch point: PSNR and L1 to always-CFG, scorer accuracy, and the ideal speedup."""
    plt = _pyplot()
    backend = next(iter(results["sweep"]["always"]))
    s = _sweep_series(results, backend)
    has_scorer = any(v is not None for v in s["scorer"])
    fig, axes = plt.subplots(1, 3 if has_scorer else 2, figsize=(15 if has_scorer else 10, 4))
    axes[0].plot(*_xy(s["f"], s["psnr"]), "o-", color="tab:blue")
    axes[0].set_ylabel("PSNR to always-CFG (dB)")
    axes[1].plot(*_xy(s["f"], s["l1"]), "o-", color="tab:orange")
    axes[1].set_ylabel("mean L1 to always-CFG")
    if has_scorer:
        axes[2].plot(*_xy(s["f"], s["scorer"]), "o-", color="tab:green")
        axes[2].set_ylabel("scorer accuracy (all attributes)")
        axes[2].set_ylim(0, 1.02)
    for ax in axes:
        ax.set_xlabel("switch point (fraction of steps with CFG)")
        ax.grid(alpha=0.3)
        twin = ax.twinx()
        twin.plot(*_xy(s["f"], s["ideal_speedup"]), ":", color="tab:red")
        twin.set_ylabel("ideal speedup (red, dotted)", color="tab:red", fontsize=8)
    fig.suptitle(f"quality vs switch point ({backend}, batch {results['sweep']['batch']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


#: Images per row of the image sheet (the first ones of the batch).
MAX_SHEET_COLUMNS = 8


def plot_images(results: Dict[str, Any], images: Dict[str, np.ndarray], path: Path) -> Optional[Path]:
    """A sheet of the largest batch's first images: one row per cell of the first backend and diffusers."""
    top = max(results["config"]["batches"])
    backend = results["config"]["backends"][0]
    rows = [c for c in results["cells"] if c["batch"] == top and c["id"] in images
            and (c["system"] == "diffusers" or c["backend"] == backend)]
    if not rows:
        return None
    plt = _pyplot()
    cols = min(images[rows[0]["id"]].shape[0], MAX_SHEET_COLUMNS)
    fig, axes = plt.subplots(len(rows), cols, figsize=(1.1 * cols + 1.6, 1.1 * len(rows)), squeeze=False)
    for r, cell in enumerate(rows):
        for k in range(cols):
            ax = axes[r][k]
            ax.imshow(np.clip(images[cell["id"]][k], 0, 1), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r][0].set_ylabel(f"{'diffusers' if cell['system'] == 'diffusers' else cell['backend']}\n{cell['plan']}",
                              fontsize=7, rotation=0, ha="right", va="center")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def write_plots(results: Dict[str, Any], images: Dict[str, np.ndarray], out: Path) -> List[Path]:
    """Every plot the run's data allows, as PNG files in ``out``."""
    paths = [plot_speed(results, out / "speed.png")]
    if results.get("sweep"):
        paths.append(plot_sweep_time(results, out / "sweep_time.png"))
        paths.append(plot_sweep_quality(results, out / "sweep_quality.png"))
    sheet = plot_images(results, images, out / "images.png") if images else None
    if sheet is not None:
        paths.append(sheet)
    return paths


__all__ = ["plot_images", "plot_speed", "plot_sweep_quality", "plot_sweep_time", "write_plots"]
