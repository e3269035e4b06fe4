"""Experiment 1: per-step trajectory probes of guided runs.

At each step of one always-guided run per prompt it records:

- the predicted clean latent ``x0`` (from the guided output and the scheduler's
  ``alphas_cumprod``), split into low and high frequencies (:mod:`.frequency`): the
  energy of each part, its relative change from the previous step, and its relative
  distance to the final step's part;
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

from ..loop import cosine_per_image
from .frequency import DEFAULT_CUTOFF, split_frequencies
from .trajectory import StepState, encode_texts, guided_trajectory, predicted_x0, prediction_type_of

logger = logging.getLogger(__name__)

#: Default relative distance to the final x0 part under which a part counts as settled.
DEFAULT_SETTLE_TOLERANCE = 0.1


def _rms(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1).double().pow(2).mean(1).sqrt()


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

    def __init__(self, prediction_type: str, cutoff: float) -> None:
        self.prediction_type = prediction_type
        self.cutoff = cutoff
        self.timesteps: List[float] = []
        self.low: List[torch.Tensor] = []
        self.high: List[torch.Tensor] = []
        self.eps_rms: List[torch.Tensor] = []
        self.delta_rms: List[torch.Tensor] = []
        self.cosine: List[torch.Tensor] = []

    def __call__(self, s: StepState) -> None:
        x0 = predicted_x0(s.sample, s.guided, s.alpha_bar, self.prediction_type)
        low, high = split_frequencies(x0, self.cutoff)
        self.timesteps.append(s.timestep)
        self.low.append(low.cpu())
        self.high.append(high.cpu())
        self.eps_rms.append(_rms(s.uncond).cpu())
        self.delta_rms.append(_rms(s.cond.double() - s.uncond.double()).cpu())
        self.cosine.append(cosine_per_image(s.uncond, s.cond).double().cpu())


def _relative(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``||a - b|| / ||b||`` per image."""
    n = a.shape[0]
    return (a - b).reshape(n, -1).norm(dim=1) / b.reshape(n, -1).norm(dim=1).clamp_min(1e-12)


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
        batch_size (`int`, defaults to 16): prompts per UNet batch.
        progress (tqdm bar, optional): advanced by one per prompt.

    Returns:
        ``per_step`` (means over prompts of each statistic, one value per step; a change is
        ``None`` at step 0), ``settle_step`` (of the mean distance curves), per-image settle
        steps and the share of images whose low part settles strictly before their high part.
    """
    prompts = list(prompts)
    prediction_type = prediction_type_of(sampler)
    batches: List[_Recorder] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        rec = _Recorder(prediction_type, cutoff)
        cond = encode_texts(sampler, chunk)
        uncond = encode_texts(sampler, [""] * len(chunk))
        seeds = [seed + start + j for j in range(len(chunk))]
        guided_trajectory(sampler, uncond, cond, seeds, steps=steps, guidance_scale=guidance_scale,
                          scheduler=scheduler, observer=rec)
        batches.append(rec)
        if progress is not None:
            progress.update(len(chunk))

    def cat(attr: str) -> torch.Tensor:  # [steps, N, ...]
        return torch.stack([torch.cat([getattr(b, attr)[i] for b in batches]) for i in range(steps)])

    low, high = cat("low"), cat("high")
    n = low.shape[1]
    energy_low = low.reshape(steps, n, -1).pow(2).mean(2)
    energy_high = high.reshape(steps, n, -1).pow(2).mean(2)
    change_low = [None] + [_relative(low[i], low[i - 1]).mean().item() for i in range(1, steps)]
    change_high = [None] + [_relative(high[i], high[i - 1]).mean().item() for i in range(1, steps)]
    dist_low = torch.stack([_relative(low[i], low[-1]) for i in range(steps)])  # [steps, N]
    dist_high = torch.stack([_relative(high[i], high[-1]) for i in range(steps)])
    mean_low, mean_high = dist_low.mean(1).tolist(), dist_high.mean(1).tolist()
    per_low = [settle_step(dist_low[:, j].tolist(), settle_tolerance) for j in range(n)]
    per_high = [settle_step(dist_high[:, j].tolist(), settle_tolerance) for j in range(n)]
    s_low, s_high = settle_step(mean_low, settle_tolerance), settle_step(mean_high, settle_tolerance)
    result = {
        "prompts": prompts,
        "seeds": [seed + i for i in range(n)],
        "steps": steps,
        "guidance_scale": guidance_scale,
        "scheduler": scheduler,
        "prediction_type": prediction_type,
        "cutoff": cutoff,
        "cutoff_meaning": "low part = FFT bins with radial frequency <= cutoff * 0.5 cycles/pixel of the latent",
        "settle_tolerance": settle_tolerance,
        "timesteps": list(batches[0].timesteps) if batches else [],
        "per_step": {
            "energy_low": energy_low.mean(1).tolist(),
            "energy_high": energy_high.mean(1).tolist(),
            "change_low": change_low,
            "change_high": change_high,
            "distance_to_final_low": mean_low,
            "distance_to_final_high": mean_high,
            "eps_uncond_rms": cat("eps_rms").mean(1).tolist(),
            "guidance_delta_rms": cat("delta_rms").mean(1).tolist(),
            "cosine": cat("cosine").mean(1).tolist(),
            "cosine_min": cat("cosine").min(1).values.tolist(),
        },
        "settle_step": {"low": s_low, "high": s_high},
        "settle_steps_per_image": {"low": per_low, "high": per_high},
        "share_low_settles_first": float(np.mean([a < b for a, b in zip(per_low, per_high)])) if n else 0.0,
        "low_settles_first": bool(s_low < s_high),
    }
    logger.info("probes: low part settles at step %d, high part at step %d (tolerance %.2f, %d prompts)",
                s_low, s_high, settle_tolerance, n)
    return result


__all__ = ["DEFAULT_SETTLE_TOLERANCE", "settle_step", "trajectory_probes"]
