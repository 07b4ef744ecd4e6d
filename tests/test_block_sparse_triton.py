"""The fused Triton block-sparse kernel against the dense oracle (Triton interpreter on CPU, tiny shapes; GPU when
present). Patterns shaped like the later users: PARO per-head orders/tables, CLEAR text + circle + pooled keys."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from attnpack.kernels.block_sparse import (
    BlockSparsePattern,
    TileMask,
    TileTable,
    block_sparse_attention,
    concat_orders,
    flat_order,
    grid_order,
    stack_orders,
    tile_table_from_dense,
    tile_table_from_mask,
)
from attnpack.kernels.block_sparse.naive import masked_attention
from attnpack.kernels.block_sparse.naive import pattern_mask as _dense_mask


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _rand(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype).to(DEVICE)


@triton.jit
def _clear_mask_triton(b, h, q_idx, kv_idx, P):
    """CLEAR-style visibility: text rows / columns, a circle of radius^2 P[4] on a (P[2], P[3]) image after P[0] text
    tokens, pooled keys from P[1] on seen only by image queries."""
    n_text = tl.load(P)
    pooled_start = tl.load(P + 1)
    w = tl.load(P + 3)
    r2 = tl.load(P + 4)
    qi = q_idx - n_text
    ki = kv_idx - n_text
    dy = qi // w - ki // w
    dx = qi % w - ki % w
    local = dy * dy + dx * dx < r2
    img_q = q_idx >= n_text
    return tl.where(kv_idx >= pooled_start, img_q, (q_idx < n_text) | (kv_idx < n_text) | local)


def _clear_pattern(h=8, w=12, n_text=20, pooled=6, radius2=10):
    n_img = h * w

    def mask_mod(b, h_, q, kv):
        qi, ki = q - n_text, kv - n_text
        dy, dx = qi // w - ki // w, qi % w - ki % w
        local = dy * dy + dx * dx < radius2
        return torch.where(kv >= n_text + n_img, q >= n_text, (q < n_text) | (kv < n_text) | local)

    tile = 16
    q_order = concat_orders(flat_order(n_text, tile), grid_order((h, w), (4, 4)))
    kv_order = concat_orders(flat_order(n_text, tile), grid_order((h, w), (4, 4)), flat_order(pooled, tile))
    params = torch.tensor([n_text, n_text + n_img, h, w, radius2], dtype=torch.int32)
    mask = TileMask(mask_mod, triton_fn=_clear_mask_triton, params=params, name="clear")
    return BlockSparsePattern(tile_table_from_mask(q_order, kv_order, mask_mod), q_order, kv_order, mask)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_triton_clear_like_pattern_against_reference(dtype):
    pattern = _clear_pattern()
    stats = pattern.stats()
    assert 0 < stats["masked_fraction"] < 1
    q = _rand(2, 2, pattern.num_queries, 16, dtype=dtype, seed=1)
    k = _rand(2, 2, pattern.num_keys, 16, dtype=dtype, seed=2)
    v = _rand(2, 2, pattern.num_keys, 16, dtype=dtype, seed=3)
    out, lse = block_sparse_attention(q, k, v, pattern, backend="triton", return_lse=True)
    ref, ref_lse = masked_attention(q.cpu(), k.cpu(), v.cpu(), _dense_mask(pattern, 1, 1), return_lse=True)
    atol = 2e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out.cpu().double(), ref, atol=atol, rtol=0)
    torch.testing.assert_close(lse.cpu().double(), ref_lse, atol=max(atol, 1e-4), rtol=0)


def test_triton_per_head_orders_and_tables_paro_style():
    grid, heads = (2, 4, 8), 3
    order = stack_orders([grid_order(grid, 16, axis_order=p) for p in [(0, 1, 2), (2, 0, 1), (1, 2, 0)]])
    g = torch.Generator().manual_seed(3)
    visited = (torch.rand(1, heads, 4, 4, generator=g) < 0.5) | torch.eye(4, dtype=torch.bool)
    pattern = BlockSparsePattern(tile_table_from_dense(visited), order, order, name="paro")
    q, k, v = (_rand(2, heads, 64, 16, seed=s) for s in range(3))
    out = block_sparse_attention(q, k, v, pattern, backend="triton")
    ref = masked_attention(q.cpu(), k.cpu(), v.cpu(), _dense_mask(pattern, 1, heads))
    torch.testing.assert_close(out.cpu().double(), ref, atol=2e-5, rtol=0)


def test_triton_identity_orders_padding_and_empty_rows():
    """1-D identity orders (no gather), a padded last tile, a query tile that sees nothing, per-batch tables."""
    order = flat_order(40, 16)
    visited = torch.zeros(2, 1, 3, 3, dtype=torch.bool)
    visited[0, 0] = torch.tensor([[1, 0, 1], [1, 1, 1], [0, 0, 1]], dtype=torch.bool)
    visited[1, 0, :2] = torch.tensor([[0, 1, 0], [1, 0, 1]], dtype=torch.bool)
    full = visited.clone()
    full[..., 2] = False  # the padded key tile is never full
    pattern = BlockSparsePattern(tile_table_from_dense(visited, full), order, order)
    q, k, v = (_rand(2, 2, 40, 32, seed=s) for s in range(3))
    out = block_sparse_attention(q, k, v, pattern, backend="triton")
    ref = masked_attention(q.cpu(), k.cpu(), v.cpu(), _dense_mask(pattern, 2, 1))
    torch.testing.assert_close(out.cpu().double(), ref, atol=2e-5, rtol=0)
    assert torch.equal(out[1, :, 32:].cpu(), torch.zeros(2, 8, 32))


def test_triton_full_tiles_skip_the_mask():
    order = flat_order(32, 16)

    @triton.jit
    def never(b, h, q, kv, P):
        return q < -1

    mask = TileMask(lambda b, h, q, kv: q < -1, triton_fn=never, name="never")
    table = TileTable(torch.tensor([[[[1, 0], [0, 1]]]]), torch.tensor([[[2, 1]]]), torch.tensor([[[1, 0]]]), 2)
    pattern = BlockSparsePattern(table, order, order, mask)
    q, k, v = (_rand(1, 1, 32, 16, seed=s) for s in range(3))
    out = block_sparse_attention(q, k, v, pattern, backend="triton")
    m = torch.zeros(32, 32, dtype=torch.bool)
    m[:16, 16:] = True
    ref = masked_attention(q.cpu(), k.cpu(), v.cpu(), m)
    torch.testing.assert_close(out[:, :, :16].cpu().double(), ref[:, :, :16], atol=2e-5, rtol=0)
    assert torch.equal(out[:, :, 16:].cpu(), torch.zeros(1, 1, 16, 16))


def test_triton_refuses_what_it_cannot_run():
    pattern = _clear_pattern()
    q = _rand(1, 1, pattern.num_queries, 16)
    kv = _rand(1, 1, pattern.num_keys, 16)
    with pytest.raises(ValueError, match="forward-only"):
        block_sparse_attention(q.clone().requires_grad_(), kv, kv, pattern, backend="triton")
    no_triton = BlockSparsePattern(pattern.table, pattern.q_order, pattern.kv_order, TileMask(pattern.mask.mask_mod))
    with pytest.raises(ValueError, match="no Triton version"):
        block_sparse_attention(q, kv, kv, no_triton, backend="triton")
    small = BlockSparsePattern(
        tile_table_from_dense(torch.ones(3, 3, dtype=torch.bool)), flat_order(24, 8), flat_order(24, 8)
    )
    with pytest.raises(ValueError, match="power of two >= 16"):
        block_sparse_attention(_rand(1, 1, 24, 16), _rand(1, 1, 24, 16), _rand(1, 1, 24, 16), small, backend="triton")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU message")
def test_triton_on_cpu_without_interpreter_names_the_fix(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    pattern = _clear_pattern()
    q = _rand(1, 1, pattern.num_queries, 16)
    kv = _rand(1, 1, pattern.num_keys, 16)
    with pytest.raises(ValueError, match="needs a CUDA device"):
        block_sparse_attention(q, kv, kv, pattern, backend="triton")


def test_triton_splits_tiles_into_blocks():
    """Query / key tiles split into smaller BLOCK_M / BLOCK_N blocks (what autotuning picks on a GPU)."""
    order = flat_order(64, 32)
    visited = torch.tensor([[[[1, 0], [1, 1]], [[0, 1], [1, 0]]]], dtype=torch.bool)
    never_below = TileMask(lambda b, h, q, kv: kv <= q, triton_fn=_causal_triton, name="causal")
    full = torch.zeros_like(visited)
    pattern = BlockSparsePattern(tile_table_from_dense(visited, full), order, order, never_below)
    q, k, v = (_rand(1, 2, 64, 16, seed=s) for s in range(3))
    ref = masked_attention(q.cpu(), k.cpu(), v.cpu(), _dense_mask(pattern, 1, 2))
    out = block_sparse_attention(q, k, v, pattern, backend="triton", backend_options={"block_m": 16, "block_n": 16})
    torch.testing.assert_close(out.cpu().double(), ref, atol=2e-5, rtol=0)


def test_default_blocks_split_large_tiles_on_cuda_only():
    """Without tuning, CUDA splits tiles into FlashAttention-sized blocks that divide them; the interpreter keeps
    whole tiles. (Autotuning is opt-in: compiling every config made a first H200 call take minutes.)"""
    from attnpack.kernels.block_sparse.triton import default_blocks

    assert default_blocks(128, 128, 128, cuda=False) == (128, 128, 4, 2)
    for q_tile, kv_tile, dim in [(128, 128, 128), (256, 64, 64), (16, 16, 64), (64, 256, 128), (128, 512, 64)]:
        for itemsize in (2, 4):
            bm, bn, warps, stages = default_blocks(q_tile, kv_tile, dim, cuda=True, itemsize=itemsize)
            assert bm <= 128 and q_tile % bm == 0 and kv_tile % bn == 0 and min(bm, bn) >= 16
            # 128-key blocks only for 16-bit inputs at head_dim >= 128 (fp32 tiles of that size overflow shared memory)
            assert bn <= (128 if dim >= 128 and itemsize == 2 else 64)
            assert warps in (4, 8) and stages == (3 if itemsize == 2 else 2)
    assert default_blocks(128, 128, 128, cuda=True) == (128, 128, 8, 3)  # the H200 sweep's best (docs/benchmarks.md)
    # masked patterns: 8 warps for 128-row blocks at head_dim 64 too (4 spill in the masked loop when compiled for
    # sm_90: docs/benchmarks.md); unmasked ones (PARO sparse-only) keep 4
    assert default_blocks(128, 128, 64, cuda=True, masked=True)[2] == 8
    assert default_blocks(128, 128, 64, cuda=True)[2] == 4


def test_triton_block_sizes_are_checked():
    order = flat_order(64, 32)
    visited = torch.ones(1, 1, 2, 2, dtype=torch.bool)
    pattern = BlockSparsePattern(tile_table_from_dense(visited, visited), order, order, None)
    q = _rand(1, 1, 64, 16)
    with pytest.raises(ValueError, match="block_m"):
        block_sparse_attention(q, q, q, pattern, backend="triton", backend_options={"block_m": 24})


@triton.jit
def _causal_triton(b, h, q_idx, kv_idx, P):
    return kv_idx <= q_idx


@pytest.mark.slow
def test_kernel_resources_compiles_for_hopper_without_a_gpu(tmp_path):
    """benchmarks/kernel_resources.py: the kernel compiles for sm_90 on any machine (in a fresh process: the tests
    import Triton in interpreter mode) with Hopper's tensor-core instructions (HGMMA, not HMMA), and issue 22's
    compiler facts hold: the tile-local GNA and CLEAR masks spill no more than the unmasked kernel (+16 local
    accesses) on gathered rows and through tensor descriptors, and contiguous rows load K / V with TMA (UTMALDG);
    issue 23's: PARO's INT8 / FP8 kernel uses Hopper's 8-bit wgmma and spills nothing at 64-token tiles.
    Up to a few minutes (Triton caches compilations)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "resources.json"
    cmd = [sys.executable, str(root / "benchmarks" / "kernel_resources.py"), "--out", str(out), "--rows", "gathered",
           "tma", "--masks", "none", "gna-tile", "clear-none", "clear-tile"]  # fmt: skip
    subprocess.run(cmd, env=env, check=True)
    rows = {(r["rows"], r["mask"]): r for r in json.loads(out.read_text())["rows"]}
    assert len(rows) == 8
    for r in rows.values():
        assert r["HGMMA"] > 0 and r["HMMA"] == 0
        assert 0 < r["registers"] <= 255 and r["stack_bytes"] is not None
    for how in ("gathered", "tma"):
        for plain, mask in (("none", "gna-tile"), ("clear-none", "clear-tile")):
            local = rows[how, plain]["LDL"] + rows[how, plain]["STL"]
            assert rows[how, mask]["LDL"] + rows[how, mask]["STL"] <= local + 16, (how, mask)
    for mask in ("none", "gna-tile", "clear-tile"):
        assert rows["tma", mask]["UTMALDG"] > 0
    # issue 23: PARO's INT8 / FP8 kernel at its launch defaults runs QK^T on integer wgmma (IGMMA) and PV on IGMMA /
    # FP8 wgmma (QGMMA), loads K and V asynchronously (LDGSTS) and spills nothing at PARO's 64-token tiles
    subprocess.run([sys.executable, str(root / "benchmarks" / "kernel_resources.py"), "--out", str(out), "--force",
                    "--paro", "--paro-defaults"], env=env, check=True)  # fmt: skip
    paro = json.loads(out.read_text())["rows"]
    assert {(r["quant"], r["head_dim"], r["block"]) for r in paro} == {
        (q, d, b) for q in ("int8", "fp8") for d in (64, 128) for b in (64, 128)
    }
    for r in paro:
        assert r["IGMMA"] > 0 and r["HMMA"] == r["IMMA"] == r["HGMMA"] == 0, r
        assert (r["QGMMA"] > 0) == (r["quant"] == "fp8"), r
        assert r["LDGSTS"] > 0, r
        if r["block"] == 64:
            assert r["stack_bytes"] == 0 and r["LDL"] == r["STL"] == 0, r


@pytest.mark.parametrize(
    "options", [{"permute": False}, {"permute": True, "tma": False}], ids=["fused-gather", "no-tma"]
)
def test_triton_load_variants_against_reference(options):
    """The same patterns with the gathers fused into the kernel's loads, and with plain pointer loads of the permuted
    rows (the default, tensor descriptors on permuted rows, is what the tests above run)."""
    pattern = _clear_pattern()
    q = _rand(2, 2, pattern.num_queries, 16, seed=1)
    k, v = (_rand(2, 2, pattern.num_keys, 16, seed=s) for s in (2, 3))
    out, lse = block_sparse_attention(q, k, v, pattern, backend="triton", return_lse=True, backend_options=options)
    ref, ref_lse = masked_attention(q.cpu(), k.cpu(), v.cpu(), _dense_mask(pattern, 1, 1), return_lse=True)
    torch.testing.assert_close(out.cpu().double(), ref, atol=2e-5, rtol=0)
    torch.testing.assert_close(lse.cpu().double(), ref_lse, atol=1e-4, rtol=0)
    grid, heads = (2, 4, 8), 3
    order = stack_orders([grid_order(grid, 16, axis_order=p) for p in [(0, 1, 2), (2, 0, 1), (1, 2, 0)]])
    visited = (torch.rand(1, heads, 4, 4, generator=torch.Generator().manual_seed(3)) < 0.5) | torch.eye(4).bool()
    paro = BlockSparsePattern(tile_table_from_dense(visited), order, order, name="paro")
    q, k, v = (_rand(2, heads, 64, 16, seed=s) for s in range(3))
    out = block_sparse_attention(q, k, v, paro, backend="triton", backend_options=options)
    ref = masked_attention(q.cpu(), k.cpu(), v.cpu(), _dense_mask(paro, 1, heads))
    torch.testing.assert_close(out.cpu().double(), ref, atol=2e-5, rtol=0)


def test_triton_descriptors_on_strided_inputs_and_tail_padding():
    """Identity orders read the caller's tensors through tensor descriptors directly: a [B, N, H, D] layout seen as
    [B, H, N, D] (diffusers' layout), a padded last tile (rows past N read as zeros, stores clipped), and a head dim
    that is not a power of two; descriptors are refused with a message where strides are not 16-byte aligned."""
    order = flat_order(40, 16)
    visited = torch.ones(1, 1, 3, 3, dtype=torch.bool)
    full = visited.clone()
    full[..., 2] = False
    pattern = BlockSparsePattern(tile_table_from_dense(visited, full), order, order)
    q, k, v = (_rand(2, 40, 3, 24, seed=s).transpose(1, 2) for s in range(3))
    assert not q.is_contiguous()
    out = block_sparse_attention(q, k, v, pattern, backend="triton", backend_options={"tma": True})
    ref = masked_attention(q.cpu(), k.cpu(), v.cpu(), _dense_mask(pattern, 1, 1))
    torch.testing.assert_close(out.cpu().double(), ref, atol=2e-5, rtol=0)
    odd = _rand(1, 1, 40, 6, dtype=torch.float16)  # 12-byte rows: no descriptors, pointer loads instead
    out = block_sparse_attention(odd, odd, odd, pattern, backend="triton")
    ref = masked_attention(odd.cpu(), odd.cpu(), odd.cpu(), _dense_mask(pattern, 1, 1))
    torch.testing.assert_close(out.cpu().double(), ref, atol=1e-2, rtol=0)
    with pytest.raises(ValueError, match="tma=True"):
        block_sparse_attention(odd, odd, odd, pattern, backend="triton", backend_options={"tma": True})
