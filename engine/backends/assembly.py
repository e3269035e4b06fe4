"""The one path from a bundle to a :class:`~cfgswitch.Sampler`: pick a backend, make its runners, assemble.

:meth:`cfgswitch.Sampler.load`, Triton's BLS pipeline model, the benchmarks and the GPU
suite all build their samplers through :func:`assemble`, so the tokenizers, scheduler config
and model spec of a bundle are read in one place, and a backend is chosen in one place.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Optional, Tuple, Union

from ..bundle import Bundle, read_manifest
from ..errors import BackendUnavailableError
from .registry import BACKENDS, check_options, get_backend, importable as _importable

logger = logging.getLogger(__name__)


def has_tensorrt_plans(bundle: Bundle) -> bool:
    """Whether ``cfgswitch build`` recorded plans in the bundle and their files are there."""
    for layout in bundle.engines().values():
        files = [e.get("file") for e in (layout.get("plans") or {}).values()]
        if files and all(f and (bundle.path / f).is_file() for f in files):
            return True
    return False


def _plan_module(bundle: Bundle, default: Optional[str]) -> Optional[str]:
    """The TensorRT module that built the bundle's plans (``tensorrt`` or ``tensorrt_rtx``)."""
    for layout in bundle.engines().values():
        flavour = layout.get("tensorrt_flavour")
        if flavour == "tensorrt-rtx":
            return "tensorrt_rtx"
    return default


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def pick_backend(bundle: Bundle, importable: Callable[[Optional[str]], bool] = _importable,
                 cuda: Callable[[], bool] = _cuda_available) -> Tuple[str, str]:
    """``(backend, reason)``: the best installed bundle backend for ``bundle``, by the registry's ranks.

    Args:
        bundle (`Bundle`): the bundle.
        importable (`callable`): whether a module imports (replaceable to test the choice).
        cuda (`callable`): whether a CUDA GPU is visible (asked only for backends that need one).

    Raises:
        BackendUnavailableError: no bundle backend's package is installed (names the extras).
    """
    plans = has_tensorrt_plans(bundle)
    skipped = []
    for entry in sorted((e for e in BACKENDS.values() if e.source == "bundle"), key=lambda e: e.auto_rank):
        module = _plan_module(bundle, entry.module) if entry.needs_plans else entry.module
        if entry.needs_plans and not plans:
            skipped.append("the bundle has no TensorRT plans")
            continue
        if entry.needs_cuda and importable(module) and not cuda():
            skipped.append(f"the bundle has TensorRT plans but no CUDA GPU is visible for {entry.name}")
            continue
        if not importable(module):
            skipped.append(f"the bundle has TensorRT plans but {module} does not import" if entry.needs_plans
                           else f"{module} does not import")
            continue
        reason = "; ".join(skipped) if skipped else f"{module} is installed" + (" and the bundle has plans" if plans and entry.needs_plans else "")
        return entry.name, reason
    hints = " or ".join(f"{e.install_hint()} ({e.name})" for e in BACKENDS.values() if e.source == "bundle")
    raise BackendUnavailableError(f"no backend for a bundle is installed ({'; '.join(skipped)}); install one with: {hints}")


def bundle_runners(bundle: Bundle, backend: str, **options: Any):
    """The :class:`~cfgswitch.runners.base.Runners` of ``bundle`` on the registered ``backend``.

    Raises:
        InvalidArgumentError: an unknown backend (or one that does not load bundles), or an
            option the backend does not take (the message lists the valid ones).
        BackendUnavailableError: the backend's package is missing (names the extra).
    """
    entry = get_backend(backend, source="bundle")
    check_options(backend, options)
    return entry.load_factory()(bundle, **options)


def check_family_runners(bundle: Bundle, runners: Any) -> None:
    """Refuse runners that lack a component the bundle's family needs (SDXL's second text encoder).

    Raises:
        BackendUnavailableError: the backend does not run this family's bundles yet (names the
            backends that do).
    """
    spec = bundle.dims
    if len(spec.encoders) > 1 and getattr(runners, "text_encoder_2", None) is None:
        raise BackendUnavailableError(
            f"backend {getattr(runners, 'backend', '?')!r} does not run {spec.family} bundles yet (it has no runner "
            f"for {spec.encoders[1].graph}); load this bundle with backend='onnxruntime' or backend='openvino'"
        )


def assemble(bundle: Union[Bundle, str, Path], backend: Optional[str] = None, *, runners: Any = None,
             sampler_cls: Any = None, source: Optional[str] = None, **options: Any):
    """A :class:`~cfgswitch.Sampler` over a bundle: its runners, tokenizer, scheduler config and model spec.

    Args:
        bundle (`Bundle`, `str` or `Path`): a bundle (read with :func:`cfgswitch.bundle.read_manifest`
            when a path).
        backend (`str`, optional): a bundle backend of the registry; ``None`` picks the best
            installed one and logs why.
        runners (`Runners`, optional): runners made elsewhere (Triton's BLS model); then
            ``backend`` and ``options`` are not used.
        sampler_cls (`type`, defaults to :class:`cfgswitch.Sampler`): the class to build.
        source (`str`, optional): what reports name as the model's source (the bundle path by default).
        options: the backend's options (see ``BACKENDS[backend].options``).

    Raises:
        BundleError: ``bundle`` is not a bundle (names ``cfgswitch export``), or is malformed.
        InvalidArgumentError: an unknown backend or option.
        BackendUnavailableError: the backend's package is not installed.
    """
    if sampler_cls is None:
        from ..sampler import Sampler as sampler_cls  # noqa: N813 - the default class
    if not isinstance(bundle, Bundle):
        bundle = read_manifest(bundle)
    if runners is None:
        if backend is None:
            backend, reason = pick_backend(bundle)
            logger.info("backend: %s (%s)", backend, reason)
        runners = bundle_runners(bundle, backend, **options)
    check_family_runners(bundle, runners)
    extras = bundle.family_extras()  # SDXL: the second tokenizer and force_zeros_for_empty_prompt
    sampler = sampler_cls(runners, bundle.load_tokenizer(), bundle.scheduler_config(), bundle.model_spec(),
                          source=source or str(bundle.path), **({"extras": extras} if extras else {}))
    set_late_context(sampler)
    return sampler


def set_late_context(sampler: Any) -> None:
    """Give a late runner that folds its context (:mod:`cfgswitch.runners.folded_context`) the empty
    prompt's embedding, made by the sampler's own text encoder exactly as a request without a
    negative prompt makes its unconditional rows."""
    unet = sampler.runners.unet
    if not hasattr(unet, "set_context"):
        return
    from ..conditioning import TEXT

    conditioning, _ = sampler.encode_conditioning([""], [""], 1)
    unet.set_context(conditioning.uncond[TEXT])


__all__ = ["assemble", "bundle_runners", "check_family_runners", "has_tensorrt_plans", "pick_backend", "set_late_context"]
