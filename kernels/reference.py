"""Plain-torch reference implementations of the fused ops.

They are both the fallback when the compiled library is absent and the oracle
that the tests compare the compiled ops against.
"""

from __future__ import annotations

from typing import Optional, Tuple

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


def guide_and_step_reference(
    pred: torch.Tensor,
    sample: torch.Tensor,
    rows: torch.Tensor,
    params: torch.Tensor,
    prev: Optional[torch.Tensor] = None,
    *,
    want_x0: bool = False,
    want_cosine: bool = False,
) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """CFG combine, scheduler update and cosine similarity, one torch op at a time.

    The oracle of the compiled ``guide_and_step`` kernels (and their fallback): it evaluates
    the formulas of ``kernels/include/cfgswitch_kernels.h`` in the same order, one rounding
    per operation, in float32 (inputs of other dtypes are upcast, outputs cast back).

    Args:
        pred (`torch.Tensor` of shape `[R, ...]`): the UNet output rows.
        sample (`torch.Tensor` of shape `[B, ...]`): current latents.
        rows (`torch.Tensor` of shape `[B, 4]`, int32): ``row_a, row_b (-1: one prediction), form, 0``.
        params (`torch.Tensor` of shape `[B, 8]`, float32): ``w, c0, c1, c2, c3, c4, c5, 0``.
        prev (`torch.Tensor` of shape `[B, ...]`, optional): the previous x0 (forms 3 and 7 only).
        want_x0 (`bool`, defaults to False): also return the predicted x0.
        want_cosine (`bool`, defaults to False): also return each image's cosine (NaN for one prediction).

    Returns:
        `(latents, x0 or None, cosine or None)`.
    """
    batch = sample.shape[0]
    flat_pred = pred.reshape(pred.shape[0], -1).float()
    flat_x = sample.reshape(batch, -1).float()
    flat_prev = prev.reshape(batch, -1).float() if prev is not None else None
    rows_h = rows.to("cpu", torch.int64).tolist()
    p = params.to("cpu", torch.float32)
    outs, x0s, cosines = [], [], []
    for b in range(batch):
        row_a, row_b, form, _ = rows_h[b]
        w, c0, c1, c2, c3, c4, c5 = (p[b, k].to(flat_x.device) for k in range(7))
        x = flat_x[b]
        if row_b >= 0:
            u, c = flat_pred[row_a], flat_pred[row_b]
            e = u + w * (c - u)
            if want_cosine:
                cosines.append(torch.nn.functional.cosine_similarity(u, c, dim=0))
        else:
            e = flat_pred[row_a]
            if want_cosine:
                cosines.append(torch.tensor(float("nan"), device=x.device))
        if not 0 <= form <= 7:
            raise ValueError(f"rows[{b}, 2]: expected a form in 0..7, got {form}")
        base, v = form % 4, form >= 4
        if not v:
            x0 = (x - c0 * e) / c1
        elif base == 1:  # Euler, v: c_out v + x / c_skip^-1
            x0 = c0 * e + x / c1
        else:
            x0 = c1 * x - c0 * e
            if base == 0:  # DDIM's update uses the implied epsilon
                e = c1 * e + c0 * x
        if base == 0:
            out = c2 * x0 + c3 * e
        elif base == 1:
            out = x + ((x - x0) / c2) * c3
        elif base == 2:
            out = c2 * x - c3 * x0
        else:
            if flat_prev is None:
                raise ValueError(f"prev: expected the previous x0 for image {b} (form {form}), got None")
            out = (c2 * x - c3 * x0) - c5 * (c4 * (x0 - flat_prev[b]))
        outs.append(out)
        x0s.append(x0)
    latents = torch.stack(outs).reshape(sample.shape).to(sample.dtype)
    x0 = torch.stack(x0s).reshape(sample.shape).to(sample.dtype) if want_x0 else None
    cosine = torch.stack(cosines).float() if want_cosine else None
    return latents, x0, cosine
