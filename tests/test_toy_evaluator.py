"""The toy evaluator: scoring rules (hand-made detections), training targets, and the shipped detector's accuracy on
held-out procedural scenes (ground truth from the generator)."""

import math

import numpy as np
import pytest
import torch

from attnpack.toy.data import COLORS, SHAPES, Scene, ToyObject, render_scene, scene_at
from attnpack.toy.evaluator import Detection, focal_loss, heatmap_targets, score_prompt


def _det(color, shape, x, y):
    return Detection(color, shape, x, y, 0.9)


def test_score_single_object_and_cell():
    dets = [_det("red", "circle", 10.0, 50.0)]
    assert score_prompt("a red circle", dets) == {"objects": True, "relation": None, "cell": None, "exact": True}
    assert score_prompt("a red circle in the bottom left", dets)["cell"] is True
    assert score_prompt("a red circle in the top left", dets)["cell"] is False
    assert score_prompt("a blue circle", dets)["objects"] is False  # wrong color
    assert score_prompt("a red square", dets)["objects"] is False  # wrong shape
    extra = dets + [_det("green", "star", 40.0, 40.0)]
    assert score_prompt("a red circle", extra) == {"objects": True, "relation": None, "cell": None, "exact": False}


def test_score_relations():
    dets = [_det("red", "circle", 10.0, 30.0), _det("blue", "square", 50.0, 34.0)]
    assert score_prompt("a red circle left of a blue square", dets)["relation"] is True
    assert score_prompt("a blue square right of a red circle", dets)["relation"] is True
    assert score_prompt("a red circle right of a blue square", dets)["relation"] is False
    assert score_prompt("a red circle above a blue square", dets)["relation"] is True  # y 30 < 34
    assert score_prompt("a red circle below a blue square", dets)["relation"] is False
    missing = score_prompt("a red circle left of a green square", dets)
    assert missing["objects"] is False and missing["relation"] is False
    three = score_prompt("a red circle, a blue square and a green star", dets)
    assert three["objects"] is False and three["relation"] is None


def test_heatmap_targets_peak_at_the_center_cell():
    obj = ToyObject("blue", "star", "small", x=21.0, y=45.0, radius=8.0)
    scene = Scene((obj,), "plain", (40, 40, 40), 0, "a blue star")
    target = heatmap_targets([scene], tuple(COLORS), SHAPES, grid=16, sigma=0.8)
    k = list(COLORS).index("blue") * len(SHAPES) + SHAPES.index("star")
    assert target.shape == (1, 36, 16, 16)
    assert torch.count_nonzero(target[0, :k]) == 0 and torch.count_nonzero(target[0, k + 1 :]) == 0
    assert target[0, k, 11, 5] == 1.0 and int(target[0, k].argmax()) == 11 * 16 + 5  # 45 // 4, 21 // 4
    assert math.isclose(float(target[0, k, 11, 6]), math.exp(-1 / (2 * 0.8**2)), rel_tol=1e-6)


def test_focal_loss_matches_hand_computation():
    logits = torch.tensor([[[[0.0, 2.0]]]])  # p = 0.5 at the object, sigmoid(2) next to it
    target = torch.tensor([[[[1.0, 0.5]]]])
    p1 = 1 / (1 + math.exp(-2.0))
    expected = -math.log(0.5) * 0.5**2 - math.log(1 - p1) * p1**2 * 0.5**4
    assert math.isclose(float(focal_loss(logits, target)), expected, rel_tol=1e-5)


# ---------------------------------------------------------------------------------------- the shipped evaluator
@pytest.fixture(scope="module")
def evaluator():
    from attnpack.toy.loader import load_evaluator

    return load_evaluator()


def test_shipped_evaluator_on_held_out_scenes(evaluator):
    """Ground truth comes from the generator; seed 5000 was never used for training."""
    from attnpack.toy.evaluator import scene_accuracy

    scenes = [scene_at(5000, i) for i in range(128)]
    acc = scene_accuracy(evaluator, scenes, [render_scene(s) for s in scenes])
    assert acc["recall"] >= 0.97 and acc["precision"] >= 0.97, acc
    assert acc["exact"] >= 0.93, acc
    assert acc["position_error"] <= 2.5, acc


def test_shipped_evaluator_finds_one_object_where_it_is(evaluator):
    obj = ToyObject("yellow", "triangle", "large", x=47.0, y=18.0, radius=11.0)
    scene = Scene((obj,), "stripes", (60, 55, 50), 3, "a yellow triangle")
    (dets,) = evaluator.detect([render_scene(scene)])
    assert [d.name for d in dets] == ["yellow triangle"]
    assert abs(dets[0].x - 47.0) <= 3.0 and abs(dets[0].y - 18.0) <= 3.0
    blank = np.full((64, 64, 3), 50, np.uint8)  # nothing there
    assert evaluator.detect([blank]) == [[]]
