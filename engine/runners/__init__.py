"""Backends: one runner per component (text encoder, UNet roles, VAE decoder).

A backend is chosen once, when the :class:`~cfgswitch.Sampler` is built; the
loop never branches on it.
"""

from .base import GuidedUNetRunner, ModelSpec, PairedGuidedUNetRunner, Runners, TextEncoderRunner, UNetRunner, VaeDecoderRunner

__all__ = ["GuidedUNetRunner", "ModelSpec", "PairedGuidedUNetRunner", "Runners", "TextEncoderRunner", "UNetRunner", "VaeDecoderRunner"]
