"""Run every experiment on one sampler and write ``analysis.json``, ``recommendation.json``, ``report.md`` and plots."""

from __future__ import annotations

import logging
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from ..errors import InvalidArgumentError
from ..plans import LATE_MODES, GuidancePlan
from ..schedulers import scheduler_class_name
from .eos import DEFAULT_NO_EFFECT_TOLERANCE, K_MODES, default_k_grid, eos_experiments
from .frequency import DEFAULT_CUTOFF, _check_cutoff
from .probes import DEFAULT_SETTLE_TOLERANCE, trajectory_probes
from .recommend import Tolerance, recommend, recommend_adaptive, within_tolerance
from .report import SCHEMA_VERSION, render_markdown, write_json
from .scoring import PromptSet
from .sweep import DEFAULT_FRACTIONS, switch_sweep

logger = logging.getLogger(__name__)

#: Experiment names, in run order.
EXPERIMENTS = ("probes", "sweep", "eos")


@dataclass
class AnalysisConfig:
    """Settings of one analysis run (every field lands in ``analysis.json``).

    Attributes:
        steps (`int`, defaults to 30), guidance_scale (`float`, 7.5), scheduler (`str`, ``ddim``), seed (`int`, 0):
            the sampling setup every experiment uses.
        probe_prompts (`int`, 16): prompts of the trajectory probes.
        sweep_prompts (`int`, 16): prompts of the switch sweep.
        eos_pairs (`int`, 8): prompt pairs of the [EOS] experiments.
        fractions (`tuple[float]`): the sweep's switch fractions.
        late_modes (`tuple[str]`): late modes of the sweep.
        k_grid (`tuple[int]`, optional): switch-in steps of the step-k swaps (default: dense early).
        k_modes (`tuple[str]`): step-k variants (``eos``, ``prompt``).
        cutoff (`float`, 0.25): low-pass radius as a fraction of Nyquist.
        settle_tolerance (`float`, 0.1), no_effect_tolerance (`float`, 0.1): see the experiments.
        pixel_probes (`bool`, True): the probes also split each step's decoded x0 image.
        tolerance (`Tolerance`): the recommendation's fidelity bound.
        batch_size (`int`, 16): images per UNet batch.
        experiments (`tuple[str]`): which of :data:`EXPERIMENTS` to run (the recommendation needs ``sweep``).
    """

    steps: int = 30
    guidance_scale: float = 7.5
    scheduler: str = "ddim"
    seed: int = 0
    probe_prompts: int = 16
    sweep_prompts: int = 16
    eos_pairs: int = 8
    fractions: Tuple[float, ...] = DEFAULT_FRACTIONS
    late_modes: Tuple[str, ...] = LATE_MODES
    k_grid: Optional[Tuple[int, ...]] = None
    k_modes: Tuple[str, ...] = K_MODES
    cutoff: float = DEFAULT_CUTOFF
    settle_tolerance: float = DEFAULT_SETTLE_TOLERANCE
    pixel_probes: bool = True
    no_effect_tolerance: float = DEFAULT_NO_EFFECT_TOLERANCE
    tolerance: Tolerance = field(default_factory=Tolerance)
    batch_size: int = 16
    experiments: Tuple[str, ...] = EXPERIMENTS

    def validate(self) -> "AnalysisConfig":
        """Check every field (cheap; call before loading a model). Returns ``self``."""
        for name in ("steps", "probe_prompts", "sweep_prompts", "eos_pairs", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidArgumentError(name, "an integer >= 1", value)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise InvalidArgumentError("seed", "an integer >= 0", self.seed)
        if not isinstance(self.guidance_scale, (int, float)) or not self.guidance_scale >= 0:
            raise InvalidArgumentError("guidance_scale", "a number >= 0", self.guidance_scale)
        scheduler_class_name(self.scheduler)
        bad = [e for e in self.experiments if e not in EXPERIMENTS]
        if bad or not self.experiments:
            raise InvalidArgumentError("experiments", f"a non-empty subset of {', '.join(EXPERIMENTS)}", list(self.experiments))
        if not self.fractions:
            raise InvalidArgumentError("fractions", "at least one switch fraction", list(self.fractions))
        for f in self.fractions:
            if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0.0 <= f <= 1.0:
                raise InvalidArgumentError("fractions", "switch fractions in [0, 1]", f)
        if any(m not in LATE_MODES for m in self.late_modes) or not self.late_modes:
            raise InvalidArgumentError("late_modes", "a non-empty subset of uncond, cond", list(self.late_modes))
        for m in self.k_modes:
            if m not in K_MODES:
                raise InvalidArgumentError("k_modes", f"a subset of {', '.join(K_MODES)}", list(self.k_modes))
        if self.k_grid is not None and any(isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= self.steps for k in self.k_grid):
            raise InvalidArgumentError("k_grid", f"steps in [0, {self.steps}]", list(self.k_grid))
        _check_cutoff(self.cutoff)
        return self

    def image_count(self) -> int:
        """Images the run will generate (the progress bar's total)."""
        total = 0
        if "probes" in self.experiments:
            total += self.probe_prompts
        if "sweep" in self.experiments:
            total += self.sweep_prompts * (1 + len(self.fractions) * len(self.late_modes))
        if "eos" in self.experiments:
            ks = self.k_grid if self.k_grid is not None else default_k_grid(self.steps)
            inner = len({k for k in ks if 0 < k < self.steps})
            total += self.eos_pairs * (4 + inner * len(self.k_modes))
        return total


def model_info(sampler, name: Optional[str] = None) -> Dict[str, Any]:
    """What analysis.json says about the model and where it ran."""
    import torch

    spec = sampler.spec
    return {
        "name": name or spec.name, "backend": sampler.backend, "device": str(sampler.device),
        "latent_channels": spec.latent_channels, "latent_size": spec.sample_size,
        "image_size": spec.default_size, "prediction_type": str(sampler.scheduler_config.get("prediction_type", "epsilon")),
        "torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads(),
    }


def run_analysis(
    sampler,
    prompt_set: PromptSet,
    out_dir: "str | Path",
    config: AnalysisConfig = AnalysisConfig(),
    *,
    scorer: Optional[Any] = None,
    scorer_note: str = "none",
    model_name: Optional[str] = None,
    progress: bool = True,
    notes: Sequence[str] = (),
) -> Dict[str, Any]:
    """Run the configured experiments, write the outputs into ``out_dir`` and return the result dict.

    Args:
        sampler (`Sampler`): the model (any backend).
        prompt_set (`PromptSet`): prompts, pairs and (for scoring) their scenes; the first
            ``probe_prompts`` / ``sweep_prompts`` prompts and ``eos_pairs`` pairs are used.
        out_dir (`str` or `Path`): created if missing.
        config (`AnalysisConfig`): settings.
        scorer (optional): an attribute scorer (:class:`~cfgswitch.analysis.scoring.ShapesScorer`).
        scorer_note (`str`): how the run was scored, for the report.
        model_name (`str`, optional): shown in the report.
        progress (`bool`, defaults to True): show a progress bar over generated images.
        notes (`Sequence[str]`): extra lines for the report.
    """
    from tqdm.auto import tqdm

    from .plots import plot_eos, plot_frequency, plot_guidance, plot_sweep, require_matplotlib, save_examples

    config.validate()
    require_matplotlib()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    common = dict(steps=config.steps, guidance_scale=config.guidance_scale, scheduler=config.scheduler, seed=config.seed)
    scenes = prompt_set.scenes if scorer is not None else None
    pair_scenes = prompt_set.pair_scenes if scorer is not None else None
    result: Dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "model": model_info(sampler, model_name),
        "config": {**asdict(config), "tolerance": asdict(config.tolerance)},
        "prompts": {"source": prompt_set.source},
        "scorer": scorer_note,
        "notes": list(prompt_set.notes) + list(notes),
    }
    plots: Dict[str, str] = {}
    bar = tqdm(total=config.image_count(), desc="analysis (images)", unit="img", disable=not progress)
    try:
        if "probes" in config.experiments:
            bar.set_postfix_str("trajectory probes")
            probe_prompts = _take(prompt_set.prompts, config.probe_prompts)
            result["probes"] = trajectory_probes(sampler, probe_prompts, cutoff=config.cutoff,
                                                 settle_tolerance=config.settle_tolerance,
                                                 pixels=config.pixel_probes, batch_size=config.batch_size, progress=bar, **common)
            plots["frequency energy over steps"] = plot_frequency(result["probes"], out / "frequency.png").name
            plots["guidance norm and cosine over steps"] = plot_guidance(result["probes"], out / "guidance.png").name
        if "sweep" in config.experiments:
            bar.set_postfix_str("switch sweep")
            sweep_prompts = _take(prompt_set.prompts, config.sweep_prompts)
            result["sweep"] = switch_sweep(
                sampler, sweep_prompts, fractions=config.fractions, late_modes=config.late_modes, cutoff=config.cutoff,
                scorer=scorer, targets=None if scenes is None else _take(scenes, config.sweep_prompts),
                batch_size=config.batch_size, progress=_PerPlan(bar, len(sweep_prompts)), **common)
            result["recommendation"] = recommend(result["sweep"], config.tolerance)
            adaptive = recommend_adaptive(result.get("probes"), result["recommendation"])
            if adaptive is not None:
                bar.set_postfix_str("adaptive check")
                adaptive.update(check_adaptive(sampler, adaptive["plan"], result["sweep"], config, scorer,
                                               None if scenes is None else _take(scenes, config.sweep_prompts)))
                result["recommendation"]["adaptive"] = adaptive
                result["recommendation"]["adaptive_plan"] = adaptive["plan"]
            write_json(out / "recommendation.json", result["recommendation"])
            plots["fidelity and speed vs switch point"] = plot_sweep(result["sweep"], result["recommendation"], out / "sweep.png").name
            imgs = result["sweep"]["_images"]
            rec_plan = result["recommendation"]["plan"]
            rows = {"always": imgs["always"], **({rec_plan: imgs[rec_plan]} if rec_plan in imgs else {}),
                    str(GuidancePlan.switch_at(0.0)): imgs.get(str(GuidancePlan.switch_at(0.0)))}
            if save_examples(rows, out / "sweep_examples.png") is not None:
                plots["examples: always-CFG, recommended, switch at 0"] = "sweep_examples.png"
        if "eos" in config.experiments:
            bar.set_postfix_str("[EOS] experiments")
            pairs = _take(prompt_set.pairs, config.eos_pairs)
            result["eos"] = eos_experiments(
                sampler, pairs, k_grid=config.k_grid, k_modes=config.k_modes, cutoff=config.cutoff,
                no_effect_tolerance=config.no_effect_tolerance, scorer=scorer,
                targets=None if pair_scenes is None else _take(pair_scenes, config.eos_pairs),
                batch_size=config.batch_size, progress=bar, **common)
            plots["[EOS] swap outcome"] = plot_eos(result["eos"], out / "eos.png").name
            if save_examples(result["eos"]["_images"], out / "eos_examples.png") is not None:
                plots["examples: A, B, A's words + B's [EOS], B's words + A's [EOS] (rows, in that order)"] = "eos_examples.png"
    finally:
        bar.close()
    result["elapsed_seconds"] = time.perf_counter() - started
    result["plots"] = plots
    write_json(out / "analysis.json", result)
    (out / "report.md").write_text(render_markdown(result, plots), encoding="utf-8")
    logger.info("analysis written to %s (%.0f s)", out, result["elapsed_seconds"])
    return result


def check_adaptive(sampler, plan: str, sweep: Dict[str, Any], config: AnalysisConfig, scorer: Optional[Any],
                   targets: Optional[List[Any]]) -> Dict[str, Any]:
    """Generate the sweep's prompts and seeds with the adaptive ``plan``; its distances and savings against always-CFG."""
    import numpy as np

    from .metrics import image_distances

    prompts, seeds = sweep["prompts"], sweep["seeds"]
    images, rows, cfg = [], 0, 0
    for start in range(0, len(prompts), config.batch_size):
        out = sampler.generate(prompts[start : start + config.batch_size], plan=plan,
                               seed=seeds[start : start + config.batch_size], steps=config.steps,
                               guidance_scale=config.guidance_scale, scheduler=config.scheduler, output_type="np")
        images.append(out.images)
        rows += out.unet_rows
        cfg += out.cfg_steps
    imgs = np.concatenate(images)
    d = image_distances(imgs, sweep["_images"]["always"], config.cutoff)
    entry: Dict[str, Any] = {"lowfreq": float(d["lowfreq"].mean()), "psnr": float(d["psnr"].mean()),
                             "unet_rows": rows, "rows_saved": 1.0 - rows / sweep["baseline"]["unet_rows"]}
    if scorer is not None and targets is not None:
        entry["accuracy"] = scorer.accuracy(imgs, targets)
        entry["accuracy_drop_points"] = float(sweep["baseline"]["accuracy"]["mean"] - entry["accuracy"]["mean"])
    entry["within_tolerance"] = within_tolerance(entry, sweep["baseline"], config.tolerance)
    return entry


def _take(items: List[Any], n: int) -> List[Any]:
    """The first ``n`` items, cycling when there are fewer."""
    if not items:
        raise InvalidArgumentError("prompts", "at least one prompt", items)
    return [items[i % len(items)] for i in range(n)]


class _PerPlan:
    """Adapts a per-image progress bar to the sweep's one-update-per-plan calls."""

    def __init__(self, bar, images_per_plan: int) -> None:
        self.bar, self.n = bar, images_per_plan

    def update(self, k: int = 1) -> None:
        self.bar.update(k * self.n)


__all__ = ["AnalysisConfig", "EXPERIMENTS", "check_adaptive", "model_info", "run_analysis"]
