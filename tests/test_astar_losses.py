"""A-STAR losses and map processing against hand-computed values and brute-force references."""

import itertools
import math

import numpy as np
import pytest
import torch

from attnpack import retention_loss, segregation_loss
from attnpack.pipelines._astar_maps import (
    binarize_maps,
    concept_maps,
    concept_token_indices,
    gaussian_kernel,
    otsu_thresholds,
    prompt_tokens,
    render_attention_maps,
    smooth_maps,
)
from attnpack.pipelines.astar import save_attention_maps, step_size_schedule
from attnpack.toy.tiny import build_clip_tokenizer


# ------------------------------------------------------------------------------------------------- Eq. 2
def test_segregation_disjoint_maps_is_zero():
    a = torch.zeros(4, 4)
    a[:2] = 1.0
    b = torch.zeros(4, 4)
    b[2:] = 0.7
    assert segregation_loss(torch.stack([a, b])).item() == 0.0


def test_segregation_identical_maps_is_half_per_pair():
    m = torch.rand(5, 6)
    for k in (2, 3, 4):
        pairs = k * (k - 1) // 2
        assert segregation_loss(m.expand(k, 5, 6)).item() == pytest.approx(0.5 * pairs, abs=1e-6)


def test_segregation_hand_computed():
    a = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    b = torch.tensor([[0.5, 0.5], [0.0, 1.0]])
    c = torch.tensor([[0.0, 0.0], [0.0, 2.0]])
    # (a,b): min sums to 0.5 + 0 + 0 + 0.5 = 1, totals 2 + 2 -> 1/4
    # (a,c): min = 0.5 at (1,1), total 2 + 2 -> 1/8;  (b,c): min = 1, total 2 + 2 -> 1/4
    assert segregation_loss(torch.stack([a, b])).item() == pytest.approx(0.25)
    assert segregation_loss(torch.stack([a, b, c])).item() == pytest.approx(0.25 + 0.125 + 0.25)


def test_segregation_batched_and_single_concept():
    maps = torch.rand(3, 2, 4, 4)
    per = torch.stack([segregation_loss(m) for m in maps])
    torch.testing.assert_close(segregation_loss(maps), per)
    assert segregation_loss(torch.rand(1, 4, 4)).item() == 0.0
    with pytest.raises(ValueError, match="maps"):
        segregation_loss(torch.rand(4, 4))


# ------------------------------------------------------------------------------------------------- Eq. 3
def test_retention_map_equal_to_mask():
    mask = torch.zeros(2, 6, 6)
    mask[0, 1:4, 1:3] = 1.0  # |B| = 6
    mask[1, 2:, 3:] = 1.0  # |B| = 12
    # per concept 1 - |B| / (2 |B|) = 0.5
    assert retention_loss(mask.clone(), mask.bool()).item() == pytest.approx(1.0)


def test_retention_hand_computed_and_no_mask():
    a = torch.tensor([[[1.0, 0.5], [0.25, 0.0]]])
    b = torch.tensor([[[1.0, 1.0], [0.0, 0.0]]])
    # min: 1 + 0.5 = 1.5; total: 1.75 + 2 = 3.75 -> 1 - 0.4 = 0.6
    assert retention_loss(a, b).item() == pytest.approx(0.6)
    assert retention_loss(a, None).item() == 0.0
    with pytest.raises(ValueError, match="prev_masks"):
        retention_loss(a, b[:, :1])


def test_retention_masks_are_detached_and_gradient_pulls_inside():
    maps = torch.full((1, 4, 4), 0.5, requires_grad=True)
    masks = torch.zeros(1, 4, 4)
    masks[0, :2] = 1.0
    masks.requires_grad_(True)
    retention_loss(maps, masks).backward()
    assert masks.grad is None
    inside, outside = maps.grad[0, :2], maps.grad[0, 2:]
    assert (inside < 0).all() and (outside > 0).all()  # descent raises attention inside B, lowers it outside


# ------------------------------------------------------------------------------------------------- binarisation
def _otsu_brute_force(values: np.ndarray) -> float:
    """Threshold maximising the between-class variance over every split between distinct values."""
    v = np.sort(values.ravel().astype(np.float64))
    best, best_t = -1.0, None
    for t in np.unique(v)[:-1]:
        low, high = v[v <= t], v[v > t]
        w0, w1 = len(low) / len(v), len(high) / len(v)
        var = w0 * w1 * (low.mean() - high.mean()) ** 2
        if var > best + 1e-12:
            best, best_t = var, t
    return best_t


@pytest.mark.parametrize("seed", range(5))
def test_otsu_matches_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    maps = torch.rand(3, 7, 5, generator=g)
    maps[1, :3] += 2.0  # a bimodal one
    thresholds = otsu_thresholds(maps)
    for m, t in zip(maps, thresholds):
        ref = _otsu_brute_force(m.numpy())
        assert torch.equal(m > t, m > ref)


def test_otsu_bimodal_and_constant():
    m = torch.full((4, 4), 0.1)
    m[:2, :2] = 0.9
    assert torch.equal(binarize_maps(m[None], "otsu")[0], m > 0.5)
    assert binarize_maps(torch.full((1, 3, 3), 0.3), "otsu").all()


def test_binarize_fraction_of_max():
    m = torch.tensor([[[0.0, 0.2], [0.5, 1.0]]])
    assert binarize_maps(m, 0.5).tolist() == [[[False, False], [True, True]]]
    assert binarize_maps(m * 4, 0.25).tolist() == [[[False, False], [True, True]]]
    for bad in ("mean", 0.0, 1.5, True):
        with pytest.raises(ValueError, match="binarize"):
            binarize_maps(m, bad)


# ------------------------------------------------------------------------------------------------- smoothing
def test_gaussian_kernel_values():
    k = gaussian_kernel(3, 0.5)
    g = torch.tensor([math.exp(-2.0), 1.0, math.exp(-2.0)])  # exp(-x^2 / (2 * 0.25)) at x = -1, 0, 1
    ref = g[:, None] * g[None, :]
    torch.testing.assert_close(k, ref / ref.sum())
    # Attend-and-Excite's kernel (effective sigma 0.5 * sqrt 2), values quoted in the reference notes
    ae = gaussian_kernel(3, 0.5 * 2**0.5)
    expected = torch.tensor([[0.045, 0.122, 0.045], [0.122, 0.332, 0.122], [0.045, 0.122, 0.045]])
    torch.testing.assert_close(ae, expected, atol=1e-3, rtol=0)
    with pytest.raises(ValueError, match="kernel_size"):
        gaussian_kernel(4, 0.5)


def test_smooth_maps_reflect_padding():
    x = torch.rand(2, 5, 6)
    k = gaussian_kernel(3, 0.5)
    padded = np.pad(x.numpy(), ((0, 0), (1, 1), (1, 1)), mode="reflect")
    ref = np.zeros_like(x.numpy())
    for b, i, j in itertools.product(range(2), range(5), range(6)):
        ref[b, i, j] = (padded[b, i : i + 3, j : j + 3] * k.numpy()).sum()
    torch.testing.assert_close(smooth_maps(x), torch.from_numpy(ref), atol=1e-6, rtol=0)
    assert torch.allclose(smooth_maps(torch.full((1, 4, 4), 0.3)), torch.full((1, 4, 4), 0.3))


# ------------------------------------------------------------------------------------------------- concept maps
def test_concept_maps_exclude_start_end_and_padding():
    h = w = 3
    n = 4  # prompt tokens at positions 1..4, end token at 5, padding after
    text = torch.rand(h, w, n)
    probs = torch.zeros(1, h, w, 77)
    probs[0, ..., 1 : n + 1] = text
    probs[0, ..., 0] = 5.0  # the start token takes most of the attention in real models
    probs[0, ..., n + 1 :] = torch.rand(h, w, 77 - n - 1)  # end + padding
    out = concept_maps(probs, [[[2], [3, 4]]], [n], smoothing=False, max_normalize=False)
    renorm = text / text.sum(-1, keepdim=True)
    torch.testing.assert_close(out[0, 0], renorm[..., 1])
    torch.testing.assert_close(out[0, 1], (renorm[..., 2] + renorm[..., 3]) / 2)
    soft = concept_maps(probs, [[[2]]], [n], token_normalization="softmax", smoothing=False, max_normalize=False)
    torch.testing.assert_close(soft[0, 0], torch.softmax(100 * text, -1)[..., 1])
    normed = concept_maps(probs, [[[2], [3, 4]]], [n])
    assert torch.allclose(normed.amax(dim=(-2, -1)), torch.ones(1, 2))
    expected = smooth_maps(out)
    torch.testing.assert_close(normed, expected / expected.amax(dim=(-2, -1), keepdim=True))


# ------------------------------------------------------------------------------------------------- tokens
def _word_of(tokenizer, prompt, positions):
    ids = tokenizer(prompt).input_ids
    return "".join(tokenizer.convert_ids_to_tokens([ids[i] for i in positions])).replace("</w>", " ").strip()


def test_concept_token_indices_multi_token_words():
    tok = build_clip_tokenizer()
    prompt = "A cat and a zebra, next to a bear"
    idx = concept_token_indices(tok, prompt, ["cat", "Zebra", "bear", "a zebra"])
    assert [_word_of(tok, prompt, p) for p in idx] == ["cat", "zebra", "bear", "a zebra"]
    assert len(idx[1]) > 1  # the tiny tokenizer splits "zebra" into pieces
    assert idx[0][0] >= 1  # position 0 is the start token


def test_concept_token_indices_errors():
    tok = build_clip_tokenizer()
    with pytest.raises(ValueError, match="does not occur"):
        concept_token_indices(tok, "a cat and a dog", ["at"])  # not a whole word
    with pytest.raises(ValueError, match="tokens: 0: <|startoftext|>"):
        concept_token_indices(tok, "a cat and a dog", ["horse"])
    with pytest.raises(ValueError, match="beyond"):
        concept_token_indices(tok, "a " * 80 + "dog", ["dog"])
    with pytest.raises(TypeError, match="concepts"):
        concept_token_indices(tok, "a cat", "cat")


def test_prompt_tokens_positions_pieces_and_words():
    tok = build_clip_tokenizer()
    prompt = "a bright-red hat"
    rows = prompt_tokens(tok, prompt)
    ids = tok(prompt).input_ids
    assert [r[0] for r in rows] == list(range(1, len(ids) - 1))  # the positions token_indices takes
    assert [r[1] for r in rows] == tok.convert_ids_to_tokens(ids)[1:-1]
    # hand-read from the pieces a</w> b right</w> -</w> red</w> h at</w>: the prompt word each belongs to
    assert [r[2] for r in rows] == ["a", "bright", "bright", "-", "red", "hat", "hat"]
    long = prompt_tokens(tok, "a " * 80 + "dog")
    assert len(long) == tok.model_max_length - 2 and "dog" not in [r[2] for r in long]  # truncated like the model


# ------------------------------------------------------------------------------------------------- schedule, pictures
def test_step_size_schedule():
    assert step_size_schedule(3) == pytest.approx([20.0, 20.0 * math.sqrt(0.75), 20.0 * math.sqrt(0.5)])
    assert step_size_schedule(2, scale_factor=10.0) == pytest.approx([10.0, 10.0 * math.sqrt(0.5)])
    assert step_size_schedule(2, step_size=3) == [3.0, 3.0]
    assert step_size_schedule(2, step_size=[1, 2]) == [1.0, 2.0]
    with pytest.raises(ValueError, match="one per step"):
        step_size_schedule(3, step_size=[1, 2])


def test_save_attention_maps_png_and_gif(tmp_path):
    from PIL import Image

    from attnpack import read_parameters

    maps = torch.rand(12, 2, 3, 4, 4)
    png = save_attention_maps(maps, tmp_path / "maps.png", concepts=["cat", "dog", "bear"], sample=1, cell=16)
    with Image.open(png) as im:
        assert im.height > 3 * 16 and im.width > 10 * 16  # 3 rows, at most 10 columns
    assert read_parameters(png)["concepts"] == ["cat", "dog", "bear"]
    gif = save_attention_maps(maps, tmp_path / "maps.gif", concepts=["cat", "dog", "bear"], cell=16)
    with Image.open(gif) as im:
        assert im.n_frames == 12
    frames = render_attention_maps(maps[:, 0], animate=True, cell=8)
    assert len(frames) == 12
    with pytest.raises(ValueError, match="path"):
        save_attention_maps(maps, tmp_path / "maps.jpg")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["maps.gif", "maps.png"]  # no temporary files left
