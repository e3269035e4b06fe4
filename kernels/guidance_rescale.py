"""Guidance rescale (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed", sec. 3.4).

The CFG prediction ``g = u + w (c - u)`` is rescaled towards the standard deviation of the
conditional prediction ``c``, per image, then mixed with ``g`` by the factor ``phi``:

    g' = phi * (g * (std(c) / std(g))) + (1 - phi) * g

diffusers' pipelines apply it (``guidance_rescale``) after the CFG combine and before
``scheduler.step``, for zero-terminal-SNR models above all. :func:`rescale_noise_cfg_reference`
evaluates it exactly as diffusers' ``rescale_noise_cfg`` does (same torch ops in the same order),
with one ``phi`` per image; ``phi = 0`` leaves an image untouched, as diffusers skips the call.
"""

from __future__ import annotations

from typing import List, Sequence, Union

import torch

Rescale = Union[float, Sequence[float]]


def rescale_factors(guidance_rescale: Rescale, batch: int) -> List[float]:
    """``guidance_rescale`` as one float per image, checked to lie in ``[0, 1]``."""
    values = [float(guidance_rescale)] * batch if isinstance(guidance_rescale, (int, float)) else [
        float(v) for v in guidance_rescale
    ]
    if len(values) != batch:
        raise ValueError(f"guidance_rescale: expected one value per image ({batch}), got {len(values)}")
    bad = [v for v in values if not 0.0 <= v <= 1.0]
    if bad:
        raise ValueError(f"guidance_rescale: expected values in [0, 1], got {bad[0]!r}")
    return values


def rescale_noise_cfg_reference(
    noise_cfg: torch.Tensor, noise_pred_text: torch.Tensor, guidance_rescale: Rescale
) -> torch.Tensor:
    """Rescale guided predictions towards the conditional one's standard deviation, per image.

    Args:
        noise_cfg (`torch.Tensor` of shape `[B, ...]`): the CFG-combined predictions.
        noise_pred_text (`torch.Tensor` of shape `[B, ...]`): the conditional predictions.
        guidance_rescale (`float` or `list[float]`): ``phi`` in ``[0, 1]``, for all images or per
            image; images with 0 are returned unchanged.

    Returns:
        `torch.Tensor` of shape `[B, ...]`: the rescaled predictions (a new tensor).
    """
    if noise_cfg.shape != noise_pred_text.shape:
        raise ValueError(f"noise_pred_text: expected shape {tuple(noise_cfg.shape)} (that of noise_cfg), "
                         f"got {tuple(noise_pred_text.shape)}")
    phi = rescale_factors(guidance_rescale, noise_cfg.shape[0])
    out = noise_cfg.clone()
    on = [b for b, p in enumerate(phi) if p > 0.0]
    if not on:
        return out
    index = torch.tensor(on, dtype=torch.long, device=noise_cfg.device)
    g, c = noise_cfg.index_select(0, index), noise_pred_text.index_select(0, index)
    dims = list(range(1, g.ndim))
    view = (-1,) + (1,) * (g.ndim - 1)
    # diffusers multiplies by Python floats: phi and (1 - phi) computed in double, then rounded to the dtype.
    keep = torch.tensor([phi[b] for b in on], dtype=g.dtype, device=g.device).reshape(view)
    mix = torch.tensor([1 - phi[b] for b in on], dtype=g.dtype, device=g.device).reshape(view)
    std_text = c.std(dim=dims, keepdim=True)
    std_cfg = g.std(dim=dims, keepdim=True)
    rescaled = g * (std_text / std_cfg)
    out[index] = keep * rescaled + mix * g
    return out


def rescale_noise_cfg_rows(noise_cfg: torch.Tensor, noise_pred_text: torch.Tensor, phi: torch.Tensor) -> torch.Tensor:
    """The same rescale with ``phi`` as a tensor: plain tensor ops, for guided graphs (ONNX, TorchScript).

    ``1 - phi`` is computed in the tensor's dtype here (diffusers computes it from a Python float),
    so a result may differ from :func:`rescale_noise_cfg_reference` in the last bit; images with
    ``phi == 0`` are returned unchanged.

    Args:
        noise_cfg (`torch.Tensor` of shape `[B, ...]`): the CFG-combined predictions.
        noise_pred_text (`torch.Tensor` of shape `[B, ...]`): the conditional predictions.
        phi (`torch.Tensor` of shape `[B]`): the rescale factor of each image, in ``[0, 1]``.
    """
    dims = list(range(1, noise_cfg.dim()))
    view = (-1,) + (1,) * (noise_cfg.dim() - 1)
    keep = phi.to(noise_cfg.dtype).reshape(view)
    std_text = noise_pred_text.std(dim=dims, keepdim=True)
    std_cfg = noise_cfg.std(dim=dims, keepdim=True)
    mixed = keep * (noise_cfg * (std_text / std_cfg)) + (1 - keep) * noise_cfg
    return torch.where(keep > 0, mixed, noise_cfg)


__all__ = ["rescale_factors", "rescale_noise_cfg_reference", "rescale_noise_cfg_rows"]
