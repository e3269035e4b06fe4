"""The analysis plots (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np


def require_matplotlib() -> None:
    """Raise :class:`~cfgswitch.errors.BackendUnavailableError` when matplotlib is not installed."""
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        from ..errors import BackendUnavailableError

        raise BackendUnavailableError("the analysis plots need matplotlib: pip install 'cfgswitch[bench]' (or matplotlib)")


def _pyplot():
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    _pyplot().close(fig)
    return path


def plot_frequency(probes: Dict[str, Any], path: Path) -> Path:
    """Energy, step-to-step change and distance to the final x0 of the low and high parts over steps."""
    plt = _pyplot()
    ps = probes["per_step"]
    steps = np.arange(len(ps["energy_low"]))
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].semilogy(steps, ps["energy_low"], label="low")
    axes[0].semilogy(steps, ps["energy_high"], label="high")
    axes[0].set_title("energy of predicted x0 latent (mean square)")
    for key, label in (("change_low", "low"), ("change_high", "high")):
        vals = [np.nan if v is None else v for v in ps[key]]
        axes[1].semilogy(steps, vals, label=label)
    axes[1].set_title("relative change from previous step")
    axes[2].plot(steps, ps["distance_to_final_low"], label="low")
    axes[2].plot(steps, ps["distance_to_final_high"], label="high")
    if "pixel" in probes:
        px = probes["pixel"]["per_step"]
        axes[2].plot(steps, px["distance_to_final_low"], color="C0", ls="-.", alpha=0.6, label="low (pixels)")
        axes[2].plot(steps, px["distance_to_final_high"], color="C1", ls="-.", alpha=0.6, label="high (pixels)")
    axes[2].axhline(probes["settle_tolerance"], color="gray", ls=":", label="settle tolerance")
    for part, color in (("low", "C0"), ("high", "C1")):
        axes[2].axvline(probes["settle_step"][part], color=color, ls="--", alpha=0.6)
    axes[2].set_title("relative distance to final x0 part")
    for ax in axes:
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
    fig.suptitle(f"frequency split at cutoff {probes['cutoff']} x Nyquist", fontsize=10)
    return _save(fig, path)


def plot_guidance(probes: Dict[str, Any], path: Path) -> Path:
    """RMS of eps(x_t, empty) and of the guidance difference, and their cosine similarity, over steps."""
    plt = _pyplot()
    ps = probes["per_step"]
    steps = np.arange(len(ps["cosine"]))
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    axes[0].plot(steps, ps["eps_uncond_rms"], label="rms eps(x_t, empty)")
    axes[0].plot(steps, ps["guidance_delta_rms"], label="rms eps(x_t, c) - eps(x_t, empty)")
    axes[0].set_yscale("log")
    axes[0].set_title("prediction norms")
    axes[1].plot(steps, ps["cosine"], label="mean")
    axes[1].plot(steps, ps["cosine_min"], ls="--", label="min over prompts")
    axes[1].set_title("cosine(eps(x_t, c), eps(x_t, empty))")
    for ax in axes:
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
    return _save(fig, path)


def plot_sweep(sweep: Dict[str, Any], recommendation: Optional[Dict[str, Any]], path: Path) -> Path:
    """Fidelity (low-frequency distance, PSNR, accuracy) and speed (rows and time saved) against the switch point."""
    plt = _pyplot()
    n_panels = 3 if sweep.get("scored") else 2
    fig, axes = plt.subplots(1, n_panels, figsize=(4.6 * n_panels, 3.6))
    for late, style in (("uncond", "-o"), ("cond", "--s")):
        es = sorted((e for e in sweep["entries"] if e["late"] == late), key=lambda e: e["fraction"])
        if not es:
            continue
        f = [e["fraction"] for e in es]
        axes[0].plot(f, [e["lowfreq"] for e in es], style, ms=3, label=f"low-freq distance ({late})")
        axes[0].plot(f, [e["l1"] for e in es], style, ms=3, alpha=0.5, label=f"L1 ({late})")
        axes[1].plot(f, [100 * e["rows_saved"] for e in es], style, ms=3, label=f"UNet rows saved ({late})")
        axes[1].plot(f, [100 * e.get("unet_time_saved", np.nan) for e in es], style, ms=3, alpha=0.7,
                     label=f"UNet time saved, calibrated ({late})")
        axes[1].plot(f, [100 * e["time_saved"] for e in es], ":", alpha=0.5, label=f"loop time saved, measured ({late})")
        if n_panels == 3:
            axes[2].plot(f, [e["accuracy"]["mean"] for e in es], style, ms=3, label=f"mean accuracy ({late})")
    if n_panels == 3:
        axes[2].axhline(sweep["baseline"]["accuracy"]["mean"], color="gray", ls=":", label="always-CFG")
        axes[2].set_ylabel("%")
        axes[2].set_title("scorer accuracy")
    if recommendation is not None:
        axes[0].axhline(recommendation["tolerance"]["lowfreq"], color="gray", ls=":", label="tolerance")
        if recommendation.get("late"):
            for ax in axes:
                ax.axvline(recommendation["fraction"], color="red", alpha=0.4)
    axes[0].set_title("distance to always-CFG image")
    axes[1].set_title("saving vs always-CFG")
    axes[1].set_ylabel("%")
    for ax in axes:
        ax.set_xlabel("switch fraction f")
        ax.legend(fontsize=7)
    return _save(fig, path)


def plot_eos(eos: Dict[str, Any], path: Path) -> Path:
    """Which prompt the swapped images follow, and the step-k curves."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10.5, 3.6))
    names = ["a", "semantic_from_b", "eos_from_b", "b"]
    labels = ["A", "A's [EOS] +\nB's words", "A's words +\nB's [EOS]", "B"]
    x = np.arange(len(names))
    width = 0.38 if eos.get("scored") else 0.6
    axes[0].bar(x - (width / 2 if eos.get("scored") else 0), [eos["variants"][n]["toward_b"] for n in names], width,
                label="toward B (low-freq distance)")
    if eos.get("scored"):
        axes[0].bar(x + width / 2, [eos["variants"][n]["matches_b"] for n in names], width,
                    label="attributes matching B (scorer)")
    axes[0].set_xticks(x, labels, fontsize=8)
    axes[0].set_ylim(0, 1)
    axes[0].set_title("which prompt the image follows (0 = A, 1 = B)")
    axes[0].legend(fontsize=7)
    for mode, label in (("eos", "B's [EOS] from step k"), ("prompt", "all of B from step k")):
        curve: List[Dict[str, Any]] = eos["step_k"].get(mode, [])
        if curve:
            (line,) = axes[1].plot([c["k"] for c in curve], [c["toward_b"] for c in curve], "-o", ms=3,
                                   label=label + " (distance)")
            if eos.get("scored"):
                axes[1].plot([c["k"] for c in curve], [c["matches_b"] for c in curve], "--", color=line.get_color(),
                             label=label + " (attributes matching B)")
    axes[1].axhline(eos["no_effect_tolerance"], color="gray", ls=":", label="no-effect tolerance")
    axes[1].set_xlabel("step k where the swap starts")
    axes[1].set_title("late swaps: toward B")
    axes[1].set_ylim(0, 1)
    axes[1].legend(fontsize=7)
    return _save(fig, path)


def save_examples(rows: Dict[str, np.ndarray], path: Path, max_images: int = 6) -> Optional[Path]:
    """A PNG grid: one row per entry of ``rows`` (label -> images ``[N, H, W, 3]`` in [0, 1]), in order.

    Images smaller than 128 pixels are enlarged by an integer factor (nearest neighbour).
    """
    from PIL import Image

    rows = {k: v for k, v in rows.items() if v is not None and len(v)}
    if not rows:
        return None
    n = min(max_images, min(len(v) for v in rows.values()))
    h, w = next(iter(rows.values())).shape[1:3]
    canvas = np.ones((len(rows) * (h + 2), n * (w + 2), 3), dtype=np.float32)
    for r, imgs in enumerate(rows.values()):
        for c in range(n):
            canvas[r * (h + 2) : r * (h + 2) + h, c * (w + 2) : c * (w + 2) + w] = imgs[c]
    scale = max(1, 128 // max(h, w))  # small images are enlarged (nearest neighbour) to be seen
    if scale > 1:
        canvas = canvas.repeat(scale, axis=0).repeat(scale, axis=1)
    Image.fromarray((canvas * 255).round().astype(np.uint8)).save(path)
    return path


__all__ = ["require_matplotlib", "plot_eos", "plot_frequency", "plot_guidance", "plot_sweep", "save_examples"]
