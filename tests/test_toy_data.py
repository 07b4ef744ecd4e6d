"""The procedural toy dataset: determinism, captions that describe the drawn scene, prompt parsing."""

import numpy as np
import pytest
import torch

from attnpack.toy.data import (
    CELLS,
    COLORS,
    SHAPES,
    SIZES,
    PromptSpec,
    ToyScenes,
    parse_prompt,
    prompt_set,
    render_scene,
    sample_scene,
    scene_at,
)
from attnpack.toy.tiny import build_clip_tokenizer, build_t5_tokenizer


SCENES = [scene_at(7, i) for i in range(300)]


def test_scenes_are_deterministic_per_seed_and_index():
    assert scene_at(7, 11) == SCENES[11]
    assert np.array_equal(render_scene(scene_at(7, 11)), render_scene(SCENES[11]))
    assert scene_at(8, 11) != SCENES[11]
    assert scene_at(7, 12) != SCENES[11]
    # any index works, also far beyond any stored dataset
    assert scene_at(7, 10**12).caption


def test_scene_statistics():
    counts = np.bincount([len(s.objects) for s in SCENES], minlength=4)[1:] / len(SCENES)
    np.testing.assert_allclose(counts, [0.4, 0.35, 0.25], atol=0.08)
    assert {o.color for s in SCENES for o in s.objects} == set(COLORS)
    assert {o.shape for s in SCENES for o in s.objects} == set(SHAPES)
    assert {s.background for s in SCENES} == {"plain", "stripes", "checker", "noise", "gradient"}
    for s in SCENES:
        pairs = [(o.color, o.shape) for o in s.objects]
        assert len(set(pairs)) == len(pairs)  # distinct color+shape pairs, so a pair names one object
        for i, a in enumerate(s.objects):
            assert a.radius <= a.x <= 64 - a.radius and a.radius <= a.y <= 64 - a.radius
            for b in s.objects[i + 1 :]:
                assert np.hypot(a.x - b.x, a.y - b.y) > a.radius + b.radius  # no overlap


def test_captions_describe_the_scene():
    """The caption read back (an independent regex here) names the objects in order, and the relation / cell it
    states matches the object coordinates."""
    import re

    for s in SCENES:
        words = re.findall(r"(?:(small|large) )?(red|green|blue|yellow|purple|white) (\w+)", s.caption)
        assert [(c, sh) for _, c, sh in words] == [(o.color, o.shape) for o in s.objects], s.caption
        for (size, _, _), obj in zip(words, s.objects):
            assert size in ("", obj.size)
        spec = parse_prompt(s.caption)
        assert spec.objects == tuple((o.color, o.shape) for o in s.objects)
        if len(s.objects) == 2:
            a, b = s.objects
            expected = {
                "left of": a.x < b.x and abs(a.x - b.x) >= 1.5 * abs(a.y - b.y),
                "right of": a.x > b.x and abs(a.x - b.x) >= 1.5 * abs(a.y - b.y),
                "above": a.y < b.y and abs(a.y - b.y) >= 1.5 * abs(a.x - b.x),
                "below": a.y > b.y and abs(a.y - b.y) >= 1.5 * abs(a.x - b.x),
            }
            assert spec.relation is not None and expected[spec.relation[1]], s.caption
        if spec.cell is not None:
            o = s.objects[0]
            assert (int(o.y // (64 / 3)), int(o.x // (64 / 3))) == spec.cell, s.caption


def test_rendered_objects_have_their_color_at_their_center():
    for s in SCENES[:80]:
        img = render_scene(s).astype(int)
        assert img.shape == (64, 64, 3) and img.dtype == np.int64
        for o in s.objects:
            cy = o.y + (0.2 * o.radius if o.shape == "triangle" else 0.0)  # the triangle's centroid sits lower
            pixel = img[int(cy), int(o.x)]
            assert np.abs(pixel - np.array(COLORS[o.color])).max() <= 14, (s.caption, o)


def test_every_caption_word_is_one_token():
    clip, t5 = build_clip_tokenizer(), build_t5_tokenizer()
    words = {w for s in SCENES for w in s.caption.replace(",", " ").split()} | {
        w for p in CELLS.values() for w in p.split()
    }
    assert {w for w in words if len(clip.tokenize(w)) != 1 or len(t5.tokenize(w)) != 1} == set()
    longest = max(SCENES, key=lambda s: len(s.caption.split())).caption
    assert len(clip(longest)["input_ids"]) <= 24  # fits TEXT_LENGTH


@pytest.mark.parametrize(
    "prompt, spec",
    [
        ("a red circle", PromptSpec((("red", "circle"),))),
        ("A small blue star in the top left.", PromptSpec((("blue", "star"),), cell=(0, 0))),
        ("a white cross at the bottom", PromptSpec((("white", "cross"),), cell=(2, 1))),
        (
            "a red circle left of a large blue square",
            PromptSpec((("red", "circle"), ("blue", "square")), (0, "left of", 1)),
        ),
        (
            "a red circle, a blue square and a green star",
            PromptSpec((("red", "circle"), ("blue", "square"), ("green", "star"))),
        ),
    ],
)
def test_parse_prompt(prompt, spec):
    assert parse_prompt(prompt) == spec


@pytest.mark.parametrize(
    "prompt, message",
    [
        ("a cat on a mat", "is not a toy caption"),
        ("a pink circle", "names 'pink' 'circle'"),
        ("a red hexagon", "shapes"),
    ],
)
def test_parse_prompt_errors(prompt, message):
    with pytest.raises(ValueError, match=message):
        parse_prompt(prompt)


def test_sample_scene_checks_num_objects():
    with pytest.raises(ValueError, match="`num_objects` must be 1, 2 or 3, got 4"):
        sample_scene(np.random.default_rng(0), 4)


def test_object_sizes_follow_the_size_words_and_can_be_overridden():
    for s in SCENES:
        for o in s.objects:
            lo, hi = SIZES[o.size]
            assert lo <= o.radius <= hi
    small = {"small": (3.0, 4.0), "large": (5.0, 6.0)}
    radii = [o.radius for i in range(50) for o in scene_at(7, i, sizes=small).objects]
    assert 3.0 <= min(radii) and max(radii) <= 6.0
    assert ToyScenes(seed=7, sizes=small)[3]["scene"] == scene_at(7, 3, sizes=small)
    with pytest.raises(ValueError, match="`sizes` must map 'small' and 'large'"):
        scene_at(7, 0, sizes={"small": (3.0, 4.0)})


def test_prompt_set_and_dataset_items():
    prompts = prompt_set(2, 5)
    assert prompts == prompt_set(2, 5) and all(len(parse_prompt(p).objects) == 2 for p in prompts)
    data = ToyScenes(seed=3)
    item = data[5]
    assert item["pixel_values"].shape == (3, 64, 64) and item["pixel_values"].dtype == torch.float32
    assert -1.0 <= float(item["pixel_values"].min()) and float(item["pixel_values"].max()) <= 1.0
    assert item["caption"] == scene_at(3, 5).caption
    batch = data.batch([5, 6])
    assert torch.equal(batch["pixel_values"][0], item["pixel_values"]) and len(batch["caption"]) == 2
