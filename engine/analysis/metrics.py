"""Distances between images of the same seed: L1, PSNR and a low-frequency-only distance.

Images are float arrays ``[N, H, W, 3]`` in [0, 1] (``Sampler.generate(output_type="np")``).
"""

from __future__ import annotations

from typing import Dict

import numpy as np
import torch

from .frequency import DEFAULT_CUTOFF, low_frequency_distance

#: PSNR reported for identical images (JSON has no infinity).
PSNR_CAP_DB = 100.0


def _check_pair(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape != b.shape or a.ndim != 4:
        from ..errors import InvalidArgumentError

        raise InvalidArgumentError("images", "two arrays of one shape [N, H, W, C]", f"{a.shape} and {b.shape}")


def l1_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Mean absolute pixel difference per image (``[N]``)."""
    _check_pair(a, b)
    return np.abs(a.astype(np.float64) - b.astype(np.float64)).reshape(len(a), -1).mean(1)


def psnr(a: np.ndarray, b: np.ndarray, peak: float = 1.0) -> np.ndarray:
    """Peak signal-to-noise ratio in dB per image (``[N]``), capped at :data:`PSNR_CAP_DB`."""
    _check_pair(a, b)
    mse = ((a.astype(np.float64) - b.astype(np.float64)) ** 2).reshape(len(a), -1).mean(1)
    with np.errstate(divide="ignore"):
        out = 10.0 * np.log10(peak**2 / mse)
    return np.minimum(out, PSNR_CAP_DB)


def lowfreq_distance(a: np.ndarray, b: np.ndarray, cutoff: float = DEFAULT_CUTOFF) -> np.ndarray:
    """RMS difference of the low-frequency parts of each image pair (``[N]``, pixel units)."""
    _check_pair(a, b)
    ta = torch.from_numpy(np.ascontiguousarray(a)).permute(0, 3, 1, 2)
    tb = torch.from_numpy(np.ascontiguousarray(b)).permute(0, 3, 1, 2)
    return low_frequency_distance(ta, tb, cutoff).numpy()


def rms_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """RMS pixel difference per image (``[N]``)."""
    _check_pair(a, b)
    return np.sqrt(((a.astype(np.float64) - b.astype(np.float64)) ** 2).reshape(len(a), -1).mean(1))


def image_distances(a: np.ndarray, b: np.ndarray, cutoff: float = DEFAULT_CUTOFF) -> Dict[str, np.ndarray]:
    """``l1``, ``psnr`` and ``lowfreq`` distances of each pair of images."""
    return {"l1": l1_distance(a, b), "psnr": psnr(a, b), "lowfreq": lowfreq_distance(a, b, cutoff)}


def toward_b(image: np.ndarray, image_a: np.ndarray, image_b: np.ndarray, cutoff: float = DEFAULT_CUTOFF) -> np.ndarray:
    """Where each image lies between A's and B's images: ``d_A / (d_A + d_B)`` with the low-frequency distance.

    0 means the image equals A's image, 1 that it equals B's, 0.5 equally far from both.
    Pairs whose A and B images coincide (``d_A + d_B == 0``) give 0.5.
    """
    da = lowfreq_distance(image, image_a, cutoff)
    db = lowfreq_distance(image, image_b, cutoff)
    total = da + db
    return np.where(total > 0, da / np.where(total > 0, total, 1.0), 0.5)


__all__ = ["PSNR_CAP_DB", "image_distances", "l1_distance", "lowfreq_distance", "psnr", "rms_distance", "toward_b"]
