"""What one request may ask of a server: limits with defaults that keep one request from
monopolising the machine.

Two limits come from the model unless the operator sets them: the largest image side
(the model's native side times :attr:`ServeLimits.image_side_factor`, the library's rule
:func:`cfgswitch.validation.max_side_for`) and the longest prompt
in tokens (the text encoder's length). :meth:`ServeLimits.for_model` fills them in.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any, Dict, Optional

from ..errors import InvalidArgumentError
from ..validation import DEFAULT_MAX_SIDE_FACTOR, max_side_for


@dataclass(frozen=True)
class ServeLimits:
    """Per-request limits a server enforces before any work.

    Attributes:
        max_steps (`int`, defaults to 100): largest ``steps`` (``--max-steps``).
        max_batch (`int`, defaults to 8): most images per request, and per merged batch (``--max-batch``).
        max_image_side (`int`, optional): largest ``height`` and ``width`` in pixels (``--max-image-side``);
            ``None`` means the model's native side times ``image_side_factor``.
        image_side_factor (`int`, defaults to 2): see ``max_image_side`` (``--image-side-factor``).
        max_prompt_bytes (`int`, defaults to 2048): longest prompt or negative prompt in UTF-8 bytes,
            checked before the text is decoded (``--max-prompt-bytes``).
        max_prompt_tokens (`int`, optional): longest prompt or negative prompt in CLIP tokens, start and
            end tokens included (``--max-prompt-tokens``); ``None`` means the model's text length (77), so a
            prompt the text encoder would truncate is refused instead of silently cut.
        default_steps (`int`, defaults to 30): ``steps`` when a request leaves it out.
        default_plan (`str`, defaults to ``"switch:0.5"``): ``plan`` when a request leaves it out.
    """

    max_steps: int = 100
    max_batch: int = 8
    max_image_side: Optional[int] = None
    max_prompt_bytes: int = 2048
    default_steps: int = 30
    default_plan: str = "switch:0.5"
    image_side_factor: int = DEFAULT_MAX_SIDE_FACTOR
    max_prompt_tokens: Optional[int] = None

    def __post_init__(self) -> None:
        for name in ("max_steps", "max_batch", "max_image_side", "max_prompt_bytes", "default_steps",
                     "image_side_factor", "max_prompt_tokens"):
            value = getattr(self, name)
            if value is None and name in ("max_image_side", "max_prompt_tokens"):
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidArgumentError(name.replace("_", "-"), "an integer >= 1", value)
        if self.default_steps > self.max_steps:
            raise InvalidArgumentError("default_steps", f"at most max_steps ({self.max_steps})", self.default_steps)

    def for_model(self, native_side: int, text_length: int) -> "ServeLimits":
        """These limits with the model-derived ones filled in.

        Args:
            native_side (`int`): the model's native image side in pixels.
            text_length (`int`): the text encoder's tokens per prompt.
        """
        return replace(
            self,
            max_image_side=(self.max_image_side if self.max_image_side is not None
                            else max_side_for(native_side, self.image_side_factor)),
            max_prompt_tokens=self.max_prompt_tokens if self.max_prompt_tokens is not None else text_length,
        )

    def describe(self) -> str:
        """One line for the server log: every limit and where it came from."""
        return (f"max steps {self.max_steps}, max images per request {self.max_batch}, max image side "
                f"{self.max_image_side} px, max prompt {self.max_prompt_bytes} bytes / {self.max_prompt_tokens} tokens")

    def to_json(self) -> Dict[str, Any]:
        """A JSON-ready dict (what the repository writer stores in the pipeline's parameters)."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: Dict[str, Any]) -> "ServeLimits":
        """Inverse of :meth:`to_json`."""
        return cls(**{k: (v if k == "default_plan" or v is None else int(v)) for k, v in data.items()})


__all__ = ["ServeLimits"]
