"""Checks of ``generate``'s arguments: each failure is an :class:`InvalidArgumentError`."""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Union

from .errors import InvalidArgumentError

MAX_SEED = 2**63 - 1


def check_prompts(prompts: Union[str, Sequence[str]], name: str = "prompts") -> List[str]:
    """A prompt or a non-empty list of prompts, each a string."""
    if isinstance(prompts, str):
        return [prompts]
    if not isinstance(prompts, (list, tuple)):
        raise InvalidArgumentError(name, "a string or a list of strings", prompts)
    if len(prompts) == 0:
        raise InvalidArgumentError(name, "at least one prompt", prompts)
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise InvalidArgumentError(f"{name}[{i}]", "a string", p)
    return list(prompts)


def check_negative_prompts(negative: Union[None, str, Sequence[str]], count: int) -> List[str]:
    """``None`` (empty negative prompts), one string for all, or one per prompt."""
    if negative is None:
        return [""] * count
    if isinstance(negative, str):
        return [negative] * count
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
        if not 0 <= seed <= MAX_SEED - count:
            raise InvalidArgumentError("seed", f"an integer in [0, {MAX_SEED - count}]", seed)
        return [seed + i for i in range(count)]
    if not isinstance(seed, (list, tuple)):
        raise InvalidArgumentError("seed", "an integer or a list of integers", seed)
    if len(seed) != count:
        raise InvalidArgumentError("seed", f"{count} seed(s), one per image", f"{len(seed)} seed(s)")
    for i, s in enumerate(seed):
        if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s <= MAX_SEED:
            raise InvalidArgumentError(f"seed[{i}]", f"an integer in [0, {MAX_SEED}]", s)
    return list(seed)


def check_size(name: str, value, factor: int) -> int:
    """A positive image side that is a multiple of the VAE's factor."""
    if isinstance(value, bool) or not isinstance(value, int) or value < factor:
        raise InvalidArgumentError(name, f"an integer >= {factor} (a multiple of the VAE factor {factor})", value)
    if value % factor:
        raise InvalidArgumentError(name, f"a multiple of the VAE factor {factor}", value)
    return value


def check_output_type(value: str) -> str:
    if value not in ("pil", "np", "latent"):
        raise InvalidArgumentError("output_type", "'pil', 'np' or 'latent'", value)
    return value
