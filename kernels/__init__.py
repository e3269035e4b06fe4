"""Fused elementwise ops of the sampling loop, with plain-torch references.

Importing this package never fails because the compiled library is missing:
:data:`HAS_COMPILED` says whether ``cfgswitch._kernels`` (the C++ CPU kernels) could be
loaded, :data:`HAS_CUDA_KERNELS` whether ``libcfgswitch_cuda.so`` (the CUDA kernels) was
built. Nothing here touches a GPU at import time.

Ops: :func:`cfg_combine` and :func:`guide_and_step` (see :mod:`cfgswitch.kernels.guide_step`);
:func:`rescale_noise_cfg_reference`, diffusers' guidance rescale (see
:mod:`cfgswitch.kernels.guidance_rescale`).
"""

from __future__ import annotations

import logging
from types import ModuleType
from typing import Optional

import torch

from .guidance_rescale import rescale_noise_cfg_reference
from .reference import cfg_combine_reference, guide_and_step_reference

logger = logging.getLogger(__name__)

_compiled: Optional[ModuleType]
try:  # the compiled module is optional by design
    from cfgswitch import _kernels as _compiled  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - depends on the build
    _compiled = None

#: True when the compiled C++ (and maybe CUDA) library is importable.
HAS_COMPILED: bool = _compiled is not None


def compiled_module() -> Optional[ModuleType]:
    """Return the compiled ``cfgswitch._kernels`` module, or ``None`` when it is absent."""
    return _compiled


from .guide_step import (  # noqa: E402  (needs compiled_module above)
    GuideStepResult,
    V_PREDICTION,
    StepForm,
    compiled_available,
    guide_and_step,
    has_cuda_kernels,
    pack_params,
    pack_rows,
    rows_for_modes,
)

#: True when the CUDA kernels' library was built (it is loaded on first use, not here).
HAS_CUDA_KERNELS: bool = has_cuda_kernels()


def _is_plain_cpu_f32(*tensors: torch.Tensor) -> bool:
    return all(t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous() for t in tensors)


def cfg_combine(uncond: torch.Tensor, cond: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Classifier-free guidance combine ``u + w * (c - u)`` with a per-image ``w``.

    Uses the compiled C++ kernel for contiguous float32 CPU tensors when it is
    built, and :func:`cfg_combine_reference` otherwise. Both round identically.

    Args:
        uncond (`torch.Tensor` of shape `[B, ...]`): unconditional predictions.
        cond (`torch.Tensor`, same shape as ``uncond``): conditional predictions.
        weights (`torch.Tensor` of shape `[B]`): guidance weight of each image.
    """
    if uncond.shape != cond.shape:
        raise ValueError(f"cond: expected shape {tuple(uncond.shape)} (that of uncond), got {tuple(cond.shape)}")
    if weights.dim() != 1 or weights.shape[0] != uncond.shape[0]:
        raise ValueError(f"weights: expected shape ({uncond.shape[0]},), got {tuple(weights.shape)}")
    if _compiled is None or not _is_plain_cpu_f32(uncond, cond):
        return cfg_combine_reference(uncond, cond, weights)
    w = weights.to(torch.float32).contiguous()
    out = torch.empty_like(uncond)
    batch = uncond.shape[0]
    _compiled.cfg_combine_f32(
        uncond.data_ptr(), cond.data_ptr(), w.data_ptr(), out.data_ptr(), batch, uncond.numel() // batch
    )
    return out


__all__ = [
    "GuideStepResult",
    "HAS_COMPILED",
    "HAS_CUDA_KERNELS",
    "StepForm",
    "cfg_combine",
    "cfg_combine_reference",
    "compiled_available",
    "compiled_module",
    "guide_and_step",
    "guide_and_step_reference",
    "has_cuda_kernels",
    "pack_params",
    "pack_rows",
    "rescale_noise_cfg_reference",
    "rows_for_modes",
    "V_PREDICTION",
]
