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
from typing import Any, Dict, Mapping, Optional

import torch

from ..bundle import Bundle, check_bundle_request, read_manifest
from ..errors import BundleError
from ..io_specs import GraphSpec, graph_spec
from ..runners.graph_runners import GraphGuidedUNet, GraphTextEncoder, GraphUNet, GraphVaeDecoder
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
                device: Optional[torch.device] = None, exact_batch: bool = False) -> Runners:
    """Runners over the engine models named in ``models`` (``text_encoder``, ``cfg``, ``late``, ``vae_decoder``)."""
    import triton_python_backend_utils as pb_utils

    dev = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dims = bundle.dims
    shared = layout == "shared"

    def graph(component: str, name: str) -> BlsGraph:
        return BlsGraph(models[component], graph_spec(name, dims), bundle.dtype, dev, pb_utils)

    def check_request(batch: int, height: int, width: int) -> None:
        check_bundle_request(bundle, batch, height, width, exact_batch=exact_batch,
                             build_hint=f"cfgswitch build {bundle.path.name} with that batch size and size")

    return Runners(
        text_encoder=GraphTextEncoder(graph("text_encoder", "text_encoder")),
        unet_cfg=GraphGuidedUNet(graph("cfg", "unet" if shared else "unet_cfg"), combine_outside=shared),
        unet=GraphUNet(graph("late", "unet")),
        vae_decoder=GraphVaeDecoder(graph("vae_decoder", "vae_decoder")),
        backend=backend, device=dev, dtype=torch.float32,
        info={"bundle": str(bundle.path), "layout": layout, "models": dict(models), "bundle_dtype": bundle.dtype},
        check_request=check_request,
    )


def bls_sampler(bundle_dir: Path, models: Dict[str, str], layout: str, backend: str = "tensorrt", exact_batch: bool = False):
    """A :class:`~cfgswitch.Sampler` whose components are BLS calls (inside Triton's Python backend)."""
    from ..sampler import Sampler

    bundle = read_manifest(bundle_dir)
    runners = bls_runners(bundle, models, layout, backend=backend, exact_batch=exact_batch)
    return Sampler(runners, bundle.load_tokenizer(), bundle.scheduler_config(), bundle.model_spec(), source=str(bundle_dir))


__all__ = ["BlsGraph", "bls_runners", "bls_sampler"]
