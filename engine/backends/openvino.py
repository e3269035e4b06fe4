"""The OpenVINO backend: a bundle's ONNX graphs, each role compiled for static shapes.

OpenVINO reads ONNX directly, so the bundle ``cfgswitch export`` wrote serves as it is. Each
role is its own compiled model: the ``cfg`` role is the guided graph (``unet_cfg``, 2B UNet
rows inside), the ``late`` role the plain UNet at B rows (on the empty prompt's embedding, the
UNet with that embedding folded in: ``fold_uncond``, :mod:`cfgswitch.runners.folded_context`),
plus the text encoder and the VAE decoder. A graph is compiled for the static shape of each call on its first use (per batch
size, image size, or step-engine row bucket) and reused after that; static shapes give
OpenVINO's CPU plugin its fastest kernels.

Compiled blobs are cached through OpenVINO's ``CACHE_DIR`` in the cfgswitch cache folder
(``$CFGSWITCH_CACHE``, by default ``~/.cache/cfgswitch``), under ``openvino/<graph>-<key>``
where the key hashes the graph's sha256, the OpenVINO version and the device (CPU) name;
inside it OpenVINO names each blob by shape and settings. A new OpenVINO, another CPU or a
re-exported graph therefore never reads an old blob.

Threads per role (``threads``):

- ``None``: OpenVINO's default (its latency hint uses every physical core) for every role.
- an ``int``: that many threads for every role.
- a mapping ``{"cfg": 2, "late": 1, ...}`` (roles ``text_encoder``, ``cfg``, ``late``,
  ``vae_decoder``): per role; roles left out get OpenVINO's default.
- ``"auto"``: the rule of :func:`auto_threads`: a UNet call gets one thread per UNet row, up
  to the usable cores (so a 1-row ``late`` call at batch 1 runs on one thread, the 2-row
  ``cfg`` call on two), the text encoder and VAE every usable core. A single row does not
  split well across cores (issue 17 found the 1-row late call gaining little from a second
  thread), and a core it leaves free serves another request in serving. The rule is not
  tuned by measurement here; a per-role mapping overrides it.

Results are float32 CPU torch tensors, fresh for every call (an fp16 bundle is cast at this
boundary). Precision defaults to ``f32`` (OpenVINO would pick bf16 on CPUs that have it,
which changes images by far more than the backends' agreement).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import threading
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..bundle import Bundle, check_bundle_request, verify_graphs
from ..errors import BackendUnavailableError, InvalidArgumentError
from ..io_specs import GraphSpec, graph_specs, resolve_shape, shape_env
from ..runners.base import Runners
from ..runners.folded_context import CONTEXT_INPUT, FoldedContextUNet, check_fold_option, folds, spec_without_context
from ..runners.graph_runners import GraphGuidedUNet, GraphPooledTextEncoder, GraphTextEncoder, GraphUNet, GraphVaeDecoder

logger = logging.getLogger(__name__)

OPENVINO_EXTRA = "pip install 'cfgswitch[openvino]'"
#: The role each bundle graph serves (the ``threads`` mapping's keys).
GRAPH_ROLES: Dict[str, str] = {"text_encoder": "text_encoder", "text_encoder_2": "text_encoder", "unet_cfg": "cfg",
                               "unet": "late", "vae_decoder": "vae_decoder"}
_ROLES: Tuple[str, ...] = tuple(dict.fromkeys(GRAPH_ROLES.values()))
#: ``precision`` values and OpenVINO's ``INFERENCE_PRECISION_HINT`` for each.
PRECISIONS: Dict[str, str] = {"f32": "f32", "bf16": "bf16", "f16": "f16"}
#: ``hint`` values and OpenVINO's ``PERFORMANCE_HINT`` for each.
HINTS: Dict[str, str] = {"latency": "LATENCY", "throughput": "THROUGHPUT"}
ThreadsArg = Union[None, int, str, Mapping[str, Optional[int]]]


def import_openvino():
    """``import openvino``, or a :class:`BackendUnavailableError` naming the extra to install."""
    try:
        return importlib.import_module("openvino")
    except ImportError as e:
        raise BackendUnavailableError(
            f"backend 'openvino' needs the openvino package, which is not installed ({e}); install it with: {OPENVINO_EXTRA}"
        ) from e


def default_cache_root() -> Path:
    """The cfgswitch cache folder: ``$CFGSWITCH_CACHE``, else ``~/.cache/cfgswitch``."""
    return Path(os.environ.get("CFGSWITCH_CACHE", Path.home() / ".cache" / "cfgswitch"))


def blob_cache_key(graph_sha256: str, openvino_version: str, device_name: str) -> str:
    """Hex sha256 of what makes a compiled blob valid: the graph, the OpenVINO version, the device."""
    payload = {"graph_sha256": graph_sha256, "openvino_version": str(openvino_version), "device": str(device_name)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - macOS, Windows
        return max(1, os.cpu_count() or 1)


def auto_threads(role: str, unet_rows: int, cores: int) -> int:
    """The ``threads="auto"`` rule: one thread per UNet row up to ``cores``; all cores for the rest.

    Args:
        role (`str`): ``text_encoder``, ``cfg``, ``late`` or ``vae_decoder``.
        unet_rows (`int`): UNet rows of the call (2B for ``cfg``, the row count for ``late``).
        cores (`int`): usable cores.
    """
    if role in ("cfg", "late"):
        return max(1, min(cores, unet_rows))
    return max(1, cores)


def check_threads(threads: ThreadsArg) -> ThreadsArg:
    """Validate the ``threads`` option (see the module docstring).

    Raises:
        InvalidArgumentError: names ``threads`` (or ``threads[role]``), what is accepted and what came.
    """
    def positive(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 1

    if threads is None or threads == "auto" or positive(threads):
        return threads
    if isinstance(threads, Mapping):
        for role, value in threads.items():
            if role not in _ROLES:
                raise InvalidArgumentError("threads", f"roles among {', '.join(_ROLES)}", role)
            if value is not None and not positive(value):
                raise InvalidArgumentError(f"threads[{role!r}]", "a positive integer or None", value)
        return dict(threads)
    raise InvalidArgumentError("threads", "None, a positive integer, 'auto' or a mapping of role to threads", threads)


class OvGraph:
    """One bundle graph on OpenVINO, compiled per static input shape on first use.

    Args:
        core: an ``openvino.Core``.
        model: the graph read by ``core.read_model`` (kept dynamic; each shape compiles a clone).
        spec (`GraphSpec`): the graph's interface (from :mod:`cfgswitch.io_specs`).
        device (`str`): the OpenVINO device (``CPU``).
        config (`dict`): compile properties shared by every shape (hint, precision, cache folder).
        threads (`callable`): ``threads(unet_rows) -> int or None`` for a shape (``None``: OpenVINO's default).
    """

    def __init__(self, core, model, spec: GraphSpec, device: str, config: Dict[str, Any], threads) -> None:
        self.core, self.model, self.spec, self.device, self.config = core, model, spec, device, config
        self.threads = threads
        self._compiled: Dict[Tuple[Tuple[int, ...], ...], Tuple[Any, ...]] = {}
        self._compile_lock = threading.Lock()

    def compiled_shapes(self) -> Dict[Tuple[Tuple[int, ...], ...], Dict[str, Any]]:
        """``{input shapes: {"threads": n, "from_cache": bool}}`` of every shape compiled so far.

        ``from_cache`` says whether OpenVINO read the compiled blob from the cache folder
        (``None`` on an OpenVINO that does not report it).
        """
        return {k: {"threads": int(c.get_property("INFERENCE_NUM_THREADS")), "from_cache": _from_cache(c)}
                for k, (c, *_) in self._compiled.items()}

    def _check(self, tensors: Sequence[torch.Tensor]) -> Tuple[Tuple[int, ...], ...]:
        if len(tensors) != len(self.spec.inputs):
            raise InvalidArgumentError(f"{self.spec.name} inputs", f"{len(self.spec.inputs)} tensors", len(tensors))
        for t, x in zip(self.spec.inputs, tensors):
            want = f"shape {tuple(t.shape)}"
            if x.dim() != len(t.shape) or any(isinstance(d, int) and d != n for d, n in zip(t.shape, x.shape)):
                raise InvalidArgumentError(f"{self.spec.name}.{t.name}", want, tuple(x.shape))
        return tuple(tuple(int(n) for n in x.shape) for x in tensors)

    def compiled_for(self, shapes: Tuple[Tuple[int, ...], ...]):
        """``(compiled model, infer request, lock)`` for static input ``shapes``, compiled on first use."""
        with self._compile_lock:
            if shapes in self._compiled:
                return self._compiled[shapes]
            model = self.model.clone()
            model.reshape({t.name: list(s) for t, s in zip(self.spec.inputs, shapes)})
            config = dict(self.config)
            # UNet rows: the embedding's (2B for unet_cfg); a folded unet has no embedding input
            rows = shapes[2][0] if self.spec.name in ("unet", "unet_cfg") and len(shapes) > 2 else shapes[0][0]
            n = self.threads(rows)
            if n is not None:
                config["INFERENCE_NUM_THREADS"] = n
            compiled = self.core.compile_model(model, self.device, config)
            request = compiled.create_infer_request()
            # The request's own tensors, viewed from torch once: each call copies into them and out of
            # them (binding fresh tensors per call cost ~0.25 ms of a ~5 ms UNet call here).
            ins = [torch.from_numpy(request.get_tensor(t.name).data) for t in self.spec.inputs]
            outs = [torch.from_numpy(request.get_tensor(t.name).data) for t in self.spec.outputs]
            entry = (compiled, request, threading.Lock(), ins, outs)
            self._compiled[shapes] = entry
            logger.info("openvino %s: compiled for %s (%s threads%s)", self.spec.name, shapes,
                        compiled.get_property("INFERENCE_NUM_THREADS"), ", from the blob cache" if _from_cache(compiled) else "")
            return entry

    def __call__(self, *tensors: torch.Tensor) -> "torch.Tensor | Tuple[torch.Tensor, ...]":
        """Run the graph on torch tensors (cast and made contiguous as needed); returns a fresh float32 tensor
        (a tuple of them for a graph with several outputs, SDXL's ``text_encoder_2``)."""
        shapes = self._check(tensors)
        _, request, lock, ins, outs = self._compiled.get(shapes) or self.compiled_for(shapes)
        with lock:  # one infer request per shape: concurrent callers (serving threads) take turns
            for view, x in zip(ins, tensors):  # copy_ casts (an fp16 bundle) and reads any layout
                view.copy_(x.detach())
            request.infer()
            ys = [y.float() if y.dtype != torch.float32 else y.clone() for y in outs]
        return ys[0] if len(ys) == 1 else tuple(ys)


def _from_cache(compiled) -> Optional[bool]:
    try:
        return bool(compiled.get_property("LOADED_FROM_CACHE"))
    except RuntimeError:  # pragma: no cover - OpenVINO before 2024 has no such property
        return None


def _device(core, device: Any) -> str:
    available = list(core.available_devices)
    if not isinstance(device, str) or device.upper() not in available:
        raise InvalidArgumentError("device", f"an OpenVINO device of this machine ({', '.join(available)})", device)
    return device.upper()


def _choice(name: str, value: Any, table: Mapping[str, str]) -> str:
    if value not in table:
        raise InvalidArgumentError(name, f"one of {', '.join(repr(k) for k in table)}", value)
    return table[value]


def _cache_folder(cache_dir: Any) -> Optional[Path]:
    if cache_dir is False:
        return None
    if cache_dir is None:
        return default_cache_root() / "openvino"
    if isinstance(cache_dir, (str, os.PathLike)):
        return Path(cache_dir)
    raise InvalidArgumentError("cache_dir", "a folder path, None (the cfgswitch cache) or False (no blob cache)", cache_dir)


def openvino_runners(bundle: Bundle, device: str = "CPU", threads: ThreadsArg = None, precision: str = "f32",
                     hint: str = "latency", cache_dir: Union[None, bool, str, os.PathLike] = None,
                     precompile: bool = False, verify_files: bool = True, fold_uncond: bool = True) -> Runners:
    """The :class:`Runners` of a bundle on OpenVINO, each role compiled for static shapes on first use.

    Args:
        bundle (`Bundle`): a bundle read by :func:`cfgswitch.bundle.read_manifest`.
        device (`str`, defaults to ``"CPU"``): the OpenVINO device.
        threads (`int`, `str` or `dict`, optional): threads per role (see the module docstring):
            ``None`` (OpenVINO's default), an int, ``"auto"`` or ``{role: threads}``.
        precision (`str`, defaults to ``"f32"``): ``f32`` (matches the other backends), ``bf16`` or
            ``f16`` (faster where the CPU has them; images then differ by more than the parity bound).
        hint (`str`, defaults to ``"latency"``): OpenVINO's performance hint, ``latency`` or ``throughput``.
        cache_dir (`str` or `Path`, optional): where compiled blobs go; ``None`` is
            ``$CFGSWITCH_CACHE/openvino``, ``False`` disables the blob cache.
        precompile (`bool`, defaults to False): compile every graph now for each batch size and image
            size of the bundle (see :func:`bundle_shapes`), instead of on each shape's first use.
        verify_files (`bool`, defaults to True): check each graph's size and sha256 against the manifest.
        fold_uncond (`bool`, defaults to True): late calls on the empty prompt's embedding run a
            UNet with that embedding folded in as a constant (:mod:`cfgswitch.runners.folded_context`);
            other late calls run the plain graph.

    Raises:
        BackendUnavailableError: openvino is not installed (names the extra).
        InvalidArgumentError: a bad device, thread count, precision, hint, cache folder, ``precompile``,
            ``verify_files`` or ``fold_uncond``.
        BundleError: a graph file is missing, truncated or replaced.
    """
    ov = import_openvino()
    threads = check_threads(threads)
    for name, flag in (("verify_files", verify_files), ("precompile", precompile)):
        if flag is not True and flag is not False:
            raise InvalidArgumentError(name, "True or False", flag)
    check_fold_option(fold_uncond)
    core = ov.Core()
    dev = _device(core, device)
    base = {"PERFORMANCE_HINT": _choice("hint", hint, HINTS),
            "INFERENCE_PRECISION_HINT": _choice("precision", precision, PRECISIONS)}
    folder = _cache_folder(cache_dir)
    names = bundle.graph_names  # the family's graphs (SDXL: text_encoder_2 too)
    if verify_files:
        verify_graphs(bundle, names)
    version = ov.get_version()
    device_name = str(core.get_property(dev, "FULL_DEVICE_NAME"))
    cores = usable_cores()
    specs = graph_specs(bundle.dims)
    graphs: Dict[str, OvGraph] = {}
    caches: Dict[str, str] = {}
    for name in names:
        role = GRAPH_ROLES[name]
        config = dict(base)
        if folder is not None:
            key = blob_cache_key(bundle.graph_entry(name)["sha256"], version, device_name)
            caches[name] = str(folder / f"{name}-{key[:16]}")
            config["CACHE_DIR"] = caches[name]
        graphs[name] = OvGraph(core, core.read_model(str(bundle.graph_path(name))), specs[name],
                               dev, config, _role_threads(threads, role, cores))
    logger.info("openvino %s on %s (%s): threads %s, precision %s, hint %s", version, dev, device_name,
                threads if threads is not None else "default", precision, hint)
    if precompile:
        for name, shapes in bundle_shapes(bundle):
            graphs[name].compiled_for(shapes)

    folded = folds(fold_uncond, bundle.family)
    if folded:
        sizes = bundle.image_sizes if precompile else []
        unet = FoldedContextUNet(graphs["unet"], _ov_fold(ov, core, graphs["unet"], bundle, sizes),
                                 bundle.batch_sizes if precompile else ())
    else:
        unet = GraphUNet(graphs["unet"])

    def check_request(batch: int, height: int, width: int) -> None:
        check_bundle_request(bundle, batch, height, width, exact_batch=False)

    return Runners(
        text_encoder=GraphTextEncoder(graphs["text_encoder"]),
        unet_cfg=GraphGuidedUNet(graphs["unet_cfg"]),
        unet=unet,
        vae_decoder=GraphVaeDecoder(graphs["vae_decoder"]),
        backend="openvino",
        device=torch.device("cpu"),
        dtype=torch.float32,
        info={"bundle": str(bundle.path), "bundle_dtype": bundle.dtype, "openvino": version, "device": dev,
              "device_name": device_name, "threads": threads, "precision": precision, "hint": hint,
              "cache_dirs": caches, "fold_uncond": folded},
        check_request=check_request,
        text_encoder_2=GraphPooledTextEncoder(graphs["text_encoder_2"]) if "text_encoder_2" in graphs else None,
    )


def fold_parameter(ov, model, name: str, value: np.ndarray):
    """A copy of OpenVINO ``model`` with parameter ``name`` replaced by a constant holding ``value``
    (cast to the parameter's element type); OpenVINO folds what depends only on it when it compiles.

    Raises:
        InvalidArgumentError: ``model`` has no parameter ``name``.
    """
    out = model.clone()
    params = [p for p in out.get_parameters() if name in p.output(0).get_names()]
    if not params:
        raise InvalidArgumentError("model parameters", f"one named {name!r}",
                                   [sorted(p.output(0).get_names()) for p in out.get_parameters()])
    param = params[0]
    const = ov.op.Constant(ov.Tensor(np.ascontiguousarray(value.astype(param.get_element_type().to_dtype()))))
    for target in list(param.output(0).get_target_inputs()):
        target.replace_source_output(const.output(0))
    out.remove_parameter(param)
    out.validate_nodes_and_infer_types()
    return out


def _ov_fold(ov, core, graph: OvGraph, bundle: Bundle, image_sizes: Sequence[Tuple[int, int]]):
    """OpenVINO's ``fold(context_rows)`` of :class:`FoldedContextUNet`: the ``unet`` model with the
    context as a constant, compiled per shape like any graph (``image_sizes``: compiled at once)."""
    spec = spec_without_context(graph.spec)

    def fold(context: torch.Tensor) -> OvGraph:
        folded = OvGraph(core, fold_parameter(ov, graph.model, CONTEXT_INPUT, context.numpy()), spec, graph.device,
                         graph.config, graph.threads)
        for height, width in image_sizes:
            env = shape_env(int(context.shape[0]), height, width, bundle.dims.vae_scale_factor)
            folded.compiled_for(tuple(tuple(resolve_shape(t.shape, env)) for t in spec.inputs))
        return folded

    return fold


def bundle_shapes(bundle: Bundle) -> List[Tuple[str, Tuple[Tuple[int, ...], ...]]]:
    """``[(graph, input shapes)]`` a request at each of the bundle's batch and image sizes runs.

    The text encoders at B prompts, the ``cfg`` role at B latents (2B embedding rows, and 2B rows
    of SDXL's added conditioning), the ``late`` role and the VAE decoder at B rows.
    """
    d = bundle.dims
    specs = graph_specs(d)
    out: List[Tuple[str, Tuple[Tuple[int, ...], ...]]] = []
    for height, width in bundle.image_sizes:
        for b in bundle.batch_sizes:
            env = shape_env(b, height, width, d.vae_scale_factor)
            out += [(name, tuple(resolve_shape(t.shape, env) for t in spec.inputs)) for name, spec in specs.items()]
    return out


def _role_threads(threads: ThreadsArg, role: str, cores: int):
    """``rows -> threads or None`` for one role under the (checked) ``threads`` option."""
    if threads == "auto":
        return lambda rows: auto_threads(role, rows, cores)
    if isinstance(threads, dict):
        value = threads.get(role)
        return lambda rows: value
    return lambda rows: threads


__all__ = ["GRAPH_ROLES", "HINTS", "OPENVINO_EXTRA", "OvGraph", "PRECISIONS", "auto_threads", "blob_cache_key", "bundle_shapes",
           "check_threads", "default_cache_root", "fold_parameter", "import_openvino", "openvino_runners", "usable_cores"]
