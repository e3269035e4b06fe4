"""Quality figures of a shapes model: scorer accuracy of generated images per guidance plan.

``python -m cfgswitch.shapes.evaluate MODEL --count 200 --seed 2026`` prints a JSON table
(the model card's numbers). Prompts come from :func:`cfgswitch.shapes.captions.sample_captioned`
with a seed the training never used.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from .captions import sample_captioned
from .scorer import accuracy

logger = logging.getLogger(__name__)

#: The model card's plans: always-CFG, switch halfway with the paper's late mode, and with ``cond``.
CARD_PLANS = ("always", "switch:0.5", "switch:0.5:cond")
#: The seed of the model card's held-out prompts (the recipe trains on seed 0, checks on 777).
CARD_SEED = 2026


def evaluate(
    sampler,
    count: int = 200,
    seed: int = CARD_SEED,
    plans: Sequence[str] = CARD_PLANS,
    steps: int = 30,
    guidance_scale: float = 7.5,
    batch: int = 50,
) -> Dict[str, Dict[str, float]]:
    """Per plan: the scorer's accuracy figures, seconds per image and UNet rows per image."""
    pairs = sample_captioned(seed, count)
    prompts = [p[1] for p in pairs]
    scenes = [p[0] for p in pairs]
    results: Dict[str, Dict[str, float]] = {}
    for plan in plans:
        images: List[np.ndarray] = []
        rows, t0 = 0, time.perf_counter()
        for i in range(0, count, batch):
            out = sampler.generate(
                prompts[i : i + batch], steps=steps, guidance_scale=guidance_scale, plan=plan,
                seed=seed * 100_000 + i, output_type="np",
            )
            images.extend(out.images)
            rows += out.unet_rows
        elapsed = time.perf_counter() - t0
        figures = accuracy(images, scenes)
        figures.update(seconds_per_image=elapsed / count, unet_rows_per_image=rows / count)
        results[plan] = figures
        logger.info("%s: %s", plan, figures)
    return results


def main(argv: Optional[List[str]] = None) -> int:
    """Command line: evaluate a diffusers folder and print the figures as JSON."""
    from ..sampler import Sampler

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("model", help="diffusers folder")
    p.add_argument("--count", type=int, default=200)
    p.add_argument("--seed", type=int, default=CARD_SEED)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--plans", default=",".join(CARD_PLANS))
    p.add_argument("--out", default=None, help="also write the JSON here")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    import torch

    torch.set_num_threads(args.threads)
    sampler = Sampler.from_diffusers(Path(args.model), device=args.device)
    res = evaluate(sampler, args.count, args.seed, args.plans.split(","), args.steps)
    text = json.dumps(res, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
