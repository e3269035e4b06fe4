"""``cfgswitch client PROMPT --url HOST:PORT``: ask a running server for one image."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from ..errors import InvalidArgumentError

logger = logging.getLogger(__name__)


def add_parser(sub: "argparse._SubParsersAction") -> None:
    """Register ``client``."""
    p = sub.add_parser("client", help="request an image from a running cfgswitch Triton server")
    p.add_argument("prompt", metavar="PROMPT")
    p.add_argument("--url", default="127.0.0.1:8000", help="HOST:PORT (default 127.0.0.1:8000; gRPC is usually :8001)")
    p.add_argument("--protocol", choices=("http", "grpc"), default="http")
    p.add_argument("--model", default=None, help="model name (default cfgswitch; a repository's is cfgswitch_pipeline)")
    p.add_argument("--negative", default=None, help="negative prompt")
    p.add_argument("--seed", type=int, default=None, help="seed (default: the server draws one)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--guidance", type=float, default=None, help="guidance scale w")
    p.add_argument("--plan", default=None, help="guidance plan, e.g. switch:0.5")
    p.add_argument("--scheduler", default=None)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--out", default="image.png", help="PNG file to write (default image.png)")
    p.add_argument("--timeout", type=float, default=600.0, help="request timeout in seconds")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from PIL import Image

    from .client import ServingClient
    from .protocol import MODEL_NAME

    out = Path(args.out)
    if out.suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp"):
        raise InvalidArgumentError("--out", "a .png, .jpg or .webp file name", args.out)
    try:
        with ServingClient(args.url, protocol=args.protocol, model=args.model or MODEL_NAME, timeout_s=args.timeout) as client:
            result = client.generate(args.prompt, negative_prompt=args.negative, seed=args.seed, steps=args.steps,
                                     guidance_scale=args.guidance, plan=args.plan, scheduler=args.scheduler,
                                     height=args.height, width=args.width)
    except OSError as e:  # no server there (connection refused, unreachable host, timeout): one line, exit 2
        reason = e.strerror or type(e).__name__
        raise InvalidArgumentError("--url", f"HOST:PORT of a running cfgswitch server ({args.protocol})",
                                   f"{args.url} ({reason.lower()})") from None
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(result.image).save(out)
    logger.info("%s: %dx%d, %d CFG steps, %d late steps", out, result.image.shape[1], result.image.shape[0],
                result.cfg_steps, result.late_steps)
    print(json.dumps({"file": str(out), "height": int(result.image.shape[0]), "width": int(result.image.shape[1]),
                      "cfg_steps": result.cfg_steps, "late_steps": result.late_steps}))
    return 0
