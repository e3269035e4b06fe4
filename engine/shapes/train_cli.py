"""``cfgswitch train-shapes``: train the embedded default model (see docs/embedded_model.md)."""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import fields
from pathlib import Path

from ..errors import InvalidArgumentError

logger = logging.getLogger(__name__)


def add_parser(sub) -> None:
    """Register ``train-shapes``."""
    p = sub.add_parser("train-shapes", help="train the small shapes text-to-image model (the embedded default)")
    p.add_argument("--out", required=True, help="output folder: the diffusers model goes to OUT/model, logs beside it")
    p.add_argument("--seed", type=int, default=0, help="seed of data, weights and noise (default 0)")
    p.add_argument("--unet-steps", type=int, default=None, help="UNet+text training steps (default: the recipe's)")
    p.add_argument("--stop-at", type=int, default=None, help="stop after this many UNet steps of the schedule (a checkpoint)")
    p.add_argument("--vae-steps", type=int, default=None, help="autoencoder training steps (default: the recipe's)")
    p.add_argument("--offset-noise", type=float, default=None, help="per-channel noise offset (default: the recipe's, 0.15)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: the recipe's, 1, for reproducibility)")
    p.add_argument("--fp32", action="store_true", help="save float32 weights (default: float16, to keep the folder small)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Train and report where the model is."""
    for name in ("unet_steps", "vae_steps", "threads", "stop_at"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise InvalidArgumentError(f"--{name.replace('_', '-')}", "a positive integer", value)
    if args.offset_noise is not None and not 0.0 <= args.offset_noise <= 1.0:
        raise InvalidArgumentError("--offset-noise", "a number in [0, 1]", args.offset_noise)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise InvalidArgumentError("--out", "a folder", str(out))
    from .train import TrainConfig, Trainer

    cfg = TrainConfig(seed=args.seed, fp16=not args.fp32)
    for name in ("unet_steps", "vae_steps", "threads", "stop_at", "offset_noise"):
        if getattr(args, name) is not None:
            setattr(cfg, name, getattr(args, name))
    t0 = time.perf_counter()
    model = Trainer(cfg, out, progress=not args.no_progress).run()
    wall = time.perf_counter() - t0
    (out / "train_summary.json").write_text(json.dumps({"wall_s": round(wall, 1), "model": "model", "seed": cfg.seed}, indent=2))
    logger.info("trained in %.1f min: %s", wall / 60, model)
    print(f"model: {model} ({wall / 60:.1f} min)")
    return 0
