"""What one benchmark run measures: :class:`BenchConfig`, built and checked before any model loads."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import importlib

from cfgswitch.backends.registry import BACKENDS as _REGISTRY, backend_names
from cfgswitch.errors import BackendUnavailableError, InvalidArgumentError
from cfgswitch.plans import GuidancePlan
from cfgswitch.schedulers import scheduler_class_name

#: Backends the harness knows: every backend of the registry (:mod:`cfgswitch.backends.registry`).
BACKENDS: Tuple[str, ...] = backend_names()
#: Plans measured when ``--plans`` is not given.
DEFAULT_PLANS: Tuple[str, ...] = ("always", "switch:0.5", "switch:0.5:cond", "interval:0.2:0.6", "adaptive:0.9997:min=0.2:cond")
#: Switch points of the quality/time sweep (``--quality``).
SWEEP_FRACTIONS: Tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
BASELINES: Tuple[str, ...] = ("diffusers", "none")


@dataclass
class BenchConfig:
    """Everything a benchmark run measures; the run's ``config`` block in ``results.json``.

    Attributes:
        model (`str` or `None`): a diffusers folder (torch backend, and the diffusers baseline).
        bundle (`str` or `None`): an exported bundle (onnxruntime / tensorrt backends).
        backends (`list[str]`): backends to measure, each in :data:`BACKENDS`; ``None`` picks (see
            :func:`parse_backends`). Without a bundle, non-torch backends run a bundle exported from the model first.
        plans (`list[str]`): normalized plan strings; ``always`` is always first (the reference).
        steps (`int`): denoising steps per call.
        batches (`list[int]`): batch sizes (images per call).
        scheduler (`str`): scheduler name.
        repeat (`int`): timed calls per cell.
        warmup (`int`): untimed calls per cell before the timed rounds.
        baseline (`str`): ``diffusers`` or ``none``.
        quality (`bool`): compute image quality and run the switch-point sweep.
        guidance_scale (`float`): CFG weight.
        seed (`int`): seed of image 0 (image i gets ``seed + i``).
        height, width (`int` or `None`): image size (``None``: the model's default).
        sweep (`list[float]`): switch fractions of the sweep (with ``quality``).
        role_repeat (`int`): timed UNet calls per role for the ideal-speedup costs.
        threads (`int` or `None`): torch intra-op threads (``None``: leave as is).
        shapes (`str`): ``auto`` (shapes-world captions and scorer for the embedded model only),
            ``yes`` (for any model trained on the shapes world) or ``no``.
    """

    model: Optional[str] = None
    bundle: Optional[str] = None
    backends: Optional[List[str]] = None
    plans: List[str] = field(default_factory=lambda: list(DEFAULT_PLANS))
    steps: int = 30
    batches: List[int] = field(default_factory=lambda: [1, 4])
    scheduler: str = "ddim"
    repeat: int = 5
    warmup: int = 1
    baseline: str = "diffusers"
    quality: bool = False
    guidance_scale: float = 7.5
    seed: int = 0
    height: Optional[int] = None
    width: Optional[int] = None
    sweep: List[float] = field(default_factory=lambda: list(SWEEP_FRACTIONS))
    role_repeat: int = 10
    threads: Optional[int] = None
    shapes: str = "auto"

    def to_dict(self) -> Dict[str, Any]:
        """A JSON-ready copy."""
        return asdict(self)

    @property
    def sweep_plans(self) -> List[str]:
        """Plan strings of the sweep (empty without ``quality``)."""
        return [str(GuidancePlan.switch_at(f)) for f in self.sweep] if self.quality else []


def parse_plans(text: "str | Sequence[str]") -> List[str]:
    """Comma-separated plan strings to normalized, de-duplicated ones with ``always`` first.

    Raises:
        PlanParseError: a plan string is malformed (the message gives the grammar).
        InvalidArgumentError: the list is empty.
    """
    items = text.split(",") if isinstance(text, str) else list(text)
    items = [s.strip() for s in items if s.strip()]
    if not items:
        raise InvalidArgumentError("plans", "at least one plan, e.g. always,switch:0.5", text)
    plans: List[str] = ["always"]
    for item in items:
        name = str(GuidancePlan.parse(item))
        if name not in plans:
            plans.append(name)
    return plans


def parse_int_list(name: str, text: "str | Sequence[int]", low: int = 1, high: int = 1024) -> List[int]:
    """``"1,4"`` to ``[1, 4]`` (sorted, unique), each in ``[low, high]``."""
    items = text.split(",") if isinstance(text, str) else list(text)
    out: List[int] = []
    for item in items:
        try:
            value = int(str(item).strip())
        except ValueError:
            raise InvalidArgumentError(name, f"comma-separated integers in [{low}, {high}]", text) from None
        if not low <= value <= high:
            raise InvalidArgumentError(name, f"integers in [{low}, {high}]", text)
        if value not in out:
            out.append(value)
    if not out:
        raise InvalidArgumentError(name, f"at least one integer in [{low}, {high}]", text)
    return sorted(out)


def parse_float_list(name: str, text: str) -> List[float]:
    """``"0.3,0.7"`` to ``[0.3, 0.7]``."""
    try:
        out = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise InvalidArgumentError(name, "comma-separated numbers", text) from None
    if not out:
        raise InvalidArgumentError(name, "at least one number", text)
    return out


def cpu_backends_available() -> List[str]:
    """Backends that run a diffusers folder on this machine without a prepared bundle: torch, and
    onnxruntime when ONNX Runtime and the exporter import (the folder is exported first)."""
    import importlib.util

    out = ["torch"]
    if all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxruntime")):
        try:
            importlib.import_module("cfgswitch.export.exporter")
            out.append("onnxruntime")
        except ImportError:  # pragma: no cover - exporter not installed
            pass
    return out


def parse_backends(text: "str | Sequence[str] | None", has_bundle: bool, has_model: bool = False) -> List[str]:
    """Comma-separated backends. ``None``: ``onnxruntime`` (plus ``torch`` with a model) for a bundle,
    else every backend in :func:`cpu_backends_available`."""
    if text is None:
        if has_bundle:
            return ["torch", "onnxruntime"] if has_model else ["onnxruntime"]
        return cpu_backends_available()
    items = text.split(",") if isinstance(text, str) else list(text)
    out = []
    for item in (s.strip() for s in items):
        if item not in BACKENDS:
            raise InvalidArgumentError("backend", f"one or more of {', '.join(BACKENDS)} (comma-separated)", text)
        if item not in out:
            out.append(item)
    if not out:
        raise InvalidArgumentError("backend", f"one or more of {', '.join(BACKENDS)}", text)
    return out


def _check_int(name: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidArgumentError(name, f"an integer in [{low}, {high}]", value)
    return value


def check_config(cfg: BenchConfig) -> BenchConfig:
    """Check every cheap argument (no model is loaded); returns ``cfg`` with normalized lists.

    Raises:
        InvalidArgumentError: a value is out of range, or the backends need a bundle that is not given.
    """
    cfg.plans = parse_plans(cfg.plans)
    cfg.batches = parse_int_list("batch", cfg.batches)
    cfg.backends = parse_backends(cfg.backends, cfg.bundle is not None, cfg.model is not None)
    cfg.steps = _check_int("steps", cfg.steps, 1, 1000)
    cfg.repeat = _check_int("repeat", cfg.repeat, 1, 1000)
    cfg.warmup = _check_int("warmup", cfg.warmup, 0, 100)
    cfg.role_repeat = _check_int("role_repeat", cfg.role_repeat, 1, 1000)
    scheduler_class_name(cfg.scheduler)
    if cfg.baseline not in BASELINES:
        raise InvalidArgumentError("baseline", "'diffusers' or 'none'", cfg.baseline)
    if cfg.threads is not None:
        cfg.threads = _check_int("threads", cfg.threads, 1, 1024)
    if cfg.shapes not in ("auto", "yes", "no"):
        raise InvalidArgumentError("shapes", "'auto', 'yes' or 'no'", cfg.shapes)
    for f in cfg.sweep:
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0.0 < float(f) < 1.0:
            raise InvalidArgumentError("sweep", "fractions strictly between 0 and 1", cfg.sweep)
    import importlib.util

    for name in cfg.backends:
        entry = _REGISTRY[name]
        if entry.source == "bundle" and entry.module and importlib.util.find_spec(entry.module) is None:
            raise BackendUnavailableError(f"backend {name}: {entry.title or entry.module} is not installed "
                                          f"({entry.install_hint()})")
    if "torch" in cfg.backends and cfg.bundle is not None and cfg.model is None:
        raise InvalidArgumentError("backend", "no 'torch' with --bundle alone (give --baseline-model DIR for the torch backend)", "torch")
    for name in ("height", "width"):
        value = getattr(cfg, name)
        if value is not None:
            _check_int(name, value, 2, 8192)
    return cfg


__all__ = ["BACKENDS", "BASELINES", "BenchConfig", "DEFAULT_PLANS", "SWEEP_FRACTIONS", "check_config", "cpu_backends_available", "parse_backends",
           "parse_float_list", "parse_int_list", "parse_plans"]
