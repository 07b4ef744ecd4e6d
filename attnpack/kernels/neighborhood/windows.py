"""Generalized neighborhood attention (GNA) patterns: per-axis windows, in-tile masks and exact tile tables.

GNA (Hassani et al., "Generalized Neighborhood Attention", https://arxiv.org/abs/2504.16922) restricts every query of
a token grid to a per-axis window; the N-D neighborhood is the Cartesian product of the per-axis windows. Per axis
(length ``n``, window ``k``, stride ``s``, dilation ``d``, causal flag), exactly as NATTEN 0.21:

- the axis splits into ``d`` interleaved sub-sequences (dilation groups ``i mod d``);
- queries form stride groups of ``s`` consecutive positions (within their dilation group) sharing the window of a
  leader: the centre ``s // 2`` (causal: the last query), clamped to the group's end;
- non-causal windows hold ``k // 2`` keys left and ``k // 2 + k % 2 - 1`` right of the leader and are *shifted*
  inward at the borders (every query sees exactly ``k`` keys per axis); causal windows start at ``leader - k + 1``
  (clipped at 0) and end at the query itself.

This module computes those windows vectorised (:func:`axis_windows`), the ``mask_mod`` on flattened token indices
(:func:`neighborhood_mask_mod`), and the exact tile table of a tiled grid (:func:`neighborhood_tile_masks`,
:func:`neighborhood_pattern`), from which the block-sparse kernels run GNA.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch

from ..block_sparse.pattern import (
    BlockSparsePattern,
    TileMask,
    concat_orders,
    flat_order,
    grid_order,
    grid_tile_index,
    segment_tile_masks,
    tile_table_from_dense,
)


__all__ = [
    "NeighborhoodSpec",
    "axis_windows",
    "neighborhood_mask_mod",
    "neighborhood_tile_masks",
    "neighborhood_pattern",
    "default_tile_shape",
    "neighborhood_key_indices",
]

# NATTEN's Hopper tiles (128 tokens): 1-D 128, 2-D (16, 8), 3-D (2, 8, 8)
_DEFAULT_TILES = {1: (128,), 2: (16, 8), 3: (2, 8, 8)}
_CPU_TILES = {1: (64,), 2: (8, 8), 3: (2, 4, 8)}


@dataclasses.dataclass(frozen=True)
class NeighborhoodSpec:
    """A normalised GNA configuration (one entry per grid axis; windows already resolved, no ``-1``)."""

    grid: tuple[int, ...]
    window: tuple[int, ...]
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    causal: tuple[bool, ...]

    @property
    def ndim(self) -> int:
        return len(self.grid)

    @property
    def num_tokens(self) -> int:
        return math.prod(self.grid)

    def is_full(self) -> bool:
        """Every query sees every token (non-causal full windows on all axes): plain self-attention."""
        return all(k == n and not c for n, k, c in zip(self.grid, self.window, self.causal))

    def is_plain_causal(self) -> bool:
        """1-D full causal window: plain causal attention (NATTEN's FMHA fast path)."""
        return self.ndim == 1 and self.window[0] == self.grid[0] and self.causal[0]


def _windows(x: torch.Tensor, n: int, k: int, s: int, d: int, causal: bool):
    """``(group, start, end)`` of axis positions ``x`` (any shape, elementwise): position ``x`` attends
    ``group + d * j`` for ``j`` in ``[start, end)``."""
    g, ii = x % d, x // d
    ng = (n - g + d - 1) // d  # length of the dilation group
    if causal:
        leader = torch.minimum((ii // s) * s + (s - 1), ng - 1)  # last query of the stride group
        return g, (leader - (k - 1)).clamp(min=0), ii + 1
    wl, wr = k // 2, k // 2 + k % 2 - 1
    leader = torch.minimum((ii // s) * s + s // 2, ng - 1)  # centre of the stride group
    centre = torch.minimum(leader.clamp(min=wl), ng - 1 - wr)  # shifted inward at the borders
    return g, centre - wl, centre + wr + 1


def axis_windows(
    n: int, k: int, s: int, d: int, causal: bool, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Windows of every position of one axis: ``(group, start, end)``, ``int64 [n]`` each.

    Position ``i`` attends positions ``group[i] + d * j`` for ``j`` in ``[start[i], end[i])`` (group-local indices).
    """
    return _windows(torch.arange(n, device=device), n, k, s, d, causal)


def neighborhood_mask_mod(spec: NeighborhoodSpec):
    """``mask_mod(b, h, q_idx, kv_idx)`` of GNA on flattened indices (FlexAttention style, elementwise ops only).

    Queries are grid tokens ``[0, N)``; keys ``>= N`` are additional keys, visible to every query.
    """
    grid, window, stride, dilation, causal = spec.grid, spec.window, spec.stride, spec.dilation, spec.causal
    strides = [math.prod(grid[a + 1 :]) for a in range(len(grid))]
    n_tokens = spec.num_tokens

    def mask_mod(b, h, q_idx, kv_idx):
        inside = None
        for a, (n, k, s, d, c) in enumerate(zip(grid, window, stride, dilation, causal)):
            g, start, end = _windows((q_idx // strides[a]) % n, n, k, s, d, c)
            ka = (kv_idx // strides[a]) % n
            jj = ka // d
            axis_ok = (ka % d == g) & (jj >= start) & (jj < end)
            inside = axis_ok if inside is None else inside & axis_ok
        return (kv_idx >= n_tokens) | inside

    return mask_mod


def _axis_tile_masks(n, k, s, d, causal, tq, tk) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-axis tile masks ``[d, Rq, d, Rk]``: (dilation group, tile) of queries x (group, tile) of keys."""
    rq, rk = -(-n // (tq * d)), -(-n // (tk * d))
    g, start, end = axis_windows(n, k, s, d, causal)
    # group-local windows of each (group, query tile), over its real queries
    slot = g * rq + (torch.arange(n) // d) // tq
    big = n + 1

    def reduce(values, how, init):
        out = torch.full((d * rq,), init, dtype=torch.int64)
        return out.scatter_reduce_(0, slot, values, how, include_self=True).view(d, rq)

    smin, smax = reduce(start, "amin", big), reduce(start, "amax", -1)
    emin, emax = reduce(end, "amin", big), reduce(end, "amax", -1)
    has_q = smax >= 0  # [d, Rq]
    # key tiles: group-local positions [r*tk, r*tk + tk), real ones below the group's length
    ng = (n - torch.arange(d) + d - 1) // d  # [d]
    k_lo = torch.arange(rk) * tk  # [Rk]
    k_hi = torch.minimum(k_lo[None, :] + tk, ng[:, None])  # [d, Rk] exclusive end of real keys
    k_real = k_hi > k_lo[None, :]
    k_nopad = (k_lo[None, :] + tk) <= ng[:, None]
    same_group = torch.eye(d, dtype=torch.bool)[:, None, :, None]  # [d, 1, d, 1]
    # windows of consecutive queries overlap or touch, so a tile's queries jointly see [smin, emax)
    visited = (
        (k_lo[None, None, None, :] < emax[:, :, None, None])
        & (k_hi[None, None, :, :] > smin[:, :, None, None])
        & k_real[None, None]
        & has_q[:, :, None, None]
        & same_group
    )
    full = (
        (smax[:, :, None, None] <= k_lo[None, None, None, :])
        & ((k_lo[None, None, None, :] + tk) <= emin[:, :, None, None])
        & k_nopad[None, None]
        & visited
    )
    return visited, full


def neighborhood_tile_masks(
    spec: NeighborhoodSpec, q_tile: Sequence[int], kv_tile: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact ``(visited, full)`` tile masks ``[Tq, Tk]`` of GNA on ``grid_order(grid, tile, dilation=dilation)``.

    Per axis, a query tile's real queries jointly see one contiguous range of their dilation group (the windows of
    consecutive queries overlap or touch), and a key tile is full iff it holds no padding and lies inside every one
    of those windows. The N-D masks are the products of the per-axis ones (the neighborhood is a Cartesian product
    and the tiles are boxes).
    """
    k = spec.ndim
    vis_axes, full_axes = [], []
    for a in range(k):
        v, f = _axis_tile_masks(
            spec.grid[a], spec.window[a], spec.stride[a], spec.dilation[a], spec.causal[a], q_tile[a], kv_tile[a]
        )
        vis_axes.append(v)
        full_axes.append(f)
    # dims: gq_0..gq_{k-1}, rq_0.., gk_0.., rk_0..  (tile ids are row-major over (groups, tiles))
    visited = torch.ones((), dtype=torch.bool)
    full = torch.ones((), dtype=torch.bool)
    for a in range(k):
        shape = [1] * (4 * k)
        shape[a], shape[k + a], shape[2 * k + a], shape[3 * k + a] = vis_axes[a].shape
        visited = visited & vis_axes[a].view(shape)
        full = full & full_axes[a].view(shape)
    tq = math.prod(visited.shape[: 2 * k])
    _, q_ids = grid_tile_index(spec.grid, q_tile, dilation=spec.dilation)
    assert torch.equal(q_ids.reshape(-1), torch.arange(tq)), "tile ids must be row-major over (groups, tiles)"
    return visited.reshape(tq, -1), full.reshape(tq, -1)


def default_tile_shape(grid: Sequence[int], device_type: str = "cuda") -> tuple[int, ...]:
    """Default N-D tile shape for ``grid``.

    CUDA: NATTEN's 128-token Hopper tiles (1-D 128, 2-D (16, 8), 3-D (2, 8, 8)); elsewhere 64-token tiles (1-D 64,
    2-D (8, 8), 3-D (2, 4, 8)), which waste less work in the pure-PyTorch path. Axes shorter than the tile shrink
    to the next power of two; tiles keep at least 16 tokens (the smallest ``tl.dot``).
    """
    grid = tuple(grid)
    tiles = _DEFAULT_TILES if device_type == "cuda" else _CPU_TILES
    base = tiles.get(len(grid), (1,) * (len(grid) - 1) + (tiles[1][0],))
    tile = [min(t, 1 << max(0, (n - 1).bit_length())) for t, n in zip(base, grid)]
    while math.prod(tile) < 16:
        tile[-1] *= 2
    return tuple(tile)


def _triton_mask() -> tuple:
    """``(triton_fn, triton_rows_fn, triton_tile_fn)`` of the GNA mask (``None``s without Triton)."""
    try:
        from .triton import neighborhood_keys_triton, neighborhood_rows_triton, neighborhood_tile_triton
    except ImportError:  # triton not installed
        return None, None, None
    return neighborhood_keys_triton, neighborhood_rows_triton, neighborhood_tile_triton


def neighborhood_params(
    spec: NeighborhoodSpec, kv_tile: Sequence[int] | None = None, num_extra: int = 0
) -> torch.Tensor:
    """``int32`` parameters of the Triton in-tile masks: ``[N, ndim, n*3, k*3, s*3, d*3, causal*3, R*3,
    num_extra]`` (axes padded to 3 with a trivial axis of length 1; ``R``: key tiles per axis and dilation group of
    ``grid_order(grid, kv_tile, dilation=dilation)``, ones without ``kv_tile``)."""
    pad = 3 - spec.ndim
    vals = [spec.num_tokens, spec.ndim]
    for field in (spec.grid, spec.window, spec.stride, spec.dilation):
        vals += [1] * pad + list(field)
    vals += [0] * pad + [int(c) for c in spec.causal]
    tiles = (
        (1,) * spec.ndim
        if kv_tile is None
        else tuple(-(-n // (t * d)) for n, t, d in zip(spec.grid, kv_tile, spec.dilation))
    )
    vals += [1] * pad + list(tiles) + [num_extra]
    return torch.tensor(vals, dtype=torch.int32)


def neighborhood_pattern(
    spec: NeighborhoodSpec,
    *,
    q_tile: Sequence[int] | None = None,
    kv_tile: Sequence[int] | None = None,
    num_extra: int = 0,
    device: torch.device | str | None = None,
) -> BlockSparsePattern:
    """The block-sparse pattern of GNA on ``spec`` plus ``num_extra`` additional keys seen by every query.

    Queries: the grid in ``q_tile`` boxes (dilation groups kept apart, as NATTEN's token permutation does); keys: the
    grid in ``kv_tile`` boxes, then the additional keys in 1-D tiles of ``prod(kv_tile)``.
    """
    if q_tile is None:
        q_tile = default_tile_shape(spec.grid, torch.device(device).type if device is not None else "cuda")
    q_tile = tuple(q_tile)
    kv_tile = tuple(kv_tile) if kv_tile is not None else q_tile
    q_order = grid_order(spec.grid, q_tile, dilation=spec.dilation)
    kv_grid = grid_order(spec.grid, kv_tile, dilation=spec.dilation)
    visited, full = neighborhood_tile_masks(spec, q_tile, kv_tile)
    if num_extra:
        kv_order = concat_orders(kv_grid, flat_order(num_extra, kv_grid.tile_size))
        visited, full = segment_tile_masks(q_order, kv_order, {(0, 0): (visited, full), (0, 1): "all"})
    else:
        kv_order = kv_grid
    keys_fn, rows_fn, tile_fn = _triton_mask()
    mask = TileMask(
        neighborhood_mask_mod(spec),
        triton_fn=keys_fn,
        params=neighborhood_params(spec, kv_tile, num_extra),
        name=f"gna(window={spec.window}, stride={spec.stride}, dilation={spec.dilation}, causal={spec.causal})",
        triton_rows_fn=rows_fn,
        triton_tile_fn=tile_fn,
        tile_args=(1,) * (3 - spec.ndim) + kv_tile,
    )
    pattern = BlockSparsePattern(tile_table_from_dense(visited, full), q_order, kv_order, mask, name="gna")
    return pattern.to(device) if device is not None else pattern


def neighborhood_key_indices(spec: NeighborhoodSpec, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys of the given flattened queries: ``(keys int64 [Q, prod(window)], valid bool [Q, prod(window)])``.

    Causal windows near the start hold fewer than ``k`` keys per axis; the missing slots are ``valid == False``.
    """
    device = queries.device
    coords = torch.unravel_index(queries, spec.grid)
    keys = torch.zeros((queries.numel(),) + (1,) * spec.ndim, dtype=torch.int64, device=device)
    valid = torch.ones_like(keys, dtype=torch.bool)
    for a in range(spec.ndim):
        n, k, s, d, c = spec.grid[a], spec.window[a], spec.stride[a], spec.dilation[a], spec.causal[a]
        g, start, end = axis_windows(n, k, s, d, c, device=device)
        x = coords[a]
        j = start[x][:, None] + torch.arange(k, device=device)[None, :]  # [Q, k]
        key_a = g[x][:, None] + d * j
        ok_a = j < end[x][:, None]
        shape = [queries.numel()] + [1] * spec.ndim
        shape[1 + a] = k
        keys = keys + key_a.clamp(max=n - 1).view(shape) * math.prod(spec.grid[a + 1 :])
        valid = valid & ok_a.view(shape)
    return keys.reshape(queries.numel(), -1), valid.reshape(queries.numel(), -1)
