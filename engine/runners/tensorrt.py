"""The TensorRT backend: plans built by ``cfgswitch build``, run with torch CUDA tensors as buffers.

Decisions come first, as pure functions that need neither TensorRT nor a GPU (and are
tested without them): which layout to load, whether a plan fits the running TensorRT
and GPU (checked before any plan is deserialised), which optimization profile serves
a request. The runtime below them uses the TensorRT Python API: one execution context
per role (``set_optimization_profile_async`` selects the role's profile, which is what
makes the ``shared`` layout work), ``set_input_shape`` / ``set_tensor_address`` /
``execute_async_v3`` on a torch CUDA stream, and optionally one CUDA graph per role and
shape. Engines are never built here (``cfgswitch build`` does that).
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from ..bundle import Bundle, verify_file
from ..errors import BackendUnavailableError, BundleError, EngineMismatchError, InvalidArgumentError
from ..io_specs import COMPONENTS, LAYOUTS, Profile, graph_spec, resolve_shape, role_binding, select_profile
from .base import Runners

logger = logging.getLogger(__name__)

GPU_EXTRA = "pip install 'cfgswitch[gpu]'"
_TORCH = {"float32": torch.float32, "float16": torch.float16, "int64": torch.int64}


# ============================================================ pure decisions
def build_command(bundle_path: "str | Path", layout: str, static: bool = True) -> str:
    """The command that (re)builds a bundle's plans for this machine."""
    return f"cfgswitch build {bundle_path} --layout {layout}" + ("" if static else " --dynamic")


def choose_layout(engines: Mapping[str, Any], bundle_path: "str | Path", layout: Optional[str] = None) -> str:
    """The layout to load: the one asked for, else ``two-engines`` when built, else ``shared``.

    Raises:
        InvalidArgumentError: an unknown layout.
        BundleError: no plans were built (names the build command).
    """
    if layout is not None and layout not in LAYOUTS:
        raise InvalidArgumentError("layout", f"one of {', '.join(LAYOUTS)}", layout)
    wanted = [layout] if layout else list(LAYOUTS)
    for name in wanted:
        if engines.get(name, {}).get("plans"):
            return name
    raise BundleError(f"bundle {bundle_path}: no TensorRT plans for layout {layout or LAYOUTS[0]}; "
                      f"build them on this GPU host with: {build_command(bundle_path, layout or LAYOUTS[0])}")


def check_engine_compat(entry: Mapping[str, Any], bundle_path: "str | Path", layout: str, tensorrt_version: str,
                        compute_capability: str) -> None:
    """Refuse plans built by another TensorRT version or for another GPU, before deserialising them.

    Args:
        entry (`dict`): the manifest's ``engines[layout]`` record.
        bundle_path: the bundle (for the message).
        layout (`str`): the layout.
        tensorrt_version (`str`): ``tensorrt.__version__`` of the running process.
        compute_capability (`str`): ``"major.minor"`` of the running GPU.

    Raises:
        EngineMismatchError: names both versions or GPUs and the rebuild command.
    """
    cmd = build_command(bundle_path, layout, bool(entry.get("static", True)))
    built_trt = str(entry.get("tensorrt_version"))
    if built_trt != str(tensorrt_version):
        raise EngineMismatchError(
            f"bundle {bundle_path}: the {layout} plans were built by TensorRT {built_trt}, this process runs TensorRT "
            f"{tensorrt_version}; plans only load in the TensorRT version that built them. Rebuild with: {cmd}"
        )
    built_cc = str(entry.get("compute_capability"))
    if built_cc != str(compute_capability):
        raise EngineMismatchError(
            f"bundle {bundle_path}: the {layout} plans were built for a GPU of compute capability {built_cc} "
            f"({entry.get('gpu_name', 'unknown GPU')}), this GPU has {compute_capability}. Rebuild with: {cmd}"
        )


def role_profiles(entry: Mapping[str, Any], component: str) -> Tuple[str, List[int], List[Profile]]:
    """``(plan name, profile indices, all profiles of that plan)`` serving ``component``."""
    role = entry["roles"][component]
    plan = entry["plans"][role["plan"]]
    return role["plan"], list(role["profiles"]), [Profile.from_json(p) for p in plan["profiles"]]


def check_engine_request(entry: Mapping[str, Any], bundle_path: "str | Path", layout: str, batch: int, height: int,
                         width: int) -> None:
    """Reject a request no profile of the UNet roles covers (names the export and build flags)."""
    for component in ("cfg", "late"):
        _, indices, profiles = role_profiles(entry, component)
        idx = select_profile(profiles, component, batch, height, width)
        if idx is None or idx not in indices:
            covered = sorted({b for p in profiles if p.component == component for b in range(p.batch[0], p.batch[2] + 1)})
            sizes = sorted({f"{p.image_size[1][0]}x{p.image_size[1][1]}" for p in profiles if p.component == component})
            raise BundleError(
                f"batch {batch} at {height}x{width} is not covered by the TensorRT {layout} plans of {bundle_path} "
                f"(batches {covered}, sizes {sizes}); re-export with cfgswitch export --batch-sizes/--height/--width, "
                f"then {build_command(bundle_path, layout)} (or --dynamic for one min..max profile)"
            )


def split_rows(rows: int, supported: Sequence[int]) -> Optional[List[int]]:
    """Chunk ``rows`` into supported row counts (largest first), or ``None`` when impossible.

    Rows are independent in every graph here, so ``f(x[a:b])`` chunks equal ``f(x)[a:b]``;
    the adaptive plan's 2B-row plain-UNet calls run as two B-row calls on ``late`` plans.
    """
    sizes = sorted(set(s for s in supported if s >= 1), reverse=True)
    best: Dict[int, Optional[List[int]]] = {0: []}
    for n in range(1, rows + 1):
        best[n] = None
        for s in sizes:
            if s <= n and best[n - s] is not None:
                best[n] = [s] + best[n - s]  # type: ignore[operator]
                break
    return best[rows]


# ============================================================ runtime
def import_tensorrt():
    """``import tensorrt`` or a :class:`BackendUnavailableError` naming the extra."""
    try:
        return importlib.import_module("tensorrt")
    except Exception as e:  # noqa: BLE001 - a partial install raises OSError for missing libraries
        raise BackendUnavailableError(
            f"backend 'tensorrt' needs TensorRT, which does not import here ({type(e).__name__}: {e}); "
            f"on a CUDA host install it with: {GPU_EXTRA}"
        ) from e


class TrtRole:
    """One execution context of a plan, serving one component through its profiles.

    Work is enqueued on the caller's current CUDA stream, so results need no extra
    synchronisation. With ``cuda_graphs`` each input shape is captured once (after one
    eager run that settles the shapes, as TensorRT requires) and replayed afterwards.

    Args:
        engine: a deserialised ``trt.ICudaEngine``.
        component (`str`): ``text_encoder``, ``cfg``, ``late`` or ``vae_decoder``.
        graph (`str`): the graph the plan was built from (names its tensors).
        indices, profiles: the component's profile indices and all the plan's profiles.
        dims, model_dtype, cuda_graphs: model dims, bundle dtype, capture CUDA graphs.
    """

    def __init__(self, engine, component: str, graph: str, indices: List[int], profiles: List[Profile], dims,
                 model_dtype: str, cuda_graphs: bool) -> None:
        self.context = engine.create_execution_context()
        self.component, self.indices, self.profiles = component, indices, profiles
        self.spec = graph_spec(graph, dims)
        self.factor = dims.vae_scale_factor
        self.row_factor = 2 if (graph == "unet" and component == "cfg") else 1
        self.in_dtypes = [_TORCH[t.resolved_dtype(model_dtype)] for t in self.spec.inputs]
        self.out_dtype = _TORCH[self.spec.outputs[0].resolved_dtype(model_dtype)]
        self.cuda_graphs = cuda_graphs
        self.profile: Optional[int] = None
        self.graphs: Dict[Tuple, Tuple[Any, List[torch.Tensor], torch.Tensor]] = {}
        self.supported_rows = sorted({b for i in indices for b in range(profiles[i].batch[0], profiles[i].batch[2] + 1)})

    def _env(self, tensors: Sequence[torch.Tensor]) -> Dict[str, int]:
        env = {d: int(n) for t, x in zip(self.spec.inputs, tensors) for d, n in zip(t.shape, x.shape)
               if isinstance(d, str) and d != "2B"}
        if "h" in env:
            env["H"], env["W"] = env["h"] * self.factor, env["w"] * self.factor
        return env

    def _select(self, images: int, height: int, width: int, stream: int) -> None:
        idx = select_profile(self.profiles, self.component, images, height, width)
        if idx is None or idx not in self.indices:
            raise BundleError(f"TensorRT {self.component}: no profile covers {images} image(s) at {height}x{width}")
        if idx != self.profile:
            self.context.set_optimization_profile_async(idx, stream)
            self.profile = idx
            self.graphs.clear()  # captured graphs hold the old profile's shapes

    def _bind(self, inputs: Sequence[torch.Tensor], out: torch.Tensor) -> None:
        for t, x in zip(self.spec.inputs, inputs):
            self.context.set_input_shape(t.name, tuple(x.shape))
            self.context.set_tensor_address(t.name, x.data_ptr())
        self.context.set_tensor_address(self.spec.outputs[0].name, out.data_ptr())

    def _execute(self, stream: int) -> None:
        if not self.context.execute_async_v3(stream):
            raise RuntimeError(f"TensorRT {self.component}: execute_async_v3 failed")

    def __call__(self, *tensors: torch.Tensor) -> torch.Tensor:
        """Run on tensors (moved to the GPU and cast to the plan's dtypes); returns a new float32 GPU tensor."""
        stream = torch.cuda.current_stream().cuda_stream
        xs = [x.to(device="cuda", dtype=dt).contiguous() for x, dt in zip(tensors, self.in_dtypes)]
        env = self._env(xs)
        if self.component == "text_encoder":
            height, width = self.profiles[self.indices[0]].image_size[1]
        else:
            height, width = env["h"] * self.factor, env["w"] * self.factor
        self._select(xs[0].shape[0] // self.row_factor, height, width, stream)
        out_shape = resolve_shape(self.spec.outputs[0].shape, env)
        if not self.cuda_graphs:
            out = torch.empty(out_shape, dtype=self.out_dtype, device="cuda")
            self._bind(xs, out)
            self._execute(stream)
            return out.to(torch.float32)
        key = tuple(tuple(x.shape) for x in xs)
        if key not in self.graphs:
            static_in = [x.clone() for x in xs]
            static_out = torch.empty(out_shape, dtype=self.out_dtype, device="cuda")
            self._bind(static_in, static_out)
            self._execute(stream)  # settles shapes and lazy allocations before capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._execute(torch.cuda.current_stream().cuda_stream)
            self.graphs[key] = (graph, static_in, static_out)
        graph, static_in, static_out = self.graphs[key]
        for dst, src in zip(static_in, xs):
            dst.copy_(src)
        graph.replay()
        return static_out.to(torch.float32, copy=True)  # the next replay overwrites static_out


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
    """The ``cfg`` role: ``unet_cfg`` plan (combine inside), or the shared plain plan on 2B rows + fused combine."""

    def __init__(self, role: TrtRole, combine_outside: bool) -> None:
        self.role, self.combine_outside = role, combine_outside

    def predict_guided(self, sample, timestep, encoder_hidden_states, guidance_scale):
        if not self.combine_outside:
            return self.role(sample, timestep, encoder_hidden_states, guidance_scale)
        from ..kernels_bridge import cfg_combine

        eps = self.role(torch.cat([sample, sample]), torch.cat([timestep, timestep]), encoder_hidden_states)
        uncond, cond = eps.chunk(2)
        return cfg_combine(uncond, cond, guidance_scale.to(eps.device))


def tensorrt_runners(bundle: Bundle, cuda_graphs: bool = True, layout: Optional[str] = None, device: int = 0,
                     verify_files: bool = True) -> Runners:
    """The :class:`Runners` of a bundle's TensorRT plans (built by ``cfgswitch build``).

    Raises:
        BackendUnavailableError: TensorRT or CUDA is missing.
        BundleError: no plans, or a plan file is missing or altered.
        EngineMismatchError: plans of another TensorRT version or GPU (refused before deserialising).
    """
    trt = import_tensorrt()
    if not torch.cuda.is_available():
        raise BackendUnavailableError(f"backend 'tensorrt' needs a CUDA GPU visible to torch; none is ({GPU_EXTRA})")
    chosen = choose_layout(bundle.engines(), bundle.path, layout)
    entry = bundle.engines(chosen)
    major, minor = torch.cuda.get_device_capability(device)
    check_engine_compat(entry, bundle.path, chosen, trt.__version__, f"{major}.{minor}")
    torch.cuda.set_device(device)
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engines: Dict[str, Any] = {}
    roles: Dict[str, TrtRole] = {}
    dims = bundle.dims
    for component in COMPONENTS:
        plan_name, indices, profiles = role_profiles(entry, component)
        if plan_name not in engines:
            plan = entry["plans"][plan_name]
            path = bundle.path / plan["file"]
            if verify_files:
                verify_file(bundle.path, plan["file"], plan["sha256"], plan.get("bytes"), plan_name)
            engines[plan_name] = runtime.deserialize_cuda_engine(path.read_bytes())
            if engines[plan_name] is None:
                raise EngineMismatchError(f"TensorRT could not deserialise {path}; rebuild with: "
                                          f"{build_command(bundle.path, chosen, bool(entry.get('static', True)))}")
        graph = entry["plans"][plan_name]["graph"]
        roles[component] = TrtRole(engines[plan_name], component, graph, indices, profiles, dims, bundle.dtype, cuda_graphs)

    def check_request(batch: int, height: int, width: int) -> None:
        check_engine_request(entry, bundle.path.name, chosen, batch, height, width)

    return Runners(
        text_encoder=TrtTextEncoder(roles["text_encoder"]),
        unet_cfg=TrtGuidedUNet(roles["cfg"], combine_outside=role_binding("cfg", chosen).combine_outside),
        unet=TrtUNet(roles["late"]),
        vae_decoder=TrtVaeDecoder(roles["vae_decoder"]),
        backend="tensorrt",
        device=torch.device("cuda", device),
        dtype=torch.float32,
        info={"bundle": str(bundle.path), "layout": chosen, "tensorrt": trt.__version__, "cuda_graphs": cuda_graphs,
              "gpu": torch.cuda.get_device_name(device), "plans": {k: v["file"] for k, v in entry["plans"].items()}},
        check_request=check_request,
    )


__all__ = ["build_command", "check_engine_compat", "check_engine_request", "choose_layout", "import_tensorrt",
           "role_profiles", "split_rows", "tensorrt_runners"]
