"""``cfgswitch generate``: prompts to PNG files and a ``result.json``.

Every check that does not need the model runs before it loads (prompts, steps, guidance,
seed, plan, scheduler, threads, the output folder), so a typo costs no model load; the
checks that need it (image size against the model's native size) run in ``generate``'s
first stage, before any work.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from .cli_options import (
    add_model_option,
    add_overwrite_option,
    add_sampling_options,
    add_threads_option,
    apply_threads,
    check_output_folder,
    check_threads,
    clear_output_folder,
)

logger = logging.getLogger(__name__)


def add_parser(sub: "argparse._SubParsersAction") -> None:
    """Register ``generate``."""
    from .backends.registry import backend_names

    p = sub.add_parser("generate", help="generate images from prompts")
    p.add_argument("prompts", nargs="+", metavar="PROMPT")
    add_model_option(p)
    p.add_argument("--backend", choices=backend_names(), default=None,
                   help="backend (default: the best installed one for the model)")
    p.add_argument("--negative", action="append", default=None, metavar="TEXT",
                   help="negative prompt (once for all prompts, or once per prompt; default: none)")
    add_sampling_options(p)
    p.add_argument("--height", type=int, default=None, help="image height in pixels (default: the model's native size)")
    p.add_argument("--width", type=int, default=None, help="image width in pixels (default: the model's native size)")
    p.add_argument("--max-image-side", type=int, default=None,
                   help="largest height and width accepted (default: 2x the model's native size)")
    p.add_argument("--images-per-prompt", type=int, default=1, help="images per prompt")
    add_threads_option(p)
    p.add_argument("--device", default=None, help="torch backend: where to run (cpu, cuda, cuda:1; default: cpu)")
    p.add_argument("--dtype", default=None, choices=("fp32", "fp16", "bf16"), help="torch backend: weights dtype (default: fp32)")
    p.add_argument("--mode", default=None, choices=("eager", "compile", "graphs"),
                   help="torch backend: how the UNet runs (default: eager; graphs needs CUDA)")
    p.add_argument("--out", required=True, help="output folder for PNGs and result.json")
    add_overwrite_option(p)
    p.set_defaults(func=run)


def quiet_third_party_logs() -> None:
    """diffusers' and transformers' load-time warnings to the log at DEBUG level (see :mod:`cfgswitch.cli`)."""
    from .cli import route_library_logs

    route_library_logs()


def check_args(args: argparse.Namespace) -> Path:
    """Every check of ``generate`` that needs no model; returns the output folder."""
    from . import validation as v
    from .calibration import AUTO_PLAN
    from .plans import GuidancePlan
    from .schedulers import scheduler_class_name

    prompts = v.check_prompts(args.prompts)
    negatives = args.negative
    if negatives is not None and len(negatives) > 1:
        v.check_negative_prompts(negatives, len(prompts))
    elif negatives:
        v.check_negative_prompts(negatives[0], len(prompts))
    steps = v.check_positive_int("steps", args.steps, 1, 10_000)
    v.check_guidance(args.guidance)
    scheduler_class_name(args.scheduler)
    if str(args.plan).strip().lower() != AUTO_PLAN:
        v.check_plan_steps(GuidancePlan.parse(args.plan), steps)
    per = v.check_positive_int("images_per_prompt", args.images_per_prompt, 1, 1024)
    v.check_seeds(args.seed, len(prompts) * per)
    for name in ("height", "width"):
        value = getattr(args, name)
        if value is not None:
            v.check_positive_int(name, value, 1)
    if args.max_image_side is not None:
        v.check_positive_int("max_image_side", args.max_image_side, 1)
    check_threads(args.threads)
    return check_output_folder(args.out, args.overwrite)


def _load(args: argparse.Namespace):
    """The sampler, with ``--threads``, ``--device``, ``--dtype`` and ``--mode`` passed to a backend that takes them."""
    from .backends.registry import load_options
    from .default_model import resolve_model
    from .sampler import Sampler

    path = resolve_model(args.model)
    backend, options = load_options(path, args.backend, args.threads, device=getattr(args, "device", None),
                                    dtype=getattr(args, "dtype", None), mode=getattr(args, "mode", None))
    return Sampler.load(path, backend=backend, **options)


def run(args: argparse.Namespace) -> int:
    """Check, load, generate, write ``image_NNN.png`` and ``result.json`` into ``--out``."""
    # 1. Cheap checks first: a typo should not cost a model load.
    out_dir = check_args(args)
    apply_threads(args.threads)
    quiet_third_party_logs()
    # 2. Load and generate.
    sampler = _load(args)
    negative = None
    if args.negative:
        negative = args.negative[0] if len(args.negative) == 1 else args.negative
    out = sampler.generate(
        args.prompts, negative, steps=args.steps, guidance_scale=args.guidance, scheduler=args.scheduler,
        plan=args.plan, seed=args.seed, height=args.height, width=args.width, max_image_side=args.max_image_side,
        num_images_per_prompt=args.images_per_prompt, output_type="pil", progress=True,
    )
    # 3. Write: an earlier run's images never stay beside the new result.json.
    out_dir.mkdir(parents=True, exist_ok=True)
    clear_output_folder(out_dir)
    files = []
    for i, img in enumerate(out.images):
        f = out_dir / f"image_{i:03d}.png"
        img.save(f)
        files.append(f.name)
    width, height = out.images[0].size
    result = {
        "prompts": args.prompts, "negative_prompts": args.negative, "model": str(args.model), "steps": args.steps,
        "guidance_scale": args.guidance, "scheduler": args.scheduler, "seed": args.seed, "requested_plan": args.plan,
        "height": height, "width": width, "images_per_prompt": args.images_per_prompt, "threads": args.threads,
        "files": files, **out.summary(),
    }
    (out_dir / "result.json").write_text(json.dumps(result, indent=2))
    logger.info("%d image(s) in %s (plan %s: %d CFG steps, %d late steps, %d UNet rows, %.2f s)", len(files), out_dir,
                out.plan, out.cfg_steps, out.late_steps, out.unet_rows, out.timings["total"])
    for w in out.warnings:
        logger.warning(w)
    return 0
