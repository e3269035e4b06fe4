"""``cfgswitch analyze``: measure when a model stops needing its prompt and recommend a switch point."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import List, Optional, Tuple

logger = logging.getLogger(__name__)


def add_parser(sub: "argparse._SubParsersAction") -> None:
    """Register ``analyze``."""
    from ..cli_options import add_sampling_options, add_threads_option

    p = sub.add_parser("analyze", help="trajectory probes, switch sweep, [EOS] swaps and a recommended switch point")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", default=None, help="diffusers folder, or 'default' (default: the embedded model)")
    src.add_argument("--bundle", default=None, help="exported bundle folder (manifest.json)")
    from ..backends.registry import backend_names

    p.add_argument("--backend", choices=backend_names(), default=None,
                   help="backend (default: the best installed one for the model)")
    p.add_argument("--prompts", default=None, metavar="FILE", help="text file, one prompt per line (default: built-in set; "
                   "on the embedded model, held-out captions of the shapes world)")
    add_sampling_options(p, plan=False)
    p.add_argument("--out", default="analysis", help="output folder (default: ./analysis); the recommendation is also "
                   "written into the model folder's cfgswitch.json unless --no-save")
    p.add_argument("--no-save", action="store_true", help="do not write cfgswitch.json into the model folder or bundle")
    p.add_argument("--experiments", default="probes,sweep,eos", help="comma list of probes, sweep, eos")
    p.add_argument("--probe-prompts", type=int, default=16, help="prompts of the trajectory probes")
    p.add_argument("--sweep-prompts", type=int, default=16, help="prompts of the switch sweep")
    p.add_argument("--pairs", type=int, default=8, help="prompt pairs of the [EOS] experiments")
    p.add_argument("--fractions", default=None, help="comma list of switch fractions (default 0,0.1,...,0.8,1)")
    p.add_argument("--late-modes", default="uncond,cond", help="comma list of uncond, cond")
    p.add_argument("--k-grid", default=None, help="comma list of switch-in steps of the late swaps (default: dense early)")
    p.add_argument("--k-modes", default="eos,prompt", help="late swaps to run: eos (B's [EOS]), prompt (all of B)")
    p.add_argument("--cutoff", type=float, default=None, help="low-pass radius as a fraction of Nyquist (default 0.25)")
    p.add_argument("--lowfreq-tolerance", type=float, default=None,
                   help="recommendation bound on the low-frequency RMS distance to always-CFG (default 0.03)")
    p.add_argument("--accuracy-points", type=float, default=None,
                   help="recommendation bound on the scorer's mean accuracy drop, in points (default 1)")
    p.add_argument("--scorer", choices=("auto", "shapes", "none"), default="auto",
                   help="attribute scorer: auto uses the shapes scorer on the embedded model")
    p.add_argument("--batch-size", type=int, default=16, help="images per UNet batch")
    p.add_argument("--no-pixel-probes", action="store_true",
                   help="probes split the latent x0 only (no VAE decode per step; for large models)")
    add_threads_option(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def _floats(name: str, text: Optional[str]) -> Optional[Tuple[float, ...]]:
    from ..errors import InvalidArgumentError

    if text is None:
        return None
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise InvalidArgumentError(name, "a comma-separated list of numbers", text) from None


def _ints(name: str, text: Optional[str]) -> Optional[Tuple[int, ...]]:
    from ..errors import InvalidArgumentError

    if text is None:
        return None
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise InvalidArgumentError(name, "a comma-separated list of integers", text) from None


def _words(text: str) -> Tuple[str, ...]:
    return tuple(w.strip() for w in text.split(",") if w.strip())


def config_from_args(args: argparse.Namespace):
    """An :class:`AnalysisConfig` from the parsed arguments, validated."""
    from .analyze import AnalysisConfig
    from .recommend import Tolerance

    cfg = AnalysisConfig(
        steps=args.steps, guidance_scale=args.guidance, scheduler=args.scheduler, seed=args.seed,
        probe_prompts=args.probe_prompts, sweep_prompts=args.sweep_prompts, eos_pairs=args.pairs,
        late_modes=_words(args.late_modes), k_modes=_words(args.k_modes), k_grid=_ints("k-grid", args.k_grid),
        batch_size=args.batch_size, experiments=_words(args.experiments), pixel_probes=not args.no_pixel_probes,
    )
    fractions = _floats("fractions", args.fractions)
    if fractions is not None:
        cfg.fractions = fractions
    if args.cutoff is not None:
        cfg.cutoff = args.cutoff
    tol = Tolerance()
    cfg.tolerance = Tolerance(
        lowfreq=tol.lowfreq if args.lowfreq_tolerance is None else args.lowfreq_tolerance,
        accuracy_points=tol.accuracy_points if args.accuracy_points is None else args.accuracy_points,
    )
    return cfg.validate()


def run(args: argparse.Namespace) -> int:
    """Run ``cfgswitch analyze``."""
    from ..default_model import resolve_model
    from ..errors import InvalidArgumentError
    from .scoring import generic_prompt_set, is_shapes_model, load_scorer, read_prompts_file, shapes_prompt_set

    from .plots import require_matplotlib

    # 1. Cheap checks first.
    cfg = config_from_args(args)
    require_matplotlib()
    if args.threads is not None and (isinstance(args.threads, bool) or args.threads < 1):
        raise InvalidArgumentError("threads", "an integer >= 1", args.threads)
    file_prompts: Optional[List[str]] = read_prompts_file(args.prompts) if args.prompts else None
    if args.bundle is not None and not (Path(args.bundle) / "manifest.json").is_file():
        raise InvalidArgumentError("bundle", "a bundle folder with manifest.json", args.bundle)
    path = Path(args.bundle) if args.bundle is not None else resolve_model(args.model)
    notes: List[str] = []
    scorer, scorer_note = load_scorer(args.scorer, None if args.bundle else str(path))
    if file_prompts is not None and scorer is not None:
        scorer, scorer_note = None, "a prompts file has no scenes to score against: fidelity is measured by image distances only"
    count = max(cfg.probe_prompts, cfg.sweep_prompts)
    if file_prompts is not None:
        prompt_set = generic_prompt_set(count, cfg.eos_pairs, file_prompts)
    elif scorer is not None or (args.bundle is None and is_shapes_model(str(path)) and _shapes_importable()):
        prompt_set = shapes_prompt_set(count, cfg.eos_pairs)
    else:
        prompt_set = generic_prompt_set(count, cfg.eos_pairs)
        if args.bundle is None and args.model in (None, "default") and not is_shapes_model(str(path)):
            notes.append("the embedded shapes model is not installed: this run used the tiny random-weight default model")

    # 2. Load the model, then run.
    from ..cli import route_library_logs
    from ..sampler import Sampler

    route_library_logs()  # diffusers' load-time warnings to the DEBUG log
    from .analyze import run_analysis

    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    sampler = Sampler.load(path, backend=args.backend)
    if scorer is not None and sampler.spec.default_size != 64:
        raise InvalidArgumentError("scorer", "a model that makes 64x64 images (the shapes world) for --scorer shapes",
                                   f"{sampler.spec.default_size}x{sampler.spec.default_size} images")
    name = path.name if args.model not in (None, "default") or args.bundle else f"default ({path.name})"
    result = run_analysis(sampler, prompt_set, args.out, cfg, scorer=scorer, scorer_note=scorer_note, model_name=name,
                          progress=not args.no_progress, notes=notes)
    rec = result.get("recommendation")
    if rec is not None:
        logger.info("recommended plan: %s (UNet rows saved %.0f%%)", rec["plan"], 100 * rec["rows_saved"])
        if rec.get("adaptive_plan"):
            logger.info("recommended adaptive plan: %s", rec["adaptive_plan"])
        if not args.no_save:
            save_recommendations(path, rec)
    logger.info("report: %s", Path(args.out) / "report.md")
    return 0


def save_recommendations(model_path: Path, rec: dict) -> Optional[Path]:
    """Write both recommendations into the model folder's (or bundle's) ``cfgswitch.json``; ``None`` if it is read-only."""
    from ..calibration import write_calibration

    keys = ("fraction", "late", "switch_step", "rows_saved", "accuracy_drop_points", "lowfreq", "steps", "scheduler",
            "guidance_scale", "tolerance", "scored")
    evidence = {k: rec.get(k) for k in keys}
    if rec.get("adaptive"):
        evidence["adaptive"] = {k: v for k, v in rec["adaptive"].items() if k != "plan"}
    try:
        written = write_calibration(model_path, rec["plan"], rec.get("adaptive_plan"), evidence)
    except OSError as e:
        logger.warning("could not write the recommendations into %s (%s); they are in recommendation.json", model_path, e)
        return None
    logger.info("recommendations saved in %s (plan auto uses them)", written)
    return written


def _shapes_importable() -> bool:
    try:
        from ..shapes import captions  # noqa: F401
    except ImportError:
        return False
    return True
