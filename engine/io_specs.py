"""The tensors of every exported graph, and the shapes TensorRT is asked to support.

One declarative source of truth, read by the exporter (``cfgswitch.export``) and by
the runtimes (ONNX Runtime, TensorRT): tensor names, dtypes, symbolic shapes (the
dynamic axes of the ONNX graphs) and the min/opt/max optimization profiles of each
role (``cfg``: 2B UNet rows, ``late``: B rows) in each TensorRT layout.

Symbolic dimensions:

======  ===============================================================
``B``   images in the request (the ``late`` role's rows)
``2B``  UNet rows of the guided graph (``[uncond; cond]``)
``T``   prompts encoded in one text-encoder call
``h``   latent height, ``w`` latent width
``H``   image height (``h * factor``), ``W`` image width
======  ===============================================================

Model constants (``latent_channels``, ``text_length``, the text and added-conditioning
widths) are filled from the model's :class:`~cfgswitch.model_spec.ModelSpec`, and each
model family gives its own graph table (:meth:`cfgswitch.families.base.Family.graph_table`:
SD 1.x/2.x the four graphs below, SDXL a second text encoder and the added UNet inputs
``text_embeds`` and ``time_ids``). Nothing here imports ONNX, ONNX Runtime or TensorRT.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

from .model_spec import ModelSpec

Dim = Union[int, str]

#: The graphs of an SD 1.x/2.x bundle, in export order (a family's own: :func:`graph_names`).
GRAPH_NAMES: Tuple[str, ...] = ("text_encoder", "unet", "unet_cfg", "vae_decoder")
#: Every graph name some family exports (SDXL adds its second text encoder).
ALL_GRAPH_NAMES: Tuple[str, ...] = ("text_encoder", "text_encoder_2", "unet", "unet_cfg", "vae_decoder")
#: The UNet roles of the loop.
ROLES: Tuple[str, ...] = ("cfg", "late")
#: TensorRT layouts: one plan per role, or one plain-UNet plan with a profile per role.
LAYOUTS: Tuple[str, ...] = ("two-engines", "shared")
#: Every engine a TensorRT runtime of an SD 1.x/2.x bundle needs: the two UNet roles plus text
#: encoder and VAE (a family's own: :func:`components`).
COMPONENTS: Tuple[str, ...] = ("text_encoder", "cfg", "late", "vae_decoder")


@dataclass(frozen=True)
class TensorSpec:
    """One input or output tensor of a graph.

    Attributes:
        name (`str`): the ONNX / TensorRT tensor name.
        dtype (`str`): ``float32``, ``float16`` or ``int64``; ``"model"`` means the export dtype.
        shape (`tuple`): ints and symbolic dimension names (see the module docstring).
    """

    name: str
    dtype: str
    shape: Tuple[Dim, ...]

    def resolved_dtype(self, model_dtype: str) -> str:
        """The concrete dtype for a bundle exported in ``model_dtype`` (``float32`` / ``float16``)."""
        return model_dtype if self.dtype == "model" else self.dtype

    def dynamic_axes(self) -> Dict[int, str]:
        """``{axis: symbol}`` of the symbolic axes (the ONNX exporter's ``dynamic_axes`` entry)."""
        return {i: d for i, d in enumerate(self.shape) if isinstance(d, str)}


@dataclass(frozen=True)
class GraphSpec:
    """The interface of one exported graph.

    Attributes:
        name (`str`): graph name (``unet_cfg``); its file is ``<name>.onnx``.
        inputs, outputs (`tuple[TensorSpec]`): in call order.
        rows (`str`): the symbol of its batch axis (what a profile varies).
    """

    name: str
    inputs: Tuple[TensorSpec, ...]
    outputs: Tuple[TensorSpec, ...]
    rows: str

    @property
    def file(self) -> str:
        """The graph's ONNX file name inside a bundle."""
        return f"{self.name}.onnx"

    @property
    def input_names(self) -> List[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> List[str]:
        return [t.name for t in self.outputs]

    def dynamic_axes(self) -> Dict[str, Dict[int, str]]:
        """The exporter's ``dynamic_axes`` for every input and output."""
        return {t.name: t.dynamic_axes() for t in self.inputs + self.outputs if t.dynamic_axes()}


def graph_specs(spec: ModelSpec) -> Dict[str, GraphSpec]:
    """The :class:`GraphSpec` of every graph of a model, by graph name in export order (its family's table)."""
    from .families import get_family

    return get_family(spec.family).graph_table(spec)


def graph_names(spec: ModelSpec) -> Tuple[str, ...]:
    """The graph names of a model's bundle, in export order."""
    return tuple(graph_specs(spec))


def text_encoder_names(spec: ModelSpec) -> Tuple[str, ...]:
    """The text-encoder graphs of a model (``text_encoder``; SDXL adds ``text_encoder_2``)."""
    return tuple(e.graph for e in spec.encoders)


def components(spec: ModelSpec) -> Tuple[str, ...]:
    """Every engine a TensorRT runtime of this model needs: its text encoders, the two UNet roles and the VAE."""
    return text_encoder_names(spec) + ("cfg", "late", "vae_decoder")


def graph_spec(name: str, spec: ModelSpec) -> GraphSpec:
    """The :class:`GraphSpec` of graph ``name`` (one of :func:`graph_names`)."""
    table = graph_specs(spec)
    if name not in table:
        raise KeyError(f"graph: expected one of {', '.join(table)}, got {name!r}")
    return table[name]


def resolve_shape(shape: Sequence[Dim], env: Mapping[str, int]) -> Tuple[int, ...]:
    """Concrete shape of a symbolic one; ``env`` gives ``B``, ``T``, ``h``, ``w`` (``2B``, ``H``, ``W`` derive)."""
    out = []
    for d in shape:
        if isinstance(d, int):
            out.append(d)
        elif d == "2B":
            out.append(2 * env["B"])
        elif d in env:
            out.append(int(env[d]))
        else:
            raise KeyError(f"dimension {d!r}: no value given (have {', '.join(sorted(env))})")
    return tuple(out)


def shape_env(rows: int, height: int, width: int, factor: int) -> Dict[str, int]:
    """The symbol values of a request: ``rows`` for every row symbol, latent and image sizes."""
    return {"B": rows, "T": rows, "h": height // factor, "w": width // factor, "H": height, "W": width}


# ---------------------------------------------------------------------- roles and profiles
@dataclass(frozen=True)
class RoleBinding:
    """Which graph serves a component in a layout, and how its rows relate to the batch B.

    Attributes:
        component (`str`): ``text_encoder``, ``cfg``, ``late`` or ``vae_decoder``.
        graph (`str`): the graph whose plan serves it.
        row_factor (`int`): rows of the graph's batch axis per image (2 for the plain UNet in
            the ``shared`` layout's ``cfg`` role; 1 otherwise: ``unet_cfg`` doubles inside).
        combine_outside (`bool`): the CFG combine runs after the engine (``shared`` layout).
    """

    component: str
    graph: str
    row_factor: int = 1
    combine_outside: bool = False


def role_binding(component: str, layout: str = "two-engines") -> RoleBinding:
    """The :class:`RoleBinding` of ``component`` in ``layout``."""
    if layout not in LAYOUTS:
        raise KeyError(f"layout: expected one of {', '.join(LAYOUTS)}, got {layout!r}")
    if component == "cfg":
        if layout == "shared":
            return RoleBinding("cfg", "unet", row_factor=2, combine_outside=True)
        return RoleBinding("cfg", "unet_cfg")
    if component == "late":
        return RoleBinding("late", "unet")
    if _is_text(component) or component == "vae_decoder":
        return RoleBinding(component, component)
    raise KeyError(f"component: expected one of {', '.join(COMPONENTS)} (or text_encoder_2), got {component!r}")


def _is_text(component: str) -> bool:
    return component in ("text_encoder", "text_encoder_2")


@dataclass(frozen=True)
class Profile:
    """One TensorRT optimization profile: ``{input name: (min, opt, max) shapes}``.

    Attributes:
        component (`str`): the component it serves.
        batch (`tuple[int, int, int]`): min/opt/max images B it serves.
        image_size (`tuple`): ``((hmin, wmin), (hopt, wopt), (hmax, wmax))`` in pixels.
        shapes (`dict`): input name to its min, opt and max shapes.
    """

    component: str
    batch: Tuple[int, int, int]
    image_size: Tuple[Tuple[int, int], Tuple[int, int], Tuple[int, int]]
    shapes: Dict[str, Tuple[Tuple[int, ...], Tuple[int, ...], Tuple[int, ...]]] = field(default_factory=dict)

    def covers(self, batch: int, height: int, width: int) -> bool:
        """Whether a request of ``batch`` images of ``height`` x ``width`` fits this profile."""
        (h0, w0), _, (h1, w1) = self.image_size
        return self.batch[0] <= batch <= self.batch[2] and h0 <= height <= h1 and w0 <= width <= w1

    def to_json(self) -> Dict:
        """A JSON-ready dict (the manifest's form)."""
        return {
            "component": self.component, "batch": list(self.batch), "image_size": [list(s) for s in self.image_size],
            "shapes": {k: [list(s) for s in v] for k, v in self.shapes.items()},
        }

    @classmethod
    def from_json(cls, d: Mapping) -> "Profile":
        """Inverse of :meth:`to_json`."""
        return cls(
            component=d["component"], batch=tuple(d["batch"]), image_size=tuple(tuple(s) for s in d["image_size"]),
            shapes={k: tuple(tuple(s) for s in v) for k, v in d["shapes"].items()},
        )


def _profile(component: str, spec: GraphSpec, row_factor: int, factor: int,
             batch: Tuple[int, int, int], sizes: Tuple[Tuple[int, int], Tuple[int, int], Tuple[int, int]]) -> Profile:
    shapes = {}
    for t in spec.inputs:
        three = tuple(resolve_shape(t.shape, shape_env(b * row_factor, hw[0], hw[1], factor)) for b, hw in zip(batch, sizes))
        shapes[t.name] = three
    return Profile(component, batch, sizes, shapes)


def profiles_for(component: str, dims: ModelSpec, batch_sizes: Sequence[int], image_sizes: Sequence[Tuple[int, int]],
                 layout: str = "two-engines", static: bool = True) -> List[Profile]:
    """The optimization profiles TensorRT is asked for, for one component.

    Static: one profile per (batch size, image size), ``min == opt == max`` (the fastest
    tactics). Dynamic: one profile from the smallest to the largest batch and size, with
    ``opt`` at the largest batch and the first image size. A text encoder always gets one
    profile of 1 to the largest batch rows: it encodes the distinct prompts of a request,
    which can be fewer than its images. Every input of the graph gets its shapes, the
    family's added conditioning too (SDXL's ``text_embeds`` and ``time_ids``: 2B rows in the
    ``cfg`` role, B in ``late``).

    Args:
        component (`str`): one of :func:`components` of the model.
        dims (`ModelSpec`): the model's spec.
        batch_sizes (`Sequence[int]`): images per request the bundle supports.
        image_sizes (`Sequence[tuple[int, int]]`): ``(height, width)`` pixel sizes it supports.
        layout (`str`, defaults to ``"two-engines"``): one of :data:`LAYOUTS`.
        static (`bool`, defaults to True): static shapes rather than one dynamic profile.
    """
    binding = role_binding(component, layout)
    spec = graph_spec(binding.graph, dims)
    bs = sorted(set(int(b) for b in batch_sizes))
    sizes = [tuple(int(x) for x in s) for s in image_sizes]
    if not bs or not sizes:
        raise ValueError("batch_sizes and image_sizes must not be empty")
    if static and not _is_text(component):
        return [_profile(component, spec, binding.row_factor, dims.vae_scale_factor, (b, b, b), (s, s, s))
                for s in sizes for b in bs]
    lo = (min(s[0] for s in sizes), min(s[1] for s in sizes))
    hi = (max(s[0] for s in sizes), max(s[1] for s in sizes))
    # The text encoder and VAE see as few as one row; the UNet roles see whole requests.
    b_min = 1 if _is_text(component) or component == "vae_decoder" else bs[0]
    return [_profile(component, spec, binding.row_factor, dims.vae_scale_factor, (b_min, bs[-1], bs[-1]), (lo, sizes[0], hi))]


@dataclass(frozen=True)
class PlanSpec:
    """One TensorRT plan to build: its graph and its profiles (indices in order).

    Attributes:
        name (`str`): plan name (``unet_cfg``, ``unet``, ``text_encoder``, ``vae_decoder``).
        graph (`str`): the ONNX graph it is built from.
        profiles (`list[Profile]`): its optimization profiles; the index is the profile index.
    """

    name: str
    graph: str
    profiles: Tuple[Profile, ...]

    def profile_indices(self, component: str) -> List[int]:
        """Indices of the profiles serving ``component``."""
        return [i for i, p in enumerate(self.profiles) if p.component == component]


def plan_specs(dims: ModelSpec, batch_sizes: Sequence[int], image_sizes: Sequence[Tuple[int, int]],
               layout: str = "two-engines", static: bool = True, row_buckets: Sequence[int] = ()) -> List[PlanSpec]:
    """The plans a layout needs.

    ``two-engines``: ``unet_cfg`` (profiles of the ``cfg`` role) and ``unet`` (``late``).
    ``shared``: one ``unet`` plan whose profiles are those of ``cfg`` (2B rows) then those
    of ``late`` (B rows). Both add the model's text encoders (``text_encoder``; SDXL also
    ``text_encoder_2``) and ``vae_decoder``. With ``row_buckets``
    the plain UNet's (``late``) profiles are one per bucket instead, the row counts the step
    engine pads its calls to (``cfgswitch build --row-buckets``).
    """
    def prof(component: str) -> Tuple[Profile, ...]:
        sizes = row_buckets if (component == "late" and row_buckets) else batch_sizes
        return tuple(profiles_for(component, dims, sizes, image_sizes, layout, static))

    plans = [PlanSpec(name, name, prof(name)) for name in text_encoder_names(dims)]
    if layout == "shared":
        plans.append(PlanSpec("unet", "unet", prof("cfg") + prof("late")))
    elif layout == "two-engines":
        plans.append(PlanSpec("unet_cfg", "unet_cfg", prof("cfg")))
        plans.append(PlanSpec("unet", "unet", prof("late")))
    else:
        raise KeyError(f"layout: expected one of {', '.join(LAYOUTS)}, got {layout!r}")
    plans.append(PlanSpec("vae_decoder", "vae_decoder", prof("vae_decoder")))
    return plans


def select_profile(profiles: Iterable[Profile], component: str, batch: int, height: int, width: int) -> Optional[int]:
    """Index of the first profile of ``component`` that covers the request, preferring exact (static) ones."""
    indexed = [(i, p) for i, p in enumerate(profiles) if p.component == component and p.covers(batch, height, width)]
    exact = [i for i, p in indexed if p.batch[0] == p.batch[2] == batch]
    if exact:
        return exact[0]
    return indexed[0][0] if indexed else None


__all__ = [
    "ALL_GRAPH_NAMES", "COMPONENTS", "GRAPH_NAMES", "GraphSpec", "LAYOUTS", "ModelSpec", "PlanSpec", "Profile", "ROLES",
    "RoleBinding", "TensorSpec", "components", "graph_names", "graph_spec", "graph_specs", "plan_specs", "profiles_for",
    "resolve_shape", "role_binding", "select_profile", "shape_env", "text_encoder_names",
]
