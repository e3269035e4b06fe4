"""Timed calls: one ``generate`` call of a cell, and the direct cost of each UNet role."""

from __future__ import annotations

import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from cfgswitch.conditioning import TEXT
from cfgswitch.request import check_size_conditioning
from cfgswitch.schedulers import make_scheduler, set_timesteps


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@contextmanager
def forward_timer(module: torch.nn.Module) -> Iterator[List[float]]:
    """Seconds spent in ``module``'s forward while the block runs, summed over its calls.

    Yields a one-element list that holds the sum once the block exits. The hooks (a pre- and a
    post-forward hook, CUDA-synchronized on a CUDA module) are removed on exit, also on error,
    so a module shared by two systems times only the calls of the block that timed it.
    """
    device = next(module.parameters()).device
    spent, entered = [0.0], [0.0]

    def before(mod, args, kwargs):
        _sync(device)
        entered[0] = time.perf_counter()

    def after(mod, args, kwargs, output):
        _sync(device)
        spent[0] += time.perf_counter() - entered[0]

    hooks = [module.register_forward_pre_hook(before, with_kwargs=True),
             module.register_forward_hook(after, with_kwargs=True)]
    try:
        yield spent
    finally:
        for h in hooks:
            h.remove()


@dataclass
class CallResult:
    """One timed call: seconds per stage, its images and its accounting."""

    timings: Dict[str, float]
    images: np.ndarray
    cfg_steps: int
    late_steps: int
    unet_rows: int
    switch_step: Optional[int]


def sampler_call(sampler, prompts: Sequence[str], seeds: Sequence[int], plan: str, steps: int, scheduler: str,
                 guidance_scale: float, height: int, width: int) -> CallResult:
    """One ``Sampler.generate`` call (numpy output); its own per-stage timings.

    On the torch backend the timings also hold ``unet``: the seconds spent in the UNet module's
    forward, timed by hooks exactly as :class:`~benchmarks.baseline.DiffusersBaseline` times
    diffusers' calls of the same module (``unet_cfg``/``unet_late`` also hold the role calls'
    own work, such as the CFG combine).
    """
    unet = sampler.modules.get("unet") if sampler.backend == "torch" else None
    with forward_timer(unet) if unet is not None else nullcontext(None) as spent:
        out = sampler.generate(list(prompts), steps=steps, guidance_scale=guidance_scale, scheduler=scheduler,
                               plan=plan, seed=list(seeds), height=height, width=width, output_type="np")
    timings = {k: float(v) for k, v in out.timings.items()}
    if spent is not None:
        timings["unet"] = spent[0]
    return CallResult(timings, np.asarray(out.images), out.cfg_steps, out.late_steps, out.unet_rows, out.switch_step)


@dataclass
class RoleInputs:
    """Representative inputs of one UNet call at batch ``B``: mid-trajectory latents and timestep."""

    sample: torch.Tensor
    timestep: torch.Tensor
    both: torch.Tensor
    late: torch.Tensor
    weights: torch.Tensor
    #: added conditioning (SDXL) of the CFG role's 2B rows and of the late role's B rows, by name
    added_both: Optional[Dict[str, torch.Tensor]] = None
    added_late: Optional[Dict[str, torch.Tensor]] = None


def role_inputs(sampler, prompts: Sequence[str], steps: int, scheduler: str, guidance_scale: float,
                height: int, width: int, seed: int = 0) -> RoleInputs:
    """Inputs as the loop builds them at step ``steps // 2``: scaled latents, the timestep, ``[uncond; cond]``."""
    device, dtype = sampler.runners.device, sampler.runners.dtype
    batch = len(prompts)
    sched = make_scheduler(scheduler, sampler.scheduler_config)
    set_timesteps(sched, steps, device)
    t = sched.timesteps[steps // 2]
    factor = sampler.spec.vae_scale_factor
    shape = (batch, sampler.spec.latent_channels, height // factor, width // factor)
    gen = torch.Generator("cpu").manual_seed(seed)
    latents = (torch.randn(shape, generator=gen, dtype=dtype) * sched.init_noise_sigma).to(device)
    sample = sched.scale_model_input(latents, t)
    sizes = check_size_conditioning(sampler.spec, {}, height, width)  # SDXL's defaults; None for SD 1.x/2.x
    conditioning, _ = sampler.encode_conditioning(list(prompts), [""] * batch, 1, negative_none=True, sizes=sizes)
    both, late = conditioning.both(), conditioning.late("uncond")
    return RoleInputs(
        sample=sample, timestep=t.to(device=device, dtype=torch.float32).expand(batch), both=both[TEXT],
        late=late[TEXT], weights=torch.full((batch,), guidance_scale, dtype=torch.float32, device=device),
        added_both={k: v for k, v in both.items() if k != TEXT} or None,
        added_late={k: v for k, v in late.items() if k != TEXT} or None,
    )


def time_roles(sampler, inputs: RoleInputs, repeat: int, warmup: int = 1) -> Tuple[List[float], List[float]]:
    """Seconds of ``repeat`` ``cfg`` calls and ``repeat`` ``late`` calls, the roles taking turns.

    Calls go straight to ``sampler.runners.unet_cfg.predict_guided`` and ``sampler.runners.unet.predict``.
    Each timed call follows an untimed call of the same role, as inside the denoising loop, where a
    role runs several steps in a row: on ONNX Runtime with more than one thread, the other role's
    session keeps its threads spinning for a while after its run, and a call right after it was
    measured 1.5-1.8x slower than in a run of calls (2-core machine, 2 threads).
    """
    device = sampler.runners.device
    cfg_runner, late_runner = sampler.runners.unet_cfg, sampler.runners.unet

    cfg_kw = {"added": inputs.added_both} if inputs.added_both else {}
    late_kw = {"added": inputs.added_late} if inputs.added_late else {}

    def cfg_call() -> None:
        cfg_runner.predict_guided(inputs.sample, inputs.timestep, inputs.both, inputs.weights, **cfg_kw)

    def late_call() -> None:
        late_runner.predict(inputs.sample, inputs.timestep, inputs.late, **late_kw)

    for _ in range(warmup):
        cfg_call()
        late_call()
    cfg_s: List[float] = []
    late_s: List[float] = []
    for _ in range(repeat):
        for fn, sink in ((cfg_call, cfg_s), (late_call, late_s)):
            fn()  # the role's previous step, untimed
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            sink.append(time.perf_counter() - start)
    return cfg_s, late_s


def rotate(items: List[Any], offset: int) -> List[Any]:
    """``items`` in round ``offset``'s order: started at ``offset`` (mod its length), and reversed in
    odd rounds. Rotation alone keeps the cyclic order, so each cell would always follow the same
    cell; reversing every other round gives each cell both neighbours as predecessors."""
    if not items:
        return []
    k = offset % len(items)
    out = items[k:] + items[:k]
    return out[::-1] if offset % 2 else out


def interleaved(cells: List[Any], rounds: int, call: Callable[[Any, int], None], progress: Optional[Any] = None) -> None:
    """Call ``call(cell, round)`` for every cell in every round, A B A B, in :func:`rotate`'s order."""
    for r in range(rounds):
        for cell in rotate(cells, r):
            call(cell, r)
            if progress is not None:
                progress.update(1)


__all__ = ["CallResult", "RoleInputs", "forward_timer", "interleaved", "role_inputs", "rotate", "sampler_call", "time_roles"]
