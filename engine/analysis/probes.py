"""Experiment 1: per-step trajectory probes of guided runs.

At each step of one always-guided run per prompt it records:

- the predicted clean latent ``x0`` (from the guided output and the scheduler's
  ``alphas_cumprod``), split into low and high frequencies (:mod:`.frequency`): the
  energy of each part, its relative change from the previous step, and its relative
  distance to the final step's part;
- optionally the same split of the decoded x0 image (pixel space, the same cutoff);
- the RMS of ``eps(x_t, empty)``, the RMS of ``eps(x_t, c) - eps(x_t, empty)`` (what
  guidance adds, before the weight) and the cosine similarity of the two predictions.

A part has *settled* at the first step from which its relative distance to the final
``x0`` part stays at or below ``settle_tolerance``.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

from .frequency import DEFAULT_CUTOFF, split_frequencies
from .trajectory import StepState, decode_images, encode_texts, guided_trajectory, predicted_x0, prediction_type_of

logger = logging.getLogger(__name__)

#: Default relative distance to the final x0 part under which a part counts as settled.
DEFAULT_SETTLE_TOLERANCE = 0.1


def _rms(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1).double().pow(2).mean(1).sqrt()


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of each image's two predictions (``[B]``, float64)."""
    n = a.shape[0]
    return torch.nn.functional.cosine_similarity(a.reshape(n, -1).double(), b.reshape(n, -1).double(), dim=1)


def settle_step(distances: Sequence[float], tolerance: float) -> int:
    """First index from which every value of ``distances`` is ``<= tolerance`` (``len`` when the last is above)."""
    k = len(distances)
    for i in range(len(distances) - 1, -1, -1):
        if distances[i] > tolerance:
            break
        k = i
    return k


class _Recorder:
    """Collects the per-step statistics of one batch."""

    def __init__(self, sampler, prediction_type: str, cutoff: float, pixels: bool) -> None:
        self.sampler = sampler
        self.prediction_type = prediction_type
        self.cutoff = cutoff
        self.pixels = pixels
        self.timesteps: List[float] = []
        self.parts: Dict[str, List[torch.Tensor]] = {"low": [], "high": [], "pixel_low": [], "pixel_high": []}
        self.eps_rms: List[torch.Tensor] = []
        self.delta_rms: List[torch.Tensor] = []
        self.cosine: List[torch.Tensor] = []

    def __call__(self, s: StepState) -> None:
        x0 = predicted_x0(s.sample, s.guided, s.alpha_bar, self.prediction_type)
        low, high = split_frequencies(x0, self.cutoff)
        self.timesteps.append(s.timestep)
        self.parts["low"].append(low.cpu())
        self.parts["high"].append(high.cpu())
        if self.pixels:
            image = decode_images(self.sampler, x0.to(s.sample.dtype))  # [B, H, W, 3] in [0, 1]
            p_low, p_high = split_frequencies(torch.from_numpy(image).permute(0, 3, 1, 2), self.cutoff)
            self.parts["pixel_low"].append(p_low)
            self.parts["pixel_high"].append(p_high)
        self.eps_rms.append(_rms(s.uncond).cpu())
        self.delta_rms.append(_rms(s.cond.double() - s.uncond.double()).cpu())
        self.cosine.append(_cosine(s.uncond, s.cond).cpu())


def _relative(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``||a - b|| / ||b||`` per image."""
    n = a.shape[0]
    return (a - b).reshape(n, -1).norm(dim=1) / b.reshape(n, -1).norm(dim=1).clamp_min(1e-12)


def part_statistics(low: torch.Tensor, high: torch.Tensor, tolerance: float) -> Dict[str, Any]:
    """Per-step statistics of the low and high parts of a trajectory (``[steps, N, ...]`` each).

    Returns means over images of the energy (mean square), the relative change from the
    previous step (``None`` at step 0) and the relative distance to the final step's part,
    the settle step of each mean distance curve, per-image settle steps, and the share of
    images whose low part settles strictly before their high part.
    """
    steps, n = low.shape[0], low.shape[1]
    out: Dict[str, Any] = {"per_step": {}, "settle_step": {}, "settle_steps_per_image": {}}
    for name, part in (("low", low), ("high", high)):
        dist = torch.stack([_relative(part[i], part[-1]) for i in range(steps)])  # [steps, N]
        out["per_step"][f"energy_{name}"] = part.reshape(steps, n, -1).pow(2).mean(2).mean(1).tolist()
        out["per_step"][f"change_{name}"] = [None] + [_relative(part[i], part[i - 1]).mean().item() for i in range(1, steps)]
        out["per_step"][f"distance_to_final_{name}"] = dist.mean(1).tolist()
        out["settle_step"][name] = settle_step(dist.mean(1).tolist(), tolerance)
        out["settle_steps_per_image"][name] = [settle_step(dist[:, j].tolist(), tolerance) for j in range(n)]
    per = out["settle_steps_per_image"]
    out["share_low_settles_first"] = float(np.mean([a < b for a, b in zip(per["low"], per["high"])])) if n else 0.0
    out["low_settles_first"] = bool(out["settle_step"]["low"] < out["settle_step"]["high"])
    return out


def trajectory_probes(
    sampler,
    prompts: Sequence[str],
    *,
    steps: int = 30,
    guidance_scale: float = 7.5,
    scheduler: str = "ddim",
    seed: int = 0,
    cutoff: float = DEFAULT_CUTOFF,
    settle_tolerance: float = DEFAULT_SETTLE_TOLERANCE,
    pixels: bool = True,
    batch_size: int = 16,
    progress: Optional[Any] = None,
) -> Dict[str, Any]:
    """Run one guided trajectory per prompt and return the per-step statistics (JSON-ready).

    Args:
        sampler (`Sampler`): the model, any backend.
        prompts (`Sequence[str]`): one run each; prompt ``i`` uses seed ``seed + i``.
        steps, guidance_scale, scheduler: as for ``Sampler.generate``.
        seed (`int`, defaults to 0): seed of the first prompt.
        cutoff (`float`, defaults to 0.25): low-pass radius as a fraction of Nyquist.
        settle_tolerance (`float`, defaults to 0.1): see the module docstring.
        pixels (`bool`, defaults to True): also decode each step's x0 and split it in pixel space
            (one VAE decode per step; turn off for large models).
        batch_size (`int`, defaults to 16): prompts per UNet batch.
        progress (tqdm bar, optional): advanced by one per prompt.

    Returns:
        The latent view at top level (``per_step``, ``settle_step``, ``settle_steps_per_image``,
        ``share_low_settles_first``, ``low_settles_first``; see :func:`part_statistics`), the
        guidance statistics in ``per_step`` (``eps_uncond_rms``, ``guidance_delta_rms``,
        ``cosine``, ``cosine_min``), and with ``pixels`` the same part statistics of the decoded
        x0 under ``pixel``.
    """
    prompts = list(prompts)
    prediction_type = prediction_type_of(sampler)
    batches: List[_Recorder] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        rec = _Recorder(sampler, prediction_type, cutoff, pixels)
        cond = encode_texts(sampler, chunk)
        uncond = encode_texts(sampler, [""] * len(chunk))
        seeds = [seed + start + j for j in range(len(chunk))]
        guided_trajectory(sampler, uncond, cond, seeds, steps=steps, guidance_scale=guidance_scale,
                          scheduler=scheduler, observer=rec)
        batches.append(rec)
        if progress is not None:
            progress.update(len(chunk))

    def cat(values: List[List[torch.Tensor]]) -> torch.Tensor:  # [steps, N, ...]
        return torch.stack([torch.cat([v[i] for v in values]) for i in range(steps)])

    latent = part_statistics(cat([b.parts["low"] for b in batches]), cat([b.parts["high"] for b in batches]), settle_tolerance)
    cosine = cat([b.cosine for b in batches])
    n = cosine.shape[1]
    result: Dict[str, Any] = {
        "prompts": prompts,
        "seeds": [seed + i for i in range(n)],
        "steps": steps,
        "guidance_scale": guidance_scale,
        "scheduler": scheduler,
        "prediction_type": prediction_type,
        "cutoff": cutoff,
        "cutoff_meaning": "low part = FFT bins with radial frequency <= cutoff * 0.5 cycles/pixel (of the latent; "
                          "of the decoded image under 'pixel')",
        "settle_tolerance": settle_tolerance,
        "timesteps": list(batches[0].timesteps) if batches else [],
        **latent,
    }
    result["per_step"].update({
        "eps_uncond_rms": cat([b.eps_rms for b in batches]).mean(1).tolist(),
        "guidance_delta_rms": cat([b.delta_rms for b in batches]).mean(1).tolist(),
        "cosine": cosine.mean(1).tolist(),
        "cosine_min": cosine.min(1).values.tolist(),
    })
    if pixels:
        result["pixel"] = part_statistics(cat([b.parts["pixel_low"] for b in batches]),
                                          cat([b.parts["pixel_high"] for b in batches]), settle_tolerance)
    logger.info("probes: low part settles at step %d, high part at step %d (latent, tolerance %.2f, %d prompts)",
                latent["settle_step"]["low"], latent["settle_step"]["high"], settle_tolerance, n)
    return result


__all__ = ["DEFAULT_SETTLE_TOLERANCE", "part_statistics", "settle_step", "trajectory_probes"]
