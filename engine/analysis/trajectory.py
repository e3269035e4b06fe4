"""A guided denoising loop for experiments: every step guided, embeddings per step, an observer hook.

It is built from the core's own pieces (:func:`cfgswitch.loop.make_generators`,
:func:`~cfgswitch.loop.initial_latents`, :func:`cfgswitch.schedulers.make_scheduler`,
the sampler's UNet runner on ``2B`` rows and the kernels' ``cfg_combine``), so with
the same embeddings and seeds it reproduces ``Sampler.generate(plan="always")``.
Unlike the engine's loop it can change the conditional embeddings at a given step
and hands each step's two predictions to an observer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import numpy as np
import torch

from ..kernels_bridge import cfg_combine
from ..loop import initial_latents, make_generators
from ..schedulers import make_scheduler, set_timesteps
from ..steppers import step_kwargs
from ..tokenizer import tokenize


@dataclass
class StepState:
    """What the observer sees at step ``index``.

    Attributes:
        index (`int`): step index, 0 is the noisiest.
        timestep (`float`): the scheduler's timestep.
        alpha_bar (`float`): cumulative signal fraction at this timestep (from the scheduler's ``alphas_cumprod``).
        sample (`torch.Tensor`): the UNet's input ``x_t`` (variance-preserving scale) ``[B, C, h, w]``.
        uncond (`torch.Tensor`): model output for the negative (empty) prompt.
        cond (`torch.Tensor`): model output for the prompt.
        guided (`torch.Tensor`): ``uncond + w (cond - uncond)``, the output the step uses.
    """

    index: int
    timestep: float
    alpha_bar: float
    sample: torch.Tensor
    uncond: torch.Tensor
    cond: torch.Tensor
    guided: torch.Tensor


Observer = Callable[[StepState], None]


def alpha_bar_at(scheduler, timestep: float) -> float:
    """``alpha_bar(t)`` by linear interpolation of ``scheduler.alphas_cumprod`` (timesteps may be fractional)."""
    table = scheduler.alphas_cumprod.detach().double().cpu().numpy()
    return float(np.interp(float(timestep), np.arange(len(table)), table))


def predicted_x0(sample: torch.Tensor, output: torch.Tensor, alpha_bar: float, prediction_type: str) -> torch.Tensor:
    """The clean latent the model predicts from ``x_t`` (Ho et al. 2020, eq. 15; Salimans & Ho 2022 for ``v``).

    Args:
        sample (`torch.Tensor`): ``x_t = sqrt(a) x0 + sqrt(1 - a) eps``.
        output (`torch.Tensor`): the model output.
        alpha_bar (`float`): ``a`` at this timestep.
        prediction_type (`str`): ``epsilon``, ``v_prediction`` or ``sample``.
    """
    a = torch.tensor(alpha_bar, dtype=torch.float64)
    x, o = sample.double(), output.double()
    if prediction_type == "epsilon":
        return (x - (1 - a).sqrt() * o) / a.sqrt()
    if prediction_type == "v_prediction":
        return a.sqrt() * x - (1 - a).sqrt() * o
    if prediction_type == "sample":
        return o
    from ..errors import InvalidArgumentError

    raise InvalidArgumentError("prediction_type", "'epsilon', 'v_prediction' or 'sample'", prediction_type)


def guided_trajectory(
    sampler,
    uncond: torch.Tensor,
    cond: torch.Tensor,
    seeds: Sequence[int],
    *,
    steps: int,
    guidance_scale: float,
    scheduler: str,
    latent_size: Optional[int] = None,
    cond_after: Optional[torch.Tensor] = None,
    switch_cond_at: Optional[int] = None,
    observer: Optional[Observer] = None,
) -> torch.Tensor:
    """Run CFG at every step and return the final latents ``[B, C, h, w]``.

    Args:
        sampler (`Sampler`): any backend; only its UNet runner (``predict`` on ``2B`` rows) is used.
        uncond, cond (`torch.Tensor` of shape `[B, L, C]`): negative and positive embeddings.
        seeds (`Sequence[int]`): one seed per image (same noise as ``Sampler.generate``).
        steps (`int`): number of steps.
        guidance_scale (`float`): CFG weight ``w``.
        scheduler (`str`): scheduler name.
        latent_size (`int`, optional): latent side; defaults to the model's native size.
        cond_after (`torch.Tensor`, optional): positive embeddings used from step ``switch_cond_at`` on.
        switch_cond_at (`int`, optional): the first step that uses ``cond_after``.
        observer (`callable`, optional): called with a :class:`StepState` at every step.
    """
    runners, spec = sampler.runners, sampler.spec
    device, dtype = runners.device, runners.dtype
    batch = len(seeds)
    side = spec.sample_size if latent_size is None else int(latent_size)
    sched = make_scheduler(scheduler, sampler.scheduler_config)
    set_timesteps(sched, steps, device)
    generators = make_generators(seeds)
    latents = initial_latents(generators, (spec.latent_channels, side, side), device, dtype) * sched.init_noise_sigma
    kwargs = step_kwargs(sched, generators)
    weights = torch.full((batch,), float(guidance_scale), dtype=torch.float32, device=device)
    uncond, cond = uncond.to(device), cond.to(device)
    for i, t in enumerate(sched.timesteps):
        c = cond_after.to(device) if cond_after is not None and switch_cond_at is not None and i >= switch_cond_at else cond
        x_in = sched.scale_model_input(latents, t)
        t_rows = t.to(device=device, dtype=torch.float32).expand(batch)
        pair = runners.unet.predict(torch.cat([x_in, x_in]), torch.cat([t_rows, t_rows]), torch.cat([uncond, c]))
        u, cc = pair.chunk(2)
        eps = cfg_combine(u, cc, weights)
        if observer is not None:
            observer(StepState(i, float(t), alpha_bar_at(sched, float(t)), x_in, u, cc, eps))
        latents = sched.step(eps, t, latents, **kwargs, return_dict=False)[0]
    return latents


def prediction_type_of(sampler) -> str:
    """The model's ``prediction_type`` (``epsilon`` when the config does not say)."""
    return str(sampler.scheduler_config.get("prediction_type", "epsilon"))


def decode_images(sampler, latents: torch.Tensor) -> np.ndarray:
    """Latents to float32 images ``[B, H, W, 3]`` in [0, 1], exactly as ``Sampler.generate(output_type="np")``."""
    decoded = sampler.runners.vae_decoder.decode(latents / sampler.spec.vae_scaling_factor)
    return (decoded.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()


def encode_texts(sampler, prompts: Sequence[str]) -> torch.Tensor:
    """Embeddings ``[N, L, C]`` of ``prompts`` through the sampler's text encoder."""
    return sampler.encode_prompts(list(prompts))[0]


def eos_positions(sampler, prompts: Sequence[str]) -> List[int]:
    """Index of the first ``[EOS]`` token of each prompt (the positions after it are padding ``[EOS]`` tokens)."""
    tok = sampler.tokenizer
    ids = tokenize(tok, list(prompts), sampler.spec.text_length).input_ids
    eos_id = int(tok.eos_token_id)
    out = []
    for row in ids.tolist():
        hits = [j for j in range(1, len(row)) if row[j] == eos_id]
        out.append(hits[0] if hits else len(row) - 1)
    return out


__all__ = [
    "StepState",
    "alpha_bar_at",
    "decode_images",
    "encode_texts",
    "eos_positions",
    "guided_trajectory",
    "predicted_x0",
    "prediction_type_of",
]
