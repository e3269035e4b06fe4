"""``cfgswitch serve MODEL_OR_BUNDLE``: a real Triton Inference Server (PyTriton) for one model."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ..errors import InvalidArgumentError
from .front import DEFAULT_MAX_REQUEST_BYTES

logger = logging.getLogger(__name__)


def add_parser(sub: "argparse._SubParsersAction") -> None:
    """Register ``serve``."""
    p = sub.add_parser("serve", help="serve a model or bundle with Triton Inference Server (HTTP and gRPC)",
                       description="Serve a diffusers folder (torch) or an exported bundle behind a real Triton "
                       "Inference Server started through PyTriton. Model name: cfgswitch (see docs/serving.md). "
                       "Every limit below is checked per request; a request over one gets a one-line error naming "
                       "it. Request size: HTTP bodies and gRPC messages over --max-request-bytes are refused before "
                       "they are read, by small fronts on --http-port and --grpc-port (the bundled Triton 2.51 has no "
                       "input-size limit of its own; see docs/serving.md).")
    p.add_argument("model", metavar="MODEL_OR_BUNDLE", help="diffusers folder (safetensors) or bundle, or 'default'")
    from ..backends.registry import backend_names

    p.add_argument("--backend", choices=backend_names(), default=None,
                   help="backend (default: the best installed one for the model)")
    p.add_argument("--device", default=None, help="torch backend: device (default cpu)")
    p.add_argument("--dtype", default=None, help="torch backend: fp32, fp16 or bf16 (default fp32)")
    p.add_argument("--mode", default=None, choices=("eager", "compile", "graphs"),
                   help="torch backend: how the UNet runs (default eager; graphs needs CUDA)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument("--max-batch", type=int, default=8,
                   help="limit: most images per request, and per merged batch (default 8)")
    p.add_argument("--max-queue-delay-us", type=int, default=2000,
                   help="batching: longest wait for more requests to merge, in microseconds (default 2000)")
    p.add_argument("--instances", type=int, default=4,
                   help="requests run at once, merged (Triton model instances; more wait in Triton's queue; "
                   "each adds about 1 s to shutdown; default 4)")
    p.add_argument("--batching", default="step", choices=("step", "request"),
                   help="step: every request joins the step engine, sharing each UNet call step by step (default); "
                        "request: requests with the same settings run whole trajectories together")
    p.add_argument("--max-rows", type=int, default=None,
                   help="step engine: UNet rows per call at most (default: twice --max-batch)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch and ONNX Runtime/OpenVINO threads (default: the library's own choice)")
    p.add_argument("--max-steps", type=int, default=100, help="limit: largest steps a request may ask (default 100)")
    p.add_argument("--default-steps", type=int, default=30, help="steps when a request leaves them out (default 30)")
    p.add_argument("--max-image-side", type=int, default=None,
                   help="limit: largest height/width in pixels (default: the model's native side times "
                   "--image-side-factor; a larger value must be given here)")
    p.add_argument("--image-side-factor", type=int, default=2,
                   help="default --max-image-side as a multiple of the model's native side (default 2)")
    p.add_argument("--max-prompt-bytes", type=int, default=2048,
                   help="limit: longest prompt or negative prompt in UTF-8 bytes, checked before decoding (default 2048)")
    p.add_argument("--max-prompt-tokens", type=int, default=None,
                   help="limit: longest prompt or negative prompt in CLIP tokens, start and end included (default: the "
                   "model's text length, 77: a prompt the model would truncate is refused)")
    p.add_argument("--max-request-bytes", type=int, default=DEFAULT_MAX_REQUEST_BYTES,
                   help="limit: largest request in bytes (HTTP body: 413; gRPC message: RESOURCE_EXHAUSTED), "
                   "refused before it is read by fronts on --http-port and --grpc-port (Triton then listens on "
                   f"internal 127.0.0.1 ports); 0: no fronts, no limit (default {DEFAULT_MAX_REQUEST_BYTES}, 1 MiB)")
    p.add_argument("--default-plan", default="switch:0.5", help="plan when a request leaves it out (default switch:0.5)")
    p.add_argument("--drain-timeout", type=float, default=20.0,
                   help="first SIGTERM/SIGINT: seconds to answer the requests in flight, unload and exit (default "
                   "20); a second signal stops at once")
    p.add_argument("--exit-timeout", type=int, default=None,
                   help="Triton's own exit timeout in seconds (default: the drain timeout)")
    p.add_argument("--no-warmup", action="store_true", help="skip the small generation run before serving")
    p.set_defaults(func=run)


def _check_port(name: str, value: int) -> int:
    if not 1 <= value <= 65535:
        raise InvalidArgumentError(name, "a TCP port in [1, 65535]", value)
    return value


def _check_free(name: str, host: str, port: int) -> None:
    """Refuse a port something already listens on (Triton would fail only after a long start)."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise InvalidArgumentError("--host", "an address this machine can listen on", f"{host} ({e})") from None
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind(addr)
        except OSError as e:
            raise InvalidArgumentError(name, f"a free port on {host}", f"{port} ({e.strerror})") from None


def run(args: argparse.Namespace) -> int:
    from ..plans import GuidancePlan
    from .limits import ServeLimits
    from .server import ServeConfig

    # Cheap checks first: nothing is loaded until every argument is known to be good.
    ports = [_check_port(f"--{n}-port", getattr(args, f"{n}_port")) for n in ("http", "grpc", "metrics")]
    if len(set(ports)) != 3:
        raise InvalidArgumentError("--http-port/--grpc-port/--metrics-port", "three different ports", ports)
    if not args.host:
        raise InvalidArgumentError("--host", "an address such as 127.0.0.1", args.host)
    for name, port in zip(("--http-port", "--grpc-port", "--metrics-port"), ports):
        _check_free(name, args.host, port)
    if args.max_queue_delay_us < 0:
        raise InvalidArgumentError("--max-queue-delay-us", "an integer >= 0", args.max_queue_delay_us)
    if args.exit_timeout is not None and args.exit_timeout < 0:
        raise InvalidArgumentError("--exit-timeout", "an integer >= 0", args.exit_timeout)
    if not args.drain_timeout > 0:
        raise InvalidArgumentError("--drain-timeout", "a number of seconds > 0", args.drain_timeout)
    if not 1 <= args.instances <= 64:
        raise InvalidArgumentError("--instances", "an integer in [1, 64]", args.instances)
    if args.default_plan.strip().lower() != "auto":  # auto: the model's recommendation (cfgswitch.json)
        GuidancePlan.parse(args.default_plan)
    if args.max_rows is not None and not 2 <= args.max_rows <= 1024:
        raise InvalidArgumentError("--max-rows", "an integer in [2, 1024]", args.max_rows)
    if args.max_rows is not None and args.max_rows < 2 * args.max_batch and args.batching == "step":
        raise InvalidArgumentError("--max-rows", f"at least twice --max-batch ({2 * args.max_batch}: the largest "
                                   "request must fit guided)", args.max_rows)
    if args.max_request_bytes < 0:
        raise InvalidArgumentError("--max-request-bytes", "an integer >= 0 (0: no limit)", args.max_request_bytes)
    if args.threads is not None and not 1 <= args.threads <= 256:
        raise InvalidArgumentError("--threads", "an integer in [1, 256]", args.threads)
    limits = ServeLimits(max_steps=args.max_steps, max_batch=args.max_batch, max_image_side=args.max_image_side,
                         max_prompt_bytes=args.max_prompt_bytes, default_steps=args.default_steps,
                         default_plan=args.default_plan, image_side_factor=args.image_side_factor,
                         max_prompt_tokens=args.max_prompt_tokens)
    config = ServeConfig(host=args.host, http_port=args.http_port, grpc_port=args.grpc_port,
                         metrics_port=args.metrics_port, max_queue_delay_us=args.max_queue_delay_us,
                         exit_timeout_s=args.exit_timeout, instances=args.instances, drain_timeout_s=args.drain_timeout,
                         batching=args.batching, max_rows=args.max_rows, max_request_bytes=args.max_request_bytes)
    options = {k: v for k, v in (("device", args.device), ("dtype", args.dtype), ("mode", args.mode)) if v is not None}
    if options and args.backend not in (None, "torch"):
        raise InvalidArgumentError("--device/--dtype/--mode", "only with the torch backend", args.backend)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("listening on %s: the server is reachable from other machines (it has no authentication)", args.host)

    from ..default_model import resolve_model
    from ..sampler import Sampler
    from .server import serve

    model = resolve_model(args.model)
    logger.info("loading %s", Path(model))
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    from ..backends.registry import load_options

    backend, load_kw = load_options(model, args.backend, args.threads, **options)
    sampler = Sampler.load(model, backend=backend, **load_kw)
    answered = serve(sampler, config, limits, warmup=not args.no_warmup)
    # The interpreter's last collection walks every object (torch, diffusers: about 2 s here) inside the
    # drain budget; frozen objects are skipped. Every child process has exited by now.
    import gc

    gc.freeze()
    # 0: stopped with every request answered; 1: Triton died, or the drain timeout cut requests off.
    return 0 if answered else 1
