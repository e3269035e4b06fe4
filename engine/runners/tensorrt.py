"""The TensorRT backend: plans built by ``cfgswitch build``, run with torch CUDA tensors as buffers.

Decisions come first, as pure functions that need neither TensorRT nor a GPU (and are
tested without them): which layout to load, whether a plan fits the running TensorRT
flavour, version and GPU (checked before any plan is deserialised), which optimization
profile serves a request. The runtime below them uses the TensorRT Python API, the same for
full TensorRT and TensorRT for RTX (the flavour recorded in the manifest is imported):

- one execution context per role (``set_optimization_profile_async`` selects the role's
  profile, which is what makes the ``shared`` layout work); the contexts of one engine share
  one user-managed device-memory block, since roles never run at once;
- work is enqueued on a CUDA stream of the backend's own (ordered after the caller's stream
  and before it again), never on the legacy default stream;
- every ``set_optimization_profile_async``, ``set_input_shape`` and ``set_tensor_address``
  result is checked and a refusal raises :class:`~cfgswitch.errors.EngineExecutionError`
  naming the tensor and the shape;
- with CUDA graphs, each (role, input shape) gets its own execution context, bound once and
  captured once, so a graph is never replayed on a context that other shapes re-bound.

Engines are never built here (``cfgswitch build`` does that).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from ..backends.trt_flavour import FLAVOURS, import_flavour
from ..bundle import Bundle, verify_file
from ..errors import BackendUnavailableError, BundleError, EngineExecutionError, EngineMismatchError
from ..io_specs import COMPONENTS, Profile, graph_spec, resolve_shape, role_binding, select_profile
from .base import Runners
from .tensorrt_decisions import (  # noqa: F401 - re-exported: cfgswitch.runners.tensorrt keeps its API
    build_command, check_engine_compat, check_engine_request, choose_layout, role_profiles, split_rows)

logger = logging.getLogger(__name__)

GPU_EXTRA = "pip install 'cfgswitch[gpu]'"
_TORCH = {"float32": torch.float32, "float16": torch.float16, "int64": torch.int64}


# ============================================================ runtime
def import_tensorrt(flavour: str = "tensorrt"):
    """Import the TensorRT ``flavour`` (``tensorrt`` or ``tensorrt-rtx``), or a :class:`BackendUnavailableError` naming the extra."""
    try:
        return import_flavour(flavour, for_polygraphy=False)
    except BackendUnavailableError as e:
        raise BackendUnavailableError(f"backend 'tensorrt' needs {flavour}: {e}") from e.__cause__


def _checked(ok: Any, what: str) -> None:
    if ok is False or ok is None:
        raise EngineExecutionError(f"TensorRT refused {what}")


class TrtRole:
    """One component served by a plan's profiles, on execution contexts of that plan.

    Work runs on ``stream`` (the backend's own), ordered after the caller's current stream
    and before it again. Eagerly, one context serves every shape. With ``cuda_graphs``, each
    input shape gets its own context, bound once, run once eagerly (as TensorRT requires
    before capture) and captured once; later calls copy into its static inputs and replay.

    Args:
        engine: a deserialised ``ICudaEngine``.
        component (`str`): ``text_encoder``, ``cfg``, ``late`` or ``vae_decoder``.
        graph (`str`): the graph the plan was built from (names its tensors).
        indices, profiles: the component's profile indices and all the plan's profiles.
        dims, model_dtype, cuda_graphs: model dims, bundle dtype, capture CUDA graphs.
        stream (`torch.cuda.Stream`): the backend's stream.
        memory (`callable`, optional): ``memory(context)`` gives a context created with the
            user-managed strategy the engine's shared device-memory block.
        trt: the TensorRT module (for the allocation strategy enum).
    """

    def __init__(self, engine, component: str, graph: str, indices: List[int], profiles: List[Profile], dims,
                 model_dtype: str, cuda_graphs: bool, stream: "torch.cuda.Stream", memory=None, trt=None) -> None:
        self.engine, self.trt, self.memory = engine, trt, memory
        self.component, self.indices, self.profiles = component, indices, profiles
        self.spec = graph_spec(graph, dims)
        self.factor = dims.vae_scale_factor
        self.row_factor = 2 if (graph == "unet" and component == "cfg") else 1
        self.in_dtypes = [_TORCH[t.resolved_dtype(model_dtype)] for t in self.spec.inputs]
        self.out_dtype = _TORCH[self.spec.outputs[0].resolved_dtype(model_dtype)]
        self.cuda_graphs = cuda_graphs
        self.stream = stream
        self.context = None if cuda_graphs else self._new_context()
        self.profile: Optional[int] = None
        #: shape key -> (context, graph, static inputs, static output): one graph per (context, shape)
        self.graphs: Dict[Tuple, Tuple[Any, Any, List[torch.Tensor], torch.Tensor]] = {}
        self.supported_rows = sorted({b for i in indices for b in range(profiles[i].batch[0], profiles[i].batch[2] + 1)})

    def _new_context(self):
        strategy = getattr(getattr(self.trt, "ExecutionContextAllocationStrategy", None), "USER_MANAGED", None)
        if self.memory is not None and strategy is not None:
            context = self.engine.create_execution_context(strategy)
            if context is not None:
                self.memory(context)
        else:
            context = self.engine.create_execution_context()
        if context is None:
            raise EngineExecutionError(f"TensorRT {self.component}: create_execution_context returned None "
                                       "(out of GPU memory, or the plan does not fit this GPU)")
        return context

    def _env(self, tensors: Sequence[torch.Tensor]) -> Dict[str, int]:
        env = {d: int(n) for t, x in zip(self.spec.inputs, tensors) for d, n in zip(t.shape, x.shape)
               if isinstance(d, str) and d != "2B"}
        if "h" in env:
            env["H"], env["W"] = env["h"] * self.factor, env["w"] * self.factor
        return env

    def _profile_for(self, images: int, height: int, width: int) -> int:
        idx = select_profile(self.profiles, self.component, images, height, width)
        if idx is None or idx not in self.indices:
            raise BundleError(f"TensorRT {self.component}: no profile covers {images} image(s) at {height}x{width}")
        return idx

    def _select(self, context, idx: int) -> None:
        _checked(context.set_optimization_profile_async(idx, self.stream.cuda_stream),
                 f"{self.component}: optimization profile {idx} (set_optimization_profile_async)")

    def _bind(self, context, inputs: Sequence[torch.Tensor], out: torch.Tensor) -> None:
        for t, x in zip(self.spec.inputs, inputs):
            _checked(context.set_input_shape(t.name, tuple(x.shape)),
                     f"{self.component}: input {t.name} of shape {tuple(x.shape)} (set_input_shape; outside the profile?)")
            _checked(context.set_tensor_address(t.name, x.data_ptr()),
                     f"{self.component}: the address of input {t.name} of shape {tuple(x.shape)} (set_tensor_address)")
        name = self.spec.outputs[0].name
        _checked(context.set_tensor_address(name, out.data_ptr()),
                 f"{self.component}: the address of output {name} of shape {tuple(out.shape)} (set_tensor_address)")

    def _execute(self, context) -> None:
        if not context.execute_async_v3(self.stream.cuda_stream):
            raise EngineExecutionError(f"TensorRT {self.component}: execute_async_v3 failed")

    def __call__(self, *tensors: torch.Tensor) -> torch.Tensor:
        """Run on tensors (moved to the GPU and cast to the plan's dtypes); returns a new float32 GPU tensor."""
        caller = torch.cuda.current_stream()
        xs = [x.to(device="cuda", dtype=dt).contiguous() for x, dt in zip(tensors, self.in_dtypes)]
        env = self._env(xs)
        if self.component == "text_encoder":
            height, width = self.profiles[self.indices[0]].image_size[1]
        else:
            height, width = env["h"] * self.factor, env["w"] * self.factor
        idx = self._profile_for(xs[0].shape[0] // self.row_factor, height, width)
        out_shape = resolve_shape(self.spec.outputs[0].shape, env)
        self.stream.wait_stream(caller)  # inputs were written on the caller's stream
        if not self.cuda_graphs:
            out = torch.empty(out_shape, dtype=self.out_dtype, device="cuda")
            with torch.cuda.stream(self.stream):
                if idx != self.profile:
                    self._select(self.context, idx)
                    self.profile = idx
                self._bind(self.context, xs, out)
                self._execute(self.context)
            for x in (*xs, out):
                x.record_stream(self.stream)
            caller.wait_stream(self.stream)
            return out.to(torch.float32)
        key = tuple(tuple(x.shape) for x in xs)
        if key not in self.graphs:
            self.graphs[key] = self._capture(xs, idx, out_shape)
        _, graph, static_in, static_out = self.graphs[key]
        with torch.cuda.stream(self.stream):
            for dst, src in zip(static_in, xs):
                dst.copy_(src)
            graph.replay()
            result = static_out.to(torch.float32, copy=True)  # the next replay overwrites static_out
        for x in xs:
            x.record_stream(self.stream)
        result.record_stream(caller)  # made on the backend's stream, read on the caller's
        caller.wait_stream(self.stream)
        return result

    def _capture(self, xs: Sequence[torch.Tensor], idx: int, out_shape) -> Tuple[Any, Any, List[torch.Tensor], torch.Tensor]:
        context = self._new_context()
        with torch.cuda.stream(self.stream):
            static_in = [x.clone() for x in xs]
            static_out = torch.empty(out_shape, dtype=self.out_dtype, device="cuda")
            self._select(context, idx)
            self._bind(context, static_in, static_out)
            self._execute(context)  # settles shapes and lazy allocations before capture
        self.stream.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=self.stream):
            self._execute(context)
        return context, graph, static_in, static_out


class _Chunked:
    """Runs a role on row chunks it supports (see :func:`split_rows`)."""

    def __init__(self, role: TrtRole) -> None:
        self.role = role

    def run(self, *tensors: torch.Tensor) -> torch.Tensor:
        rows = tensors[0].shape[0]
        if rows in self.role.supported_rows:
            return self.role(*tensors)
        chunks = split_rows(rows, self.role.supported_rows)
        if chunks is None:
            raise BundleError(f"TensorRT {self.role.component}: {rows} rows cannot be split into {self.role.supported_rows}")
        outs, start = [], 0
        for n in chunks:
            outs.append(self.role(*[t[start:start + n] for t in tensors]))
            start += n
        return torch.cat(outs)


class TrtTextEncoder(_Chunked):
    def encode(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.run(input_ids)


class TrtUNet(_Chunked):
    def predict(self, sample, timestep, encoder_hidden_states):
        return self.run(sample, timestep, encoder_hidden_states)


class TrtVaeDecoder(_Chunked):
    def decode(self, latents):
        return self.run(latents)


class TrtGuidedUNet:
    """The ``cfg`` role: ``unet_cfg`` plan (combine inside), or the shared plain plan on 2B rows + fused combine.

    Args:
        role (`TrtRole`): the CFG role's context(s).
        combine_outside (`bool`): ``role`` runs the plain UNet (``shared`` layout).
        pair (`_Chunked`, optional): the plain-UNet plan :meth:`predict_pair` uses when ``role``
            is ``unet_cfg`` (``two-engines``); its rows are split into the counts its profiles cover.
    """

    def __init__(self, role: TrtRole, combine_outside: bool, pair: Optional[_Chunked] = None) -> None:
        self.role, self.combine_outside, self.pair = role, combine_outside, pair

    def predict_guided(self, sample, timestep, encoder_hidden_states, guidance_scale):
        if not self.combine_outside:
            return self.role(sample, timestep, encoder_hidden_states, guidance_scale)
        from ..kernels_bridge import cfg_combine

        uncond, cond = self.predict_pair(sample, timestep, encoder_hidden_states).chunk(2)
        return cfg_combine(uncond, cond, guidance_scale.to(uncond.device))

    def predict_pair(self, sample, timestep, encoder_hidden_states):
        """``[eps_uncond (B); eps_cond (B)]`` for the adaptive plan: the shared plan's CFG profile (2B rows), or
        (``two-engines``) the plain UNet plan in row chunks its profiles cover."""
        args = (torch.cat([sample, sample]), torch.cat([timestep, timestep]), encoder_hidden_states)
        if self.combine_outside:
            return self.role(*args)
        if self.pair is None:
            raise BundleError("TensorRT cfg: no plain UNet plan to compute both predictions with")
        return self.pair.run(*args)


def shared_memory(engine, device: int):
    """``(block, bind)``: one device-memory block for every context of ``engine`` (roles never run at once),
    and ``bind(context)`` that gives it to a context created with the user-managed strategy (``bind`` holds
    the block, so it lives as long as the roles do); ``(None, None)`` when this TensorRT cannot."""
    size = getattr(engine, "device_memory_size_v2", None) or getattr(engine, "device_memory_size", None)
    if not size:
        return None, None
    block = torch.empty(int(size), dtype=torch.uint8, device=torch.device("cuda", device))

    def bind(context) -> None:
        if hasattr(context, "set_device_memory"):
            context.set_device_memory(block.data_ptr(), int(size))
        else:
            context.device_memory = block.data_ptr()

    return block, bind


def _check_rtx_validity(runtime, data: bytes, path: Path, command: str) -> None:
    """TensorRT for RTX says whether a plan can run on this GPU before it is deserialised (JIT targets, versions)."""
    if not hasattr(runtime, "get_engine_validity"):
        return
    validity, diagnostics = runtime.get_engine_validity(data)
    if getattr(validity, "name", str(validity)) == "INVALID":
        raise EngineMismatchError(f"TensorRT for RTX cannot run {path} on this GPU (diagnostics {diagnostics}); "
                                  f"rebuild with: {command}")


def tensorrt_runners(bundle: Bundle, cuda_graphs: bool = True, layout: Optional[str] = None, device: int = 0,
                     verify_files: bool = True) -> Runners:
    """The :class:`Runners` of a bundle's TensorRT plans (built by ``cfgswitch build``), on the flavour that built them.

    Args:
        bundle (`Bundle`): a bundle read by :func:`cfgswitch.bundle.read_manifest`.
        cuda_graphs (`bool`, defaults to True): capture one CUDA graph per (role, input shape).
        layout (`str`, optional): ``two-engines`` or ``shared``; ``None`` takes the one built.
        device (`int`, defaults to 0): the CUDA device.
        verify_files (`bool`, defaults to True): check each plan's size and sha256 against the manifest.

    Raises:
        BackendUnavailableError: the TensorRT flavour that built the plans, or CUDA, is missing.
        BundleError: no plans, or a plan file is missing or altered.
        EngineMismatchError: plans of another flavour, version or GPU (refused before deserialising).
    """
    built = [rec for name, rec in bundle.engines().items() if rec.get("plans") and (layout is None or name == layout)]
    flavour = str((built[0] if built else {}).get("tensorrt_flavour", "tensorrt"))
    if flavour not in FLAVOURS:
        raise EngineMismatchError(f"bundle {bundle.path}: plans built by an unknown TensorRT flavour {flavour!r}; "
                                  f"rebuild with: {build_command(bundle.path, layout or 'two-engines')}")
    trt = import_tensorrt(flavour)  # a missing TensorRT is named before missing plans
    chosen = choose_layout(bundle.engines(), bundle.path, layout)
    entry = bundle.engines(chosen)
    flavour = str(entry.get("tensorrt_flavour", "tensorrt"))
    if flavour not in FLAVOURS:
        raise EngineMismatchError(f"bundle {bundle.path}: plans built by an unknown TensorRT flavour {flavour!r}; "
                                  f"rebuild with: {build_command(bundle.path, chosen)}")
    trt = import_tensorrt(flavour)
    if not torch.cuda.is_available():
        raise BackendUnavailableError(f"backend 'tensorrt' needs a CUDA GPU visible to torch; none is ({GPU_EXTRA})")
    major, minor = torch.cuda.get_device_capability(device)
    check_engine_compat(entry, bundle.path, chosen, trt.__version__, f"{major}.{minor}", flavour)
    command = build_command(bundle.path, chosen, bool(entry.get("static", True)), flavour)
    torch.cuda.set_device(device)
    stream = torch.cuda.Stream(device=device)
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engines: Dict[str, Any] = {}
    memory: Dict[str, Any] = {}
    roles: Dict[str, TrtRole] = {}
    dims = bundle.dims
    for component in COMPONENTS:
        plan_name, indices, profiles = role_profiles(entry, component)
        if plan_name not in engines:
            plan = entry["plans"][plan_name]
            path = bundle.path / plan["file"]
            if verify_files:
                verify_file(bundle.path, plan["file"], plan["sha256"], plan.get("bytes"), plan_name)
            data = path.read_bytes()
            if flavour == "tensorrt-rtx":
                _check_rtx_validity(runtime, data, path, command)
            engines[plan_name] = runtime.deserialize_cuda_engine(data)
            if engines[plan_name] is None:
                raise EngineMismatchError(f"TensorRT could not deserialise {path}; rebuild with: {command}")
            memory[plan_name] = shared_memory(engines[plan_name], device)
        graph = entry["plans"][plan_name]["graph"]
        roles[component] = TrtRole(engines[plan_name], component, graph, indices, profiles, dims, bundle.dtype, cuda_graphs,
                                   stream, memory=memory[plan_name][1], trt=trt)

    def check_request(batch: int, height: int, width: int) -> None:
        check_engine_request(entry, bundle.path.name, chosen, batch, height, width)

    late = TrtUNet(roles["late"])
    combine_outside = role_binding("cfg", chosen).combine_outside
    return Runners(
        text_encoder=TrtTextEncoder(roles["text_encoder"]),
        unet_cfg=TrtGuidedUNet(roles["cfg"], combine_outside=combine_outside, pair=None if combine_outside else late),
        unet=late,
        vae_decoder=TrtVaeDecoder(roles["vae_decoder"]),
        backend="tensorrt",
        device=torch.device("cuda", device),
        dtype=torch.float32,
        info={"bundle": str(bundle.path), "layout": chosen, "tensorrt": trt.__version__, "tensorrt_flavour": flavour,
              "cuda_graphs": cuda_graphs, "gpu": torch.cuda.get_device_name(device),
              "plans": {k: v["file"] for k, v in entry["plans"].items()}},
        check_request=check_request,
    )


__all__ = ["build_command", "check_engine_compat", "check_engine_request", "choose_layout", "import_tensorrt",
           "role_profiles", "shared_memory", "split_rows", "tensorrt_runners"]
