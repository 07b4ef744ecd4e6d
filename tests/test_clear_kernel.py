"""CLEAR kernels: the mask against a transcription of the paper's rule, tile tables, pooling, published densities."""

from __future__ import annotations

import math

import pytest
import torch
from clear_oracle import oracle_mask, oracle_pool

from attnpack.kernels.block_sparse import dense_tile_masks
from attnpack.kernels.block_sparse.naive import masked_attention
from attnpack.kernels.clear import (
    ClearPatternCache,
    ClearSpec,
    circle_tile_masks,
    clear_attention,
    clear_mask_mod,
    clear_pair_count,
    clear_pattern,
    clear_tile_stats,
    default_clear_tiles,
    pool_image_tokens,
    proportional_scale,
)


def _rand(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype)


# ------------------------------------------------------------------------------------------------- the mask
@pytest.mark.parametrize(
    "grid,text_len,radius,d", [((5, 7), 6, 2, 1), ((6, 6), 3, 3, 1), ((4, 8), 5, 2, 2), ((6, 9), 0, 4, 3)]
)
def test_mask_mod_equals_the_rule(grid, text_len, radius, d):
    spec = ClearSpec(grid, text_len, radius, d)
    expect = oracle_mask(grid, text_len, radius, d)
    q = torch.arange(spec.num_queries)[:, None]
    k = torch.arange(spec.num_keys)[None, :]
    assert torch.equal(clear_mask_mod(spec)(0, 0, q, k), expect)


def test_mask_is_strict_and_hides_pooled_tokens_from_text():
    spec = ClearSpec((7, 9), 2, 3, 1)
    m = clear_mask_mod(spec)
    t, w = 2, 9
    centre = t + 3 * w + 4  # (3, 4)
    cols = [x for x in range(w) if m(0, 0, torch.tensor(centre), torch.tensor(t + 3 * w + x))]
    assert cols == [2, 3, 4, 5, 6]  # |dx| = 3 = r is excluded
    # (3, 4) -> (0, 4) is at distance 3: excluded; (1, 2) at sqrt(8) < 3: included
    assert not m(0, 0, torch.tensor(centre), torch.tensor(t + 0 * w + 4))
    assert m(0, 0, torch.tensor(centre), torch.tensor(t + 1 * w + 2))
    # a Pythagorean triple on the boundary: r = 5, (dy, dx) = (3, 4) excluded, (3, 3) included
    m5 = clear_mask_mod(ClearSpec((8, 8), 0, 5, 1))
    assert not m5(0, 0, torch.tensor(0), torch.tensor(3 * 8 + 4)) and m5(
        0, 0, torch.tensor(0), torch.tensor(3 * 8 + 3)
    )
    pooled = ClearSpec((4, 4), 3, 1, 2)
    mp = clear_mask_mod(pooled)
    k = torch.arange(pooled.num_keys)
    text_row, image_row = mp(0, 0, torch.tensor(1), k), mp(0, 0, torch.tensor(3), k)
    assert text_row[: 3 + 16].all() and not text_row[3 + 16 :].any()  # text: all text + image, no pooled
    assert image_row[:3].all() and image_row[3 + 16 :].all() and image_row[3 : 3 + 16].sum() == 1  # r=1: itself


@pytest.mark.parametrize("radius,count", [(8, 193), (16, 793), (32, 3205)])
def test_interior_window_sizes_match_the_reference_counts(radius, count):
    """Keys seen by an interior query: the counts verified in the reference note (~ pi r^2)."""
    spec = ClearSpec((80, 80), 0, radius, 1)
    keys = torch.arange(spec.num_keys)
    assert int(clear_mask_mod(spec)(0, 0, torch.tensor(40 * 80 + 40), keys).sum()) == count


@pytest.mark.parametrize("grid,text_len,radius,d", [((5, 7), 6, 2, 1), ((8, 6), 4, 3, 2), ((9, 11), 0, 4, 1)])
def test_pair_count_equals_brute_force(grid, text_len, radius, d):
    assert clear_pair_count(ClearSpec(grid, text_len, radius, d)) == int(oracle_mask(grid, text_len, radius, d).sum())


# ------------------------------------------------------------------------------------------------- tile tables
@pytest.mark.parametrize(
    "grid,text_len,radius,d,q_tile,kv_tile",
    [
        ((9, 11), 5, 3, 1, (2, 4), (2, 4)),
        ((9, 11), 5, 3, 1, (4, 4), (2, 2)),
        ((8, 12), 7, 2, 2, (2, 4), (4, 2)),
        ((8, 8), 3, 2, 4, 16, 16),  # 1-D row-major tiles (two whole rows each)
        ((7, 5), 0, 9, 1, (4, 2), (2, 2)),  # radius beyond the diagonal: every tile full
    ],
)
def test_pattern_tiles_equal_brute_force(grid, text_len, radius, d, q_tile, kv_tile):
    spec = ClearSpec(grid, text_len, radius, d)
    pattern = clear_pattern(spec, q_tile=q_tile, kv_tile=kv_tile)
    oracle = oracle_mask(grid, text_len, radius, d)
    vis_ref, full_ref = dense_tile_masks(pattern.q_order, pattern.kv_order, lambda b, h, q, k: oracle[q, k])
    visited, full = pattern.table.dense()
    assert torch.equal(visited, vis_ref) and torch.equal(full, full_ref)


def test_circle_tile_masks_reject_tiles_that_are_not_boxes():
    from attnpack.kernels.block_sparse import grid_order

    order = grid_order((5, 6), 4)  # 4-token runs wrap around rows of 6
    with pytest.raises(ValueError, match="boxes"):
        circle_tile_masks(order, order, (5, 6), 2)


def test_default_tiles_shrink_on_small_grids():
    assert default_clear_tiles((64, 64)) == ((8, 16), (8, 8))
    assert default_clear_tiles((4, 4)) == ((4, 4), (4, 4))
    q, kv = default_clear_tiles((3, 40))
    assert math.prod(q) >= 16 and math.prod(kv) >= 16


# reference note section 2: FlexAttention's 128 x 128 row-major block density (analytic, checked there against
# create_block_mask at 1K and 2K)
PUBLISHED_ROW_MAJOR = {
    (1024, 8, 1): 41.7,
    (1024, 16, 1): 57.4,
    (1024, 32, 1): 81.5,
    (1024, 8, 4): 44.2,
    (1024, 16, 4): 59.1,
    (2048, 8, 1): 16.7,
    (2048, 16, 1): 27.4,
    (2048, 32, 1): 46.6,
    (2048, 8, 4): 21.3,
    (2048, 16, 4): 31.3,
}


@pytest.mark.parametrize("res,radius,d", list(PUBLISHED_ROW_MAJOR))
def test_row_major_density_reproduces_the_published_table(res, radius, d):
    spec = ClearSpec((res // 16, res // 16), 512, radius, d)
    row = clear_tile_stats(spec, q_tile=128, kv_tile=128)
    assert round(100 * row["density"], 1) == PUBLISHED_ROW_MAJOR[(res, radius, d)]
    # 2-D tiles of the same 128 tokens visit fewer tiles, and fewer of the visited ones need the in-tile mask
    box = clear_tile_stats(spec, q_tile=(8, 16), kv_tile=(8, 16))
    assert box["density"] <= row["density"] and box["masked"] < row["masked"]
    assert box["pairs"] == row["pairs"] <= box["density"]


# ------------------------------------------------------------------------------------------------- attention
CASES = [
    dict(grid=(5, 7), text_len=6, radius=2, d=1, q_tile=(2, 4), kv_tile=(2, 2)),
    dict(grid=(6, 6), text_len=4, radius=3, d=1, q_tile=None, kv_tile=None),
    dict(grid=(4, 8), text_len=5, radius=2, d=2, q_tile=(2, 4), kv_tile=(4, 2)),
    dict(grid=(6, 9), text_len=3, radius=3, d=3, q_tile=(4, 4), kv_tile=(4, 4)),
]
# the Triton kernel needs power-of-two tiles of >= 16 tokens
TRITON_CASES = [
    dict(grid=(6, 9), text_len=5, radius=2, d=1, q_tile=(4, 4), kv_tile=(4, 4)),
    dict(grid=(8, 8), text_len=3, radius=3, d=2, q_tile=(4, 8), kv_tile=(4, 4)),
]


def _case_id(c):
    return f"g{c['grid'][0]}x{c['grid'][1]}-T{c['text_len']}-r{c['radius']}-d{c['d']}"


@pytest.mark.parametrize(
    "case,backend",
    [(c, b) for c in CASES for b in ("reference", "flex")] + [(c, "triton") for c in TRITON_CASES],
    ids=lambda x: _case_id(x) if isinstance(x, dict) else x,
)
def test_clear_attention_against_dense_oracle(case, backend):
    grid, t, r, d = case["grid"], case["text_len"], case["radius"], case["d"]
    n = t + grid[0] * grid[1]
    q, k, v = (_rand(2, 3, n, 8, seed=s) for s in (1, 2, 3))
    weight = torch.rand(d, d, generator=torch.Generator().manual_seed(4)) if d > 1 else None
    # the Triton kernel runs on the GPU when there is one, else in the interpreter
    dev = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    out = clear_attention(
        q.to(dev), k.to(dev), v.to(dev), grid=grid, text_len=t, radius=r, down_factor=d,
        spatial_weight=None if weight is None else weight.to(dev), backend=backend,
        q_tile=case["q_tile"], kv_tile=case["kv_tile"],
    ).cpu()  # fmt: skip
    kk, vv = k, v
    if d > 1:  # the same weights pool keys and values
        kk = torch.cat([k, oracle_pool(k[:, :, t:], grid, d, weight)], dim=2)
        vv = torch.cat([v, oracle_pool(v[:, :, t:], grid, d, weight)], dim=2)
    ref = masked_attention(q, kk, vv, oracle_mask(grid, t, r, d))
    torch.testing.assert_close(out, ref.float(), atol=2e-5, rtol=0)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_owned_queries_only(backend):
    """Ring attention's query subset (`query_positions`, text and image queries, with pooled keys): the rows of the
    dense oracle's attention, whatever the other query rows hold."""
    grid, t, r, d = (8, 8), 3, 3, 2
    n = t + 64
    q, k, v = (_rand(1, 2, n, 8, seed=s) for s in (1, 2, 3))
    weight = torch.rand(d, d, generator=torch.Generator().manual_seed(4))
    owned = torch.cat([torch.arange(1, 3), torch.arange(t + 13, t + 45)])
    q_owned = torch.zeros_like(q).index_copy_(2, owned, q[:, :, owned])
    dev = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    out = clear_attention(
        q_owned.to(dev), k.to(dev), v.to(dev), grid=grid, text_len=t, radius=r, down_factor=d,
        spatial_weight=weight.to(dev), backend=backend, q_tile=(4, 8), kv_tile=(4, 4), query_positions=owned,
    ).cpu()  # fmt: skip
    kk = torch.cat([k, oracle_pool(k[:, :, t:], grid, d, weight)], dim=2)
    vv = torch.cat([v, oracle_pool(v[:, :, t:], grid, d, weight)], dim=2)
    ref = masked_attention(q, kk, vv, oracle_mask(grid, t, r, d))[:, :, owned]
    torch.testing.assert_close(out, ref.float(), atol=2e-5, rtol=0)


# what the kernel is run with: the default (tokens permuted into tile-major order, tensor descriptors, the tile-local
# mask), gathers fused into the loads, pointer loads, and the index mask on original indices (the rule written twice)
KERNEL_VARIANTS = [
    ("default", {}, False),
    ("fused-gather", {"permute": False}, False),
    ("no-tma", {"permute": True, "tma": False}, False),
    ("index-mask", {}, True),
]


@pytest.mark.parametrize("variant", KERNEL_VARIANTS, ids=lambda v: v[0])
@pytest.mark.parametrize(
    "case,dtype",
    [(c, torch.float32) for c in TRITON_CASES]
    + [(dict(grid=(6, 12), text_len=20, radius=3, d=2, q_tile=(4, 4), kv_tile=(2, 8)), torch.bfloat16)],
    ids=lambda x: _case_id(x) if isinstance(x, dict) else str(x).split(".")[-1],
)
def test_triton_kernel_variants_against_dense_oracle(case, dtype, variant):
    import dataclasses

    from attnpack.kernels.block_sparse import block_sparse_attention

    grid, t, r, d = case["grid"], case["text_len"], case["radius"], case["d"]
    spec = ClearSpec(grid, t, r, d)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    pattern = clear_pattern(spec, q_tile=case["q_tile"], kv_tile=case["kv_tile"])
    assert pattern.mask.triton_tile_fn is not None
    if variant[2]:
        mask = dataclasses.replace(pattern.mask, triton_tile_fn=None, triton_rows_fn=None)
        pattern = dataclasses.replace(pattern, mask=mask, _cache={})
    q = _rand(2, 3, spec.num_queries, 16, seed=1)
    k, v = (_rand(2, 3, spec.num_keys, 16, seed=s) for s in (2, 3))
    out = block_sparse_attention(
        *(x.to(dtype).to(dev) for x in (q, k, v)), pattern, backend="triton", backend_options=variant[1]
    )
    ref = masked_attention(*(x.to(dtype).double() for x in (q, k, v)), oracle_mask(grid, t, r, d))
    atol = 2e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out.cpu().double(), ref, atol=atol, rtol=0)


def test_pooling_matches_loops_and_defaults_to_average():
    grid, d = (4, 6), 2
    x = _rand(1, 2, 24, 3)
    w = torch.rand(d, d)
    torch.testing.assert_close(pool_image_tokens(x, grid, d, w), oracle_pool(x, grid, d, w), atol=1e-6, rtol=0)
    avg = pool_image_tokens(x, grid, d, torch.full((1, 1, 1, d, 1, d, 1), 1 / d**2))
    torch.testing.assert_close(avg, torch.nn.functional.avg_pool2d(x.view(2, 4, 6, 3).permute(0, 3, 1, 2), d)
                               .permute(0, 2, 3, 1).reshape(1, 2, 6, 3), atol=1e-6, rtol=0)  # fmt: skip


def test_full_radius_equals_dense_attention():
    grid, t = (5, 6), 4
    q, k, v = (_rand(1, 2, t + 30, 8, seed=s) for s in (1, 2, 3))
    spec = ClearSpec(grid, t, 7, 1)
    assert spec.is_dense() and not ClearSpec(grid, t, 6, 1).is_dense()  # 6^2 = 36 < 4^2 + 5^2 = 41
    out = clear_attention(q, k, v, grid=grid, text_len=t, radius=7, backend="reference")
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v), atol=1e-6, rtol=0)


def test_backward_matches_dense_including_pooling_weight():
    grid, t, r, d = (4, 4), 3, 2, 2
    n = t + 16
    q, k, v = (_rand(1, 2, n, 4, seed=s).requires_grad_() for s in (1, 2, 3))
    w = torch.rand(d, d, generator=torch.Generator().manual_seed(5)).requires_grad_()
    out = clear_attention(
        q, k, v, grid=grid, text_len=t, radius=r, down_factor=d, spatial_weight=w, backend="reference"
    )
    g = _rand(*out.shape, seed=6)
    grads = torch.autograd.grad((out * g).sum(), (q, k, v, w))
    kk = torch.cat([k, oracle_pool(k[:, :, t:], grid, d, w)], dim=2)
    vv = torch.cat([v, oracle_pool(v[:, :, t:], grid, d, w)], dim=2)
    ref = masked_attention(q, kk, vv, oracle_mask(grid, t, r, d)).float()
    ref_grads = torch.autograd.grad((ref * g).sum(), (q, k, v, w))
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype):
    grid, t = (6, 6), 4
    q, k, v = (_rand(1, 2, t + 36, 16, seed=s) for s in (1, 2, 3))
    out = clear_attention(*(x.to(dtype) for x in (q, k, v)), grid=grid, text_len=t, radius=3, backend="reference")
    assert out.dtype == dtype
    ref = masked_attention(q, k, v, oracle_mask(grid, t, 3)).float()
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=0)


def test_proportional_scale_is_the_official_formula():
    # at the training length (64^2 + 512 tokens) the plain variant is the usual 1/sqrt(D)
    assert proportional_scale(4608, 128) == pytest.approx(128**-0.5, abs=1e-12)
    # 4x the tokens: sqrt(log_4608(N) / D); the pooled variant takes log of 10 N (official constant)
    n = 4 * 4608
    assert proportional_scale(n, 64) == pytest.approx(math.sqrt(math.log(n) / math.log(4608) / 64), abs=1e-12)
    assert proportional_scale(n, 64, 4) == pytest.approx(math.sqrt(math.log(10 * n) / math.log(4608) / 64), abs=1e-12)
    grid, t = (4, 4), 2
    q, k, v = (_rand(1, 1, t + 16, 8, seed=s) for s in (1, 2, 3))
    out = clear_attention(q, k, v, grid=grid, text_len=t, radius=2, proportional_attention=True, backend="reference")
    ref = masked_attention(q, k, v, oracle_mask(grid, t, 2), scale=proportional_scale(t + 16, 8)).float()
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)


def test_pattern_cache_switching_resolutions():
    cache = ClearPatternCache(maxsize=2)
    a, b, c = (ClearSpec(g, 4, 2, 1) for g in [(4, 6), (6, 4), (5, 5)])
    pa = cache.get(a)
    assert cache.get(b).num_queries == 28 and cache.get(a) is pa and cache.builds == 2
    cache.get(c)  # evicts b (least recently used)
    assert len(cache) == 2 and cache.get(a) is pa and cache.builds == 3
    cache.get(b)
    assert cache.builds == 4
    # every resolution gets its own exact pattern, whatever the order of calls
    for spec in (a, b, c, a):
        q, k, v = (_rand(1, 1, spec.num_queries, 4, seed=s) for s in (1, 2, 3))
        out = clear_attention(q, k, v, grid=spec.grid, text_len=4, radius=2, cache=cache, backend="reference")
        ref = masked_attention(q, k, v, oracle_mask(spec.grid, 4, 2)).float()
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(grid=(6, 6), text_len=2, radius=0), "radius"),
        (dict(grid=(6, 5), text_len=2, radius=2, down_factor=2), "down_factor`=2 must divide"),
        (dict(grid=(6, 6), text_len=-1, radius=2), "text_len"),
        (dict(grid=(6,), text_len=2, radius=2), "grid"),
    ],
)
def test_spec_errors_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ClearSpec(kwargs["grid"], kwargs["text_len"], kwargs["radius"], kwargs.get("down_factor", 1))


def test_attention_shape_and_weight_errors():
    q = _rand(1, 1, 10, 4)
    with pytest.raises(ValueError, match="T \\+ h\\*w"):
        clear_attention(q, q, q, grid=(3, 3), text_len=2, radius=2)
    q = _rand(1, 1, 18, 4)
    with pytest.raises(ValueError, match="spatial_weight"):
        clear_attention(q, q, q, grid=(4, 4), text_len=2, radius=2, down_factor=2)


try:
    import triton
    import triton.language as tl

    from attnpack.kernels.clear.triton import clear_mask_triton

    @triton.jit
    def _evaluate_triton_mask(params_ptr, out_ptr, NQ: tl.constexpr, NK: tl.constexpr):
        qi = tl.arange(0, NQ)[:, None]
        ki = tl.arange(0, NK)[None, :]
        m = clear_mask_triton(0, 0, qi, ki, params_ptr)
        tl.store(out_ptr + qi * NK + ki, m.to(tl.int8))

except ImportError:  # pragma: no cover - triton is in the test extra
    _evaluate_triton_mask = None


@pytest.mark.skipif(_evaluate_triton_mask is None, reason="needs triton (pip install attnpack[triton])")
def test_triton_mask_function_equals_mask_mod():
    """The in-tile mask of the Triton backend, run in a small kernel (the interpreter on CPU)."""
    from attnpack.kernels.clear import clear_mask_params

    device = "cuda" if torch.cuda.is_available() else "cpu"
    for spec in (ClearSpec((5, 7), 6, 3, 1), ClearSpec((4, 6), 3, 2, 2)):
        out = torch.zeros(64, 64, dtype=torch.int8, device=device)
        _evaluate_triton_mask[(1,)](clear_mask_params(spec).to(device), out, NQ=64, NK=64)
        expect = oracle_mask(spec.grid, spec.text_len, spec.radius, spec.down_factor)
        assert torch.equal(out[: spec.num_queries, : spec.num_keys].bool().cpu(), expect)


def test_benchmark_script_runs_small_cases_on_cpu(tmp_path):
    """benchmarks/clear.py (the one-command GPU benchmark) on CPU-sized cases, so it cannot rot between GPU runs."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "clear.py"
    spec = importlib.util.spec_from_file_location("clear_benchmark", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    cpu = torch.device("cpu")
    case = bench.clear_case(128, 2, 2, devices=("cpu",), heads=2, head_dim=16, text=8)
    result = bench.attention.run_case(case, cpu, torch.float32, "flex", 1)
    assert result["keys"] == 8 + 64 + 16 and result["time_ms"] > 0 and result["fraction_of_tile_bound"] is not None
    tiny = dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
                num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
                axes_dims_rope=(4, 4, 8))  # fmt: skip
    rows = bench.run_e2e(cpu, torch.float32, 2, "reference", 1, config=tiny, resolutions=(128,), text=8)
    assert rows[0]["resolution"] == 128 and rows[0]["speedup"] > 0
