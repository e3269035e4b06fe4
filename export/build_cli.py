"""``cfgswitch build BUNDLE``: TensorRT plans for a bundle (full TensorRT on a GPU host, or TensorRT for RTX anywhere)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from cfgswitch.backends.trt_flavour import TRT_CHOICES
from cfgswitch.io_specs import LAYOUTS

logger = logging.getLogger(__name__)


def add_parser(sub: "argparse._SubParsersAction") -> None:
    """Register ``build``."""
    p = sub.add_parser("build", help="build TensorRT plans for a bundle (TensorRT on a GPU host; TensorRT for RTX needs no GPU)")
    p.add_argument("bundle", metavar="BUNDLE", help="a bundle made by cfgswitch export")
    p.add_argument("--layout", choices=LAYOUTS, default=LAYOUTS[0],
                   help="two-engines: unet_cfg.plan (2B rows) + unet.plan (B rows); shared: one UNet plan, two profiles")
    p.add_argument("--trt", choices=TRT_CHOICES, default="auto",
                   help="which TensorRT builds: tensorrt (needs a GPU), tensorrt-rtx (TensorRT for RTX, builds on a CPU), "
                        "auto (tensorrt when it imports, else tensorrt-rtx)")
    shape = p.add_mutually_exclusive_group()
    shape.add_argument("--static", dest="static", action="store_true", default=True,
                       help="one static profile per exported batch size (default, fastest)")
    shape.add_argument("--dynamic", dest="static", action="store_false", help="one min..max profile per role")
    p.add_argument("--compute-capability", default="", metavar="CC[,CC]", dest="compute_capability",
                   help="with --trt tensorrt-rtx: GPUs the plans target, e.g. 7.5 (Turing) or 8.6,8.9 "
                        "(default: TensorRT for RTX's portable set, Ampere and later)")
    p.add_argument("--no-tf32", dest="tf32", action="store_false", default=True,
                   help="forbid TF32 in fp32 layers (TensorRT's default allows it)")
    p.add_argument("--timing-cache", type=Path, default=None, metavar="PATH", help="TensorRT timing cache to load and update")
    p.add_argument("--builder-optimization-level", type=int, default=None, metavar="N", help="0..5 (TensorRT default 3)")
    p.add_argument("--cache-dir", type=Path, default=None, help="plan cache folder (default BUNDLE/engines)")
    p.add_argument("--no-check", dest="check", action="store_false", default=True,
                   help="skip the checks of each plan against the bundle's io_specs (cfgswitch.export.plan_check)")
    p.add_argument("--row-buckets", default="", metavar="N[,N]", dest="row_buckets",
                   help="the plain UNet's profiles: one per row count (the step engine's buckets, e.g. 1,2,4,8,16); "
                        "default: the bundle's batch sizes")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def _row_buckets(text: str):
    from cfgswitch.errors import InvalidArgumentError

    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise InvalidArgumentError("--row-buckets", "comma-separated row counts, e.g. 1,2,4,8,16", text) from None


def run(args: argparse.Namespace) -> int:
    """Check the arguments and the bundle, build, then check every plan against io_specs."""
    from cfgswitch.bundle import read_manifest

    from .build import BuildOptions, build_bundle

    options = BuildOptions(layout=args.layout, static=args.static, timing_cache=args.timing_cache,
                           builder_optimization_level=args.builder_optimization_level, cache_dir=args.cache_dir,
                           trt=args.trt, tf32=args.tf32,
                           compute_capabilities=tuple(c.strip() for c in args.compute_capability.split(",") if c.strip()),
                           row_buckets=_row_buckets(args.row_buckets)).check()
    read_manifest(args.bundle)  # bad bundle before any TensorRT work
    entry = build_bundle(args.bundle, options, progress=not args.no_progress)
    for name, plan in entry["plans"].items():
        seconds = (plan.get("builder_report") or {}).get("build_seconds")
        logger.info("%s: %s (%s)", name, plan["file"],
                    f"built in {seconds:.1f} s" if plan["built_now"] and seconds is not None else
                    "built" if plan["built_now"] else "cached")
    if args.check:
        from .plan_check import check_layout

        for line in check_layout(read_manifest(args.bundle), options.layout):
            logger.info("check: %s", line)
    return 0
