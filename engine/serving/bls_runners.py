"""Runners that call a repository's engine models over BLS (Business Logic Scripting).

Used by the ``cfgswitch_pipeline`` model of ``tensorrt`` (and ``onnxruntime-bls``)
repositories: the switching loop runs in the Python backend and each component is an
``InferenceRequest`` to its model (``text_encoder``, ``unet_cfg``, ``unet_late`` or the
shared ``unet``, ``vae_decoder``). Tensor names and dtypes come from the bundle's manifest
(:mod:`cfgswitch.io_specs`). Only importable inside Triton's Python backend.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional

import torch

from ..bundle import Bundle, check_bundle_request, read_manifest
from ..errors import BundleError
from ..io_specs import GraphSpec, graph_spec
from ..runners.graph_runners import Graph, GraphGuidedUNet, GraphTextEncoder, GraphUNet, GraphVaeDecoder
from ..runners.base import Runners

logger = logging.getLogger(__name__)

_TORCH = {"float32": torch.float32, "float16": torch.float16, "int64": torch.int64}


class BlsGraph:
    """One engine model, called with torch tensors; returns its first output as float32.

    Args:
        model (`str`): the Triton model name.
        spec (`GraphSpec`): the graph's interface.
        model_dtype (`str`): the bundle's export dtype.
        device (`torch.device`): where results go.
        pb_utils: the ``triton_python_backend_utils`` module.
    """

    def __init__(self, model: str, spec: GraphSpec, model_dtype: str, device: torch.device, pb_utils: Any) -> None:
        self.model = model
        self.spec = spec
        self.in_dtypes = [_TORCH[t.resolved_dtype(model_dtype)] for t in spec.inputs]
        self.device = device
        self.pb = pb_utils

    def _tensor(self, name: str, x: torch.Tensor):
        x = x.contiguous()
        if x.device.type == "cpu":
            return self.pb.Tensor(name, x.numpy())
        return self.pb.Tensor.from_dlpack(name, torch.utils.dlpack.to_dlpack(x))

    def __call__(self, *tensors: torch.Tensor) -> torch.Tensor:
        inputs = [self._tensor(t.name, x.detach().to(dtype=dt)) for t, x, dt in zip(self.spec.inputs, tensors, self.in_dtypes)]
        out_name = self.spec.outputs[0].name
        request = self.pb.InferenceRequest(model_name=self.model, requested_output_names=[out_name], inputs=inputs)
        response = request.exec()
        if response.has_error():
            raise BundleError(f"engine model {self.model!r} failed: {response.error().message()}")
        out = self.pb.get_output_tensor_by_name(response, out_name)
        if out.is_cpu():
            y = torch.from_numpy(out.as_numpy().copy())
        else:
            y = torch.from_dlpack(out.to_dlpack()).clone()
        return y.to(device=self.device, dtype=torch.float32)


def bls_runners(bundle: Bundle, models: Mapping[str, str], layout: str, backend: str = "tensorrt",
                device: Optional[torch.device] = None, exact_batch: bool = False,
                graph_factory: Optional[Callable[[str, GraphSpec], Graph]] = None) -> Runners:
    """Runners over the engine models named in ``models`` (``text_encoder``, ``cfg``, ``late``, ``vae_decoder``).

    The CFG role has one path for both predictions (:meth:`GraphGuidedUNet.predict_pair`, what
    adaptive plans need for their cosine): in the ``shared`` layout the plain UNet's 2B-row
    profile; in ``two-engines`` the ``late`` engine called twice on B rows (uncond, then cond),
    since its profiles cover B rows. No engine is sent more rows than its profiles cover.

    Args:
        bundle (`Bundle`): the repository's bundle.
        models (`dict`): component to Triton model name.
        layout (`str`): ``two-engines`` or ``shared``.
        backend (`str`, defaults to ``"tensorrt"``): what results report as the backend.
        device (`torch.device`, optional): where results go (CUDA when available).
        exact_batch (`bool`, defaults to False): only the exported batch sizes (static plans).
        graph_factory (optional): ``(model name, GraphSpec) -> graph callable``; by default a
            :class:`BlsGraph` over Triton's BLS (only inside the Python backend).
    """
    dev = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if graph_factory is None:
        import triton_python_backend_utils as pb_utils

        def graph_factory(model: str, spec: GraphSpec) -> Graph:
            return BlsGraph(model, spec, bundle.dtype, dev, pb_utils)

    dims = bundle.dims
    shared = layout == "shared"

    def graph(component: str, name: str) -> Graph:
        return graph_factory(models[component], graph_spec(name, dims))

    def check_request(batch: int, height: int, width: int) -> None:
        check_bundle_request(bundle, batch, height, width, exact_batch=exact_batch,
                             build_hint=f"cfgswitch build {bundle.path.name} with that batch size and size")

    late = graph("late", "unet")
    if shared:
        cfg = GraphGuidedUNet(graph("cfg", "unet"), combine_outside=True)
    else:
        cfg = GraphGuidedUNet(graph("cfg", "unet_cfg"), pair_graph=late, pair_split=True)
    return Runners(
        text_encoder=GraphTextEncoder(graph("text_encoder", "text_encoder")),
        unet_cfg=cfg,
        unet=GraphUNet(late),
        vae_decoder=GraphVaeDecoder(graph("vae_decoder", "vae_decoder")),
        backend=backend, device=dev, dtype=torch.float32,
        info={"bundle": str(bundle.path), "layout": layout, "models": dict(models), "bundle_dtype": bundle.dtype},
        check_request=check_request,
    )


def bls_sampler(bundle_dir: Path, models: Dict[str, str], layout: str, backend: str = "tensorrt", exact_batch: bool = False):
    """A :class:`~cfgswitch.Sampler` whose components are BLS calls (inside Triton's Python backend).

    Built through :func:`cfgswitch.backends.assembly.assemble`, like every other sampler over a bundle.
    """
    from ..backends.assembly import assemble

    bundle = read_manifest(bundle_dir)
    runners = bls_runners(bundle, models, layout, backend=backend, exact_batch=exact_batch)
    return assemble(bundle, runners=runners, source=str(bundle_dir))


__all__ = ["BlsGraph", "bls_runners", "bls_sampler"]
