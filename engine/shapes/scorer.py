"""A deterministic, weight-free scorer for images of the shapes world.

:func:`parse_image` reads an image into the objects it shows (colour by nearest palette
entry, connected regions, shape by template overlap, size by box side, position by the
nearest anchor); :func:`score` compares that reading with the scene that was asked for and
says, per attribute, whether it is right. Asked objects are matched to detected ones by
the assignment that agrees on the most attributes; an asked object with no region left to
match gets every attribute wrong.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .world import BACKGROUNDS, COLOURS, IMAGE_SIZE, POSITIONS, SHAPES, SIZES, Scene, shape_mask

#: Attributes judged per object, in report order.
OBJECT_ATTRIBUTES: Tuple[str, ...] = ("colour", "shape", "size", "position")
#: A pixel further than this (RGB distance) from every palette colour is left unlabelled.
COLOUR_TOLERANCE = 80.0
#: Regions smaller than this many pixels are ignored (noise, blended rims).
MIN_AREA = 30

_OBJ_NAMES = list(COLOURS)
_BG_NAMES = list(BACKGROUNDS)
_PALETTE = np.array([COLOURS[n] for n in _OBJ_NAMES] + [BACKGROUNDS[n] for n in _BG_NAMES], dtype=np.float32)


@dataclass(frozen=True)
class DetectedObject:
    """An object read from an image."""

    colour: str
    shape: str
    size: str
    position: str
    area: int
    box: Tuple[int, int, int, int]


@dataclass(frozen=True)
class Reading:
    """What an image shows: its background and its objects, largest first."""

    background: str
    objects: Tuple[DetectedObject, ...]


def _components(mask: np.ndarray) -> List[np.ndarray]:
    """4-connected components of a boolean mask, as arrays of (y, x) pixel indices."""
    seen = np.zeros_like(mask, dtype=bool)
    h, w = mask.shape
    out = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        seen[y0, x0] = True
        queue, pixels = deque([(y0, x0)]), []
        while queue:
            y, x = queue.popleft()
            pixels.append((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        out.append(np.array(pixels))
    return out


def _classify_shape(region: np.ndarray, box: Tuple[int, int, int, int]) -> str:
    x0, y0, x1, y1 = box
    side = max(x1 - x0, y1 - y0)
    cx, cy = (x0 + x1) / 2.0, (y0 + y1) / 2.0
    wx0, wy0 = int(round(cx - side / 2.0)), int(round(cy - side / 2.0))
    canvas = np.zeros((side + 2 * IMAGE_SIZE, side + 2 * IMAGE_SIZE), dtype=bool)
    ys, xs = region[:, 0] - wy0 + IMAGE_SIZE, region[:, 1] - wx0 + IMAGE_SIZE
    canvas[ys, xs] = True
    window = canvas[IMAGE_SIZE : IMAGE_SIZE + side, IMAGE_SIZE : IMAGE_SIZE + side]
    outside = int(canvas.sum() - window.sum())
    best, best_iou = SHAPES[0], -1.0
    for shape in SHAPES:
        tmpl = shape_mask(shape, side)
        inter = int((tmpl & window).sum())
        union = int((tmpl | window).sum()) + outside
        iou = inter / max(union, 1)
        if iou > best_iou:
            best, best_iou = shape, iou
    return best


def _nearest(value: Tuple[float, float], table: Dict[str, Tuple[int, int]]) -> str:
    return min(table, key=lambda k: (table[k][0] - value[0]) ** 2 + (table[k][1] - value[1]) ** 2)


def parse_image(image: np.ndarray) -> Reading:
    """Read an ``[H, W, 3]`` image (uint8, or float in [0, 1]) of the shapes world."""
    img = np.asarray(image)
    if img.dtype != np.uint8:
        img = np.clip(np.round(img.astype(np.float64) * 255.0), 0, 255).astype(np.uint8)
    if img.shape != (IMAGE_SIZE, IMAGE_SIZE, 3):
        raise ValueError(f"image: expected shape ({IMAGE_SIZE}, {IMAGE_SIZE}, 3), got {img.shape}")
    pix = img.astype(np.float32)
    border = np.concatenate([pix[:2].reshape(-1, 3), pix[-2:].reshape(-1, 3), pix[:, :2].reshape(-1, 3), pix[:, -2:].reshape(-1, 3)])
    bg_rgb = np.median(border, axis=0)
    background = min(_BG_NAMES, key=lambda n: float(((np.array(BACKGROUNDS[n]) - bg_rgb) ** 2).sum()))
    dist = np.sqrt(((pix[:, :, None, :] - _PALETTE[None, None]) ** 2).sum(-1))  # [H, W, P]
    label = dist.argmin(-1)
    close = dist.min(-1) <= COLOUR_TOLERANCE
    objects = []
    for ci, name in enumerate(_OBJ_NAMES):
        for region in _components((label == ci) & close):
            if len(region) < MIN_AREA:
                continue
            ys, xs = region[:, 0], region[:, 1]
            box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
            side = max(box[2] - box[0], box[3] - box[1])
            size = min(SIZES, key=lambda k: abs(SIZES[k] - side))
            centre = ((box[0] + box[2]) / 2.0, (box[1] + box[3]) / 2.0)
            objects.append(DetectedObject(name, _classify_shape(region, box), size, _nearest(centre, POSITIONS), len(region), box))
    objects.sort(key=lambda o: -o.area)
    return Reading(background, tuple(objects))


def score(image: np.ndarray, scene: Scene) -> Dict[str, bool]:
    """Per attribute of the asked ``scene``, whether ``image`` shows it.

    Keys: ``background`` and ``object{i}.{attribute}`` for each asked object ``i`` (0 is the
    main object) and attribute in :data:`OBJECT_ATTRIBUTES`.
    """
    reading = parse_image(image)
    result = {"background": reading.background == scene.background}
    asked = list(scene.objects)
    found = list(reading.objects)
    best: Optional[Tuple[int, Tuple[Optional[int], ...]]] = None
    slots = list(range(len(found))) + [None] * len(asked)
    for assign in itertools.permutations(slots, len(asked)):
        if len({a for a in assign if a is not None}) != sum(a is not None for a in assign):
            continue
        hits = sum(
            getattr(found[a], attr) == getattr(obj, attr)
            for obj, a in zip(asked, assign) if a is not None for attr in OBJECT_ATTRIBUTES
        )
        if best is None or hits > best[0]:
            best = (hits, assign)
    assign = best[1] if best is not None else tuple([None] * len(asked))
    for i, (obj, a) in enumerate(zip(asked, assign)):
        for attr in OBJECT_ATTRIBUTES:
            result[f"object{i}.{attr}"] = a is not None and getattr(found[a], attr) == getattr(obj, attr)
    return result


def accuracy(images: Sequence[np.ndarray], scenes: Sequence[Scene]) -> Dict[str, float]:
    """Accuracy figures over a set: the main object's ``colour``, ``shape``, ``size``,
    ``position``, the ``background``, and ``all_attributes`` (every attribute of every object)."""
    if len(images) != len(scenes) or not scenes:
        raise ValueError(f"images and scenes: expected equal non-zero counts, got {len(images)} and {len(scenes)}")
    tallies: Dict[str, List[bool]] = {k: [] for k in (*OBJECT_ATTRIBUTES, "background", "all_attributes")}
    for img, scene in zip(images, scenes):
        res = score(img, scene)
        for attr in OBJECT_ATTRIBUTES:
            tallies[attr].append(res[f"object0.{attr}"])
        tallies["background"].append(res["background"])
        tallies["all_attributes"].extend(res.values())
    return {k: float(np.mean(v)) for k, v in tallies.items()}
