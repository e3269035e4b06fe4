"""``cfgswitch export MODEL_DIR --out BUNDLE``: a diffusers folder to an ONNX bundle.

``--optimize`` adds ONNX Runtime's CPU-safe fused graphs (``ort/``) to the new bundle;
``cfgswitch export --optimize-only BUNDLE`` adds them to an existing one
(:func:`cfgswitch.export.optimize.optimize_bundle`, docs/optimize.md).
"""

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
    p.add_argument("model", metavar="MODEL_DIR", nargs="?", default=None,
                   help="diffusers folder with safetensors weights, or 'default' (the embedded model)")
    p.add_argument("--out", default=None, metavar="BUNDLE", help="bundle directory to create (required unless --optimize-only)")
    p.add_argument("--height", type=int, default=None, help="image height in pixels (default: the model's native size)")
    p.add_argument("--width", type=int, default=None, help="image width in pixels (default: the model's native size)")
    p.add_argument("--batch-sizes", default="1,2,4", help="images per request the bundle supports (default 1,2,4)")
    p.add_argument("--dtype", choices=("fp32", "fp16"), default="fp32", help="graph dtype (fp16 for strongly typed TensorRT)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    p.add_argument("--verify", action="store_true", help="compare every graph with torch on ONNX Runtime")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing bundle at --out (with --optimize-only: its fused graphs)")
    p.add_argument("--optimize", action="store_true",
                   help="also write ONNX Runtime's CPU-safe fused graphs to BUNDLE/ort/ (the exported graphs stay the reference)")
    p.add_argument("--optimize-only", default=None, metavar="BUNDLE", dest="optimize_only",
                   help="only fuse the graphs of an existing bundle (no MODEL_DIR, no --out)")
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
    if args.optimize_only is not None:
        return run_optimize_only(args)
    if args.model is None:
        raise InvalidArgumentError("MODEL_DIR", "a diffusers folder or 'default' (or --optimize-only BUNDLE)", None)
    if args.out is None:
        raise InvalidArgumentError("--out", "the bundle directory to create", None)
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
    if args.optimize:
        from .optimize import optimize_bundle

        optimize_bundle(bundle, threads=args.threads)
    print(bundle)
    return 0


def run_optimize_only(args: argparse.Namespace) -> int:
    """``--optimize-only BUNDLE``: fuse an existing bundle's graphs and print one line per graph."""
    from .optimize import optimize_bundle

    for name, value in (("MODEL_DIR", args.model), ("--out", args.out)):
        if value is not None:
            raise InvalidArgumentError(name, "nothing with --optimize-only (it works on the bundle it names)", value)
    bundle = Path(args.optimize_only)
    if not bundle.is_dir():
        raise InvalidArgumentError("--optimize-only", "an existing bundle directory", str(bundle))
    apply_threads(args.threads)
    try:
        records = optimize_bundle(bundle, overwrite=args.overwrite, threads=args.threads)
    except InvalidArgumentError as e:
        if e.argument != "overwrite":
            raise
        raise InvalidArgumentError("--overwrite", "the flag, to replace the fused graphs already recorded", e.got) from None
    for name, rec in records.items():
        diff = rec["check"]["max_abs_diff"] if rec.get("check") else None
        print(f"{name}: {rec['file']} fused {', '.join(rec['fusions']) or 'nothing'}"
              + (f"; max abs diff {diff:.2g}" if diff is not None else ""))
    return 0
