"""Writers of ``analysis.json``, ``recommendation.json`` and ``report.md``."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, List, Optional

#: Version of the ``analysis.json`` layout.
SCHEMA_VERSION = 1


def public(obj: Any) -> Any:
    """``obj`` without private keys (``_images`` and the like), with non-finite floats as ``None``."""
    if isinstance(obj, dict):
        return {k: public(v) for k, v in obj.items() if not str(k).startswith("_")}
    if isinstance(obj, (list, tuple)):
        return [public(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_json(path: Path, data: Dict[str, Any]) -> Path:
    path.write_text(json.dumps(public(data), indent=1, sort_keys=False) + "\n", encoding="utf-8")
    return path


def _f(x: Optional[float], digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def _pct(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{x:.0%}"


def answers(result: Dict[str, Any]) -> List[str]:
    """The four questions of the analysis, answered from the numbers (markdown bullet lines)."""
    out: List[str] = []
    probes, sweep, eos, rec = (result.get(k) for k in ("probes", "sweep", "eos", "recommendation"))
    if probes:
        s = probes["settle_step"]
        n = probes["steps"]
        verdict = "yes" if s["low"] < s["high"] else ("no, at the same step" if s["low"] == s["high"] else "no")
        out.append(
            f"- **Does low-frequency content settle before high frequencies?** {verdict} (latent): the low part of the predicted "
            f"x0 latent comes within {probes['settle_tolerance']:.0%} of its final value at step {s['low']} of {n}, the high part "
            f"at step {s['high']}; per prompt the low part settles strictly first in "
            f"{probes['share_low_settles_first']:.0%} of {len(probes['prompts'])} prompts"
            + (f". In pixel space (decoded x0): low part at step {probes['pixel']['settle_step']['low']}, high part at step "
               f"{probes['pixel']['settle_step']['high']}, low strictly first in {probes['pixel']['share_low_settles_first']:.0%} "
               "of prompts." if "pixel" in probes else ".")
        )
    if eos:
        v = eos["variants"]
        e, s = v["eos_from_b"], v["semantic_from_b"]
        line = (f"- **Does swapping [EOS] move the image toward prompt B more than swapping the semantic tokens?** "
                f"{'yes' if e['toward_b'] > s['toward_b'] else 'no'}: toward-B (0 = A's image, 1 = B's) is "
                f"{e['toward_b']:.3f} with B's [EOS] tokens and {s['toward_b']:.3f} with B's semantic tokens")
        if eos.get("scored"):
            line += (f"; the scorer finds {e['matches_b']:.0%} of attributes matching B with B's [EOS] vs "
                     f"{s['matches_b']:.0%} with B's words (A's own image: {v['a']['matches_b']:.0%}, B's: {v['b']['matches_b']:.0%})")
        if eos.get("scored") and "matches_b_by_attribute" in e:
            attrs = [k for k in e["matches_b_by_attribute"] if k != "mean"]
            line += ("; per attribute, images matching B with B's [EOS] / with B's words: " + ", ".join(
                f"{a} {e['matches_b_by_attribute'][a]:.0%} / {s['matches_b_by_attribute'][a]:.0%}" for a in attrs))
        out.append(line + f" ({len(eos['pairs'])} pairs).")
        ne = eos["no_effect_from_step"]
        parts = []
        for mode, label in (("prompt", "switching to all of B's embeddings"), ("eos", "swapping in B's [EOS]")):
            if mode in eos["step_k"]:
                curve = {c["k"]: c["toward_b"] for c in eos["step_k"][mode]}
                k = ne.get(mode)
                text = (f"{label} from step k stops moving the image (toward-B <= {eos['no_effect_tolerance']}) at "
                        f"k = {k if k is not None else 'never within the grid'} of {eos['steps']} "
                        f"(toward-B by k: " + ", ".join(f"{kk}: {vv:.2f}" for kk, vv in curve.items()) + ")")
                scored_k = (eos.get("no_effect_from_step_scored") or {}).get(mode, "absent")
                if eos.get("scorer_separates_pairs") is False:
                    v = eos["variants"]
                    text += (f"; the scorer cannot date it: it barely tells B's own images from A's (share matching B "
                             f"{v['b']['matches_b']:.2f} vs {v['a']['matches_b']:.2f})")
                elif scored_k != "absent":
                    match = {c["k"]: c["matches_b"] for c in eos["step_k"][mode]}
                    text += (f" and stops changing the scored attributes (share matching B within "
                             f"{eos['no_effect_tolerance']} of A's own {eos['variants']['a']['matches_b']:.2f}) at k = "
                             f"{scored_k if scored_k is not None else 'never within the grid'} (matching B by k: "
                             + ", ".join(f"{kk}: {vv:.2f}" for kk, vv in match.items()) + ")")
                parts.append(text)
        if parts:
            out.append("- **From which step does the swap no longer matter?** " + "; ".join(parts) + ".")
    if rec:
        if rec.get("late"):
            acc = "" if rec.get("accuracy_drop_points") is None else f", mean accuracy drop {rec['accuracy_drop_points']:.1f} points"
            out.append(
                f"- **Recommended switch point:** `{rec['plan']}` (switch at step {rec['switch_step']} of {rec['steps']}): "
                f"saves {rec['rows_saved']:.0%} of UNet rows, {_pct(rec.get('unet_time_saved'))} of UNet time by calibrated "
                f"per-call times ({_pct(rec['time_saved'])} of measured loop time), at "
                f"low-frequency distance {rec['lowfreq']:.4f} to always-CFG (tolerance {rec['tolerance']['lowfreq']}){acc}."
            )
        else:
            out.append("- **Recommended switch point:** `always`: no switch fraction below 1 stayed within tolerance "
                       f"(low-frequency distance <= {rec['tolerance']['lowfreq']}).")
        ad = rec.get("adaptive")
        if ad and ad.get("plan") not in (None, "always"):
            drop = ad.get("accuracy_drop_points")
            acc_text = "" if drop is None else f", mean accuracy drop {drop:.1f} points"
            out.append(
                f"- **Recommended adaptive plan:** `{ad['plan']}`: threshold {ad['threshold']} (the mean cosine at step "
                f"{ad['from_step']}, the last guided step of `{rec['plan']}`), at least {ad['min_fraction']:.0%} of the steps "
                f"guided; on the sweep's prompts it saves {ad['rows_saved']:.0%} of UNet rows at low-frequency distance "
                f"{ad['lowfreq']:.4f}{acc_text} ({'within' if ad['within_tolerance'] else 'outside'} tolerance)."
            )
        alt = rec.get("earliest_per_criterion") or {}
        if alt:
            out.append("  One criterion at a time: " + "; ".join(
                f"{'low-frequency distance' if k == 'lowfreq_only' else 'accuracy'} alone gives `{v}`" for k, v in alt.items()) + ".")
    return out


def render_markdown(result: Dict[str, Any], plots: Dict[str, str]) -> str:
    """The ``report.md`` text."""
    cfg = result["config"]
    lines = [
        "# cfgswitch analysis",
        "",
        f"Model `{result['model']['name']}` on backend `{result['model']['backend']}`; {cfg['steps']} steps of "
        f"`{cfg['scheduler']}`, guidance {cfg['guidance_scale']}, seed {cfg['seed']}; prompts: {result['prompts']['source']}. "
        f"Scorer: {result['scorer']}. Wall time {result['elapsed_seconds']:.0f} s.",
        "",
        "## Answers",
        "",
        *answers(result),
        "",
    ]
    if result.get("notes"):
        lines += ["Notes:", "", *[f"- {n}" for n in result["notes"]], ""]
    probes = result.get("probes")
    if probes:
        ps = probes["per_step"]
        lines += ["## 1. Trajectory probes", "",
                  f"Low part = FFT bins of the predicted latent x0 with radius <= {probes['cutoff']} x Nyquist. "
                  "Change = relative change from the previous step; distance = relative distance to the final step's part.",
                  "", "| step | t | energy low | energy high | change low | change high | dist. low | dist. high | rms eps(empty) | rms guidance | cosine |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for i in range(probes["steps"]):
            lines.append(
                f"| {i} | {probes['timesteps'][i]:.0f} | {ps['energy_low'][i]:.4f} | {ps['energy_high'][i]:.4f} | "
                f"{_f(ps['change_low'][i])} | {_f(ps['change_high'][i])} | {ps['distance_to_final_low'][i]:.3f} | "
                f"{ps['distance_to_final_high'][i]:.3f} | {ps['eps_uncond_rms'][i]:.4f} | {ps['guidance_delta_rms'][i]:.4f} | "
                f"{ps['cosine'][i]:.4f} |")
        lines.append("")
        if "pixel" in probes:
            px = probes["pixel"]["per_step"]
            lines += ["Pixel space (the decoded x0 of each step, same cutoff):", "",
                      "| step | energy low | energy high | change low | change high | dist. low | dist. high |",
                      "| --- | --- | --- | --- | --- | --- | --- |"]
            for i in range(probes["steps"]):
                lines.append(f"| {i} | {px['energy_low'][i]:.4f} | {px['energy_high'][i]:.5f} | {_f(px['change_low'][i])} | "
                             f"{_f(px['change_high'][i])} | {px['distance_to_final_low'][i]:.3f} | {px['distance_to_final_high'][i]:.3f} |")
            lines.append("")
    sweep = result.get("sweep")
    if sweep:
        scored = sweep.get("scored")
        lines += ["## 2. Switch sweep", "",
                  f"{len(sweep['prompts'])} prompts, each against its always-CFG image (same seed). "
                  f"Always-CFG: {sweep['baseline']['unet_rows']} UNet rows, loop {sweep['baseline']['loop_seconds']:.2f} s"
                  + (f"; one UNet call on {sweep['unet_timing']['batch']} images takes {1000 * sweep['unet_timing']['cfg_call_seconds']:.1f} ms "
                     f"guided (2B rows) and {1000 * sweep['unet_timing']['late_call_seconds']:.1f} ms late (B rows), medians"
                     if "unet_timing" in sweep else "")
                  + (f", mean accuracy {sweep['baseline']['accuracy']['mean']:.1f}%" if scored else "") + ".", "",
                  "| plan | switch step | L1 | PSNR dB | low-freq dist. | rows saved | UNet time saved | loop time saved |" + (" accuracy % (mean / colour / shape / size / position / background) |" if scored else ""),
                  "| --- | --- | --- | --- | --- | --- | --- | --- |" + (" --- |" if scored else "")]
        for e in sweep["entries"]:
            row = (f"| `{e['plan']}` | {e['switch_step']} | {e['l1']:.4f} | {e['psnr']:.1f} | {e['lowfreq']:.4f} | "
                   f"{e['rows_saved']:.0%} | {_pct(e.get('unet_time_saved'))} | {e['time_saved']:.0%} |")
            if scored:
                a = e["accuracy"]
                row += " " + " / ".join(f"{a[k]:.0f}" for k in ("mean", "colour", "shape", "size", "position", "background")) + " |"
            lines.append(row)
        if scored:
            a = sweep["baseline"]["accuracy"]
            lines.append("| `always` | - | 0 | - | 0 | 0% | 0% | 0% | " + " / ".join(
                f"{a[k]:.0f}" for k in ("mean", "colour", "shape", "size", "position", "background")) + " |")
        lines.append("")
    eos = result.get("eos")
    if eos:
        scored = eos.get("scored")
        lines += ["## 3. [EOS] experiments", "",
                  f"{len(eos['pairs'])} prompt pairs (A, B); toward-B = d(image, A's image) / (d(A) + d(B)) with the "
                  "low-frequency distance (0 = A, 1 = B)" + ("; matches A / B = share of scored attributes matching that scene" if scored else "") + ".", "",
                  "| variant | toward-B |" + (" matches A | matches B |" if scored else ""),
                  "| --- | --- |" + (" --- | --- |" if scored else "")]
        names = {"a": "A", "b": "B", "eos_from_b": "A's words + B's [EOS]", "semantic_from_b": "B's words + A's [EOS]"}
        for key, label in names.items():
            v = eos["variants"][key]
            lines.append(f"| {label} | {v['toward_b']:.3f} |" + (f" {v['matches_a']:.2f} | {v['matches_b']:.2f} |" if scored else ""))
        lines.append("")
        if scored:
            attrs = [k for k in eos["variants"]["a"]["matches_b_by_attribute"] if k != "mean"]
            lines += ["Per attribute (share of images whose attribute matches A / B):", "",
                      "| variant | " + " | ".join(attrs) + " |", "| --- |" + " --- |" * len(attrs)]
            for key, label in names.items():
                v = eos["variants"][key]
                lines.append(f"| {label} | " + " | ".join(
                    f"{v['matches_a_by_attribute'][a]:.2f} / {v['matches_b_by_attribute'][a]:.2f}" for a in attrs) + " |")
            lines.append("")
        for mode, label in (("eos", "B's [EOS] from step k"), ("prompt", "all of B from step k")):
            if mode not in eos["step_k"]:
                continue
            attrs = [a for a in eos["step_k"][mode][0].get("matches_b_by_attribute", {}) if a != "mean"] if scored else []
            lines += [f"{label}:", "", "| k | toward-B |" + (" matches B |" if scored else "")
                      + "".join(f" {a} = B |" for a in attrs),
                      "| --- | --- |" + (" --- |" if scored else "") + " --- |" * len(attrs)]
            for c in eos["step_k"][mode]:
                lines.append(f"| {c['k']} | {c['toward_b']:.3f} |" + (f" {c['matches_b']:.2f} |" if scored else "")
                             + "".join(f" {c['matches_b_by_attribute'][a]:.2f} |" for a in attrs))
            lines.append("")
        if eos["pairs"]:
            a, b = eos["pairs"][0]
            lines += [f"Example pair: A = \"{a}\", B = \"{b}\".", ""]
    if plots:
        lines += ["## Plots", ""] + [f"![{name}]({file})" for name, file in plots.items()] + [""]
    return "\n".join(lines)


__all__ = ["SCHEMA_VERSION", "answers", "public", "render_markdown", "write_json"]
