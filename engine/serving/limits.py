"""What one request may ask of a server: limits with defaults that keep one request from
monopolising the machine."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Dict

from ..errors import InvalidArgumentError


@dataclass(frozen=True)
class ServeLimits:
    """Per-request limits a server enforces before any work.

    Attributes:
        max_steps (`int`, defaults to 100): largest ``steps``.
        max_batch (`int`, defaults to 8): most images per request and per dynamic batch.
        max_image_side (`int`, defaults to 1024): largest ``height`` and ``width`` in pixels.
        max_prompt_bytes (`int`, defaults to 2048): longest prompt or negative prompt, UTF-8 bytes.
        default_steps (`int`, defaults to 30): ``steps`` when a request leaves it out.
        default_plan (`str`, defaults to ``"switch:0.5"``): ``plan`` when a request leaves it out.
    """

    max_steps: int = 100
    max_batch: int = 8
    max_image_side: int = 1024
    max_prompt_bytes: int = 2048
    default_steps: int = 30
    default_plan: str = "switch:0.5"

    def __post_init__(self) -> None:
        for name in ("max_steps", "max_batch", "max_image_side", "max_prompt_bytes", "default_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidArgumentError(name.replace("_", "-"), "an integer >= 1", value)
        if self.default_steps > self.max_steps:
            raise InvalidArgumentError("default_steps", f"at most max_steps ({self.max_steps})", self.default_steps)

    def to_json(self) -> Dict[str, Any]:
        """A JSON-ready dict (what the repository writer stores in the pipeline's parameters)."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: Dict[str, Any]) -> "ServeLimits":
        """Inverse of :meth:`to_json`."""
        return cls(**{k: (v if k == "default_plan" else int(v)) for k, v in data.items()})


__all__ = ["ServeLimits"]
