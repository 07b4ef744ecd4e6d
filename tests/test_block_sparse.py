"""Block-sparse attention entry point: token orders, tile tables, backends against a dense masked oracle."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from attnpack.kernels.block_sparse import (
    BlockSparsePattern,
    TileMask,
    TileTable,
    block_sparse_attention,
    concat_orders,
    dense_tile_masks,
    flat_order,
    grid_order,
    grid_tile_index,
    segment_tile_masks,
    stack_orders,
    tile_coordinate_bounds,
    tile_table_from_dense,
    tile_table_from_mask,
)
from attnpack.kernels.block_sparse.naive import masked_attention
from attnpack.kernels.block_sparse.naive import pattern_mask as _dense_mask


BACKENDS = ["reference", "flex"]


def _rand(b, h, n, d, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, h, n, d, generator=g).to(dtype)


# ------------------------------------------------------------------------------------------------- token orders
@pytest.mark.parametrize(
    "grid,tile,dilation",
    [
        ((10,), (4,), (1,)),
        ((10,), (3,), (3,)),
        ((7, 9), (2, 4), (1, 1)),
        ((7, 9), (2, 2), (2, 3)),
        ((3, 5, 6), (2, 2, 4), (1, 2, 1)),
    ],
)
def test_grid_order_tiles_are_boxes_and_permute_is_invertible(grid, tile, dilation):
    order = grid_order(grid, tile, dilation=dilation)
    n = math.prod(grid)
    idx = order.index[0]
    real = idx[idx >= 0]
    assert sorted(real.tolist()) == list(range(n))  # every token exactly once
    coords = torch.stack(torch.unravel_index(idx.clamp(min=0).long(), grid), dim=-1)  # [P, k]
    tiles, ids = grid_tile_index(grid, tile, dilation=dilation)
    for t in range(order.num_tiles):
        sl = slice(t * order.tile_size, (t + 1) * order.tile_size)
        c = coords[sl][idx[sl] >= 0]
        if len(c) == 0:
            continue
        for a in range(len(grid)):
            g = c[:, a] % dilation[a]
            assert (g == g[0]).all(), "a tile mixes dilation groups"
            pos = c[:, a] // dilation[a]
            assert (pos // tile[a] == pos[0] // tile[a]).all(), "a tile is not one box"
        g0 = tuple(int(c[0, a] % dilation[a]) for a in range(len(grid)))
        r0 = tuple(int((c[0, a] // dilation[a]) // tile[a]) for a in range(len(grid)))
        assert int(ids[g0 + r0]) == t
    assert tiles == tuple(-(-n // (t * d)) for n, t, d in zip(grid, tile, dilation))
    x = _rand(2, 3, n, 5)
    assert torch.equal(order.unpermute(order.permute(x)), x)
    assert torch.equal(order.permute(x)[:, :, idx < 0], torch.zeros(2, 3, int((idx < 0).sum()), 5))


def test_axis_order_and_flat_tiles_follow_paro_reordering():
    f, h, w = 2, 3, 4
    x = torch.arange(f * h * w).view(f, h, w)
    for perm in itertools.permutations(range(3)):
        order = grid_order((f, h, w), 8, axis_order=perm)
        expect = x.permute(perm).reshape(-1)
        assert torch.equal(order.index[0, : f * h * w].long(), expect)
        assert (order.index[0, f * h * w :] == -1).all()


def test_concat_and_stack_orders():
    text = flat_order(5, 4)
    image = grid_order((4, 6), (2, 2))
    joined = concat_orders(text, image)
    assert joined.num_tokens == 29 and joined.num_tiles == 2 + 6
    assert joined.segments == ((0, 5, 0, 2), (5, 24, 2, 6))
    assert sorted(joined.index[0][joined.index[0] >= 0].tolist()) == list(range(29))
    heads = stack_orders([grid_order((2, 3, 4), 8, axis_order=p) for p in [(0, 1, 2), (2, 1, 0)]])
    assert heads.num_heads == 2
    x = _rand(1, 2, 24, 3)
    y = heads.permute(x)
    assert torch.equal(y[0, 0, :24], x[0, 0])
    assert torch.equal(y[0, 1, :24], x[0, 1].view(2, 3, 4, 3).permute(2, 1, 0, 3).reshape(24, 3))
    assert torch.equal(heads.unpermute(y), x)
    with pytest.raises(ValueError, match="tile_size"):
        concat_orders(flat_order(3, 4), flat_order(3, 2))


def test_tile_table_from_dense_sorts_full_first():
    visited = torch.tensor([[1, 1, 0, 1], [0, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    full = torch.tensor([[0, 1, 0, 1], [0, 0, 0, 0], [1, 0, 1, 0]], dtype=torch.bool)
    t = tile_table_from_dense(visited, full)
    assert t.kv_tiles.shape == (1, 1, 3, 4)
    assert t.num_kv.tolist() == [[[3, 0, 4]]] and t.num_full.tolist() == [[[2, 0, 2]]]
    assert t.kv_tiles[0, 0, 0, :3].tolist() == [1, 3, 0]
    assert t.kv_tiles[0, 0, 2].tolist() == [0, 2, 1, 3]
    v2, f2 = t.dense()
    assert torch.equal(v2[0, 0], visited) and torch.equal(f2[0, 0], full)
    with pytest.raises(ValueError, match="visited"):
        tile_table_from_dense(visited & False, full)


# ------------------------------------------------------------------------------------------------- patterns
def _local_text_pattern(grid=(6, 7), tile=(2, 4), n_text=5, radius=2, pooled=0):
    """Text tokens first (see everything / seen by all), an image grid with a square window, optional pooled keys
    that only image queries see: the CLEAR layout in miniature."""
    h, w = grid
    n_img = h * w

    def mask_mod(b, h_, q, kv):
        qi, ki = q - n_text, kv - n_text
        qy, qx, ky, kx = qi // w, qi % w, ki // w, ki % w
        local = ((qy - ky).abs() <= radius) & ((qx - kx).abs() <= radius)
        img_q = q >= n_text
        pooled_k = kv >= n_text + n_img
        return torch.where(pooled_k, img_q, (q < n_text) | (kv < n_text) | local)

    t = math.prod(tile)
    q_order = concat_orders(flat_order(n_text, t), grid_order(grid, tile))
    parts = [flat_order(n_text, t), grid_order(grid, tile)] + ([flat_order(pooled, t)] if pooled else [])
    kv_order = concat_orders(*parts)
    table = tile_table_from_mask(q_order, kv_order, mask_mod)
    return BlockSparsePattern(table, q_order, kv_order, TileMask(mask_mod), name="local+text")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pooled", [0, 6])
def test_block_sparse_against_reference_local_text(backend, pooled):
    pattern = _local_text_pattern(pooled=pooled)
    assert pattern.table.num_full.sum() > 0 and (pattern.table.num_kv > pattern.table.num_full).any()
    b, h, d = 2, 3, 8
    q = _rand(b, h, pattern.num_queries, d, seed=1)
    k = _rand(b, h, pattern.num_keys, d, seed=2)
    v = _rand(b, h, pattern.num_keys, d, seed=3)
    mask = _dense_mask(pattern, 1, 1)
    out, lse = block_sparse_attention(q, k, v, pattern, backend=backend, return_lse=True)
    ref, ref_lse = masked_attention(q, k, v, mask, return_lse=True)
    torch.testing.assert_close(out, ref.float(), atol=2e-5, rtol=0)
    torch.testing.assert_close(lse, ref_lse.float(), atol=2e-5, rtol=0)


def test_segment_tile_masks_equal_brute_force():
    pattern = _local_text_pattern(pooled=6)
    qo, ko = pattern.q_order, pattern.kv_order
    image = grid_order((6, 7), (2, 4))
    local = dense_tile_masks(image, image, lambda b, h, q, kv: pattern.mask.mask_mod(b, h, q + 5, kv + 5))
    rules = {(0, 0): "all", (0, 1): "all", (1, 0): "all", (1, 1): local, (1, 2): "all"}
    visited, full = segment_tile_masks(qo, ko, rules)
    v_ref, f_ref = dense_tile_masks(qo, ko, pattern.mask.mask_mod)
    assert torch.equal(visited, v_ref) and torch.equal(full, f_ref)


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_head_orders_and_tables_paro_style(backend):
    """Each head has its own axis order (PARO) and its own table of kept 1-D tiles, no in-tile mask."""
    grid, tile, heads = (2, 3, 4), 4, 3
    perms = [(0, 1, 2), (2, 0, 1), (1, 2, 0)]
    order = stack_orders([grid_order(grid, tile, axis_order=p) for p in perms])
    g = torch.Generator().manual_seed(5)
    visited = torch.rand(1, heads, order.num_tiles, order.num_tiles, generator=g) < 0.5
    visited |= torch.eye(order.num_tiles, dtype=torch.bool)  # diagonal blocks always kept
    pattern = BlockSparsePattern(tile_table_from_dense(visited), order, order, name="paro")
    q, k, v = (_rand(2, heads, 24, 8, seed=s) for s in range(3))
    out = block_sparse_attention(q, k, v, pattern, backend=backend)
    ref = masked_attention(q, k, v, _dense_mask(pattern, 1, heads))
    torch.testing.assert_close(out, ref.float(), atol=2e-5, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_for_queries_keeps_the_owned_rows_and_the_keys_they_visit(backend):
    """`for_queries` (ring attention): owned rows equal the full pattern's (per-head orders, an in-tile mask), the
    other query tiles visit nothing, and `visited_keys` is the union of the owned rows of the brute-force mask."""
    grid, tile, heads = (2, 3, 4), 4, 3
    order = stack_orders([grid_order(grid, tile, axis_order=p) for p in [(0, 1, 2), (2, 0, 1), (1, 2, 0)]])
    g = torch.Generator().manual_seed(6)
    visited = (torch.rand(1, heads, order.num_tiles, order.num_tiles, generator=g) < 0.4) | torch.eye(6).bool()
    mask = TileMask(lambda b, h, q, kv: (q + kv) % 3 != 0)
    pattern = BlockSparsePattern(tile_table_from_dense(visited, torch.zeros_like(visited)), order, order, mask)
    q, k, v = (_rand(2, heads, 24, 8, seed=s) for s in range(3))
    owned = torch.arange(0, 4)  # one tile of head 0 (row-major), spread over tiles in the permuted heads
    sub = pattern.for_queries(owned)
    out = block_sparse_attention(q, k, v, sub, backend=backend)
    ref = masked_attention(q, k, v, _dense_mask(pattern, 1, heads))
    torch.testing.assert_close(out[:, :, owned], ref.float()[:, :, owned], atol=2e-5, rtol=0)
    assert int(sub.table.num_kv.sum()) < int(pattern.table.num_kv.sum())  # tiles without owned queries dropped
    seen = _dense_mask(pattern, 1, heads)[..., owned, :].flatten(0, 2).any(0)  # keys some owned query sees
    assert bool((sub.visited_keys() | ~seen).all())  # visited_keys covers them (at tile granularity)
    assert pattern.for_queries(owned) is sub  # cached


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_batch_tables_and_empty_rows(backend):
    order = flat_order(20, 4)
    visited = torch.zeros(2, 1, 5, 5, dtype=torch.bool)
    visited[0, 0, :, 0] = True
    visited[1, 0, :4] = torch.eye(5, dtype=torch.bool)[:4]  # query tile 4 of batch 1 sees nothing
    pattern = BlockSparsePattern(tile_table_from_dense(visited), order, order)
    q, k, v = (_rand(2, 2, 20, 4, seed=s) for s in range(3))
    out = block_sparse_attention(q, k, v, pattern, backend=backend)
    ref = masked_attention(q, k, v, _dense_mask(pattern, 2, 1))
    torch.testing.assert_close(out, ref.float(), atol=2e-5, rtol=0)
    assert torch.equal(out[1, :, 16:], torch.zeros(2, 4, 4))


@pytest.mark.parametrize("backend", BACKENDS)
def test_full_tiles_skip_the_mask(backend):
    """A tile listed as full is attended entirely even where mask_mod says no: kernels must not evaluate it."""
    order = flat_order(8, 4)
    never = TileMask(lambda b, h, q, kv: q < -1, name="never")
    table = TileTable(torch.tensor([[[[1, 0], [0, 1]]]]), torch.tensor([[[2, 1]]]), torch.tensor([[[1, 0]]]), 2)
    pattern = BlockSparsePattern(table, order, order, never)
    q, k, v = (_rand(1, 1, 8, 4, seed=s) for s in range(3))
    out = block_sparse_attention(q, k, v, pattern, backend=backend)
    mask = torch.zeros(8, 8, dtype=torch.bool)
    mask[:4, 4:] = True  # query tile 0: full tile 1 only (tile 0 is partial and masked out)
    ref = masked_attention(q, k, v, mask)
    torch.testing.assert_close(out[:, :, :4], ref[:, :, :4].float(), atol=2e-5, rtol=0)
    assert torch.equal(out[:, :, 4:], torch.zeros(1, 1, 4, 4))  # query tile 1: only a partial, masked tile


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_block_sparse_reference_half_precision(dtype):
    pattern = _local_text_pattern()
    q, k, v = (_rand(1, 2, pattern.num_queries, 16, dtype=dtype, seed=s) for s in range(3))
    out = block_sparse_attention(q, k, v, pattern, backend="reference")
    assert out.dtype == dtype
    ref = masked_attention(q, k, v, _dense_mask(pattern, 1, 1))
    torch.testing.assert_close(out.double(), ref, atol=1e-2, rtol=0)


def test_block_sparse_reference_backward_matches_dense():
    pattern = _local_text_pattern(pooled=6)
    q, k, v = (_rand(2, 2, n, 8, seed=s).requires_grad_() for s, n in enumerate((47, 53, 53)))
    grad = _rand(2, 2, 47, 8, seed=9)
    out = block_sparse_attention(q, k, v, pattern, backend="reference", backend_options={"chunk_elements": 256})
    (out * grad).sum().backward()
    q2, k2, v2 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = masked_attention(q2, k2, v2, _dense_mask(pattern, 1, 1))
    (ref * grad.double()).sum().backward()
    for a, b_ in ((out, ref), (q.grad, q2.grad), (k.grad, k2.grad), (v.grad, v2.grad)):
        torch.testing.assert_close(a.double(), b_, atol=1e-5, rtol=0)


def test_chunking_does_not_change_results():
    pattern = _local_text_pattern()
    q, k, v = (_rand(1, 2, pattern.num_queries, 8, seed=s) for s in range(3))
    a = block_sparse_attention(q, k, v, pattern, backend="reference", backend_options={"chunk_elements": 1})
    b = block_sparse_attention(q, k, v, pattern, backend="reference", backend_options={"chunk_elements": 1 << 30})
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_tile_bound_and_stats():
    order = flat_order(64, 8)
    visited = torch.eye(8, dtype=torch.bool) | torch.eye(8, dtype=torch.bool).roll(1, 1)
    pattern = BlockSparsePattern(tile_table_from_dense(visited), order, order)
    assert pattern.tile_bound() == pytest.approx(64 / 16)
    stats = pattern.stats()
    assert stats["fully_block_sparse"] and stats["visited_per_row"] == 16


# ------------------------------------------------------------------------------------------------- errors and choice
def test_errors_name_the_argument():
    pattern = _local_text_pattern()
    q = _rand(1, 2, pattern.num_queries, 8)
    with pytest.raises(ValueError, match="`pattern` is for 47 queries"):
        block_sparse_attention(q[:, :, :-1], q, q, pattern)
    with pytest.raises(ValueError, match="`query` must be a \\[B, H, N, D\\]"):
        block_sparse_attention(q[0], q, q, pattern)
    with pytest.raises(ValueError, match="`backend` must be one of"):
        block_sparse_attention(q, q, q, pattern, backend="cuda")
    with pytest.raises(ValueError, match="no backward pass on CPU"):
        block_sparse_attention(q.requires_grad_(), q, q, pattern, backend="flex")
    with pytest.raises(ValueError, match="head dims"):
        block_sparse_attention(q, q[..., :4], q, pattern)


def test_automatic_choice_is_logged(caplog):
    pattern = _local_text_pattern()
    q = _rand(1, 1, pattern.num_queries, 8)
    with caplog.at_level("DEBUG", logger="attnpack.kernels.block_sparse"):
        block_sparse_attention(q, q, q, pattern)
    assert "picked 'reference'" in caplog.text


@pytest.mark.slow
def test_compiled_flex_on_cpu_honours_the_table(monkeypatch):
    """Compiled FlexAttention skips unlisted tiles and the mask on full tiles (eager evaluates the mask everywhere):
    both paths must give the pattern's result."""
    monkeypatch.setenv("ATTNPACK_FLEX_COMPILE", "1")
    grid, tile, heads = (2, 3, 4), 4, 3
    order = stack_orders([grid_order(grid, tile, axis_order=p) for p in [(0, 1, 2), (2, 0, 1), (1, 2, 0)]])
    g = torch.Generator().manual_seed(5)
    visited = (torch.rand(1, heads, 6, 6, generator=g) < 0.5) | torch.eye(6, dtype=torch.bool)
    pattern = BlockSparsePattern(tile_table_from_dense(visited), order, order, name="paro")
    q, k, v = (_rand(2, heads, 24, 16, seed=s) for s in range(3))
    with torch.no_grad():
        out = block_sparse_attention(q, k, v, pattern, backend="flex")
    torch.testing.assert_close(
        out, masked_attention(q, k, v, _dense_mask(pattern, 1, heads)).float(), atol=2e-5, rtol=0
    )


def test_tile_coordinate_bounds_classify_a_circle_like_brute_force():
    """The CLEAR use: classify tiles of a circular window analytically from tile boxes."""
    grid, radius = (9, 11), 3.5
    order = grid_order(grid, (4, 4))
    lo, hi, has = tile_coordinate_bounds(order, grid)
    # per-axis distance between boxes: min (0 if overlapping) and max
    dmin = (lo[0, :, None] - hi[0, None, :]).clamp(min=0) + (lo[0, None, :] - hi[0, :, None]).clamp(min=0)
    dmax = torch.maximum(hi[0, :, None] - lo[0, None, :], hi[0, None, :] - lo[0, :, None])
    visited = (dmin.pow(2).sum(-1) < radius**2) & has[0, :, None] & has[0, None, :]
    kpad = (order.index[0] < 0).view(order.num_tiles, -1).any(-1)
    full = (dmax.pow(2).sum(-1) < radius**2) & visited & ~kpad[None, :]

    def circle(b, h, q, kv):
        qy, qx, ky, kx = q // grid[1], q % grid[1], kv // grid[1], kv % grid[1]
        return (qy - ky) ** 2 + (qx - kx) ** 2 < radius**2

    v_ref, f_ref = dense_tile_masks(order, order, circle)
    assert torch.equal(visited, v_ref[0, 0]) and torch.equal(full, f_ref[0, 0])


def test_invalid_tables_are_rejected():
    order = flat_order(8, 4)
    with pytest.raises(ValueError, match="outside"):
        BlockSparsePattern(
            TileTable(torch.tensor([[[[5], [0]]]]), torch.tensor([[[1, 1]]]), torch.zeros(1, 1, 2), 2), order, order
        )
    with pytest.raises(ValueError, match="num_full <= num_kv"):
        BlockSparsePattern(
            TileTable(torch.tensor([[[[1], [0]]]]), torch.tensor([[[1, 1]]]), torch.full((1, 1, 2), 2), 2),
            order,
            order,
        )


# ------------------------------------------------------------------------------------------------- padded full tiles
@pytest.mark.parametrize("per_head", [False, True])
def test_padded_key_tiles_are_never_full(per_head):
    """Tables made from block masks alone list every visited tile as full; a key tile holding padding must still be
    masked (kernels load full tiles without masks: on a GPU the padding row -1 is an illegal address)."""
    from attnpack.kernels.block_sparse import TokenOrder

    n, tile = 40, 16  # 3 tiles, 8 padding positions
    if per_head:  # head 0 pads its last tile, head 1 its first
        rows = [list(range(n)) + [-1] * 8, [-1] * 8 + list(range(n))]
        order = TokenOrder(torch.tensor(rows, dtype=torch.int32), tile, n)
    else:
        order = flat_order(n, tile)
    vis = torch.ones(order.num_tiles, order.num_tiles, dtype=torch.bool)
    pattern = BlockSparsePattern(tile_table_from_dense(vis), order, order)
    visited, full = pattern.table.dense()
    padded = torch.tensor([[False, False, True], [True, False, False]][: order.num_heads])
    assert visited.all()
    assert torch.equal(full, ~padded[None, :, None, :].expand_as(full))
    q, k, v = (_rand(1, 2, n, 16, seed=s) for s in range(3))
    expect = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double())
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # the Triton kernel runs in the interpreter on CPUs
    for backend in ("reference", "triton"):
        out = block_sparse_attention(q.to(dev), k.to(dev), v.to(dev), pattern.to(dev), backend=backend)
        torch.testing.assert_close(out.double().cpu(), expect, atol=2e-5, rtol=0)


def test_flex_is_not_chosen_for_tiles_its_compiled_kernel_cannot_take():
    """Compiled FlexAttention (CUDA) needs tl.dot reduction dims >= 16; seen on an H200: PARO with 4-token tiles
    failed to compile. The automatic choice must skip flex there (the reference backend serves the call)."""
    from unittest import mock

    import attnpack.kernels.block_sparse as bs

    def on_cuda(n, d):
        q = mock.MagicMock()
        q.device, q.shape = torch.device("cuda"), (1, 2, n, d)
        return q

    def pattern(n, tile):
        o = flat_order(n, tile)
        vis = torch.ones(o.num_tiles, o.num_tiles, dtype=torch.bool)
        return BlockSparsePattern(tile_table_from_dense(vis), o, o)

    assert "key tiles" in bs._flex_unusable(on_cuda(32, 64), None, None, pattern(32, 4), False)
    assert "head_dim" in bs._flex_unusable(on_cuda(64, 8), None, None, pattern(64, 16), False)
    assert bs._flex_unusable(on_cuda(96, 64), None, None, pattern(96, 48), False) is None  # 48 = 16 x 3
    assert bs._flex_unusable(torch.zeros(1, 2, 32, 8), None, None, pattern(32, 4), False) is None  # eager on CPU
