"""``cfgswitch export MODEL_DIR --out BUNDLE``: a diffusers folder to an ONNX bundle."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import List

from cfgswitch.cli_options import add_threads_option, apply_threads, check_threads
from cfgswitch.errors import InvalidArgumentError

logger = logging.getLogger(__name__)


def parse_batch_sizes(text: str) -> List[int]:
    """``"1,2,4"`` to ``[1, 2, 4]`` (raises :class:`InvalidArgumentError`)."""
    try:
        values = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise InvalidArgumentError("--batch-sizes", "comma-separated positive integers, e.g. 1,2,4", text) from None
    if not values or any(v < 1 for v in values):
        raise InvalidArgumentError("--batch-sizes", "comma-separated positive integers, e.g. 1,2,4", text)
    return values


def add_parser(sub: "argparse._SubParsersAction") -> None:
    """Register ``export``."""
    p = sub.add_parser("export", help="export a diffusers Stable Diffusion folder to an ONNX bundle")
    p.add_argument("model", metavar="MODEL_DIR", help="diffusers folder with safetensors weights, or 'default' (the embedded model)")
    p.add_argument("--out", required=True, metavar="BUNDLE", help="bundle directory to create")
    p.add_argument("--height", type=int, default=None, help="image height in pixels (default: the model's native size)")
    p.add_argument("--width", type=int, default=None, help="image width in pixels (default: the model's native size)")
    p.add_argument("--batch-sizes", default="1,2,4", help="images per request the bundle supports (default 1,2,4)")
    p.add_argument("--dtype", choices=("fp32", "fp16"), default="fp32", help="graph dtype (fp16 for strongly typed TensorRT)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    p.add_argument("--verify", action="store_true", help="compare every graph with torch on ONNX Runtime")
    p.add_argument("--overwrite", action="store_true", help="replace an existing bundle at --out")
    add_threads_option(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Check the arguments, export, and return 1 when a ``--verify`` comparison failed."""
    from cfgswitch.cli import route_library_logs
    from cfgswitch.default_model import resolve_model
    from cfgswitch.model_loading import check_model_dir

    from .exporter import check_options, export_bundle, verify_failures

    check_threads(args.threads)
    opts = check_options(height=args.height, width=args.width, batch_sizes=parse_batch_sizes(args.batch_sizes),
                         dtype=args.dtype, opset=args.opset, verify=args.verify, overwrite=args.overwrite)
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise InvalidArgumentError("--out", "a path that does not exist yet (or pass --overwrite)", str(out))
    model = check_model_dir(resolve_model(args.model))
    apply_threads(args.threads)
    route_library_logs()
    bundle = export_bundle(model, out, opts, progress=not args.no_progress)
    failed = verify_failures(bundle) if args.verify else []
    if failed:
        logger.error("verification failed for: %s (see manifest.json graphs.*.verify)", ", ".join(failed))
        return 1
    print(bundle)
    return 0
