"""Splitting images and latents into low- and high-frequency parts with a radial FFT mask.

The split is exact and linear: ``low + high == x``. A frequency bin belongs to the
low part when its radial frequency ``sqrt(fy**2 + fx**2)`` (in cycles per pixel, as
``torch.fft.fftfreq`` counts them) is at most ``cutoff * 0.5``: ``cutoff`` is a
fraction of the Nyquist frequency (0.5 cycles per pixel). The default
:data:`DEFAULT_CUTOFF` of 0.25 keeps the frequencies up to a quarter of Nyquist,
i.e. periods of 8 pixels and longer: on a 16x16 latent the DC bin and the rings
out to 2 cycles per image side, the layout of the image rather than its texture.
"""

from __future__ import annotations

from typing import Tuple

import torch

#: Default low-pass radius as a fraction of the Nyquist frequency (0.5 cycles/pixel).
DEFAULT_CUTOFF = 0.25


def _check_cutoff(cutoff: float) -> float:
    from ..errors import InvalidArgumentError

    if isinstance(cutoff, bool) or not isinstance(cutoff, (int, float)) or not 0.0 <= float(cutoff) <= 1.5:
        raise InvalidArgumentError("cutoff", "a fraction of the Nyquist frequency in [0, 1.5]", cutoff)
    return float(cutoff)


def low_pass_mask(height: int, width: int, cutoff: float = DEFAULT_CUTOFF, device=None) -> torch.Tensor:
    """Boolean ``[height, width]`` mask of the FFT bins kept by the low-pass filter.

    Args:
        height, width (`int`): spatial size of the signal.
        cutoff (`float`, defaults to :data:`DEFAULT_CUTOFF`): radius as a fraction of Nyquist;
            0 keeps only the DC bin, ``sqrt(2)`` (or more) keeps every bin.
        device: where to build the mask.
    """
    c = _check_cutoff(cutoff)
    fy = torch.fft.fftfreq(height, device=device, dtype=torch.float64)
    fx = torch.fft.fftfreq(width, device=device, dtype=torch.float64)
    radius = torch.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2)
    return radius <= c * 0.5 + 1e-12


def split_frequencies(x: torch.Tensor, cutoff: float = DEFAULT_CUTOFF) -> Tuple[torch.Tensor, torch.Tensor]:
    """Split ``x`` (``[..., H, W]``, real) into ``(low, high)`` with ``low + high == x``.

    The FFT runs over the last two axes in float64, so the split is exact to rounding.
    """
    if x.dim() < 2:
        from ..errors import InvalidArgumentError

        raise InvalidArgumentError("x", "a tensor with at least 2 dimensions [..., H, W]", tuple(x.shape))
    xd = x.detach().to(torch.float64)
    mask = low_pass_mask(xd.shape[-2], xd.shape[-1], cutoff, xd.device)
    spectrum = torch.fft.fft2(xd)
    low = torch.fft.ifft2(spectrum * mask).real
    return low, xd - low


def band_energy(x: torch.Tensor, cutoff: float = DEFAULT_CUTOFF) -> Tuple[torch.Tensor, torch.Tensor]:
    """Mean squared value of the low and the high part of each item (``[N, ...]`` to two ``[N]`` tensors).

    By Parseval, the two add up to the mean square of ``x``.
    """
    low, high = split_frequencies(x, cutoff)
    n = x.shape[0]
    return low.reshape(n, -1).pow(2).mean(1), high.reshape(n, -1).pow(2).mean(1)


def relative_change(previous: torch.Tensor, current: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """``||current - previous|| / ||current||`` per item (``[N, ...]`` to ``[N]``)."""
    n = current.shape[0]
    diff = (current - previous).reshape(n, -1).double().norm(dim=1)
    return diff / current.reshape(n, -1).double().norm(dim=1).clamp_min(eps)


def low_frequency_distance(a: torch.Tensor, b: torch.Tensor, cutoff: float = DEFAULT_CUTOFF) -> torch.Tensor:
    """RMS difference of the low-frequency parts of ``a`` and ``b`` per item (``[N, ..., H, W]`` to ``[N]``).

    For images pass channels first (``[N, 3, H, W]``) in [0, 1]; the result is then in
    the same units as an RMS pixel error.
    """
    low, _ = split_frequencies(a.double() - b.double(), cutoff)
    return low.reshape(low.shape[0], -1).pow(2).mean(1).sqrt()


__all__ = [
    "DEFAULT_CUTOFF",
    "band_energy",
    "low_frequency_distance",
    "low_pass_mask",
    "relative_change",
    "split_frequencies",
]
