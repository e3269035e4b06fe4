"""Serving cfgswitch with Triton Inference Server.

Two paths, one request format (see ``docs/serving.md``):

- :mod:`cfgswitch.serving.server`: ``cfgswitch serve`` binds a :class:`~cfgswitch.Sampler` to a
  real Triton server through PyTriton (HTTP, gRPC, metrics, dynamic batching).
- :mod:`cfgswitch.serving.repo`: ``cfgswitch triton-repo`` writes a classic Triton model
  repository for a bundle (TensorRT plans plus a Python-backend pipeline model, or the
  pipeline running the bundle on ONNX Runtime in-process).

:mod:`cfgswitch.serving.protocol` holds the tensors of the model, :mod:`cfgswitch.serving.limits`
what a request may ask, :mod:`cfgswitch.serving.admission` checks one request (and words the
error its client sees), :mod:`cfgswitch.serving.batching` parses requests and runs them grouped,
:mod:`cfgswitch.serving.merger` merges admitted requests and drains, :mod:`cfgswitch.serving.client`
is the client.
Nothing here is imported by ``import cfgswitch``.
"""

from __future__ import annotations

from .limits import ServeLimits
from .protocol import INPUTS, MODEL_NAME, OUTPUTS, PIPELINE_MODEL_NAME

__all__ = ["INPUTS", "MODEL_NAME", "OUTPUTS", "PIPELINE_MODEL_NAME", "ServeLimits"]
