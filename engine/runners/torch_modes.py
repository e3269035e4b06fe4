"""How the torch backend runs its UNet: eagerly, under ``torch.compile``, or replaying CUDA graphs.

:class:`CudaGraphCache` captures one CUDA graph per input signature (shapes, dtypes), once,
after two warm-up calls on a side stream, with one memory pool shared by every graph (graphs
replay one at a time and each output is cloned at once); later calls copy into its static
inputs and replay. :func:`compile_module` wraps ``torch.compile`` with its cache in the
cfgswitch cache folder (``$CFGSWITCH_CACHE/inductor``) and logs the first (compiling) call of
each shape.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Dict, Tuple

import torch

from ..errors import BackendUnavailableError, InvalidArgumentError

logger = logging.getLogger(__name__)

#: The torch backend's UNet modes.
TORCH_MODES: Tuple[str, ...] = ("eager", "compile", "graphs")


def check_mode(mode: str, device: torch.device) -> str:
    """``mode`` if it can run on ``device``.

    Raises:
        InvalidArgumentError: an unknown mode.
        BackendUnavailableError: ``graphs`` without a CUDA device.
    """
    if mode not in TORCH_MODES:
        raise InvalidArgumentError("mode", f"one of {', '.join(TORCH_MODES)}", mode)
    if mode == "graphs" and device.type != "cuda":
        raise BackendUnavailableError(f"mode 'graphs' captures CUDA graphs and needs a CUDA device; got device {device}")
    return mode


def _cache_dir() -> Path:
    return Path(os.environ.get("CFGSWITCH_CACHE", Path.home() / ".cache" / "cfgswitch")) / "inductor"


class CompiledCall:
    """``torch.compile(fn)``, logging how long the first call of each input signature took (the compile).

    Args:
        fn (`callable`): the module or function to compile.
        name (`str`): what the log calls it.
        options: passed to ``torch.compile`` (for example ``mode="reduce-overhead"`` on CUDA).
    """

    def __init__(self, fn: Callable[..., Any], name: str = "unet", **options: Any) -> None:
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(_cache_dir()))
        self.name = name
        self.reduce_overhead = options.get("mode") == "reduce-overhead"
        self.fn = torch.compile(fn, **options)
        self.seen: Dict[Tuple, float] = {}

    def __call__(self, *args: torch.Tensor) -> Any:
        key = tuple((tuple(a.shape), a.dtype) for a in args)
        if self.reduce_overhead and hasattr(torch.compiler, "cudagraph_mark_step_begin"):
            torch.compiler.cudagraph_mark_step_begin()
        if key in self.seen:
            return self.fn(*args)
        logger.info("torch.compile %s: compiling for %s (first call of this shape)", self.name, [k[0] for k in key])
        start = time.perf_counter()
        out = self.fn(*args)
        self.seen[key] = time.perf_counter() - start
        logger.info("torch.compile %s: ready in %.1f s", self.name, self.seen[key])
        return out


class CudaGraphCache:
    """Replays one CUDA graph per input signature, captured once (static buffers; outputs are cloned).

    Args:
        fn (`callable`): ``fn(*tensors) -> tensor``, capturable (no host syncs, no new shapes inside).
    """

    def __init__(self, fn: Callable[..., torch.Tensor]) -> None:
        self.fn = fn
        self.graphs: Dict[Tuple, Tuple[torch.cuda.CUDAGraph, Tuple[torch.Tensor, ...], torch.Tensor]] = {}
        self._pool = None

    @torch.no_grad()
    def _capture(self, args: Tuple[torch.Tensor, ...]):
        static = tuple(a.clone() for a in args)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # settle lazy initialisation and the allocator before capture
                self.fn(*static)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self._pool):
            out = self.fn(*static)
        return graph, static, out

    @torch.no_grad()
    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        key = tuple((tuple(a.shape), a.dtype, a.device) for a in args)
        if key not in self.graphs:
            self.graphs[key] = self._capture(args)
        graph, static, out = self.graphs[key]
        for dst, src in zip(static, args):
            dst.copy_(src)
        graph.replay()
        return out.clone()


__all__ = ["CompiledCall", "CudaGraphCache", "TORCH_MODES", "check_mode"]
