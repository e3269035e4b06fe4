"""Prompt sets and attribute scoring: the shapes world's scorer when available, generic prompts otherwise.

On the embedded model (trained on :mod:`cfgswitch.shapes` scenes) prompts are captions of
held-out scenes and images are scored attribute by attribute against their scene. On any
other model the prompts are generic and the experiments fall back to image distances.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

logger = logging.getLogger(__name__)

#: Scene seed of the analysis prompts: never used by the shapes training recipe (0) or its evaluation (777).
ANALYSIS_SCENE_SEED = 4242

#: Prompts for models that are not the shapes model.
GENERIC_PROMPTS: Tuple[str, ...] = (
    "a red fox in the snow",
    "a bowl of green apples on a wooden table",
    "a lighthouse on a cliff at sunset",
    "a blue vintage car parked in a narrow street",
    "an astronaut riding a horse on the moon",
    "a watercolor painting of a mountain lake",
    "a black cat sleeping on a yellow sofa",
    "a city skyline at night with neon lights",
)


class ShapesScorer:
    """Attribute scoring with :mod:`cfgswitch.shapes.scorer` (deterministic, no weights)."""

    name = "shapes"
    #: The attributes of the main object and the background, in report order.
    attributes = ("colour", "shape", "size", "position", "background")

    def __init__(self) -> None:
        from ..shapes import scorer

        self._scorer = scorer

    def accuracy(self, images: np.ndarray, scenes: Sequence[Any]) -> Dict[str, float]:
        """Percent of images right on each attribute of the main object and the background, and
        ``mean`` (percent of every attribute of every object, the scorer's ``all_attributes``)."""
        acc = self._scorer.accuracy(list(images), list(scenes))
        out = {k: 100.0 * acc[k] for k in self.attributes}
        out["mean"] = 100.0 * acc["all_attributes"]
        return out

    def match_shares(self, images: np.ndarray, scenes: Sequence[Any]) -> Dict[str, float]:
        """Share (0..1) of images whose main object (and background) match ``scenes``, per attribute,
        and ``mean`` over the five attributes."""
        keys = {a: ("background" if a == "background" else f"object0.{a}") for a in self.attributes}
        hits: Dict[str, List[float]] = {a: [] for a in self.attributes}
        for img, scene in zip(images, scenes):
            res = self._scorer.score(img, scene)
            for a, k in keys.items():
                hits[a].append(float(res[k]))
        out = {a: float(np.mean(v)) if v else 0.0 for a, v in hits.items()}
        out["mean"] = float(np.mean([out[a] for a in self.attributes]))
        return out

    def match_share(self, images: np.ndarray, scenes: Sequence[Any]) -> float:
        """Share (0..1) of the scored attributes (main object and background) that match ``scenes``."""
        return self.match_shares(images, scenes)["mean"]


def load_scorer(kind: str = "auto", model_dir: Optional[str] = None) -> Tuple[Optional[ShapesScorer], str]:
    """The scorer to use and a note saying why.

    Args:
        kind (`str`, defaults to ``"auto"``): ``shapes``, ``none``, or ``auto`` (the shapes scorer
            when the model is the embedded shapes model and :mod:`cfgswitch.shapes` imports).
        model_dir (`str`, optional): the model folder, to recognise the embedded model.
    """
    from ..errors import InvalidArgumentError

    if kind not in ("auto", "shapes", "none"):
        raise InvalidArgumentError("scorer", "'auto', 'shapes' or 'none'", kind)
    if kind == "none":
        return None, "scorer disabled (--scorer none): fidelity is measured by image distances only"
    if kind == "auto" and not is_shapes_model(model_dir):
        return None, "the model is not the embedded shapes model: fidelity is measured by image distances only"
    try:
        return ShapesScorer(), "shapes scorer (cfgswitch.shapes.scorer): attribute accuracies of the main object and background"
    except ImportError as e:
        if kind == "shapes":
            raise InvalidArgumentError("scorer", "an importable cfgswitch.shapes package", str(e)) from e
        return None, f"cfgswitch.shapes is not importable ({e}): fidelity is measured by image distances only"


def is_shapes_model(model_dir: Optional[str]) -> bool:
    """Whether ``model_dir`` is the embedded shapes model (the package's ``models/shapes`` folder)."""
    if model_dir is None:
        return False
    from pathlib import Path

    from ..default_model import EMBEDDED_MODEL_DIR

    try:
        return Path(model_dir).resolve() == EMBEDDED_MODEL_DIR.resolve()
    except OSError:
        return False


@dataclass
class PromptSet:
    """Prompts of the experiments, with the scenes they describe when a scorer can use them.

    Attributes:
        prompts (`list[str]`): prompts of the probes and the sweep.
        scenes (`list`, optional): one scene per prompt (scored runs only).
        pairs (`list[tuple[str, str]]`): (A, B) prompts of the [EOS] experiments.
        pair_scenes (`list[tuple]`, optional): (scene A, scene B) per pair.
        source (`str`): where the prompts came from.
    """

    prompts: List[str]
    pairs: List[Tuple[str, str]]
    scenes: Optional[List[Any]] = None
    pair_scenes: Optional[List[Tuple[Any, Any]]] = None
    source: str = ""
    notes: List[str] = field(default_factory=list)


def shapes_prompt_set(count: int, pair_count: int, seed: int = ANALYSIS_SCENE_SEED) -> PromptSet:
    """Held-out captions of the shapes world and (A, B) pairs of one-object scenes that differ in every attribute."""
    from ..shapes.captions import canonical_caption, sample_captioned
    from ..shapes.world import random_scene

    captioned = sample_captioned(seed, count)
    rng = np.random.default_rng([seed, 2])
    pairs, pair_scenes = [], []
    while len(pairs) < pair_count:
        a = random_scene(rng, two_object_share=0.0)
        b = random_scene(rng, two_object_share=0.0)
        oa, ob = a.objects[0], b.objects[0]
        if a.background == b.background or any(getattr(oa, k) == getattr(ob, k) for k in ("colour", "shape", "size", "position")):
            continue
        pairs.append((canonical_caption(a), canonical_caption(b)))
        pair_scenes.append((a, b))
    return PromptSet(prompts=[c for _, c in captioned], scenes=[s for s, _ in captioned], pairs=pairs,
                     pair_scenes=pair_scenes, source=f"shapes world, held-out scene seed {seed}")


def generic_prompt_set(count: int, pair_count: int, prompts: Optional[Sequence[str]] = None) -> PromptSet:
    """``prompts`` (default :data:`GENERIC_PROMPTS`), cycled to ``count``; pairs of neighbours (i, i + 1)."""
    base = list(prompts) if prompts else list(GENERIC_PROMPTS)
    chosen = [base[i % len(base)] for i in range(count)]
    if len(base) < 2:
        from ..errors import InvalidArgumentError

        raise InvalidArgumentError("prompts", "at least two distinct prompts (the [EOS] experiments swap between pairs)", base)
    pairs = [(base[i % len(base)], base[(i + 1) % len(base)]) for i in range(pair_count)]
    return PromptSet(prompts=chosen, pairs=pairs, source="prompts file" if prompts else "built-in generic prompts")


def read_prompts_file(path: str) -> List[str]:
    """Non-empty, non-comment lines of a text file (one prompt per line)."""
    from pathlib import Path

    from ..errors import InvalidArgumentError

    p = Path(path)
    if not p.is_file():
        raise InvalidArgumentError("prompts", "an existing text file with one prompt per line", str(path))
    lines = [ln.strip() for ln in p.read_text(encoding="utf-8").splitlines()]
    prompts = [ln for ln in lines if ln and not ln.startswith("#")]
    if len(prompts) < 2:
        raise InvalidArgumentError("prompts", "a file with at least two prompts", f"{len(prompts)} prompt(s) in {path}")
    return prompts


__all__ = ["ANALYSIS_SCENE_SEED", "GENERIC_PROMPTS", "PromptSet", "ShapesScorer", "generic_prompt_set",
           "is_shapes_model", "load_scorer", "read_prompts_file", "shapes_prompt_set"]
