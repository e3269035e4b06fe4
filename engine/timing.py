"""Per-stage wall-clock timing that waits for the device before reading the clock."""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Dict, Iterator

import torch


class StageTimer:
    """Accumulates seconds per named stage; synchronises CUDA so GPU work is counted where it ran."""

    def __init__(self, device: torch.device) -> None:
        self._cuda = torch.device(device).type == "cuda"
        self._totals: Dict[str, float] = defaultdict(float)

    def _sync(self) -> None:
        if self._cuda:
            torch.cuda.synchronize()

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self._totals[stage] += time.perf_counter() - start

    def add(self, stage: str, seconds: float) -> None:
        """Add ``seconds`` to ``stage``."""
        self._totals[stage] += seconds

    def totals(self) -> Dict[str, float]:
        """Seconds per stage so far (every standard stage present, 0 when it did not run)."""
        out = {k: 0.0 for k in ("text", "unet_cfg", "unet_late", "scheduler", "vae", "loop")}
        out.update(self._totals)
        return out
