"""Image quality of a plan: distance to the always-CFG images of the same seeds, and the shapes scorer.

Images are ``[B, H, W, 3]`` float arrays in [0, 1]. PSNR uses peak 1:
``10 * log10(1 / MSE)``; identical images have no finite PSNR and are stored as ``None``.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

logger = logging.getLogger(__name__)

#: Prompts for models other than the embedded shapes model.
GENERIC_PROMPTS: Tuple[str, ...] = (
    "a red fox in the snow",
    "a photo of a cat",
    "a lighthouse on a cliff at sunset",
    "a bowl of fruit on a wooden table",
    "an astronaut riding a horse",
    "a watercolor painting of a city street",
    "a close-up of a sunflower",
    "a sailing boat on a calm lake",
)


def l1_per_image(images: np.ndarray, reference: np.ndarray) -> List[float]:
    """Mean absolute difference of each image to its reference."""
    a, b = np.asarray(images, np.float64), np.asarray(reference, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"images: expected shape {b.shape} (the reference's), got {a.shape}")
    return [float(x) for x in np.abs(a - b).reshape(len(a), -1).mean(axis=1)]


def psnr_per_image(images: np.ndarray, reference: np.ndarray) -> List[Optional[float]]:
    """PSNR (dB, peak 1) of each image against its reference; ``None`` where they are identical."""
    a, b = np.asarray(images, np.float64), np.asarray(reference, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"images: expected shape {b.shape} (the reference's), got {a.shape}")
    mse = ((a - b) ** 2).reshape(len(a), -1).mean(axis=1)
    return [None if m == 0 else float(10.0 * math.log10(1.0 / m)) for m in mse]


def compare(images: np.ndarray, reference: np.ndarray) -> Dict[str, Any]:
    """Per-image L1 and PSNR against the reference, and their means (PSNR over finite values)."""
    l1 = l1_per_image(images, reference)
    psnr = psnr_per_image(images, reference)
    finite = [p for p in psnr if p is not None]
    return {
        "l1": l1, "psnr_db": psnr, "l1_mean": float(np.mean(l1)),
        "psnr_mean_db": float(np.mean(finite)) if finite else None,
        "max_abs": float(np.abs(np.asarray(images, np.float64) - np.asarray(reference, np.float64)).max()),
    }


def is_embedded_model(path: "str | Path | None") -> bool:
    """Whether ``path`` is the embedded shapes model shipped in the package."""
    if path is None:
        return False
    from cfgswitch.default_model import EMBEDDED_MODEL_DIR

    try:
        return Path(path).resolve() == EMBEDDED_MODEL_DIR.resolve()
    except OSError:  # pragma: no cover - unreadable path
        return False


def shapes_prompts(count: int, seed: int = 0) -> Optional[Tuple[List[str], List[Any]]]:
    """``count`` captions of the shapes world and their scenes, or ``None`` when the world is not importable."""
    try:
        from cfgswitch.shapes.captions import sample_captioned
    except ImportError as e:
        logger.info("shapes world not importable (%s): generic prompts", e)
        return None
    pairs = sample_captioned(seed, count)
    return [c for _, c in pairs], [s for s, _ in pairs]


def prompts_for(count: int, shapes: bool, seed: int = 0) -> Tuple[List[str], Optional[List[Any]], str]:
    """Prompts for ``count`` images, their scenes (``shapes``: a shapes-world model) and where they came from."""
    if shapes:
        got = shapes_prompts(count, seed)
        if got is not None:
            return got[0], got[1], "shapes world captions (cfgswitch.shapes.captions.sample_captioned)"
    return [GENERIC_PROMPTS[i % len(GENERIC_PROMPTS)] for i in range(count)], None, "generic prompts"


def scorer_accuracy(images: np.ndarray, scenes: Sequence[Any]) -> Tuple[Optional[Dict[str, float]], Optional[str]]:
    """The shapes scorer's attribute accuracies, or ``(None, why not)``."""
    try:
        from cfgswitch.shapes.scorer import accuracy
        from cfgswitch.shapes.world import IMAGE_SIZE
    except ImportError as e:
        return None, f"shapes scorer not importable ({e})"
    if images.shape[1:3] != (IMAGE_SIZE, IMAGE_SIZE):
        return None, f"shapes scorer reads {IMAGE_SIZE}x{IMAGE_SIZE} images, these are {images.shape[1]}x{images.shape[2]}"
    return accuracy(list(images), list(scenes)[: len(images)]), None


__all__ = ["GENERIC_PROMPTS", "compare", "is_embedded_model", "l1_per_image", "prompts_for", "psnr_per_image",
           "scorer_accuracy", "shapes_prompts"]
