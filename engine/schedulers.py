"""Schedulers by name, backed by diffusers' scheduler classes and the model's own config.

The loop calls the UNet exactly once per entry of ``scheduler.timesteps``; a
scheduler that needs several model calls per step (Heun, DPM2) is refused.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Tuple

from .errors import InvalidArgumentError, UnknownSchedulerError

# name -> (diffusers class name, settings the name fixes: given to from_config only where its result disagrees)
_SCHEDULERS: Dict[str, Tuple[str, Dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
}
# Known schedulers that evaluate the model more than once per step.
_MULTI_CALL = {
    "heun": "HeunDiscreteScheduler",
    "dpm2": "KDPM2DiscreteScheduler",
    "dpm2_a": "KDPM2AncestralDiscreteScheduler",
    "dpmpp_sde": "DPMSolverSDEScheduler",
}

#: Names accepted by :func:`make_scheduler`.
SCHEDULER_NAMES: Tuple[str, ...] = tuple(_SCHEDULERS)


def scheduler_class_name(name: str) -> str:
    """The diffusers class behind a scheduler name (raises for unknown or refused names)."""
    key = name.strip().lower() if isinstance(name, str) else name
    if key in _MULTI_CALL:
        raise UnknownSchedulerError(
            "scheduler",
            f"a scheduler that calls the model once per step ({', '.join(SCHEDULER_NAMES)}); "
            f"{key!r} ({_MULTI_CALL[key]}) calls it more than once per step",
            name,
        )
    if key not in _SCHEDULERS:
        raise UnknownSchedulerError("scheduler", f"one of {', '.join(SCHEDULER_NAMES)}", name)
    return _SCHEDULERS[key][0]


def make_scheduler(name: str, base_config: Mapping[str, Any]):
    """Build the diffusers scheduler ``name`` from a model's scheduler config, as diffusers does.

    The result is exactly ``Class.from_config(base_config)``: the config goes to diffusers
    unchanged, private keys included. A config taken from a live pipeline
    (``dict(pipe.scheduler.config)``) lists in ``_use_default_values`` the keys its own JSON
    lacked; diffusers' ``from_config`` drops them, so the new class applies its own defaults
    (SD 1.5's PNDM config turned into Euler gets ``timestep_spacing="linspace"``, timesteps
    from 999). A folder's or a bundle's JSON lacks those keys to begin with, so all three
    sources give the same scheduler. Only when that result contradicts the name itself
    (``dpmpp_2m``: ``dpmsolver++`` of order 2; ``pndm``: PLMS without Runge-Kutta warm-up, as in
    SD's own configs) is it ``Class.from_config(base_config, **settings)`` instead.

    Args:
        name (`str`): one of :data:`SCHEDULER_NAMES`.
        base_config (`Mapping`): the model's scheduler config: a ``scheduler_config.json``'s
            content, or ``pipe.scheduler.config`` (``num_train_timesteps``, ``beta_schedule``,
            ``prediction_type``, ...).

    Raises:
        UnknownSchedulerError: the name is unknown or names a multi-call scheduler.
        InvalidArgumentError: ``base_config`` is not a mapping.
    """
    import diffusers

    cls_name = scheduler_class_name(name)
    if not isinstance(base_config, Mapping):
        raise InvalidArgumentError("base_config", "a scheduler config mapping", type(base_config).__name__)
    settings = _SCHEDULERS[name.strip().lower()][1]
    cls = getattr(diffusers, cls_name)
    scheduler = cls.from_config(dict(base_config))
    if any(scheduler.config.get(k) != v for k, v in settings.items()):  # only then differ from diffusers
        scheduler = cls.from_config(dict(base_config), **settings)
    if getattr(scheduler, "order", 1) != 1:  # pragma: no cover - guarded by the table above
        raise UnknownSchedulerError("scheduler", "a scheduler of order 1", name)
    return scheduler


def set_timesteps(scheduler, steps: int, device) -> None:
    """``scheduler.set_timesteps(steps)`` and a check that it yields one model call per step.

    PNDM (PLMS) is the one exception: its warm-up evaluates the model once more at the
    start, so it makes ``steps + 1`` calls, exactly as in diffusers' pipeline.
    """
    scheduler.set_timesteps(steps, device=device)
    n = len(scheduler.timesteps)
    allowed = {steps, steps + 1} if type(scheduler).__name__ == "PNDMScheduler" else {steps}
    if n not in allowed:
        raise UnknownSchedulerError(
            "scheduler", f"a schedule of {steps} model calls for steps={steps}", f"{type(scheduler).__name__} ({n} calls)"
        )


__all__ = ["SCHEDULER_NAMES", "make_scheduler", "scheduler_class_name", "set_timesteps"]
