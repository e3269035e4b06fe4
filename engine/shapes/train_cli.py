"""``cfgswitch train-shapes``: train the embedded default model (see docs/embedded_model.md)."""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import fields
from pathlib import Path
from typing import Any, Tuple

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
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: the recipe's, 2; 1 is faster on a CPU other jobs keep busy)")
    p.add_argument("--device", default=None, help="torch device to train on, e.g. cuda (default: the recipe's, cpu)")
    p.add_argument("--max-minutes", type=float, default=None, dest="max_minutes",
                   help="stop, save and check once the whole run has taken this many minutes (default: no limit)")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", dest="overrides",
                   help="override any recipe field of cfgswitch.shapes.train.TrainConfig, e.g. --set x0_weight_cap=5 (repeatable)")
    p.add_argument("--fp32", action="store_true", help="save float32 weights (default: float16, to keep the folder small)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    p.set_defaults(func=run)


def parse_override(item: str) -> Tuple[str, Any]:
    """``NAME=VALUE`` of ``--set`` as a typed ``(field, value)`` of :class:`TrainConfig`."""
    from .train import TrainConfig

    types = {f.name: type(f.default) for f in fields(TrainConfig)}
    name, sep, text = item.partition("=")
    name = name.strip().replace("-", "_")
    if not sep or name not in types:
        raise InvalidArgumentError("--set", f"NAME=VALUE with NAME one of {', '.join(sorted(types))}", item)
    kind = types[name]
    try:
        if kind is bool:
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError(text)
            value: Any = text.lower() in ("true", "1")
        elif kind is tuple:
            value = tuple(int(v) for v in text.split(","))
        else:
            value = kind(text)
    except ValueError:
        raise InvalidArgumentError("--set", f"{name}= a {kind.__name__} value", text) from None
    if kind in (int, float) and value < 0:
        raise InvalidArgumentError("--set", f"{name}= a non-negative {kind.__name__}", text)
    return name, value


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
    if args.max_minutes is not None and not args.max_minutes > 0:
        raise InvalidArgumentError("--max-minutes", "a positive number of minutes", args.max_minutes)
    from .train import TrainConfig, Trainer

    cfg = TrainConfig(seed=args.seed, fp16=not args.fp32)
    for item in args.overrides:
        name, value = parse_override(item)
        setattr(cfg, name, value)
    for name in ("unet_steps", "vae_steps", "threads", "stop_at", "offset_noise", "device", "max_minutes"):
        if getattr(args, name) is not None:
            setattr(cfg, name, getattr(args, name))
    if cfg.device != "cpu":
        import torch

        try:
            torch.empty(1, device=cfg.device)
        except (RuntimeError, AssertionError) as exc:
            raise InvalidArgumentError("--device", "a torch device that exists here (cpu, or cuda on a GPU machine)", cfg.device) from exc
    t0 = time.perf_counter()
    model = Trainer(cfg, out, progress=not args.no_progress).run()
    wall = time.perf_counter() - t0
    (out / "train_summary.json").write_text(json.dumps({"wall_s": round(wall, 1), "model": "model", "seed": cfg.seed}, indent=2))
    logger.info("trained in %.1f min: %s", wall / 60, model)
    print(f"model: {model} ({wall / 60:.1f} min)")
    return 0
