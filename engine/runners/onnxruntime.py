"""The ONNX Runtime backend: a bundle's graphs (its family's: four for SD, five for SDXL) run through IO binding.

Inputs are bound by pointer straight from the caller's torch tensors (cast only when
the graph's dtype differs), and outputs are bound to torch tensors allocated for the
result, so no numpy round trip and no ONNX Runtime allocation happens per step.
Results are float32 tensors on the provider's device (an fp16 bundle is cast at this
boundary, so the loop keeps its latents in float32): the CPU, or with the CUDA or TensorRT
provider the GPU, where inputs and outputs are bound directly (no host round trip per step).
Execution providers and their options are the user's choice, CPU by default.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch

from ..bundle import Bundle, check_bundle_request, verify_graphs
from ..errors import BackendUnavailableError, InvalidArgumentError
from ..io_specs import GraphSpec, graph_specs, resolve_shape, shape_env
from .base import Runners
from .folded_context import CONTEXT_INPUT, FoldedContextUNet, check_fold_option, folds, onnx_without_input, spec_without_context
from .graph_runners import GraphGuidedUNet, GraphPooledTextEncoder, GraphTextEncoder, GraphUNet, GraphVaeDecoder
from .ort_sessions import graph_file, open_sessions
from .ort_static import STATIC_GRAPHS, ShapeSessions, dimension_values, unet_bytes, use_static_shapes

logger = logging.getLogger(__name__)

ProviderArg = Union[str, Tuple[str, Dict[str, Any]]]
_TORCH = {"float32": torch.float32, "float16": torch.float16, "int64": torch.int64}
#: Providers that exist only in onnxruntime-gpu (or other special builds), with the extra that brings them.
_GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider", "ROCMExecutionProvider", "DmlExecutionProvider")
#: Short names accepted for the common providers.
_ALIASES = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}
CPU_EXTRA = "pip install 'cfgswitch[cpu]'"
GPU_EXTRA = "pip install 'cfgswitch[gpu]'"
#: The session config entry that ends a thread pool's spinning when a run ends (``stop_spinning``).
STOP_SPINNING_KEY = "session.force_spinning_stop"


def import_onnxruntime():
    """``import onnxruntime``, or a :class:`BackendUnavailableError` naming the extra to install."""
    try:
        return importlib.import_module("onnxruntime")
    except ImportError as e:
        raise BackendUnavailableError(
            f"backend 'onnxruntime' needs the onnxruntime package, which is not installed ({e}); "
            f"install it with: {CPU_EXTRA} (CPU) or {GPU_EXTRA} (CUDA)"
        ) from e


def check_providers(providers: Union[None, ProviderArg, Sequence[ProviderArg]], available: Sequence[str]) -> List[ProviderArg]:
    """The provider list to give ONNX Runtime (CPU when ``None``).

    Raises:
        InvalidArgumentError: a provider name ONNX Runtime does not know, or a malformed entry.
        BackendUnavailableError: a known provider missing from this build (names the extra).
    """
    if providers is None:
        return ["CPUExecutionProvider"]
    items = [providers] if isinstance(providers, (str, tuple)) else list(providers)
    if not items:
        raise InvalidArgumentError("providers", "a non-empty list of ONNX Runtime execution providers", providers)
    out: List[ProviderArg] = []
    for item in items:
        name = item[0] if isinstance(item, tuple) else item
        if not isinstance(name, str) or (isinstance(item, tuple) and (len(item) != 2 or not isinstance(item[1], dict))):
            raise InvalidArgumentError("providers", "provider names or (name, options dict) pairs", item)
        name = _ALIASES.get(name.lower(), name)
        if name not in available:
            if name in _GPU_PROVIDERS:
                raise BackendUnavailableError(
                    f"ONNX Runtime provider {name} is not in this onnxruntime build (available: {', '.join(available)}); "
                    f"install onnxruntime-gpu with: {GPU_EXTRA}"
                )
            raise InvalidArgumentError("providers", f"providers of this onnxruntime build ({', '.join(available)})", name)
        out.append((name, item[1]) if isinstance(item, tuple) else name)
    return out


#: Providers that compute on a CUDA device (inputs and outputs are then bound there, not on the host).
_CUDA_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")


def cache_folder() -> Path:
    """The cfgswitch cache folder: ``$CFGSWITCH_CACHE``, else ``~/.cache/cfgswitch``."""
    return Path(os.environ.get("CFGSWITCH_CACHE", Path.home() / ".cache" / "cfgswitch"))


def with_provider_defaults(chosen: Sequence[ProviderArg], bundle_name: str = "bundle") -> List[ProviderArg]:
    """``chosen`` with cfgswitch's defaults added to each provider's options (the user's options win).

    The TensorRT provider keeps its engine and timing caches in the cfgswitch cache folder
    (``ort-tensorrt/<bundle>``), so it does not rebuild its engines at every start.
    """
    out: List[ProviderArg] = []
    for item in chosen:
        name, opts = (item if isinstance(item, tuple) else (item, {}))
        if name == "TensorrtExecutionProvider":
            cache = str(cache_folder() / "ort-tensorrt" / bundle_name)
            opts = {"trt_engine_cache_enable": "True", "trt_engine_cache_path": cache, "trt_timing_cache_enable": "True",
                    "trt_timing_cache_path": cache, **opts}
        out.append((name, dict(opts)) if opts or isinstance(item, tuple) else name)
    return out


def binding_device(chosen: Sequence[ProviderArg]) -> torch.device:
    """Where inputs and outputs are bound: the CUDA device of a CUDA or TensorRT provider first in ``chosen``
    (its ``device_id`` option, default 0), else the CPU."""
    first = chosen[0] if chosen else "CPUExecutionProvider"
    name, opts = (first if isinstance(first, tuple) else (first, {}))
    if name in _CUDA_PROVIDERS:
        device_id = opts.get("device_id", 0)
        try:
            return torch.device("cuda", int(device_id))
        except (TypeError, ValueError):
            raise InvalidArgumentError(f"providers[{name}].device_id", "a CUDA device index", device_id) from None
    return torch.device("cpu")


def _numpy_dtype(name: str):
    import numpy as np

    return {"float32": np.float32, "float16": np.float16, "int64": np.int64}[name]


class OrtGraph:
    """One ONNX Runtime session of a bundle graph, called with torch tensors through IO binding.

    Args:
        session: an ``onnxruntime.InferenceSession``.
        spec (`GraphSpec`): the graph's interface (from :mod:`cfgswitch.io_specs`).
        model_dtype (`str`): the bundle's export dtype.
        factor (`int`): the VAE factor (to size the decoder's output).
        device (`torch.device`, defaults to the CPU): where inputs and outputs are bound (the
            provider's device: a CUDA provider reads and writes GPU memory, with no host copy).
        shaped (`ShapeSessions`, optional): per-shape sessions to run instead of ``session``
            (``session`` is then ``None``; see :mod:`cfgswitch.runners.ort_static`).
    """

    def __init__(self, session, spec: GraphSpec, model_dtype: str, factor: int,
                 device: torch.device = torch.device("cpu"), shaped: Optional[ShapeSessions] = None) -> None:
        self.session = session
        self.shaped = shaped
        self.spec = spec
        self.factor = factor
        self.device = device
        self._where = ("cuda", device.index or 0) if device.type == "cuda" else ("cpu", 0)
        self.in_dtypes = [t.resolved_dtype(model_dtype) for t in spec.inputs]
        self.out_dtypes = [t.resolved_dtype(model_dtype) for t in spec.outputs]

    def _env(self, tensors: Sequence[torch.Tensor]) -> Dict[str, int]:
        env: Dict[str, int] = {}
        for t, x in zip(self.spec.inputs, tensors):
            if x.dim() != len(t.shape):
                raise InvalidArgumentError(f"{self.spec.name}.{t.name}", f"a {len(t.shape)}-d tensor", tuple(x.shape))
            for d, n in zip(t.shape, x.shape):
                if isinstance(d, str) and d != "2B":
                    env[d] = int(n)
        if "h" in env:
            env["H"], env["W"] = env["h"] * self.factor, env["w"] * self.factor
        return env

    def __call__(self, *tensors: torch.Tensor) -> "torch.Tensor | Tuple[torch.Tensor, ...]":
        """Run the graph on torch tensors (moved to the binding device, cast and made contiguous as needed);
        returns its output as float32 on that device (a tuple for a graph with several outputs)."""
        if len(tensors) != len(self.spec.inputs):
            raise InvalidArgumentError(f"{self.spec.name} inputs", f"{len(self.spec.inputs)} tensors "
                                       f"({', '.join(self.spec.input_names)})", len(tensors))
        env = self._env(tensors)
        session = self.shaped.session_for(dimension_values(env)) if self.shaped is not None else self.session
        b = session.io_binding()  # per call: cheap, and concurrent callers (serving threads) stay apart
        kind, index = self._where
        keep = []
        for t, x, dt in zip(self.spec.inputs, tensors, self.in_dtypes):
            x = x.detach().to(device=self.device, dtype=_TORCH[dt]).contiguous()
            keep.append(x)  # alive until the run below returns
            b.bind_input(t.name, kind, index, _numpy_dtype(dt), tuple(x.shape), x.data_ptr())
        outs = []
        for t, dt in zip(self.spec.outputs, self.out_dtypes):
            y = torch.empty(resolve_shape(t.shape, env), dtype=_TORCH[dt], device=self.device)
            outs.append(y)
            b.bind_output(t.name, kind, index, _numpy_dtype(dt), tuple(y.shape), y.data_ptr())
        if kind == "cuda":
            torch.cuda.current_stream(self.device).synchronize()  # inputs written by torch are ready for ORT's stream
            b.synchronize_inputs()
        session.run_with_iobinding(b)
        if kind == "cuda":
            b.synchronize_outputs()
        outs = [y if y.dtype == torch.float32 else y.float() for y in outs]
        return outs[0] if len(outs) == 1 else tuple(outs)


def onnxruntime_runners(bundle: Bundle, providers: Union[None, ProviderArg, Sequence[ProviderArg]] = None,
                        threads: Optional[int] = None, verify_files: bool = True,
                        static_shapes: Optional[bool] = None, stop_spinning: bool = True,
                        precompile: bool = False, fold_uncond: bool = True) -> Runners:
    """The :class:`Runners` of a bundle on ONNX Runtime.

    Args:
        bundle (`Bundle`): a bundle read by :func:`cfgswitch.bundle.read_manifest`.
        providers (`str` or `list`, optional): execution providers in priority order (names or
            ``(name, options)`` pairs, the options passed to ONNX Runtime); ``None`` is
            ``["CPUExecutionProvider"]``. With a CUDA or TensorRT provider first, tensors are bound
            on its device (``device_id``) and latents stay there; the TensorRT provider's engine
            cache defaults to the cfgswitch cache folder (see :func:`with_provider_defaults`).
        threads (`int`, optional): intra-op threads per session (ONNX Runtime's default when ``None``).
        verify_files (`bool`, defaults to True): check each graph's size and sha256 against the manifest.
        static_shapes (`bool`, optional): run the UNet roles on sessions fixed to each input shape
            (opened on its first call; see :mod:`cfgswitch.runners.ort_static`). ``None``: yes on
            the CPU provider when the UNet takes at most 256 MiB, else one dynamic session.
        stop_spinning (`bool`, defaults to True): each session's thread pool stops spinning when
            its run ends (ONNX Runtime's ``session.force_spinning_stop``), so the next call, on
            another session, has the cores (docs/export.md, "Spinning between sessions").
        precompile (`bool`, defaults to False): with static shapes, open the UNet roles' session
            for each batch size and image size of the bundle now, instead of on each shape's first
            call (other row counts, such as the step engine's, still open on first use).
        fold_uncond (`bool`, defaults to True): with static shapes (and the ``onnx`` package), late
            calls on the empty prompt's embedding run a UNet with that embedding folded in
            (:mod:`cfgswitch.runners.folded_context`); other late calls run the plain graph.

    Raises:
        BackendUnavailableError: onnxruntime, or a requested provider, is not installed.
        InvalidArgumentError: a bad provider, thread count, ``static_shapes``, ``stop_spinning``,
            ``precompile`` or ``fold_uncond``.
        BundleError: a graph file is missing, truncated or replaced.
    """
    ort = import_onnxruntime()
    chosen = check_providers(providers, ort.get_available_providers())
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise InvalidArgumentError("threads", "a positive integer (or None for ONNX Runtime's default)", threads)
    names = bundle.graph_names  # the family's graphs
    if verify_files:
        verify_graphs(bundle, names)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads is not None:
        opts.intra_op_num_threads = threads
    for name, flag in (("stop_spinning", stop_spinning), ("precompile", precompile)):
        if not isinstance(flag, bool):
            raise InvalidArgumentError(name, "True or False", flag)
    check_fold_option(fold_uncond)
    if stop_spinning:
        opts.add_session_config_entry(STOP_SPINNING_KEY, "1")
    dims = bundle.dims
    specs = graph_specs(dims)
    chosen = with_provider_defaults(chosen, bundle.path.name)
    device = binding_device(chosen)
    provider_names = [c[0] if isinstance(c, tuple) else c for c in chosen]
    provider_options = [c[1] if isinstance(c, tuple) else {} for c in chosen]
    static = use_static_shapes(static_shapes, provider_names, unet_bytes(bundle.graph_entry("unet")))
    shaped = {name: ShapeSessions(ort, graph_file(bundle, name), opts, provider_names, provider_options)
              for name in STATIC_GRAPHS if static and name in names}
    sessions = open_sessions(ort, bundle, [n for n in names if n not in shaped], opts, provider_names, provider_options)
    graphs: Dict[str, OrtGraph] = {
        name: OrtGraph(sessions.get(name), specs[name], bundle.dtype, dims.vae_scale_factor, device, shaped.get(name))
        for name in names
    }
    if precompile:
        for name, shaped_sessions in shaped.items():
            for height, width in bundle.image_sizes:
                for b in bundle.batch_sizes:
                    shaped_sessions.session_for(dimension_values(shape_env(b, height, width, dims.vae_scale_factor)))
    folded = static and folds(fold_uncond, bundle.family) and "unet" in shaped
    if folded and importlib.util.find_spec("onnx") is None:
        logger.info("onnxruntime: the late role's context is not folded (the onnx package is not installed)")
        folded = False
    if folded:
        fold = _ort_fold(ort, graph_file(bundle, "unet"), opts, provider_names, provider_options, specs["unet"],
                         bundle.dtype, dims.vae_scale_factor, device, bundle.image_sizes if precompile else [])
        unet = FoldedContextUNet(graphs["unet"], fold, bundle.batch_sizes if precompile else ())
    else:
        unet = GraphUNet(graphs["unet"])
    used = graphs["text_encoder"].session.get_providers()
    logger.info("onnxruntime %s: providers %s, %s threads, UNet %s", ort.__version__, ", ".join(used),
                threads or "default", "per shape" if static else "dynamic")

    def check_request(batch: int, height: int, width: int) -> None:
        check_bundle_request(bundle, batch, height, width, exact_batch=False)

    return Runners(
        text_encoder=GraphTextEncoder(graphs["text_encoder"]),
        unet_cfg=GraphGuidedUNet(graphs["unet_cfg"], pair_graph=graphs["unet"]),  # ORT: any row count
        unet=unet,
        vae_decoder=GraphVaeDecoder(graphs["vae_decoder"]),
        backend="onnxruntime",
        device=device,
        dtype=torch.float32,
        info={"bundle": str(bundle.path), "bundle_dtype": bundle.dtype, "providers": used,
              "threads": threads, "onnxruntime": ort.__version__, "static_shapes": static,
              "stop_spinning": stop_spinning, "fold_uncond": folded},
        check_request=check_request,
        text_encoder_2=GraphPooledTextEncoder(graphs["text_encoder_2"]) if "text_encoder_2" in graphs else None,
    )


def _ort_fold(ort: Any, path: Path, options: Any, providers: Sequence[str], provider_options: Sequence[Dict[str, Any]],
              spec: GraphSpec, model_dtype: str, factor: int, device: torch.device,
              image_sizes: Sequence[Tuple[int, int]] = ()):
    """The ONNX Runtime ``fold(context_rows)`` of :class:`FoldedContextUNet`: per-shape sessions of the
    ``unet`` graph at ``path`` with the context as an initializer (cast to the bundle's dtype); the
    sessions of ``image_sizes`` (``(height, width)`` in pixels, the ``precompile`` option) open at once."""
    model_bytes = onnx_without_input(path)
    folded_spec = spec_without_context(spec)
    context_dtype = next(t for t in spec.inputs if t.name == CONTEXT_INPUT).resolved_dtype(model_dtype)

    def fold(context: torch.Tensor) -> OrtGraph:
        value = context.numpy().astype(_numpy_dtype(context_dtype))
        shaped = ShapeSessions(ort, path, options, providers, provider_options, model=model_bytes(value))
        for height, width in image_sizes:
            shaped.session_for(dimension_values(shape_env(int(context.shape[0]), height, width, factor)))
        return OrtGraph(None, folded_spec, model_dtype, factor, device, shaped)

    return fold


__all__ = ["OrtGraph", "binding_device", "cache_folder", "check_providers", "import_onnxruntime", "onnxruntime_runners",
           "with_provider_defaults"]
