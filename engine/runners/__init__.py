"""Backends: one runner per component (text encoder, UNet roles, VAE decoder).

A backend is chosen once, when the :class:`~cfgswitch.Sampler` is built; the
loop never branches on it.
"""

from .base import ModelSpec, Runners, TextEncoderRunner, UNetRunner, GuidedUNetRunner, VaeDecoderRunner

__all__ = ["GuidedUNetRunner", "ModelSpec", "Runners", "TextEncoderRunner", "UNetRunner", "VaeDecoderRunner"]
