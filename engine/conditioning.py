"""``Conditioning``: the named tensors each image brings to the UNet, unconditional and conditional.

For SD 1.x/2.x that is ``encoder_hidden_states`` (``[B, 77, C]``); a family with added
conditioning (SDXL) adds its own names (``text_embeds``, ``time_ids``) and every method here
carries them along unchanged. The loop and the step engine select rows through this object,
so neither needs to know which names a family has:

- :meth:`Conditioning.both` gives the CFG role's 2B rows ``[uncond; cond]`` (diffusers' order);
- :meth:`Conditioning.late` gives the B rows a late step uses (``uncond`` or ``cond``);
- :meth:`Conditioning.rows` gives any mix of rows, one ``(image, which)`` pair each, as the step
  engine builds one row set from many requests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, List, Mapping, Sequence, Tuple

import torch

from .errors import InvalidArgumentError

#: The name of the text embeddings every family has.
TEXT = "encoder_hidden_states"
#: Which half of an image's conditioning a row takes.
WHICH = ("uncond", "cond")


@dataclass(frozen=True)
class Conditioning:
    """Unconditional and conditional tensors of B images, by name.

    Attributes:
        uncond (`dict[str, torch.Tensor]`): each tensor ``[B, ...]`` (negative prompts).
        cond (`dict[str, torch.Tensor]`): the same names and shapes (prompts).
    """

    uncond: Mapping[str, torch.Tensor]
    cond: Mapping[str, torch.Tensor]

    def __post_init__(self) -> None:
        if set(self.uncond) != set(self.cond) or TEXT not in self.cond:
            raise InvalidArgumentError("conditioning", f"the same names for uncond and cond, including {TEXT!r}",
                                       (sorted(self.uncond), sorted(self.cond)))
        sizes = {int(t.shape[0]) for t in list(self.uncond.values()) + list(self.cond.values())}
        if len(sizes) != 1:
            raise InvalidArgumentError("conditioning", "one row count for every tensor", sorted(sizes))

    @classmethod
    def from_text(cls, uncond: torch.Tensor, cond: torch.Tensor) -> "Conditioning":
        """SD 1.x/2.x conditioning: text embeddings only."""
        return cls({TEXT: uncond}, {TEXT: cond})

    @property
    def batch(self) -> int:
        """B, the number of images."""
        return int(self.cond[TEXT].shape[0])

    @property
    def names(self) -> Tuple[str, ...]:
        """The tensor names, in a fixed order."""
        return tuple(sorted(self.cond))

    def half(self, which: str) -> Dict[str, torch.Tensor]:
        """``uncond`` or ``cond`` tensors of every image."""
        if which not in WHICH:
            raise InvalidArgumentError("which", "'uncond' or 'cond'", which)
        return dict(self.uncond if which == "uncond" else self.cond)

    def both(self) -> Dict[str, torch.Tensor]:
        """The CFG role's 2B rows, ``[uncond_0..uncond_{B-1}, cond_0..cond_{B-1}]``."""
        return {k: torch.cat([self.uncond[k], self.cond[k]]) for k in self.names}

    def late(self, mode: str) -> Dict[str, torch.Tensor]:
        """The late role's B rows: the ``mode`` half (``uncond`` as the paper, or ``cond``)."""
        return self.half(mode)

    def rows(self, picks: Sequence[Tuple[int, str]]) -> Dict[str, torch.Tensor]:
        """Rows in the order of ``picks``: each ``(image index, 'uncond' or 'cond')``."""
        out: Dict[str, torch.Tensor] = {}
        for k in self.names:
            parts = [self.uncond[k], self.cond[k]]
            stacked = torch.cat(parts)
            index = [i if which == "uncond" else i + self.batch for i, which in picks]
            out[k] = stacked.index_select(0, torch.tensor(index, dtype=torch.long, device=stacked.device))
        return out

    def repeat_interleave(self, n: int) -> "Conditioning":
        """Each image's tensors repeated ``n`` times consecutively (diffusers' images per prompt)."""
        if n == 1:
            return self
        return Conditioning({k: v.repeat_interleave(n, dim=0) for k, v in self.uncond.items()},
                            {k: v.repeat_interleave(n, dim=0) for k, v in self.cond.items()})


def concat_rows(parts: Iterable[Mapping[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    """Row-wise concatenation of several row sets with the same names."""
    parts = list(parts)
    if not parts:
        raise InvalidArgumentError("parts", "at least one row set", parts)
    names: List[str] = sorted(parts[0])
    return {k: torch.cat([p[k] for p in parts]) for k in names}


__all__ = ["Conditioning", "TEXT", "WHICH", "concat_rows"]
