"""The shapes world: renderer, captions and the weight-free scorer."""

from __future__ import annotations

import numpy as np
import pytest

from cfgswitch.shapes.captions import BACKGROUND_WORDS, COLOUR_WORDS, POSITION_WORDS, SHAPE_WORDS, SIZE_WORDS, sample_captioned
from cfgswitch.shapes.scorer import accuracy, parse_image, score
from cfgswitch.shapes.world import (
    BACKGROUNDS, COLOURS, IMAGE_SIZE, POSITIONS, SHAPES, SIZES, Scene, SceneObject, render, render_batch, sample_scenes,
    shape_mask,
)


def test_world_has_the_required_variety():
    assert len(COLOURS) >= 6 and len(SHAPES) >= 4 and len(SIZES) == 2
    assert len(POSITIONS) >= 5 and len(BACKGROUNDS) >= 3
    scenes = sample_scenes(0, 2000)
    assert {s.background for s in scenes} == set(BACKGROUNDS)
    objs = [o for s in scenes for o in s.objects]
    assert {o.colour for o in objs} == set(COLOURS)
    assert {o.shape for o in objs} == set(SHAPES)
    assert {o.position for o in objs} == set(POSITIONS)
    two = sum(len(s.objects) == 2 for s in scenes) / len(scenes)
    assert 0.15 < two < 0.35  # 30% asked; a large centre object stays alone


def test_scenes_are_deterministic_and_seed_dependent():
    assert sample_captioned(3, 50) == sample_captioned(3, 50)
    assert sample_captioned(3, 50) != sample_captioned(4, 50)
    a, b = render_batch(sample_scenes(3, 20)), render_batch(sample_scenes(3, 20))
    assert a.shape == (20, IMAGE_SIZE, IMAGE_SIZE, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)


def test_two_objects_never_touch_and_differ_in_colour():
    for scene in sample_scenes(1, 3000):
        if len(scene.objects) == 2:
            a, b = scene.objects
            assert a.colour != b.colour and a.position != b.position
            ax0, ay0, ax1, ay1 = a.box()
            bx0, by0, bx1, by1 = b.box()
            assert ax1 + 2 <= bx0 or bx1 + 2 <= ax0 or ay1 + 2 <= by0 or by1 + 2 <= ay0


def test_render_paints_exactly_the_shape():
    obj = SceneObject("red", "triangle", "large", "top left")
    img = render(Scene("white", (obj,)))
    x0, y0, x1, y1 = obj.box()
    assert (x0, y0, x1, y1) == (3, 3, 29, 29)
    red = np.all(img == COLOURS["red"], axis=-1)
    assert red.sum() == shape_mask("triangle", 26).sum()
    assert np.array_equal(red[y0:y1, x0:x1], shape_mask("triangle", 26))
    assert np.all(img[~red] == BACKGROUNDS["white"])
    # shape masks fill their box as expected: square 100%, circle ~pi/4, triangle ~1/2, cross 5/9
    fills = {s: shape_mask(s, 60).mean() for s in SHAPES}
    assert fills["square"] == 1.0
    assert fills["circle"] == pytest.approx(np.pi / 4, abs=0.02)
    assert fills["triangle"] == pytest.approx(0.5, abs=0.02)
    assert fills["cross"] == pytest.approx(5 / 9, abs=0.02)


def test_captions_name_every_attribute():
    for scene, text in sample_captioned(11, 300):
        assert any(w in text for w in BACKGROUND_WORDS[scene.background])
        for o in scene.objects:
            for table, value in ((COLOUR_WORDS, o.colour), (SHAPE_WORDS, o.shape), (SIZE_WORDS, o.size), (POSITION_WORDS, o.position)):
                assert any(w in text for w in table[value]), (text, value)
    texts = {t for _, t in sample_captioned(11, 300)}
    assert len(texts) > 250  # varied wording, not one template


def test_scorer_is_right_on_clean_renders():
    scenes = sample_scenes(12345, 400)
    figures = accuracy(list(render_batch(scenes)), scenes)
    assert figures["all_attributes"] >= 0.99
    for key in ("colour", "shape", "size", "position", "background"):
        assert figures[key] >= 0.99, (key, figures)


def test_scorer_reads_float_images_and_reports_wrong_attributes():
    scene = Scene("black", (SceneObject("blue", "circle", "small", "bottom right"),))
    img = render(scene).astype(np.float32) / 255.0
    assert all(score(img, scene).values())
    asked = Scene("gray", (SceneObject("red", "square", "large", "top left"),))
    res = score(img, asked)
    assert res == {"background": False, "object0.colour": False, "object0.shape": False, "object0.size": False,
                   "object0.position": False}
    # a right colour at the wrong place: only the colour counts
    asked = Scene("black", (SceneObject("blue", "circle", "small", "top left"),))
    res = score(img, asked)
    assert res["object0.colour"] and res["object0.shape"] and res["object0.size"] and not res["object0.position"]


def test_scorer_survives_noise_and_blur():
    rng = np.random.default_rng(0)
    scenes = sample_scenes(99, 100)
    imgs = render_batch(scenes).astype(np.float32)
    # a 3x3 box blur and Gaussian noise of 12 levels: still mostly right
    pad = np.pad(imgs, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    blurred = sum(pad[:, dy : dy + IMAGE_SIZE, dx : dx + IMAGE_SIZE] for dy in range(3) for dx in range(3)) / 9.0
    noisy = np.clip(blurred + rng.normal(0, 12, blurred.shape), 0, 255).astype(np.uint8)
    figures = accuracy(list(noisy), scenes)
    assert figures["all_attributes"] >= 0.95, figures


def test_scorer_rejects_bad_input():
    with pytest.raises(ValueError, match=r"expected shape \(64, 64, 3\)"):
        parse_image(np.zeros((32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match="equal non-zero counts"):
        accuracy([], [])


def test_empty_image_has_no_objects():
    reading = parse_image(np.full((64, 64, 3), 128, np.uint8))
    assert reading.background == "gray" and reading.objects == ()
    scene = Scene("gray", (SceneObject("red", "square", "large", "centre"),))
    res = score(np.full((64, 64, 3), 128, np.uint8), scene)
    assert res["background"] and not any(v for k, v in res.items() if k != "background")
