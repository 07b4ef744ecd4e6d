"""Generalized neighborhood attention: NATTEN semantics (worked examples), tile tables, backends vs a dense oracle."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from attnpack.kernels import block_sparse_attention, neighborhood_attention
from attnpack.kernels.block_sparse import dense_tile_masks, grid_order
from attnpack.kernels.block_sparse.naive import masked_attention
from attnpack.kernels.neighborhood import normalize_neighborhood_args
from attnpack.kernels.neighborhood.naive import nbrs_1d, neighborhood_mask
from attnpack.kernels.neighborhood.windows import (
    axis_windows,
    neighborhood_mask_mod,
    neighborhood_pattern,
    neighborhood_tile_masks,
)


def _rand(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype)


def _oracle(q, k, v, spec, extra_k=None, extra_v=None, scale=None):
    """Dense attention with the brute-force GNA mask (fp64)."""
    mask = neighborhood_mask(spec.grid, spec.window, spec.stride, spec.dilation, spec.causal)
    if extra_k is not None:
        k = torch.cat([k, extra_k], dim=2)
        v = torch.cat([v, extra_v], dim=2)
        mask = torch.cat([mask, torch.ones(mask.shape[0], extra_k.shape[2], dtype=torch.bool)], dim=1)
    return masked_attention(q, k, v, mask, scale=scale)


def _ranges(keys):
    return (min(keys), max(keys))


# ------------------------------------------------------------------------------------------------- worked examples
def test_worked_example_stride_groups():
    """n=12, k=5, s=3: 0-2:[0..4] 3-5:[2..6] 6-8:[5..9] 9-11:[7..11] (reference note, verified against NATTEN)."""
    expect = {range(0, 3): (0, 4), range(3, 6): (2, 6), range(6, 9): (5, 9), range(9, 12): (7, 11)}
    for queries, (lo, hi) in expect.items():
        for i in queries:
            assert nbrs_1d(i, 12, 5, 3, 1, False) == list(range(lo, hi + 1))


def test_worked_example_causal_stride():
    """Causal k=5, s=3: q3:[1..3] q4:[1..4] q5:[1..5] (shared start leader-k+1, each query stops at itself)."""
    assert nbrs_1d(3, 12, 5, 3, 1, True) == [1, 2, 3]
    assert nbrs_1d(4, 12, 5, 3, 1, True) == [1, 2, 3, 4]
    assert nbrs_1d(5, 12, 5, 3, 1, True) == [1, 2, 3, 4, 5]
    # near the start fewer than k keys; only the stride leader sees a full window
    assert nbrs_1d(0, 12, 5, 3, 1, True) == [0]
    assert nbrs_1d(1, 12, 5, 3, 1, True) == [0, 1]


def test_worked_example_even_window_and_stride():
    """Even k=4, s=2: q2, q3 -> [1..4] (leader 3: 2 keys left, 1 right)."""
    assert nbrs_1d(2, 12, 4, 2, 1, False) == [1, 2, 3, 4]
    assert nbrs_1d(3, 12, 4, 2, 1, False) == [1, 2, 3, 4]
    # plain even window: k/2 left, k/2 - 1 right
    assert nbrs_1d(5, 12, 4, 1, 1, False) == [3, 4, 5, 6]


def test_worked_example_blocked_window_non_divisible():
    """s = k = 4 on n = 10: blocks [0..3] [4..7], the partial last block takes the last k keys 6..9."""
    for i in range(4):
        assert nbrs_1d(i, 10, 4, 4, 1, False) == [0, 1, 2, 3]
    for i in range(4, 8):
        assert nbrs_1d(i, 10, 4, 4, 1, False) == [4, 5, 6, 7]
    assert nbrs_1d(8, 10, 4, 4, 1, False) == [6, 7, 8, 9]
    assert nbrs_1d(9, 10, 4, 4, 1, False) == [6, 7, 8, 9]


def test_worked_example_border_shift_and_dilation():
    # border: windows shift inward, every query sees exactly k keys
    assert nbrs_1d(0, 9, 5, 1, 1, False) == [0, 1, 2, 3, 4]
    assert nbrs_1d(8, 9, 5, 1, 1, False) == [4, 5, 6, 7, 8]
    assert all(len(nbrs_1d(i, 9, 5, 1, 1, False)) == 5 for i in range(9))
    # dilation 2 on n = 9: groups {0,2,4,6,8} (length 5) and {1,3,5,7} (length 4); NA inside each group
    assert nbrs_1d(0, 9, 3, 1, 2, False) == [0, 2, 4]
    assert nbrs_1d(8, 9, 3, 1, 2, False) == [4, 6, 8]
    assert nbrs_1d(7, 9, 3, 1, 2, False) == [3, 5, 7]
    assert nbrs_1d(3, 9, 3, 1, 2, False) == [1, 3, 5]
    # full window = every key
    assert nbrs_1d(4, 9, 9, 1, 1, False) == list(range(9))


def test_axis_windows_match_the_definition_exhaustively():
    for n in range(2, 13):
        for k, d in itertools.product(range(2, n + 1), range(1, n + 1)):
            if k * d > n:
                continue
            for s, causal in itertools.product(range(1, k + 1), (False, True)):
                g, start, end = axis_windows(n, k, s, d, causal)
                for i in range(n):
                    got = [int(g[i]) + d * j for j in range(int(start[i]), int(end[i]))]
                    assert got == nbrs_1d(i, n, k, s, d, causal), (n, k, s, d, causal, i)


@pytest.mark.parametrize(
    "grid,window,stride,dilation,causal",
    [
        ((7, 9), (3, 4), (1, 2), (2, 1), (False, True)),
        ((5, 6), (5, 2), (5, 2), (1, 3), (True, False)),
        ((3, 4, 5), (2, 3, 4), (2, 1, 3), (1, 1, 1), (False, False, True)),
    ],
)
def test_mask_mod_equals_cartesian_product_of_nbrs(grid, window, stride, dilation, causal):
    spec = normalize_neighborhood_args(grid, window, stride, dilation, causal)
    n = spec.num_tokens
    mm = neighborhood_mask_mod(spec)
    got = mm(None, None, torch.arange(n)[:, None], torch.arange(n + 3)[None, :])
    expect = neighborhood_mask(grid, window, stride, dilation, causal)
    assert torch.equal(got[:, :n], expect)
    assert got[:, n:].all()  # additional keys: visible to all


# ------------------------------------------------------------------------------------------------- tile tables
@pytest.mark.parametrize(
    "grid,window,stride,dilation,causal,q_tile,kv_tile",
    [
        ((13,), (5,), (1,), (1,), (False,), (4,), (4,)),
        ((13,), (4,), (4,), (2,), (True,), (2,), (4,)),
        ((10, 11), (5, 4), (2, 3), (1, 2), (False, True), (4, 2), (2, 4)),
        ((6, 7), (6, 7), (1, 1), (1, 1), (False, False), (2, 4), (2, 4)),
        ((4, 6, 7), (3, 4, 3), (3, 2, 1), (1, 1, 2), (True, False, False), (2, 2, 2), (1, 4, 2)),
    ],
)
def test_tile_masks_equal_brute_force(grid, window, stride, dilation, causal, q_tile, kv_tile):
    spec = normalize_neighborhood_args(grid, window, stride, dilation, causal)
    visited, full = neighborhood_tile_masks(spec, q_tile, kv_tile)
    qo = grid_order(grid, q_tile, dilation=dilation)
    ko = grid_order(grid, kv_tile, dilation=dilation)
    v_ref, f_ref = dense_tile_masks(qo, ko, neighborhood_mask_mod(spec))
    assert torch.equal(visited, v_ref[0, 0])
    assert torch.equal(full, f_ref[0, 0])


@pytest.mark.parametrize(
    "grid,window,stride,tile,bound,masked,fully",
    [
        # the tile bounds in the reference note (independent tile simulation; NATTEN docs)
        ((256, 256), (80, 80), (1, 1), (16, 8), 7.51, 0.51, False),
        ((256, 256), (80, 80), (16, 16), (16, 8), 10.24, 0.0, True),
        ((30, 48, 80), (18, 24, 24), (1, 1, 1), (2, 8, 8), 5.44, 0.83, False),
        ((30, 48, 80), (18, 24, 24), (16, 8, 8), (2, 8, 8), 11.11, 0.0, True),
        ((32768,), (2048,), (1,), (128,), 15.1, None, False),
        ((32768,), (2048,), (128,), (128,), 15.1, None, False),
        ((32768,), (2048,), (256,), (128,), 16.0, 0.0, True),
    ],
)
def test_tile_bounds_match_published_simulation(grid, window, stride, tile, bound, masked, fully):
    spec = normalize_neighborhood_args(grid, window, stride)
    stats = neighborhood_pattern(spec, q_tile=tile).stats()
    assert round(stats["tile_bound"], 2 if bound != 15.1 else 1) == bound
    if masked is not None:
        assert stats["masked_fraction"] == pytest.approx(masked, abs=0.006)  # the note rounds to whole percents
    assert stats["fully_block_sparse"] is fully


# ------------------------------------------------------------------------------------------------- backends
CASES = [
    # grid, window, stride, dilation, causal
    ((17,), 5, 1, 1, False),
    ((16,), 4, 2, 2, True),
    ((7, 9), 3, 1, 1, False),
    ((6, 10), (4, 5), (2, 5), 1, (False, True)),
    ((9, 8), (3, 2), (3, 1), (2, 3), False),
    ((10, 7), (10, 3), 1, 1, (True, False)),
    ((3, 5, 6), (2, 3, 4), (1, 3, 2), (1, 1, 1), (False, False, False)),
    ((4, 5, 6), (3, 2, 3), (2, 1, 3), (1, 2, 2), (True, False, True)),
]


def _case_id(case):
    return "g{}-w{}-s{}-d{}-c{}".format(*case).replace(" ", "")


# eager FlexAttention on CPU is slow (it evaluates the mask on every pair): every other case
BACKEND_CASES = [(b, c) for b in ("reference", "tiled") for c in CASES] + [("flex", c) for c in CASES[::2]]


@pytest.mark.parametrize("backend,case", BACKEND_CASES, ids=lambda x: x if isinstance(x, str) else _case_id(x))
def test_neighborhood_attention_against_reference(backend, case):
    grid, window, stride, dilation, causal = case
    spec = normalize_neighborhood_args(grid, window, stride, dilation, causal)
    n = spec.num_tokens
    b, h, d = 2, 3, 8
    q, k, v = (_rand(b, h, n, d, seed=s) for s in range(3))
    extra = n % 2 == 0  # half of the cases with additional (text) keys
    ek, ev = (_rand(b, h, 5, d, seed=s) for s in (7, 8)) if extra else (None, None)
    out = neighborhood_attention(
        q, k, v, grid_shape=grid, window_size=window, stride=stride, dilation=dilation, is_causal=causal,
        additional_keys=ek, additional_values=ev, backend=backend,
    )  # fmt: skip
    ref = _oracle(q, k, v, spec, ek, ev)
    torch.testing.assert_close(out, ref.float(), atol=2e-5, rtol=0)


@pytest.mark.parametrize("backend", ["reference", "tiled", "flex", None])
def test_owned_queries_only(backend):
    """Ring attention's query subset (`query_positions`): the rows of the brute-force GNA mask's attention, whatever the
    other rows of the query tensor hold (zeros here, as ring attention leaves them)."""
    from attnpack.kernels.neighborhood import neighborhood_attention_spec

    spec = normalize_neighborhood_args((4, 6, 6), (3, 3, 3), (1, 2, 1), (1, 1, 2), (False, False, True))
    q, k, v = (_rand(2, 2, spec.num_tokens, 8, seed=s) for s in range(3))
    ek, ev = (_rand(2, 2, 3, 8, seed=s) for s in (7, 8))
    owned = torch.arange(30, 75)  # a shard that starts and ends inside query tiles
    q_owned = torch.zeros_like(q).index_copy_(2, owned, q[:, :, owned])
    out = neighborhood_attention_spec(
        q_owned, k, v, spec, additional_keys=ek, additional_values=ev, backend=backend, query_positions=owned
    )
    torch.testing.assert_close(out, _oracle(q, k, v, spec, ek, ev).float()[:, :, owned], atol=2e-5, rtol=0)


@pytest.mark.parametrize("case", CASES[1::3], ids=_case_id)
def test_tile_pattern_through_block_sparse_reference(case):
    """The analytic tile table with the block-sparse reference (the path flex and Triton take), non-default tiles."""
    grid, window, stride, dilation, causal = case
    spec = normalize_neighborhood_args(grid, window, stride, dilation, causal)
    q_tile = tuple(min(2, g) for g in grid)
    kv_tile = tuple(min(4, g) for g in grid)
    pattern = neighborhood_pattern(spec, q_tile=q_tile, kv_tile=kv_tile, num_extra=3)
    q, k, v = (_rand(1, 2, spec.num_tokens + (3 if s else 0), 4, seed=s) for s in range(3))
    out = block_sparse_attention(q, k, v, pattern, backend="reference")
    ref = _oracle(q, k[:, :, :-3], v[:, :, :-3], spec, k[:, :, -3:], v[:, :, -3:])
    torch.testing.assert_close(out, ref.float(), atol=2e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", ["reference", "flex"])
def test_neighborhood_attention_half_precision(dtype, backend):
    grid, window, stride = (6, 7), (3, 4), (1, 2)
    spec = normalize_neighborhood_args(grid, window, stride)
    q, k, v = (_rand(1, 2, 42, 16, dtype=dtype, seed=s) for s in range(3))
    out = neighborhood_attention(q, k, v, grid_shape=grid, window_size=window, stride=stride, backend=backend)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), _oracle(q, k, v, spec), atol=1e-2, rtol=0)


@pytest.mark.parametrize("backend", [None, "reference", "tiled", "flex"])
def test_full_window_equals_dense_attention(backend):
    grid = (5, 6)
    q, k, v = (_rand(2, 2, 30, 8, seed=s) for s in range(3))
    ek, ev = (_rand(2, 2, 4, 8, seed=s) for s in (5, 6))
    out = neighborhood_attention(
        q, k, v, grid_shape=grid, window_size=-1, additional_keys=ek, additional_values=ev, backend=backend
    )
    dense = torch.nn.functional.scaled_dot_product_attention(q, torch.cat([k, ek], 2), torch.cat([v, ev], 2))
    torch.testing.assert_close(out, dense, atol=1e-5, rtol=0)


def test_full_causal_1d_is_plain_causal_attention():
    q, k, v = (_rand(1, 2, 12, 8, seed=s) for s in range(3))
    for backend in (None, "reference"):
        out = neighborhood_attention(
            q, k, v, grid_shape=(12,), window_size=12, stride=3, is_causal=True, backend=backend
        )
        ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", ["reference", "tiled"])
def test_reference_backward_matches_dense(backend):
    grid, window, stride, dilation, causal = (6, 7), (3, 4), (1, 2), (2, 1), (False, True)
    spec = normalize_neighborhood_args(grid, window, stride, dilation, causal)
    q, k, v = (_rand(2, 2, 42, 8, seed=s).requires_grad_() for s in range(3))
    ek, ev = (_rand(2, 2, 3, 8, seed=s).requires_grad_() for s in (4, 5))
    grad = _rand(2, 2, 42, 8, seed=9)
    out = neighborhood_attention(
        q, k, v, grid_shape=grid, window_size=window, stride=stride, dilation=dilation, is_causal=causal,
        additional_keys=ek, additional_values=ev, backend=backend,
    )  # fmt: skip
    (out * grad).sum().backward()
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v, ek, ev)]
    ref = _oracle(*leaves[:3], spec, *leaves[3:])
    (ref * grad.double()).sum().backward()
    for a, b in zip((q, k, v, ek, ev), leaves):
        torch.testing.assert_close(a.grad.double(), b.grad, atol=1e-5, rtol=0)


def test_reference_memory_is_bounded_by_window_not_n_squared(monkeypatch):
    """The reference gathers at most `chunk_elements` keys per chunk: with a tiny budget it still gives exact results
    (many chunks), and no intermediate ever reaches N x N."""
    from attnpack.kernels.neighborhood import reference as ref_mod

    seen = []
    original = ref_mod._chunk

    def spy(q, key, value, extra_k, extra_v, keys, valid, scale):
        seen.append(keys.numel())
        return original(q, key, value, extra_k, extra_v, keys, valid, scale)

    monkeypatch.setattr(ref_mod, "_chunk", spy)
    grid = (16, 16)
    q, k, v = (_rand(1, 1, 256, 4, seed=s) for s in range(3))
    spec = normalize_neighborhood_args(grid, 3)
    out = ref_mod.neighborhood_reference(q, k, v, spec, chunk_elements=4096)
    torch.testing.assert_close(out, _oracle(q, k, v, spec).float(), atol=2e-5, rtol=0)
    assert len(seen) > 1 and max(seen) * 4 < 256 * 256


# ------------------------------------------------------------------------------------------------- checks
@pytest.mark.parametrize(
    "kwargs,match",
    [
        (
            dict(window_size=(3, 9)),
            r"`window_size` and `dilation` cannot be larger than the grid.*window_size=\(3, 9\)",
        ),
        (dict(window_size=3, dilation=(1, 3)), r"dilation=\(1, 3\) for grid_shape=\(6, 7\)"),
        (dict(window_size=1), r"`window_size` must be >= 2 .* got window_size=\(1, 1\) for grid_shape=\(6, 7\)"),
        (dict(window_size=3, stride=4), r"`stride` cannot be larger than `window_size`.*stride=\(4, 4\)"),
        (dict(window_size=3, stride=0), r"`stride` must be >= 1"),
        (dict(window_size=(3, 3, 3)), r"`window_size` must be an int or a tuple of ints, one per axis"),
        (dict(window_size=3, is_causal=1), r"`is_causal` must be a bool or a tuple of bools"),
        (dict(window_size=3, grid_shape=(6, 6)), r"N = prod\(grid_shape\) = 36 tokens for grid_shape=\(6, 6\)"),
        (dict(window_size=3, grid_shape=(2, 3, 7, 1)), r"`grid_shape` must be a tuple of 1, 2 or 3 positive ints"),
        (dict(window_size=3, backend="cuda"), r"`backend` must be one of"),
    ],
)
def test_argument_errors_name_argument_value_and_grid(kwargs, match):
    q = _rand(1, 2, 42, 8)
    kwargs = {"grid_shape": (6, 7), **kwargs}
    with pytest.raises(ValueError, match=match):
        neighborhood_attention(q, q, q, **kwargs)


def test_additional_kv_errors():
    q = _rand(1, 2, 42, 8)
    with pytest.raises(ValueError, match="both tensors or both None"):
        neighborhood_attention(q, q, q, grid_shape=(6, 7), window_size=3, additional_keys=q)
    with pytest.raises(ValueError, match=r"`additional_keys` must match key in batch, heads and head dim"):
        neighborhood_attention(
            q, q, q, grid_shape=(6, 7), window_size=3, additional_keys=q[:, :1], additional_values=q
        )
    with pytest.raises(ValueError, match="cannot run the backward pass|no backward pass on CPU"):
        neighborhood_attention(q.clone().requires_grad_(), q, q, grid_shape=(6, 7), window_size=3, backend="flex")


def test_automatic_choice_logged(caplog):
    q = _rand(1, 1, 42, 8)
    with caplog.at_level("DEBUG", logger="attnpack.kernels.neighborhood"):
        neighborhood_attention(q, q, q, grid_shape=(6, 7), window_size=3)
        neighborhood_attention(q, q, q, grid_shape=(6, 7), window_size=-1)
    assert "picked 'reference' on cpu" in caplog.text or "picked 'tiled' on cpu" in caplog.text
    assert "full window on every axis" in caplog.text


@pytest.mark.parametrize(
    "grid,window,extra,expect",
    [((8, 32, 32), (3, 7, 7), 0, "reference"), ((64, 64), 7, 0, "reference"), ((32, 32), 9, 64, "reference"),
     ((128, 128), 13, 0, "tiled")],
)  # fmt: skip
def test_cpu_choice_follows_the_measured_cost_rule(grid, window, extra, expect):
    """On the CPU the automatic choice takes the reference path where the tiled one would compute over 4x the keys a
    query needs (the cases measured by benchmarks/cpu_dispatch.py and benchmarks/attention.py)."""
    from attnpack.kernels.neighborhood import cpu_backend_choice

    spec = normalize_neighborhood_args(grid, window)
    assert cpu_backend_choice(spec, extra)[0] == expect


def test_sparse_window_differs_from_dense():
    """The oracle comparison can fail: a local window gives a different result than dense attention."""
    q, k, v = (_rand(1, 1, 42, 8, seed=s) for s in range(3))
    out = neighborhood_attention(q, k, v, grid_shape=(6, 7), window_size=3)
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert (out - dense).abs().max() > 1e-2
    assert math.isfinite(float(out.abs().max()))
