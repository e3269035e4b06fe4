"""``cfgswitch build BUNDLE``: TensorRT plans for a bundle, on a GPU host."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

logger = logging.getLogger(__name__)


def add_parser(sub: "argparse._SubParsersAction") -> None:
    """Register ``build``."""
    p = sub.add_parser("build", help="build TensorRT plans for a bundle (GPU host with TensorRT)")
    p.add_argument("bundle", metavar="BUNDLE", help="a bundle made by cfgswitch export")
    p.add_argument("--layout", choices=("two-engines", "shared"), default="two-engines",
                   help="two-engines: unet_cfg.plan (2B rows) + unet.plan (B rows); shared: one UNet plan, two profiles")
    shape = p.add_mutually_exclusive_group()
    shape.add_argument("--static", dest="static", action="store_true", default=True,
                       help="one static profile per exported batch size (default, fastest)")
    shape.add_argument("--dynamic", dest="static", action="store_false", help="one min..max profile per role")
    p.add_argument("--timing-cache", type=Path, default=None, metavar="PATH", help="TensorRT timing cache to load and update")
    p.add_argument("--builder-optimization-level", type=int, default=None, metavar="N", help="0..5 (TensorRT default 3)")
    p.add_argument("--cache-dir", type=Path, default=None, help="plan cache folder (default BUNDLE/engines)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Check the arguments and the bundle, then build."""
    from cfgswitch.bundle import read_manifest

    from .build import BuildOptions, build_bundle

    options = BuildOptions(layout=args.layout, static=args.static, timing_cache=args.timing_cache,
                           builder_optimization_level=args.builder_optimization_level, cache_dir=args.cache_dir).check()
    read_manifest(args.bundle)  # bad bundle before any TensorRT work
    entry = build_bundle(args.bundle, options, progress=not args.no_progress)
    for name, plan in entry["plans"].items():
        logger.info("%s: %s (%s)", name, plan["file"], "built" if plan["built_now"] else "cached")
    return 0
