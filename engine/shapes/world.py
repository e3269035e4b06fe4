"""A synthetic scene world: small RGB images of one or two flat shapes on a plain background.

Every scene is drawn from a seed and comes with its ground truth (:class:`Scene`), so a
renderer, a caption grammar (:mod:`cfgswitch.shapes.captions`) and a scorer
(:mod:`cfgswitch.shapes.scorer`) all read the same facts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import numpy as np

#: Image side in pixels.
IMAGE_SIZE = 64

#: Object colours (RGB).
COLOURS: Dict[str, Tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 230),
    "yellow": (245, 220, 30),
    "purple": (140, 40, 190),
    "cyan": (40, 210, 230),
    "orange": (250, 140, 20),
}

#: Background colours (RGB).
BACKGROUNDS: Dict[str, Tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "gray": (128, 128, 128),
}

#: Shape names.
SHAPES: Tuple[str, ...] = ("square", "circle", "triangle", "cross")

#: Size name -> object side in pixels (the bounding box).
SIZES: Dict[str, int] = {"small": 14, "large": 26}

#: Position name -> object centre (x, y) in pixels.
POSITIONS: Dict[str, Tuple[int, int]] = {
    "top left": (16, 16),
    "top right": (48, 16),
    "centre": (32, 32),
    "bottom left": (16, 48),
    "bottom right": (48, 48),
}

#: Share of scenes with two objects.
TWO_OBJECT_SHARE = 0.3


@dataclass(frozen=True)
class SceneObject:
    """One object: colour, shape, size and position names (keys of the tables above)."""

    colour: str
    shape: str
    size: str
    position: str

    def box(self) -> Tuple[int, int, int, int]:
        """Bounding box ``(x0, y0, x1, y1)``, end-exclusive, in pixels."""
        cx, cy = POSITIONS[self.position]
        side = SIZES[self.size]
        x0, y0 = cx - side // 2, cy - side // 2
        return x0, y0, x0 + side, y0 + side


@dataclass(frozen=True)
class Scene:
    """A scene: its background colour name and one or two objects (the first is the main one)."""

    background: str
    objects: Tuple[SceneObject, ...]


def shape_mask(shape: str, side: int) -> np.ndarray:
    """Boolean ``[side, side]`` mask of ``shape`` filling a square box of ``side`` pixels."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}")
    # pixel centres in [-1, 1]
    c = (np.arange(side) + 0.5) / side * 2.0 - 1.0
    y, x = np.meshgrid(c, c, indexing="ij")
    if shape == "square":
        return np.ones((side, side), dtype=bool)
    if shape == "circle":
        return x * x + y * y <= 1.0
    if shape == "triangle":  # apex up, base at the bottom
        return np.abs(x) <= (y + 1.0) / 2.0
    arm = 1.0 / 3.0  # cross: a plus sign with arms a third of the side wide
    return (np.abs(x) <= arm) | (np.abs(y) <= arm)


def _boxes_apart(a: SceneObject, b: SceneObject, gap: int = 2) -> bool:
    ax0, ay0, ax1, ay1 = a.box()
    bx0, by0, bx1, by1 = b.box()
    return ax1 + gap <= bx0 or bx1 + gap <= ax0 or ay1 + gap <= by0 or by1 + gap <= ay0


def random_object(rng: np.random.Generator) -> SceneObject:
    """One object with every attribute drawn uniformly."""
    return SceneObject(
        colour=str(rng.choice(list(COLOURS))),
        shape=str(rng.choice(SHAPES)),
        size=str(rng.choice(list(SIZES))),
        position=str(rng.choice(list(POSITIONS))),
    )


def random_scene(rng: np.random.Generator, two_object_share: float = TWO_OBJECT_SHARE) -> Scene:
    """A scene drawn from ``rng``: one object, or two apart from each other with different colours."""
    background = str(rng.choice(list(BACKGROUNDS)))
    first = random_object(rng)
    objects = [first]
    if rng.random() < two_object_share:
        for _ in range(64):  # a large centre object leaves no room: it stays alone
            second = random_object(rng)
            if second.colour != first.colour and second.position != first.position and _boxes_apart(first, second):
                objects.append(second)
                break
    return Scene(background=background, objects=tuple(objects))


def render(scene: Scene) -> np.ndarray:
    """The ``[64, 64, 3]`` uint8 image of ``scene`` (hard edges, no noise)."""
    img = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    img[:] = BACKGROUNDS[scene.background]
    for obj in scene.objects:
        x0, y0, x1, y1 = obj.box()
        mask = shape_mask(obj.shape, x1 - x0)
        region = img[y0:y1, x0:x1]
        region[mask] = COLOURS[obj.colour]
    return img


def sample_scenes(seed: int, count: int, two_object_share: float = TWO_OBJECT_SHARE) -> List[Scene]:
    """``count`` scenes, deterministic from ``seed``."""
    rng = np.random.default_rng(seed)
    return [random_scene(rng, two_object_share) for _ in range(count)]


def render_batch(scenes: Sequence[Scene]) -> np.ndarray:
    """``[N, 64, 64, 3]`` uint8 images of ``scenes``."""
    return np.stack([render(s) for s in scenes]) if scenes else np.zeros((0, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
