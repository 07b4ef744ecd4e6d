"""PARO kernels: axis orders, block statistics, the selection metric, masks, quantized attention (reference + Triton)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from attnpack.kernels.block_sparse import (
    BlockSparsePattern,
    TileMask,
    block_sparse_attention,
    flat_order,
    tile_table_from_dense,
)
from attnpack.kernels.paro import (
    AXIS_ORDER_NAMES,
    BlockStatistics,
    axis_order,
    block_statistics,
    combined_scores,
    fidelity,
    forced_blocks,
    inverse_axis_order,
    order_metrics,
    paro_token_order,
    permute_grid,
    quantized_reference,
    quantized_triton,
    select_block_masks,
    select_orders,
    unpermute_grid,
)
from attnpack.kernels.paro.quant import LOG2E, QUANT_MODES, prepare_quantized
from attnpack.kernels.paro.triton import prepare_quantized_triton


def _rand(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


# Triton kernels run on the GPU when there is one, else in the interpreter (conftest sets TRITON_INTERPRET=1)
KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _order_tokens(grid, axes):
    """Original row-major index of every position when the grid is flattened slowest-axis-first in ``axes``
    (nested Python loops: independent of the tensor code)."""
    strides = [math.prod(grid[a + 1 :]) for a in range(len(grid))]
    out = []
    for coords in itertools.product(*[range(grid[a]) for a in axes]):
        out.append(sum(c * strides[a] for c, a in zip(coords, axes)))
    return out


# ------------------------------------------------------------------------------------------------- orders
def test_official_order_indices_and_inverse_table():
    assert AXIS_ORDER_NAMES[3] == ("FHW", "FWH", "HWF", "HFW", "WHF", "WFH")
    assert [axis_order(i, 3) for i in range(6)] == [(0, 1, 2), (0, 2, 1), (1, 2, 0), (1, 0, 2), (2, 1, 0), (2, 0, 1)]
    assert [axis_order(i, 2) for i in range(2)] == [(0, 1), (1, 0)]
    # the reference notes' check of the official hand-written inverse table
    assert inverse_axis_order(axis_order("HWF", 3)) == (2, 0, 1)
    assert inverse_axis_order(axis_order("WFH", 3)) == (1, 2, 0)
    for name in ("FHW", "FWH", "HFW", "WHF"):
        assert inverse_axis_order(axis_order(name, 3)) == axis_order(name, 3)
    with pytest.raises(ValueError, match="order"):
        axis_order("FHX", 3)
    with pytest.raises(ValueError, match="order"):
        axis_order(6, 3)
    with pytest.raises(ValueError, match="axes"):
        axis_order(0, 4)


@pytest.mark.parametrize("grid", [(2, 3, 5), (4, 3, 2), (3, 1, 4), (3, 5), (5, 2)])
def test_permutation_and_inverse_round_trip_exactly(grid):
    n = math.prod(grid)
    x = _rand(2, 3, n, 4)
    for o in range(len(AXIS_ORDER_NAMES[len(grid)])):
        y = permute_grid(x, grid, o)
        expect = _order_tokens(grid, axis_order(o, len(grid)))
        assert sorted(expect) == list(range(n))
        assert torch.equal(y, x[:, :, expect])
        assert torch.equal(unpermute_grid(y, grid, o), x)
        # other layouts: tokens on dim 1
        assert torch.equal(unpermute_grid(permute_grid(x[0], grid, o, dim=1), grid, o, dim=1), x[0])
    with pytest.raises(ValueError, match="prod"):
        permute_grid(x[:, :, :-1], grid, 0)


@pytest.mark.parametrize("text_first", [True, False])
def test_paro_token_order_is_text_blocks_plus_per_head_reordered_grid(text_first):
    grid, text, bs = (2, 3, 5), 6, 4
    orders = [0, 2, 5, 3]
    order = paro_token_order(grid, orders, bs, text_len=text, text_first=text_first)
    n = math.prod(grid)
    t_text, t_grid = -(-text // bs), -(-n // bs)
    assert order.num_tiles == t_text + t_grid and order.num_heads == 4
    for h, o in enumerate(orders):
        toks = _order_tokens(grid, axis_order(o, 3))
        text_part = list(range(text)) + [-1] * (t_text * bs - text)
        grid_part = toks + [-1] * (t_grid * bs - n)
        if text_first:
            expect = text_part + [t + text for t in grid_part if t >= 0] + [-1] * (t_grid * bs - n)
        else:
            expect = grid_part + [t + n if t >= 0 else -1 for t in text_part]
        assert order.index[h].tolist() == expect
    # permute / unpermute through the order round-trip the whole sequence
    x = _rand(1, 4, text + n, 3)
    assert torch.equal(order.unpermute(order.permute(x)), x)
    shared = paro_token_order(grid, [2, 2], bs)
    assert shared.num_heads == 1


# ------------------------------------------------------------------------------------------------- statistics
def _brute_stats(q, k, order, eps, span):
    """Per-block statistics from the full attention matrix, token by token."""
    b, h, n, d = q.shape
    p = torch.softmax(q.double() @ k.double().transpose(-1, -2) / math.sqrt(d), dim=-1)
    s0 = span.start
    t, sz = order.num_tiles, order.tile_size
    out = {name: torch.zeros(h, t, t, dtype=torch.float64) for name in ("sum", "max", "small", "entries")}
    for hh in range(h):
        idx = order.index[min(hh, order.num_heads - 1)].tolist()
        for i, j in itertools.product(range(t), range(t)):
            qs = [x + s0 for x in idx[i * sz : (i + 1) * sz] if x >= 0]
            ks = [x + s0 for x in idx[j * sz : (j + 1) * sz] if x >= 0]
            block = p[:, hh][:, qs][:, :, ks]
            out["sum"][hh, i, j] = block.sum()
            out["max"][hh, i, j] = block.max() if block.numel() else 0
            out["small"][hh, i, j] = (block < eps).sum()
            out["entries"][hh, i, j] = block.numel()
    return out


@pytest.mark.parametrize("with_text", [False, True])
def test_block_statistics_match_the_full_attention_map(with_text):
    grid, bs, text = (2, 3, 4), 4, 5
    n = math.prod(grid)
    total = n + (text if with_text else 0)
    q, k = _rand(2, 3, total, 8, seed=1) * 2, _rand(2, 3, total, 8, seed=2) * 2
    span = slice(text, total) if with_text else slice(0, total)
    orders = [paro_token_order(grid, [1, 4, 2], bs), paro_token_order(grid, [3], bs)]
    eps = 0.02
    small_chunks = block_statistics(q, k, orders, span=span, eps=eps, chunk_elements=1)
    big_chunks = block_statistics(q, k, orders, span=span, eps=eps)
    for order, st, st_big in zip(orders, small_chunks, big_chunks):
        ref = _brute_stats(q, k, order, eps, span)
        for name in ("sum", "max", "small", "entries"):
            torch.testing.assert_close(getattr(st, name).double(), ref[name], atol=1e-6, rtol=0)
            torch.testing.assert_close(getattr(st_big, name), getattr(st, name), atol=1e-6, rtol=0)


def test_order_metrics_hand_computed():
    # one head, 2 x 2 blocks of 4 entries each
    st = BlockStatistics(
        sum=torch.tensor([[[2.0, 0.0], [0.4, 1.0]]]),
        max=torch.tensor([[[1.0, 0.0], [0.4, 0.5]]]),
        small=torch.tensor([[[2.0, 4.0], [3.0, 0.0]]]),
        entries=torch.full((1, 2, 2), 4.0),
    )
    sparsity, incoherence = order_metrics(st, sigma=0.75)
    assert sparsity.tolist() == [0.5]  # blocks (0, 1) and (1, 0) have >= 3 of 4 entries small
    # max / mean over blocks holding attention: 1/0.5, 0.4/0.1, 0.5/0.25
    assert incoherence.item() == pytest.approx((2.0 + 4.0 + 2.0) / 3)


def test_selection_prefers_sparser_orders_the_sign_fix():
    # candidate 0: fewer near-empty blocks; candidate 1: more. Same incoherence.
    sparsity = torch.tensor([[0.2, 0.8]])
    incoherence = torch.tensor([[10.0, 10.0]])
    for alpha in (0.5, 1.0):
        assert select_orders(combined_scores(sparsity, incoherence, alpha)).tolist() == [1]
    # the published form (alpha * sparsity + ...) would have picked candidate 0
    published = 0.5 * sparsity / sparsity.amax(-1, keepdim=True) + 0.5 * incoherence / incoherence.amax(
        -1, keepdim=True
    )
    assert published.argmin(-1).tolist() == [0]
    # lower incoherence wins when sparsity is equal; exact ties go to order 0 (the identity)
    assert select_orders(combined_scores(torch.tensor([[0.5, 0.5]]), torch.tensor([[9.0, 3.0]]), 0.5)).tolist() == [1]
    assert select_orders(combined_scores(torch.tensor([[0.5, 0.5]]), torch.tensor([[3.0, 3.0]]), 0.5)).tolist() == [0]
    with pytest.raises(ValueError, match="alpha"):
        combined_scores(sparsity, incoherence, 1.5)


# ------------------------------------------------------------------------------------------------- masks
def test_forced_blocks():
    f = forced_blocks(5, range(0, 2))
    expect = torch.zeros(5, 5, dtype=torch.bool)
    expect[:2, :] = expect[:, :2] = True
    expect[-1, :] = expect[:, -1] = True
    expect |= torch.eye(5, dtype=torch.bool)
    assert torch.equal(f, expect)


@pytest.mark.parametrize("rule", ["threshold", "row"])
def test_block_masks_meet_density_keep_heaviest_and_nest(rule):
    h, t = 3, 9
    mass = torch.rand(h, t, t, generator=torch.Generator().manual_seed(0))
    forced = forced_blocks(t, range(0, 1))
    densities = [0.35, 0.5, 0.8]
    codes = select_block_masks(mass, densities, forced, rule=rule)
    assert codes.dtype == torch.uint8 and codes.shape == (h, t, t)
    for level, d in enumerate(densities):
        keep = codes <= level
        assert bool(keep[:, forced].all())
        if rule == "threshold":
            per = keep.flatten(1).sum(-1)
            expect = max(int(d * t * t + 0.5), int(forced.sum()))
            assert per.tolist() == [expect] * h
            for hh in range(h):  # every kept free block is at least as heavy as every dropped one
                free = ~forced
                kept_m, drop_m = mass[hh][free & keep[hh]], mass[hh][free & ~keep[hh]]
                if len(kept_m) and len(drop_m):
                    assert kept_m.min() >= drop_m.max()
        else:
            per_row = keep.sum(-1)
            need = torch.clamp(forced.sum(-1), min=int(d * t + 0.5))
            assert torch.equal(per_row, need.expand(h, t))
        if level:
            assert bool((keep >= (codes <= level - 1)).all())  # nested
    # forced blocks alone exceeding the target: the mask is exactly the forced blocks
    tight = select_block_masks(mass, [0.05], forced)
    assert torch.equal(tight == 0, forced.expand(h, t, t))
    with pytest.raises(ValueError, match="densities"):
        select_block_masks(mass, [0.5, 0.3], forced)
    with pytest.raises(ValueError, match="mask_rule"):
        select_block_masks(mass, [0.5], forced, rule="topk")


# ------------------------------------------------------------------------------------------------- quantized attention
def _pattern(grid, orders, bs, text, density, seed=0, batch_table=1):
    order = paro_token_order(grid, orders, bs, text_len=text)
    t = order.num_tiles
    g = torch.Generator().manual_seed(seed)
    vis = torch.rand(batch_table, len(orders), t, t, generator=g) < density
    vis |= forced_blocks(t, range(0, -(-text // bs)) if text else None)
    return BlockSparsePattern(tile_table_from_dense(vis), order, order)


def _naive_quantized(q, k, v, pattern, quant):
    """Loop-by-loop oracle of the quantized semantics (module docstring of attnpack.kernels.paro.quant)."""
    spec = QUANT_MODES[quant]
    b_, h_, _, d = q.shape
    out = torch.zeros(b_, h_, q.shape[2], v.shape[-1])
    sm = d**-0.5 * LOG2E
    sz = pattern.q_order.tile_size
    table = pattern.table

    def rnd(x):
        return torch.floor(x + 0.5)

    for b, h in itertools.product(range(b_), range(h_)):
        kk = k[b, h].float() - k[b, h].float().mean(0)
        vmean = v[b, h].float().mean(0)
        vv = v[b, h].float() - vmean
        vscale = vv.abs().amax(0) / spec.pv_max
        vq = vv / vscale
        vq = vq.to(torch.float8_e4m3fn).float() if spec.pv_fp8 else rnd(vq).clamp(-spec.pv_max, spec.pv_max)
        qidx = pattern.q_order.index[min(h, pattern.q_order.num_heads - 1)].tolist()
        kidx = pattern.kv_order.index[min(h, pattern.kv_order.num_heads - 1)].tolist()

        def tile(x, idx, i):
            toks = idx[i * sz : (i + 1) * sz]
            rows = torch.stack([x[t] if t >= 0 else torch.zeros_like(x[0]) for t in toks])
            return rows, [t >= 0 for t in toks], toks

        def quantize(x):
            s = x.abs().max() / spec.qk_max
            s = s if s > 0 else torch.tensor(1.0)
            return rnd(x / s).clamp(-spec.qk_max, spec.qk_max), s

        bt, ht = min(b, table.kv_tiles.shape[0] - 1), min(h, table.kv_tiles.shape[1] - 1)
        for i in range(pattern.q_order.num_tiles):
            qt, q_ok, q_toks = tile(q[b, h].float(), qidx, i)
            qq, qs = quantize(qt)
            m = torch.full((sz,), -math.inf)
            l_sum = torch.zeros(sz)
            acc = torch.zeros(sz, v.shape[-1])
            for slot in range(int(table.num_kv[bt, ht, i])):
                j = int(table.kv_tiles[bt, ht, i, slot])
                kt, k_ok, _ = tile(kk, kidx, j)
                kq, ks = quantize(kt)
                vt, _, _ = tile(vq, kidx, j)
                s = (qq @ kq.T) * ((qs * ks) * sm)
                s[:, [not ok for ok in k_ok]] = -math.inf
                m_new = torch.maximum(m, s.amax(-1))
                m_safe = torch.where(torch.isinf(m_new), 0.0, m_new)
                alpha = torch.exp2(m - m_safe)
                p = torch.exp2(s - m_safe[:, None])
                p[[not ok for ok in q_ok]] = 0
                p[:, [not ok for ok in k_ok]] = 0
                l_sum = l_sum * alpha + p.sum(-1)
                pmax = p.max(-1, keepdim=True).values  # one scale per row
                scaled = p * torch.where(pmax > 0, spec.pv_max / pmax, 0.0)
                pq = scaled.to(torch.float8_e4m3fn).float() if spec.pv_fp8 else rnd(scaled)
                acc = acc * alpha[:, None] + (pq @ vt) * (pmax / spec.pv_max)
                m = m_new
            for r, t in enumerate(q_toks):
                if t >= 0 and l_sum[r] > 0:
                    out[b, h, t] = acc[r] * vscale / l_sum[r] + vmean
    return out


@pytest.mark.parametrize("quant", ["int8", "fp8", "int4"])
def test_quantized_reference_matches_loop_oracle(quant):
    grid, bs, text = (2, 3, 4), 4, 3
    pattern = _pattern(grid, [0, 4], bs, text, 0.5, seed=1, batch_table=2)
    n = text + math.prod(grid)
    q, k, v = _rand(2, 2, n, 8, seed=3), _rand(2, 2, n, 8, seed=4) + 0.5, _rand(2, 2, n, 6, seed=5)
    ref = quantized_reference(q, k, v, pattern, quant=quant, chunk_elements=64)  # several query-tile chunks
    torch.testing.assert_close(ref, _naive_quantized(q, k, v, pattern, quant), atol=2e-5, rtol=0)


@pytest.mark.parametrize("quant,min_cos,lse_tol", [("int8", 0.9995, 0.1), ("fp8", 0.998, 0.1), ("int4", 0.95, 1.5)])
def test_quantized_attention_is_close_to_exact_block_sparse_attention(quant, min_cos, lse_tol):
    grid, bs = (3, 4, 6), 8
    pattern = _pattern(grid, [1, 2, 5], bs, 0, 0.6)
    n = math.prod(grid)
    q, k, v = _rand(1, 3, n, 32, seed=1) * 1.5, _rand(1, 3, n, 32, seed=2) * 1.5 + 2.0, _rand(1, 3, n, 32, seed=3)
    exact, lse = block_sparse_attention(q, k, v, pattern, backend="reference", return_lse=True)
    out, qlse = block_sparse_attention(
        q, k, v, pattern, backend="paro_quant_reference", backend_options={"quant": quant}, return_lse=True
    )
    assert fidelity(exact, out)["cosine"] > min_cos
    assert (qlse - lse).abs().max() < lse_tol  # K smoothing is added back to the log-sum-exp
    # K smoothing: a per-channel offset common to all keys (softmax-invariant) leaves the quantized result unchanged
    offset = _rand(1, 3, 1, 32, seed=9) * 10
    shifted = quantized_reference(q, k + offset, v, pattern, quant=quant)
    torch.testing.assert_close(shifted, out, atol=1e-5, rtol=0)


def test_quantized_backends_reject_in_tile_masks_and_bad_quant():
    grid, bs = (2, 2, 4), 4
    order = paro_token_order(grid, [0], bs)
    vis = torch.ones(1, 1, order.num_tiles, order.num_tiles, dtype=torch.bool)
    masked = BlockSparsePattern(
        tile_table_from_dense(vis, torch.zeros_like(vis)), order, order, TileMask(lambda *a: True)
    )
    q = _rand(1, 1, 16, 16)
    for backend in ("paro_quant_reference", "paro_quant_triton"):
        with pytest.raises(ValueError, match="in-tile mask"):
            block_sparse_attention(q, q, q, masked, backend=backend)
    plain = BlockSparsePattern(tile_table_from_dense(vis), order, order)
    with pytest.raises(ValueError, match="quant"):
        block_sparse_attention(q, q, q, plain, backend="paro_quant_reference", backend_options={"quant": "int2"})


@pytest.mark.parametrize(
    "quant,dtype,text,batch_table",
    [("int8", torch.float32, 3, 1), ("fp8", torch.float32, 0, 2), ("int4", torch.float16, 3, 2)],
)
def test_triton_kernel_matches_reference(quant, dtype, text, batch_table):
    grid, bs = (2, 2, 5), 8
    pattern = _pattern(grid, [3, 0], bs, text, 0.6, seed=2, batch_table=batch_table).to(KERNEL_DEVICE)
    n = text + math.prod(grid)
    q, k, v = (_rand(2, 2, n, 12, seed=s, dtype=dtype).to(KERNEL_DEVICE) for s in (6, 7, 8))
    ref, ref_lse = quantized_reference(q, k, v, pattern, quant=quant, return_lse=True)
    out, lse = quantized_triton(q, k, v, pattern, quant=quant, return_lse=True)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), ref.float(), atol=1e-5 if dtype == torch.float32 else 1e-3, rtol=0)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=0)
    via_api = block_sparse_attention(q, k, v, pattern, backend="paro_quant_triton", backend_options={"quant": quant})
    torch.testing.assert_close(via_api, out, atol=0, rtol=0)


@pytest.mark.parametrize("quant", ["int8", "fp8", "int4"])
def test_triton_quantization_prepass_is_bit_identical(quant):
    grid, bs, text = (2, 3, 5), 16, 7
    pattern = _pattern(grid, [5, 1, 0], bs, text, 1.0).to(KERNEL_DEVICE)
    n = text + math.prod(grid)
    q, k, v = (_rand(2, 3, n, 24, seed=s, dtype=torch.bfloat16).to(KERNEL_DEVICE) * 3 for s in (1, 2, 3))
    ref = prepare_quantized(q, k, v, pattern, QUANT_MODES[quant])
    out = prepare_quantized_triton(q, k, v, pattern, QUANT_MODES[quant])
    for name in ("q", "q_scale", "k", "k_scale", "v", "v_scale", "v_mean", "k_mean"):
        a, b = getattr(ref, name), getattr(out, name)
        assert a.dtype == b.dtype and a.shape == b.shape, name
        if a.dtype == torch.float8_e4m3fn:  # compare fp8 through its bits
            a, b = a.view(torch.uint8), b.view(torch.uint8)
        assert torch.equal(a, b), name


@pytest.mark.parametrize("quant", ["int8", "fp8"])
def test_triton_kernel_transposed_v_tiles_against_loop_oracle(quant):
    """Issue 23: the pre-pass stores V's tiles transposed (token index fastest, the K-major operand of 8-bit wgmma)
    and the kernel scales P per row from the online-softmax row max; checked against the independent loop oracle
    with a value head dim unlike the key's (V^T strides use Dv) and padded tiles (text not a multiple of the tile)."""
    grid, bs, text = (2, 3, 4), 16, 5
    pattern = _pattern(grid, [2, 5], bs, text, 0.5, seed=4, batch_table=2).to(KERNEL_DEVICE)
    n = text + math.prod(grid)
    q, k = (_rand(2, 2, n, 16, seed=s).to(KERNEL_DEVICE) * 2 for s in (1, 2))
    v = _rand(2, 2, n, 24, seed=3).to(KERNEL_DEVICE)
    prep = prepare_quantized_triton(q, k, v, pattern, QUANT_MODES[quant])
    assert prep.v.shape[-2:] == (bs, 24) and prep.v.stride(-2) == 1 and prep.v.stride(-1) == bs  # [Dv, S] tiles
    out = quantized_triton(q, k, v, pattern, quant=quant)
    torch.testing.assert_close(out.cpu(), _naive_quantized(q.cpu(), k.cpu(), v.cpu(), pattern.to("cpu"), quant),
                               atol=2e-5, rtol=0)  # fmt: skip


def test_triton_kernel_full_tables_shared_order():
    # one shared order, a table broadcast over batch and heads, a tile size that is a power of two >= 16
    order = flat_order(40, 16)
    vis = torch.ones(1, 1, order.num_tiles, order.num_tiles, dtype=torch.bool)
    pattern = BlockSparsePattern(tile_table_from_dense(vis), order, order).to(KERNEL_DEVICE)
    q, k, v = (_rand(1, 2, 40, 16, seed=s).to(KERNEL_DEVICE) for s in (1, 2, 3))
    torch.testing.assert_close(
        quantized_triton(q, k, v, pattern, quant="int8"), quantized_reference(q, k, v, pattern), atol=1e-5, rtol=0
    )


# ------------------------------------------------------------------------------------------------- GPU (full size)
@pytest.mark.gpu
@pytest.mark.parametrize("quant", ["int8", "fp8"])
@pytest.mark.parametrize(
    "grid,text,dim,orders",
    [((13, 30, 45), 226, 64, [0, 2, 3, 5]), ((21, 45, 80), 0, 128, [1, 4])],
    ids=["cogvideox", "wan720p"],
)
def test_triton_kernel_full_size_on_gpu(quant, grid, text, dim, orders):
    if quant == "fp8" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 needs compute capability >= 8.9")
    pattern = _pattern(grid, orders, 64, text, 0.3).to("cuda")
    n = text + math.prod(grid)
    q, k, v = (_rand(1, len(orders), n, dim, seed=s, dtype=torch.bfloat16).cuda() for s in (1, 2, 3))
    ref = quantized_reference(q, k, v, pattern, quant=quant)
    out = quantized_triton(q, k, v, pattern, quant=quant)
    assert fidelity(ref.float(), out.float())["cosine"] > 0.99999
    exact = block_sparse_attention(q, k, v, pattern, backend="reference")
    assert fidelity(exact.float(), out.float())["cosine"] > (0.999 if quant == "int8" else 0.995)
