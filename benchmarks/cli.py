"""``cfgswitch bench``: speed and quality of every plan, against diffusers, in one run."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

logger = logging.getLogger(__name__)

DEFAULT_OUT = "bench-results"


def add_parser(sub: "argparse._SubParsersAction") -> None:
    """Register ``bench``."""
    from cfgswitch.cli_options import add_sampling_options

    from .config import DEFAULT_PLANS

    p = sub.add_parser("bench", help="benchmark guidance plans (speed, quality) against diffusers in one run",
                       description="Times every plan and batch size in one process, interleaved, beside diffusers' "
                                   "pipeline on the same components; writes results.json, report.md and plots.")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", default=None, help="diffusers folder, or 'default' (default: the embedded model)")
    src.add_argument("--bundle", default=None, help="exported bundle (onnxruntime / tensorrt backends)")
    p.add_argument("--baseline-model", default=None, dest="baseline_model",
                   help="with --bundle: the diffusers folder it was exported from (torch backend and diffusers baseline)")
    from cfgswitch.backends.registry import backend_names

    p.add_argument("--backend", default=None,
                   help=f"{', '.join(backend_names())}; several comma-separated (default: every CPU backend installed, "
                        "onnxruntime running a bundle exported from the model; onnxruntime for --bundle)")
    p.add_argument("--plans", default=",".join(DEFAULT_PLANS), help="comma-separated plans (always is added first)")
    p.add_argument("--batch", default="1,4", help="comma-separated batch sizes")
    p.add_argument("--repeat", type=int, default=5, help="timed calls per cell")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls per cell first")
    p.add_argument("--role-repeat", type=int, default=10, dest="role_repeat", help="timed direct calls per UNet role (at least; spread over the rounds)")
    p.add_argument("--baseline", default="diffusers", choices=("diffusers", "none"))
    p.add_argument("--quality", action="store_true", help="image quality per plan and the switch-point sweep")
    p.add_argument("--sweep", default=None, help="switch fractions of the --quality sweep (default: 0.1,0.2,...,0.9)")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--shapes", default="auto", choices=("auto", "yes", "no"),
                   help="shapes-world captions and scorer: auto = for the embedded model only")
    add_sampling_options(p, plan=False)
    p.add_argument("--threads", type=int, default=None, help="torch, onnxruntime and openvino threads (default: torch's own choice, capped at the idle cores)")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default: ./{DEFAULT_OUT})")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--suite", default="plans", choices=("plans", "serving", "peers"),
                   help="plans: every plan against diffusers; serving: the step engine under open-loop load; "
                        "peers: the CPU peers (diffusers, optimum ORT, OpenVINO, DeepCache) beside cfgswitch")
    peers = p.add_argument_group("peers suite (--peers, docs/benchmarks.md#peers)")
    peers.add_argument("--peers", action="store_const", const="peers", dest="suite",
                       help="same as --suite peers (default threads: 1)")
    peers.add_argument("--peer-python", default=None, dest="peer_python", metavar="PATH",
                       help="the Python whose environment has the peers (default: this one)")
    peers.add_argument("--peer-cache", default=None, dest="peer_cache", metavar="DIR",
                       help="folder of the exported bundle and the peers' exports (default: $CFGSWITCH_CACHE/bench-peers)")
    peers.add_argument("--peer-systems", default=None, dest="peer_systems",
                       help="comma-separated peers to run (default: all of diffusers, deepcache, diffusers+cutoff, "
                            "optimum-ort, optimum-ort+cutoff, openvino-dynamic, openvino-static)")
    peers.add_argument("--peer-plan", default="switch:0.5", dest="peer_plan",
                       help="the switch plan of cfgswitch and of the peers' cutoff (default: switch:0.5)")
    from .engine_cli import add_arguments

    add_arguments(p)
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace) -> "BenchConfig":  # noqa: F821
    """A checked :class:`~cfgswitch.benchmarks.config.BenchConfig` from parsed arguments (no model loads)."""
    from cfgswitch.errors import InvalidArgumentError

    from .config import BenchConfig, check_config, parse_float_list

    model = args.model
    if args.baseline_model is not None:
        if args.bundle is None:
            raise InvalidArgumentError("baseline-model", "only with --bundle (use --model otherwise)", args.baseline_model)
        model = args.baseline_model
    cfg = BenchConfig(
        model=model, bundle=args.bundle, backends=args.backend, plans=args.plans, steps=args.steps, batches=args.batch,
        scheduler=args.scheduler, repeat=args.repeat, warmup=args.warmup, baseline=args.baseline, quality=args.quality,
        guidance_scale=args.guidance, seed=args.seed, height=args.height, width=args.width, role_repeat=args.role_repeat,
        threads=args.threads, shapes=args.shapes,
    )
    if args.sweep is not None:
        cfg.sweep = parse_float_list("sweep", args.sweep)
    return check_config(cfg)


def run(args: argparse.Namespace) -> int:
    """Run the benchmark, write its files, print the summary table."""
    if getattr(args, "suite", "plans") == "serving":
        from .engine_cli import run as run_serving

        return run_serving(args)
    if getattr(args, "suite", "plans") == "peers":
        from .peers import run_cli as run_peers

        return run_peers(args)
    from .harness import run_benchmark
    from .report import QUALITY_NOTE, headline_table, plans_table, write_results

    cfg = config_from_args(args)
    from cfgswitch.cli import route_library_logs

    route_library_logs()  # diffusers' load-time warnings to the DEBUG log
    argv = ["cfgswitch"] + sys.argv[1:] if Path(sys.argv[0]).name in ("cfgswitch", "__main__.py") else None
    results, images = run_benchmark(cfg, progress=not args.no_progress, argv=argv)
    files = write_results(results, images, args.out)
    t = results["derived"]["targets"]
    print(headline_table(results))
    print()
    print(plans_table(results))
    print(QUALITY_NOTE)
    print(f"\nrun took {results['elapsed_s']:.1f} s; host overhead per step max "
          f"{(t['host_overhead_per_step_s']['max'] or 0) * 1e3:.3f} ms; report: {files['report']}")
    return 0


__all__ = ["add_parser", "config_from_args", "run"]
