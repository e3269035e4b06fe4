"""Plain-torch reference implementations of the fused ops.

They are both the fallback when the compiled library is absent and the oracle
that the tests compare the compiled ops against.
"""

from __future__ import annotations

import torch


def cfg_combine_reference(uncond: torch.Tensor, cond: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Classifier-free guidance combine, ``u + w * (c - u)`` with one ``w`` per image.

    Args:
        uncond (`torch.Tensor` of shape `[B, ...]`): unconditional predictions.
        cond (`torch.Tensor` of shape `[B, ...]`): conditional predictions.
        weights (`torch.Tensor` of shape `[B]`): guidance weight of each image.

    Returns:
        `torch.Tensor` of shape `[B, ...]`: the guided prediction.
    """
    w = weights.to(uncond.dtype).reshape((-1,) + (1,) * (uncond.dim() - 1))
    return uncond + w * (cond - uncond)
