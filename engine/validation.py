"""Checks of ``generate``'s arguments: each failure is an :class:`InvalidArgumentError`.

The rules shared by the library, the command line and the servers live here, once:

- seeds: every image's seed is an integer in ``[0, MAX_SEED]`` (``2**63 - 1``, the largest
  signed 64-bit integer, the Triton ``INT64`` seed input's range). An int ``seed`` for ``n``
  images gives image ``i`` the seed ``seed + i``, so it may be at most ``MAX_SEED - (n - 1)``.
- image size: a side is at most :func:`max_side_for` ``(native side, factor)``, by default
  ``DEFAULT_MAX_SIDE_FACTOR`` (2) times the model's native size (1024 px for SD 1.5, 128 px
  for the embedded 64 px model). It is explicit to raise: ``generate(..., max_image_side=N)``.
- prompts: text that encodes as UTF-8 (no lone surrogates, as an undecodable command-line
  argument becomes).
- steps: fewer than the model's training timesteps; a ``step:K`` plan with ``K <= steps``.
"""

from __future__ import annotations

import math
from typing import Any, List, Optional, Sequence, Union

from .errors import InvalidArgumentError

#: Largest seed of any image (library, command line and servers).
MAX_SEED = 2**63 - 1
#: Default largest image side, as a multiple of the model's native side.
DEFAULT_MAX_SIDE_FACTOR = 2


def max_side_for(native_side: "int | Any", factor: int = DEFAULT_MAX_SIDE_FACTOR) -> int:
    """The largest image side allowed for a model: ``factor`` times its native side.

    Args:
        native_side (`int` or `ModelSpec`): the model's native image side in pixels, or a spec
            with ``default_size``.
        factor (`int`, defaults to 2): the multiple of the native side.
    """
    side = getattr(native_side, "default_size", native_side)
    if isinstance(side, bool) or not isinstance(side, int) or side < 1:
        raise InvalidArgumentError("native_side", "a positive integer (pixels) or a ModelSpec", native_side)
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
        raise InvalidArgumentError("factor", "an integer >= 1", factor)
    return factor * side


def check_max_image_side(value: Optional[int], native_side: int, vae_factor: int) -> int:
    """``max_image_side`` of ``generate``: ``None`` is the default rule (:func:`max_side_for`)."""
    if value is None:
        return max_side_for(native_side)
    if isinstance(value, bool) or not isinstance(value, int) or value < vae_factor:
        raise InvalidArgumentError("max_image_side", f"an integer >= {vae_factor} (pixels) or None", value)
    return value


def check_text(name: str, text: str) -> str:
    """A prompt that encodes as UTF-8: a lone surrogate (an undecodable argument) is refused."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidArgumentError(
            name, f"text that encodes as UTF-8 (character {e.start} is a lone surrogate {text[e.start]!r})", text
        ) from None
    return text


def check_prompts(prompts: Union[str, Sequence[str]], name: str = "prompts") -> List[str]:
    """A prompt or a non-empty list of prompts, each a string."""
    if isinstance(prompts, str):
        return [check_text(f"{name}[0]", prompts)]
    if not isinstance(prompts, (list, tuple)):
        raise InvalidArgumentError(name, "a string or a list of strings", prompts)
    if len(prompts) == 0:
        raise InvalidArgumentError(name, "at least one prompt", prompts)
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise InvalidArgumentError(f"{name}[{i}]", "a string", p)
        check_text(f"{name}[{i}]", p)
    return list(prompts)


def check_negative_prompts(negative: Union[None, str, Sequence[str]], count: int) -> List[str]:
    """``None`` (empty negative prompts), one string for all, or one per prompt."""
    if negative is None:
        return [""] * count
    if isinstance(negative, str):
        return [check_text("negative_prompts[0]", negative)] * count
    out = check_prompts(negative, "negative_prompts")
    if len(out) != count:
        raise InvalidArgumentError("negative_prompts", f"{count} negative prompt(s), one per prompt", f"{len(out)} negative prompt(s)")
    return out


def check_positive_int(name: str, value, minimum: int = 1, maximum: Optional[int] = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgumentError(name, f"an integer >= {minimum}", value)
    if value < minimum or (maximum is not None and value > maximum):
        bound = f"an integer in [{minimum}, {maximum}]" if maximum is not None else f"an integer >= {minimum}"
        raise InvalidArgumentError(name, bound, value)
    return value


def check_guidance(value) -> float:
    """A finite guidance scale >= 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidArgumentError("guidance_scale", "a finite number >= 0", value)
    if not math.isfinite(value) or value < 0:
        raise InvalidArgumentError("guidance_scale", "a finite number >= 0", value)
    return float(value)


def check_seeds(seed, count: int) -> List[int]:
    """One int (image i gets ``seed + i``), ``None`` (random), or one int per image."""
    if seed is None:
        import secrets

        base = secrets.randbelow(2**31)
        return [base + i for i in range(count)]
    if isinstance(seed, bool):
        raise InvalidArgumentError("seed", "an integer or a list of integers", seed)
    if isinstance(seed, int):
        top = MAX_SEED - (count - 1)  # image i gets seed + i <= MAX_SEED
        if not 0 <= seed <= top:
            extra = f" for {count} images (image i gets seed + i <= {MAX_SEED})" if count > 1 else ""
            raise InvalidArgumentError("seed", f"an integer in [0, {top}]{extra}", seed)
        return [seed + i for i in range(count)]
    if not isinstance(seed, (list, tuple)):
        raise InvalidArgumentError("seed", "an integer or a list of integers", seed)
    if len(seed) != count:
        raise InvalidArgumentError("seed", f"{count} seed(s), one per image", f"{len(seed)} seed(s)")
    for i, s in enumerate(seed):
        if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s <= MAX_SEED:
            raise InvalidArgumentError(f"seed[{i}]", f"an integer in [0, {MAX_SEED}]", s)
    return list(seed)


def check_size(name: str, value, factor: int, maximum: Optional[int] = None) -> int:
    """A positive image side that is a multiple of the VAE's factor and at most ``maximum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < factor:
        raise InvalidArgumentError(name, f"an integer >= {factor} (a multiple of the VAE factor {factor})", value)
    if value % factor:
        raise InvalidArgumentError(name, f"a multiple of the VAE factor {factor}", value)
    if maximum is not None and value > maximum:
        raise InvalidArgumentError(name, f"at most {maximum} pixels (max_image_side; pass a larger max_image_side to raise it)", value)
    return value


def check_steps_for_schedule(steps: int, scheduler_config: Any) -> int:
    """``steps`` below the model's training timesteps.

    diffusers refuses more steps than ``num_train_timesteps``, and with ``steps_offset`` (SD
    schedules) exactly as many index past the end, so the bound is ``num_train_timesteps - 1``.
    """
    train = scheduler_config.get("num_train_timesteps") if hasattr(scheduler_config, "get") else None
    if isinstance(train, int) and not isinstance(train, bool) and train > 1 and steps >= train:
        raise InvalidArgumentError("steps", f"an integer in [1, {train - 1}] (fewer than the model's {train} "
                                   "training timesteps)", steps)
    return steps


def check_plan_steps(plan: Any, steps: int) -> None:
    """Refuse a plan that names a step past the trajectory (``step:100`` with 10 steps).

    ``step:K`` with ``K == steps`` is CFG all the way (as ``always``); ``K > steps`` is a
    mistake (usually a step count changed without the plan) and raises.
    """
    from .plans import StepPlan

    if isinstance(plan, StepPlan) and plan.step > steps:
        raise InvalidArgumentError(
            "plan", f"step:K with K <= steps ({steps}); use always for CFG at every step", str(plan)
        )


def check_output_type(value: str) -> str:
    if value not in ("pil", "np", "latent"):
        raise InvalidArgumentError("output_type", "'pil', 'np' or 'latent'", value)
    return value
