"""A caption grammar for :mod:`cfgswitch.shapes.world` scenes, with some variety of wording.

``caption(scene, rng)`` picks a template and synonyms with ``rng``; every caption names
every attribute of every object and the background, so the scene is recoverable from it.
"""

from __future__ import annotations

from typing import Dict, List, Tuple

import numpy as np

from .world import Scene, SceneObject, sample_scenes

SIZE_WORDS: Dict[str, Tuple[str, ...]] = {"small": ("small", "little"), "large": ("large", "big")}
SHAPE_WORDS: Dict[str, Tuple[str, ...]] = {
    "square": ("square",),
    "circle": ("circle", "disc"),
    "triangle": ("triangle",),
    "cross": ("cross", "plus sign"),
}
COLOUR_WORDS: Dict[str, Tuple[str, ...]] = {
    "red": ("red",), "green": ("green",), "blue": ("blue",), "yellow": ("yellow",),
    "purple": ("purple",), "cyan": ("cyan",), "orange": ("orange",),
}
POSITION_WORDS: Dict[str, Tuple[str, ...]] = {
    "top left": ("top left", "upper left"),
    "top right": ("top right", "upper right"),
    "centre": ("centre", "center", "middle"),
    "bottom left": ("bottom left", "lower left"),
    "bottom right": ("bottom right", "lower right"),
}
BACKGROUND_WORDS: Dict[str, Tuple[str, ...]] = {"white": ("white",), "black": ("black",), "gray": ("gray", "grey")}

# object phrase templates: {s} size, {c} colour, {h} shape, {p} position
_OBJECT_TEMPLATES = (
    "a {s} {c} {h} at the {p}",
    "a {s} {c} {h} in the {p}",
    "{c} {h}, {s}, {p}",
    "a {c} {h} at the {p}, {s}",
)
# scene templates: {o} object phrases, {b} background colour
_SCENE_TEMPLATES = (
    "{o} on a {b} background",
    "{o}, {b} background",
    "{b} background, {o}",
)


def _pick(rng: np.random.Generator, words: Tuple[str, ...]) -> str:
    return words[int(rng.integers(len(words)))]


def object_phrase(obj: SceneObject, rng: np.random.Generator) -> str:
    """A phrase naming the colour, shape, size and position of ``obj``."""
    template = _OBJECT_TEMPLATES[int(rng.integers(len(_OBJECT_TEMPLATES)))]
    text = template.format(
        s=_pick(rng, SIZE_WORDS[obj.size]), c=_pick(rng, COLOUR_WORDS[obj.colour]),
        h=_pick(rng, SHAPE_WORDS[obj.shape]), p=_pick(rng, POSITION_WORDS[obj.position]),
    )
    return "an " + text[2:] if text.startswith("a orange") else text


def caption(scene: Scene, rng: np.random.Generator) -> str:
    """A caption of ``scene``; the main object is named first."""
    phrases = [object_phrase(o, rng) for o in scene.objects]
    joined = phrases[0] if len(phrases) == 1 else f"{phrases[0]} and {phrases[1]}"
    template = _SCENE_TEMPLATES[int(rng.integers(len(_SCENE_TEMPLATES)))]
    return template.format(o=joined, b=_pick(rng, BACKGROUND_WORDS[scene.background]))


def canonical_caption(scene: Scene) -> str:
    """The plain caption of ``scene`` (first synonyms, first templates): for demos and docs."""
    def phrase(o: SceneObject) -> str:
        return f"a {o.size} {o.colour} {o.shape} at the {o.position}"

    joined = " and ".join(phrase(o) for o in scene.objects)
    return f"{joined} on a {scene.background} background"


def sample_captioned(seed: int, count: int) -> List[Tuple[Scene, str]]:
    """``count`` (scene, caption) pairs, deterministic from ``seed``."""
    scenes = sample_scenes(seed, count)
    rng = np.random.default_rng([seed, 1])
    return [(s, caption(s, rng)) for s in scenes]
