"""IR-Diffusion mask utilities against brute-force / hand-computed references."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attnpack.pipelines.ir_masks import (
    SubjectMasks,
    as_mask,
    binarize,
    box_mask,
    close_mask,
    mask_bbox,
    otsu_threshold,
    postprocess_target_masks,
    remove_overlaps,
    resize_mask,
    scaled_pixels,
    trim_bottom,
)


@pytest.mark.parametrize("seed", range(5))
def test_otsu_matches_brute_force_between_class_variance(seed):
    rng = np.random.default_rng(seed)
    # values at bin centres, so the 256-bin histogram loses nothing; a bimodal mixture
    bins = np.concatenate([rng.normal(60, 15, 300), rng.normal(190, 25, 200)]).clip(0, 255).astype(int)
    values = (bins + 0.5) / 256
    best, best_score = None, -1.0
    for t in np.unique(values)[:-1]:  # class 0 = values <= t
        lo, hi = values[values <= t], values[values > t]
        score = len(lo) * len(hi) * (lo.mean() - hi.mean()) ** 2
        if score > best_score:
            best, best_score = t, score
    threshold = otsu_threshold(torch.tensor(values))
    assert np.array_equal(values >= threshold, values > best)


def test_dreamstory_otsu_variant_follows_the_official_formula():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.uniform(0, 0.3, 700), rng.uniform(0.6, 1.0, 300)]).astype(np.float32)
    hist, _ = np.histogram(x, bins=256, range=(x.min(), x.max()))
    c = np.cumsum(hist).astype(np.float64)
    cummean = np.cumsum(hist * np.arange(256)) / c
    score = c * (c - 256) * (cummean - cummean[-1]) ** 2
    assert otsu_threshold(torch.from_numpy(x), method="dreamstory") == pytest.approx(np.argmax(score) / 255)


def test_binarize_normalises_and_thresholds():
    soft = torch.tensor([[0.0, 2.0], [10.0, 8.0]])
    assert torch.equal(binarize(soft, 0.5), torch.tensor([[False, False], [True, True]]))
    assert torch.equal(binarize(soft, "otsu"), torch.tensor([[False, False], [True, True]]))
    assert not binarize(torch.zeros(3, 3)).any()
    with pytest.raises(ValueError, match="threshold"):
        binarize(soft, "median")


def test_resize_and_subject_masks_per_grid():
    pixel = torch.zeros(1, 4, 4)
    pixel[:, :, :2] = 1  # left half
    assert torch.equal(resize_mask(pixel, (2, 2))[0], torch.tensor([[1.0, 0.0], [1.0, 0.0]]))
    masks = SubjectMasks(pixel, 1 - pixel)
    ref, tgt = masks.at((2, 2))
    assert ref.tolist() == [[True, False, True, False]] and tgt.tolist() == [[False, True, False, True]]
    assert masks.at((2, 2))[0] is ref  # cached
    with pytest.raises(ValueError, match="same n"):
        SubjectMasks(torch.zeros(2, 4, 4), torch.zeros(1, 4, 4))


def test_trim_bottom_official_rows():
    for h, start in ((768, 640), (100, 80), (64, 50)):
        m = trim_bottom(torch.ones(h, 3, dtype=torch.bool))
        assert int(m.all(1).sum()) == start and not m[start:].any()
    assert torch.equal(trim_bottom(torch.ones(5, 5, dtype=torch.bool), 0), torch.ones(5, 5, dtype=torch.bool))


def naive_close(mask, k):
    h, w = mask.shape
    a = k // 2

    def window(img, y, x, fn, default):
        vals = [
            bool(img[yy][xx])
            for yy in range(y - a, y - a + k)
            for xx in range(x - a, x - a + k)
            if 0 <= yy < h and 0 <= xx < w
        ]
        return fn(vals) if vals else default

    dil = [[window(mask, y, x, max, False) for x in range(w)] for y in range(h)]
    ero = [[window(dil, y, x, min, True) for x in range(w)] for y in range(h)]
    out = torch.tensor(ero, dtype=torch.bool)
    x0, y0, x1, y1 = mask_bbox(mask)
    clip = torch.zeros_like(mask)
    clip[y0:y1, x0:x1] = True
    return out & clip


@pytest.mark.parametrize("kernel", [2, 3, 4, 5])
def test_close_mask_matches_naive_morphology(kernel):
    g = torch.Generator().manual_seed(kernel)
    mask = torch.rand(11, 13, generator=g) > 0.6
    mask[0, 0] = mask[10, 12] = False
    assert torch.equal(close_mask(mask, kernel), naive_close(mask, kernel))


def test_close_mask_fills_a_hole():
    m = torch.zeros(9, 9, dtype=torch.bool)
    m[2:7, 2:7] = True
    m[4, 4] = False
    assert bool(close_mask(m, 3)[4, 4]) and int(close_mask(m, 3).sum()) == 25


def test_remove_overlaps_smaller_mask_loses():
    big, small = torch.zeros(10, 10, dtype=torch.bool), torch.zeros(10, 10, dtype=torch.bool)
    big[0:8, 0:8] = True
    small[6:10, 6:10] = True
    out = remove_overlaps(torch.stack([big, small]))
    assert torch.equal(out[0], big)
    assert int(out[1].sum()) == 16 - 4 and not (out[0] & out[1]).any()


def test_postprocess_target_masks_hand_example():
    a, b = torch.zeros(20, 20, dtype=torch.bool), torch.zeros(20, 20, dtype=torch.bool)
    a[1:3, 1:3] = True  # area 4 < 6**2: grows to rows/cols 0..4, then loses its overlap with b
    b[3:15, 3:15] = True
    out = postprocess_target_masks(torch.stack([a, b]), 6)
    expected = torch.zeros(20, 20, dtype=torch.bool)
    expected[0:5, 0:5] = True
    expected[3:5, 3:5] = False
    assert torch.equal(out[0], expected)
    assert torch.equal(out[1], b)
    # near the border the box is clipped; without min size only overlaps are removed
    c = torch.zeros(20, 20, dtype=torch.bool)
    c[18:20, 18:20] = True
    grown = postprocess_target_masks(c[None], 6)[0]
    assert mask_bbox(grown) == (15, 15, 20, 20)  # centre 18, rows 18 - 3 .. min(20, 18 + 3)
    assert torch.equal(postprocess_target_masks(torch.stack([a, b]), None), remove_overlaps(torch.stack([a, b])))


def test_boxes_and_user_masks():
    m = box_mask((2, 1, 5, 3), 4, 6)
    assert mask_bbox(m) == (2, 1, 5, 3) and int(m.sum()) == 6
    for bad in ((0, 0, 7, 2), (3, 0, 3, 2), (0, 0, 1), (0.5, 0, 1, 1)):
        with pytest.raises(ValueError, match="box"):
            box_mask(bad, 4, 6)
    assert mask_bbox(torch.zeros(3, 3, dtype=torch.bool)) is None
    assert torch.equal(
        as_mask(np.array([[0, 255], [255, 0]], dtype=np.uint8)), torch.tensor([[False, True], [True, False]])
    )
    assert as_mask(torch.ones(1, 2, 2), size=(4, 4)).shape == (4, 4)
    with pytest.raises(ValueError, match="2-D"):
        as_mask(torch.ones(2, 2, 2))
    with pytest.raises(TypeError, match="mask"):
        as_mask([[1, 0]])


def test_scaled_pixels():
    assert scaled_pixels(256, 768, 1280) == 256
    assert scaled_pixels(256, 1024, 1024) == 341
    assert scaled_pixels(128, 64, 64) == 11
