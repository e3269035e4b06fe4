"""Decisions of the TensorRT backend, as pure functions that need neither TensorRT nor a GPU.

Which layout to load, whether a plan fits the running TensorRT flavour, version and GPU
(checked before any plan is deserialised), which optimization profile serves a request,
how rows are chunked into supported counts. Tested without TensorRT; used by
:mod:`cfgswitch.runners.tensorrt`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from ..backends.trt_flavour import RTX_PORTABLE
from ..errors import BundleError, EngineMismatchError, InvalidArgumentError
from ..io_specs import LAYOUTS, Profile, select_profile


# ============================================================ pure decisions
def build_command(bundle_path: "str | Path", layout: str, static: bool = True, flavour: str = "tensorrt") -> str:
    """The command that (re)builds a bundle's plans for this machine with ``flavour``."""
    return (f"cfgswitch build {bundle_path} --layout {layout}" + ("" if static else " --dynamic")
            + ("" if flavour == "tensorrt" else f" --trt {flavour}"))


def choose_layout(engines: Mapping[str, Any], bundle_path: "str | Path", layout: Optional[str] = None) -> str:
    """The layout to load: the one asked for, else ``two-engines`` when built, else ``shared``.

    Raises:
        InvalidArgumentError: an unknown layout.
        BundleError: no plans were built (names the build command).
    """
    if layout is not None and layout not in LAYOUTS:
        raise InvalidArgumentError("layout", f"one of {', '.join(LAYOUTS)}", layout)
    wanted = [layout] if layout else list(LAYOUTS)
    for name in wanted:
        if engines.get(name, {}).get("plans"):
            return name
    raise BundleError(f"bundle {bundle_path}: no TensorRT plans for layout {layout or LAYOUTS[0]}; "
                      f"build them on this GPU host with: {build_command(bundle_path, layout or LAYOUTS[0])}")


def check_engine_compat(entry: Mapping[str, Any], bundle_path: "str | Path", layout: str, tensorrt_version: str,
                        compute_capability: str, flavour: str = "tensorrt") -> None:
    """Refuse plans built by another TensorRT flavour or version, or for another GPU, before deserialising them.

    Args:
        entry (`dict`): the manifest's ``engines[layout]`` record.
        bundle_path: the bundle (for the message).
        layout (`str`): the layout.
        tensorrt_version (`str`): ``__version__`` of the TensorRT module of this process.
        compute_capability (`str`): ``"major.minor"`` of the running GPU.
        flavour (`str`, defaults to ``"tensorrt"``): the flavour of this process (``tensorrt-rtx``).

    Raises:
        EngineMismatchError: names both flavours, versions or GPUs and the rebuild command.
    """
    cmd = build_command(bundle_path, layout, bool(entry.get("static", True)), flavour)
    built_flavour = str(entry.get("tensorrt_flavour", "tensorrt"))
    if built_flavour != flavour:
        raise EngineMismatchError(
            f"bundle {bundle_path}: the {layout} plans were built by {built_flavour} {entry.get('tensorrt_version')}, "
            f"this process runs {flavour} {tensorrt_version}; plans load only in the TensorRT that built them. "
            f"Rebuild with: {cmd}"
        )
    built_trt = str(entry.get("tensorrt_version"))
    if built_trt != str(tensorrt_version):
        name = "TensorRT" if flavour == "tensorrt" else "TensorRT for RTX"
        raise EngineMismatchError(
            f"bundle {bundle_path}: the {layout} plans were built by {name} {built_trt}, this process runs {name} "
            f"{tensorrt_version}; plans only load in the TensorRT version that built them. Rebuild with: {cmd}"
        )
    built_cc = str(entry.get("compute_capability"))
    if built_cc != RTX_PORTABLE and str(compute_capability) not in built_cc.split(","):
        raise EngineMismatchError(
            f"bundle {bundle_path}: the {layout} plans were built for a GPU of compute capability {built_cc} "
            f"({entry.get('gpu_name', 'unknown GPU')}), this GPU has {compute_capability}. Rebuild with: {cmd}"
        )


def role_profiles(entry: Mapping[str, Any], component: str) -> Tuple[str, List[int], List[Profile]]:
    """``(plan name, profile indices, all profiles of that plan)`` serving ``component``."""
    role = entry["roles"][component]
    plan = entry["plans"][role["plan"]]
    return role["plan"], list(role["profiles"]), [Profile.from_json(p) for p in plan["profiles"]]


def check_engine_request(entry: Mapping[str, Any], bundle_path: "str | Path", layout: str, batch: int, height: int,
                         width: int) -> None:
    """Reject a request no profile of the UNet roles covers (names the export and build flags)."""
    for component in ("cfg", "late"):
        _, indices, profiles = role_profiles(entry, component)
        idx = select_profile(profiles, component, batch, height, width)
        if idx is None or idx not in indices:
            covered = sorted({b for p in profiles if p.component == component for b in range(p.batch[0], p.batch[2] + 1)})
            sizes = sorted({f"{p.image_size[1][0]}x{p.image_size[1][1]}" for p in profiles if p.component == component})
            raise BundleError(
                f"batch {batch} at {height}x{width} is not covered by the TensorRT {layout} plans of {bundle_path} "
                f"(batches {covered}, sizes {sizes}); re-export with cfgswitch export --batch-sizes/--height/--width, "
                f"then {build_command(bundle_path, layout)} (or --dynamic for one min..max profile)"
            )


def split_rows(rows: int, supported: Sequence[int]) -> Optional[List[int]]:
    """Chunk ``rows`` into supported row counts (largest first), or ``None`` when impossible.

    Rows are independent in every graph here, so ``f(x[a:b])`` chunks equal ``f(x)[a:b]``;
    the adaptive plan's 2B-row plain-UNet calls run as two B-row calls on ``late`` plans.
    """
    sizes = sorted(set(s for s in supported if s >= 1), reverse=True)
    best: Dict[int, Optional[List[int]]] = {0: []}
    for n in range(1, rows + 1):
        best[n] = None
        for s in sizes:
            if s <= n and best[n - s] is not None:
                best[n] = [s] + best[n - s]  # type: ignore[operator]
                break
    return best[rows]


__all__ = ["build_command", "check_engine_compat", "check_engine_request", "choose_layout", "role_profiles", "split_rows"]
