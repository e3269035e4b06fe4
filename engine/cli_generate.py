"""``cfgswitch generate``: prompts to PNG files and a ``result.json``."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

logger = logging.getLogger(__name__)


def add_parser(sub: "argparse._SubParsersAction") -> None:
    """Register ``generate``."""
    from .schedulers import SCHEDULER_NAMES

    p = sub.add_parser("generate", help="generate images from prompts")
    p.add_argument("prompts", nargs="+", metavar="PROMPT")
    p.add_argument("--model", default="default", help="diffusers folder or bundle (default: the embedded model)")
    p.add_argument("--backend", choices=("torch", "onnxruntime", "tensorrt"), default=None,
                   help="backend (default: the best installed one for the model)")
    p.add_argument("--negative", action="append", default=None, metavar="TEXT",
                   help="negative prompt (once for all prompts, or once per prompt)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--guidance", type=float, default=7.5, help="guidance scale w")
    p.add_argument("--scheduler", default="ddim", help=f"one of {', '.join(SCHEDULER_NAMES)}")
    p.add_argument("--plan", default="switch:0.5", help="guidance plan, e.g. always, switch:0.5, switch:0.5:cond, step:20, "
                   "timestep:500, interval:0.2:0.6, adaptive:0.995")
    p.add_argument("--seed", type=int, default=0, help="seed of the first image (image i gets seed + i)")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--images-per-prompt", type=int, default=1)
    p.add_argument("--out", required=True, help="output folder for PNGs and result.json")
    p.set_defaults(func=run)


def quiet_third_party_logs() -> None:
    """Keep diffusers' and transformers' load-time chatter out of the command line's output."""
    for name in ("diffusers", "transformers"):
        try:
            mod = __import__(f"{name}.utils.logging", fromlist=["set_verbosity_error"])
            mod.set_verbosity_error()
            if hasattr(mod, "disable_progress_bar"):
                mod.disable_progress_bar()
        except ImportError:  # pragma: no cover
            pass


def run(args: argparse.Namespace) -> int:
    from .default_model import resolve_model
    from .plans import GuidancePlan
    from .sampler import Sampler
    from .schedulers import scheduler_class_name

    # cheap checks first: a typo should not cost a model load
    GuidancePlan.parse(args.plan)
    scheduler_class_name(args.scheduler)
    quiet_third_party_logs()
    sampler = Sampler.load(resolve_model(args.model), backend=args.backend)
    negative = None
    if args.negative:
        negative = args.negative[0] if len(args.negative) == 1 else args.negative
    out = sampler.generate(
        args.prompts, negative, steps=args.steps, guidance_scale=args.guidance, scheduler=args.scheduler,
        plan=args.plan, seed=args.seed, height=args.height, width=args.width,
        num_images_per_prompt=args.images_per_prompt, output_type="pil", progress=True,
    )
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = []
    for i, img in enumerate(out.images):
        f = out_dir / f"image_{i:03d}.png"
        img.save(f)
        files.append(f.name)
    result = {
        "prompts": args.prompts, "negative_prompts": args.negative, "model": str(args.model), "steps": args.steps,
        "guidance_scale": args.guidance, "scheduler": args.scheduler, "seed": args.seed,
        "height": args.height, "width": args.width, "images_per_prompt": args.images_per_prompt, "files": files,
        **out.summary(),
    }
    (out_dir / "result.json").write_text(json.dumps(result, indent=2))
    logger.info("%d image(s) in %s (%d CFG steps, %d late steps, %d UNet rows, %.2f s)", len(files), out_dir,
                out.cfg_steps, out.late_steps, out.unet_rows, out.timings["total"])
    for w in out.warnings:
        logger.warning(w)
    return 0
