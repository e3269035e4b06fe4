"""``cfgswitch triton-repo BUNDLE --out REPO``: write a Triton model repository for a bundle."""

from __future__ import annotations

import argparse
import logging
import signal

from ..errors import InvalidArgumentError

logger = logging.getLogger(__name__)


def add_parser(sub: "argparse._SubParsersAction") -> None:
    """Register ``triton-repo``."""
    p = sub.add_parser("triton-repo", help="write a Triton model repository for a bundle",
                       description="Write a classic Triton model repository: the bundle's engines as Triton models plus "
                       "the cfgswitch_pipeline Python-backend model (see docs/serving.md).")
    p.add_argument("bundle", metavar="BUNDLE")
    p.add_argument("--out", required=True, metavar="REPO", help="repository folder to write")
    p.add_argument("--engines", choices=("tensorrt", "onnxruntime", "onnxruntime-bls"), default="onnxruntime",
                   help="tensorrt: the built plans as tensorrt_plan models (GPU Triton); onnxruntime: the pipeline runs "
                   "the bundle in-process (any Triton); onnxruntime-bls: the tensorrt layout with ONNX Runtime "
                   "Python models as engines (CPU Triton). Default onnxruntime")
    p.add_argument("--layout", choices=("two-engines", "shared"), default=None,
                   help="TensorRT layout (default: the bundle's built one, two-engines first)")
    p.add_argument("--max-batch", type=int, default=8, help="pipeline max_batch_size (default 8)")
    p.add_argument("--max-queue-delay-us", type=int, default=2000, help="pipeline dynamic batching delay (default 2000)")
    p.add_argument("--instances", type=int, default=1, help="pipeline model instances (default 1)")
    p.add_argument("--max-steps", type=int, default=100)
    p.add_argument("--default-steps", type=int, default=30)
    p.add_argument("--max-image-side", type=int, default=None,
                   help="largest height/width (default: the model's native side times --image-side-factor)")
    p.add_argument("--image-side-factor", type=int, default=2, help="see --max-image-side (default 2)")
    p.add_argument("--max-prompt-bytes", type=int, default=2048)
    p.add_argument("--max-prompt-tokens", type=int, default=None,
                   help="longest prompt in CLIP tokens (default: the model's text length, 77)")
    p.add_argument("--default-plan", default="switch:0.5")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads per session (default: its own)")
    p.add_argument("--batching", default="step", choices=("step", "request"),
                   help="step: the requests of a Triton batch run through the step engine (default); "
                        "request: merged whole, by settings")
    p.add_argument("--python-path", action="append", default=None, metavar="DIR",
                   help="folder the Python models add to sys.path (site-packages with cfgswitch); repeatable. Default: "
                   "this interpreter's site-packages. 'none': cfgswitch is installed where the server's Python finds it")
    p.add_argument("--overwrite", action="store_true", help="replace an existing repository at --out")
    p.add_argument("--serve", action="store_true",
                   help="then serve the repository with the tritonserver binary PyTriton bundles (CPU; not tensorrt)")
    p.add_argument("--host", default="127.0.0.1", help="with --serve: address to listen on")
    p.add_argument("--http-port", type=int, default=8000, help="with --serve")
    p.add_argument("--grpc-port", type=int, default=8001, help="with --serve")
    p.add_argument("--metrics-port", type=int, default=8002, help="with --serve")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..plans import GuidancePlan
    from .limits import ServeLimits
    from .repo import RepoOptions, check_repository, write_repository
    from .triton_env import site_dirs

    GuidancePlan.parse(args.default_plan)
    limits = ServeLimits(max_steps=args.max_steps, max_batch=args.max_batch, max_image_side=args.max_image_side,
                         max_prompt_bytes=args.max_prompt_bytes, default_steps=args.default_steps,
                         default_plan=args.default_plan, image_side_factor=args.image_side_factor,
                         max_prompt_tokens=args.max_prompt_tokens)
    if args.threads is not None and args.threads < 1:
        raise InvalidArgumentError("--threads", "an integer >= 1", args.threads)
    if args.serve and args.engines == "tensorrt":
        raise InvalidArgumentError("--serve", "--engines onnxruntime or onnxruntime-bls (the bundled server has no "
                                   "TensorRT backend; deploy tensorrt repositories on a GPU Triton)", args.engines)
    if args.python_path is None:
        paths = site_dirs()
    elif args.python_path == ["none"]:
        paths = []
    else:
        paths = list(args.python_path)
    options = RepoOptions(engines=args.engines, layout=args.layout, limits=limits, max_queue_delay_us=args.max_queue_delay_us,
                          instances=args.instances, python_paths=paths, threads=args.threads, batching=args.batching)
    written = write_repository(args.bundle, args.out, options, overwrite=args.overwrite)
    check_repository(args.out)
    for name, path in sorted(written.items()):
        logger.info("  %s: %s", name, path)
    if not args.serve:
        print(args.out)
        return 0
    from .process import start_tritonserver

    def on_term(_signum, _frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)  # SIGTERM, like Ctrl-C, stops the server it started
    server = start_tritonserver(args.out, host=args.host, ports=(args.http_port, args.grpc_port, args.metrics_port))
    logger.info("tritonserver pid %d, log %s; Ctrl-C stops it", server.proc.pid, server.log_path)
    try:
        server.proc.wait()
    except KeyboardInterrupt:
        pass
    finally:
        code = server.stop(signal.SIGINT)
    return 0 if code in (0, -signal.SIGINT) else 1
