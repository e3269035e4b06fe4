"""Checks of built TensorRT plans against :mod:`cfgswitch.io_specs`, without a GPU.

Deserialising a plan needs a GPU (``Runtime.deserialize_cuda_engine`` fails with CUDA error
35 on a machine without a driver), so ``IEngineInspector`` and ``ICudaEngine`` queries are out
of reach on CI. What is checked instead, for every plan of a layout:

1. **The builder's view** (:func:`check_builder_report`): the report
   :func:`cfgswitch.export.build.inspect_build` read from TensorRT's own objects just before
   serialising: input and output tensor names, order and dtypes, static dimensions, the number
   of optimization profiles in the ``IBuilderConfig``, and each profile's min/opt/max shapes
   (``IOptimizationProfile.get_shape``), against the plans and profiles io_specs asks for.
2. **The plan file** (:func:`check_plan_file`): its size and sha256 against the manifest; for
   TensorRT for RTX, the header magic (``vtrt``) and the library version written in the
   header against the version recorded in the manifest, and every I/O tensor name present in
   the serialised bytes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Mapping, Sequence

from cfgswitch.backends.trt_flavour import FLAVOURS, plan_header_version
from cfgswitch.bundle import Bundle, verify_file
from cfgswitch.errors import BundleError
from cfgswitch.io_specs import GraphSpec, PlanSpec, graph_spec, plan_specs


def expected_plans(bundle: Bundle, layout: str, static: bool, row_buckets=()) -> Dict[str, PlanSpec]:
    """The plans io_specs asks for, by name (for the bundle's batch and image sizes)."""
    return {p.name: p for p in plan_specs(bundle.dims, bundle.batch_sizes, bundle.image_sizes, layout, static,
                                          tuple(row_buckets))}


def check_builder_report(report: Mapping[str, Any], plan: PlanSpec, spec: GraphSpec, model_dtype: str) -> List[str]:
    """Mismatches between a builder report and the plan io_specs asks for (empty when it matches)."""
    problems: List[str] = []
    if not report:
        return [f"plan {plan.name}: no builder report was kept (rebuild it with cfgswitch build)"]
    tensors = report.get("tensors", [])
    for mode, wanted in (("input", spec.inputs), ("output", spec.outputs)):
        got = [t for t in tensors if t.get("mode") == mode]
        if [t["name"] for t in got] != [t.name for t in wanted]:
            problems.append(f"plan {plan.name}: {mode} tensors {[t['name'] for t in got]}, expected {[t.name for t in wanted]}")
            continue
        for g, w in zip(got, wanted):
            dtype = w.resolved_dtype(model_dtype)
            if g["dtype"] != dtype:
                problems.append(f"plan {plan.name}: {mode} {w.name} has dtype {g['dtype']}, expected {dtype}")
            if len(g["shape"]) != len(w.shape) or any(isinstance(d, int) and d != n for d, n in zip(w.shape, g["shape"])):
                problems.append(f"plan {plan.name}: {mode} {w.name} has shape {g['shape']}, expected {list(w.shape)}")
    if report.get("num_profiles") != len(plan.profiles) or len(report.get("profiles", [])) != len(plan.profiles):
        problems.append(f"plan {plan.name}: {report.get('num_profiles')} optimization profiles, expected {len(plan.profiles)}")
        return problems
    for k, (got, want) in enumerate(zip(report["profiles"], plan.profiles)):
        for name, three in want.shapes.items():
            wanted = [list(s) for s in three]
            if got.get(name) != wanted:
                problems.append(f"plan {plan.name}: profile {k} input {name} min/opt/max {got.get(name)}, expected {wanted}")
    return problems


def check_plan_file(path: Path, flavour: str, version: str, names: Sequence[str]) -> Dict[str, Any]:
    """Facts of a serialised plan read without a GPU; raises :class:`BundleError` when they are wrong.

    Returns:
        ``{"bytes": size, "header_version": "1.7.1" or None, "names_found": [...]}``.
    """
    data = Path(path).read_bytes()
    facts: Dict[str, Any] = {"bytes": len(data), "header_version": None, "names_found": []}
    if len(data) < 64:
        raise BundleError(f"plan {path.name}: {len(data)} bytes, too small for a TensorRT plan (rebuild it)")
    if flavour == "tensorrt-rtx":
        magic = FLAVOURS[flavour].plan_magic
        header = plan_header_version(data, flavour)
        if header is None:
            raise BundleError(f"plan {path.name}: header {data[:4]!r} is not a TensorRT for RTX plan (expected {magic!r})")
        if not str(version).startswith(header + ".") and str(version) != header:
            raise BundleError(f"plan {path.name}: its header says TensorRT for RTX {header}, the manifest records {version}")
        facts["header_version"] = header
        missing = [n for n in names if n.encode() not in data]
        if missing:
            raise BundleError(f"plan {path.name}: tensor names {missing} are not in the serialised plan")
        facts["names_found"] = list(names)
    return facts


def check_layout(bundle: Bundle, layout: str) -> List[str]:
    """Check every plan of ``layout`` recorded in ``bundle``'s manifest; one summary line per plan.

    Raises:
        BundleError: no plans of ``layout``, or any plan fails a check (every problem is listed).
    """
    entry = bundle.engines(layout)
    if not entry.get("plans"):
        raise BundleError(f"bundle {bundle.path}: no {layout} plans to check (cfgswitch build {bundle.path} --layout {layout})")
    wanted = expected_plans(bundle, layout, bool(entry.get("static", True)), entry.get("row_buckets") or ())
    if sorted(wanted) != sorted(entry["plans"]):
        raise BundleError(f"bundle {bundle.path}: {layout} plans {sorted(entry['plans'])}, io_specs expects {sorted(wanted)}")
    flavour = entry.get("tensorrt_flavour", "tensorrt")
    lines, problems = [], []
    for name, rec in entry["plans"].items():
        plan = wanted[name]
        spec = graph_spec(plan.graph, bundle.dims)
        verify_file(bundle.path, rec["file"], rec["sha256"], rec.get("bytes"), name)
        problems += check_builder_report(rec.get("builder_report") or {}, plan, spec, bundle.dtype)
        facts = check_plan_file(bundle.path / rec["file"], flavour, entry["tensorrt_version"],
                                spec.input_names + spec.output_names)
        lines.append(f"{layout}/{name}: {facts['bytes']} bytes, {len(plan.profiles)} profile(s), tensors "
                     f"{', '.join(spec.input_names + spec.output_names)} ({bundle.dtype})"
                     + (f", header {flavour} {facts['header_version']}" if facts["header_version"] else ""))
    if problems:
        raise BundleError(f"bundle {bundle.path}: {layout} plans do not match io_specs: " + "; ".join(problems))
    return lines


__all__ = ["check_builder_report", "check_layout", "check_plan_file", "expected_plans"]
