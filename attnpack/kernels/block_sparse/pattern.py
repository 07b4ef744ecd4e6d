"""Block-sparse attention patterns: token orders (N-D tiling), tile tables and in-tile masks.

A :class:`BlockSparsePattern` says which (query, key) pairs attend:

- a **query order** and a **key order** (:class:`TokenOrder`) map the caller's token sequence to a *tile-major*
  sequence in which every run of ``tile_size`` consecutive positions is one tile (a 1-D span, or an N-D box of a
  token grid after :func:`grid_order`), with ``-1`` marking padding;
- a **tile table** (:class:`TileTable`) lists, for every (batch, head, query tile), the key tiles it visits: first
  the *full* tiles (every pair visible: kernels skip mask evaluation there), then the *partial* ones;
- an optional **in-tile mask** (:class:`TileMask`) decides visibility inside partial tiles from *original* token
  indices (the caller's order), like a FlexAttention ``mask_mod``.

Everything outside the listed tiles is masked. Padding keys are always masked; padding queries produce no output.
The kernels in :mod:`attnpack.kernels.block_sparse` run any pattern; builders for specific patterns (generalized
neighborhood attention, CLEAR circles, PARO tables) construct one.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .._checks import per_axis


__all__ = [
    "TokenOrder",
    "TileTable",
    "TileMask",
    "BlockSparsePattern",
    "flat_order",
    "grid_order",
    "grid_tile_index",
    "tile_coordinate_bounds",
    "concat_orders",
    "stack_orders",
    "tile_table_from_dense",
    "tile_table_from_mask",
    "dense_tile_masks",
    "segment_tile_masks",
]

MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


# ------------------------------------------------------------------------------------------------- token orders
@dataclasses.dataclass(frozen=True, eq=False)
class TokenOrder:
    """A tile-major order of a token sequence of length ``num_tokens``.

    Attributes:
        index: ``int32`` tensor ``[Hi, P]`` with ``Hi`` 1 (all heads) or ``H`` (one order per head) and
            ``P = num_tiles * tile_size``. ``index[h, p]`` is the original token placed at tile-major position ``p``
            (``-1``: padding). Every original token appears exactly once per row.
        tile_size: tokens per tile.
        num_tokens: length ``N`` of the original sequence.
        segments: ``(token_start, num_tokens, tile_start, num_tiles)`` of every part joined by :func:`concat_orders`
            (one entry for a single order).
    """

    index: torch.Tensor
    tile_size: int
    num_tokens: int
    segments: tuple[tuple[int, int, int, int], ...] = ()

    def __post_init__(self):
        if self.index.dim() != 2 or self.index.shape[-1] % self.tile_size:
            raise ValueError(
                f"TokenOrder.index must be [Hi, P] with P a multiple of tile_size={self.tile_size}, "
                f"got shape {tuple(self.index.shape)}."
            )
        if self.index.dtype != torch.int32:
            object.__setattr__(self, "index", self.index.to(torch.int32))
        if not self.segments:
            object.__setattr__(self, "segments", ((0, self.num_tokens, 0, self.num_tiles),))

    @property
    def num_positions(self) -> int:
        return self.index.shape[-1]

    @property
    def num_tiles(self) -> int:
        return self.index.shape[-1] // self.tile_size

    @property
    def num_heads(self) -> int:
        return self.index.shape[0]

    @property
    def device(self) -> torch.device:
        return self.index.device

    def to(self, device: torch.device | str) -> TokenOrder:
        if self.index.device == torch.device(device):
            return self
        return dataclasses.replace(self, index=self.index.to(device))

    def is_identity(self) -> bool:
        """Whether position ``p`` holds token ``p`` for ``p < N`` (then only tail padding follows)."""
        if self.num_heads != 1:
            return False
        expect = torch.arange(self.num_positions, device=self.device, dtype=torch.int32)
        expect = torch.where(expect < self.num_tokens, expect, -1)
        return bool(torch.equal(self.index[0], expect))

    def inverse(self) -> torch.Tensor:
        """``int64 [Hi, N]``: the tile-major position of every original token."""
        hi, p = self.index.shape
        inv = torch.full((hi, self.num_tokens + 1), -1, dtype=torch.int64, device=self.device)
        src = torch.arange(p, device=self.device).expand(hi, p)
        idx = torch.where(self.index >= 0, self.index.long(), self.num_tokens)
        inv.scatter_(1, idx, src)
        return inv[:, : self.num_tokens]

    def permute(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, H, N, D]`` (original order) -> ``[B, H, P, D]`` (tile-major, zeros at padding)."""
        b, h, n, d = x.shape
        if n != self.num_tokens:
            raise ValueError(f"expected {self.num_tokens} tokens, got a tensor of shape {tuple(x.shape)}.")
        padded = torch.cat([x, x.new_zeros(b, h, 1, d)], dim=2)  # token N = a zero row for padding
        idx = torch.where(self.index >= 0, self.index, self.num_tokens).long()  # [Hi, P]
        if self.num_heads == 1:
            return padded.index_select(2, idx[0])
        return torch.gather(padded, 2, idx[None, :, :, None].expand(b, h, -1, d))

    def unpermute(self, y: torch.Tensor) -> torch.Tensor:
        """Exact inverse of :meth:`permute`: ``[B, H, P, ...]`` (tile-major) -> ``[B, H, N, ...]`` (original)."""
        inv = self.inverse()
        if self.num_heads == 1:
            return y.index_select(2, inv[0])
        shape = inv.shape + (1,) * (y.dim() - 3)
        return torch.gather(y, 2, inv[None].view(1, *shape).expand(y.shape[0], -1, -1, *y.shape[3:]))


def flat_order(num_tokens: int, tile_size: int, *, device: torch.device | str | None = None) -> TokenOrder:
    """The identity order of ``num_tokens`` tokens in 1-D tiles of ``tile_size`` (tail padded)."""
    if num_tokens < 1 or tile_size < 1:
        raise ValueError(f"`num_tokens` and `tile_size` must be >= 1, got {num_tokens=}, {tile_size=}.")
    p = -(-num_tokens // tile_size) * tile_size
    idx = torch.arange(p, dtype=torch.int32, device=device)
    return TokenOrder(torch.where(idx < num_tokens, idx, -1)[None], tile_size, num_tokens)


def _grid_layout(grid, tile, dilation) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Tiles per axis per dilation group ``R`` and padded lengths per axis (``R * tile * dilation``)."""
    tiles = tuple(-(-n // (t * d)) for n, t, d in zip(grid, tile, dilation))
    return tiles, tuple(r * t * d for r, t, d in zip(tiles, tile, dilation))


def grid_order(
    grid: Sequence[int],
    tile: int | Sequence[int],
    *,
    dilation: int | Sequence[int] = 1,
    axis_order: Sequence[int] | None = None,
    device: torch.device | str | None = None,
) -> TokenOrder:
    """Tile-major order of a row-major token grid.

    Args:
        grid: the grid shape ``(n_0, ..., n_{k-1})``; original token ``i`` has coordinates ``unravel(i, grid)``.
        tile: a tuple (one size per grid axis) for N-D box tiles of ``prod(tile)`` tokens, or an int for 1-D tiles of
            the flattened grid (after ``axis_order``), as in PARO.
        dilation: per-axis dilation ``d`` (N-D tiles only): axis ``a`` splits into ``d_a`` interleaved sub-grids
            (coordinate ``x = (r * t + o) * d + g``); each tile lies inside one sub-grid. Each axis is padded to a
            multiple of ``t * d`` (as NATTEN's token permutation does).
        axis_order: order in which axes are flattened (slowest first), e.g. ``(2, 0, 1)`` = W, F, H for a
            ``(F, H, W)`` grid: PARO's per-head reorderings. Default: ``range(k)``.

    Tile numbering (used by :func:`grid_tile_index`): tile id = ``g * prod(R) + r`` with ``g`` the dilation group and
    ``r`` the tile coordinate within it, both flattened row-major in ``axis_order``; positions inside a tile are
    row-major in ``axis_order`` too.
    """
    grid = tuple(int(n) for n in grid)
    k = len(grid)
    if k < 1 or any(n < 1 for n in grid):
        raise ValueError(f"`grid` must be a non-empty tuple of positive ints, got {grid!r}.")
    order = tuple(range(k)) if axis_order is None else tuple(axis_order)
    if sorted(order) != list(range(k)):
        raise ValueError(f"`axis_order` must be a permutation of {tuple(range(k))}, got {axis_order!r}.")
    strides = [math.prod(grid[a + 1 :]) for a in range(k)]
    n_tokens = math.prod(grid)
    if isinstance(tile, int) and not isinstance(tile, bool):
        if dilation not in (1, (1,) * k):
            raise ValueError("`dilation` needs N-D tiles: pass `tile` as a tuple with one size per grid axis.")
        coords = torch.meshgrid(*[torch.arange(grid[a]) for a in order], indexing="ij")
        flat = sum(c * strides[a] for c, a in zip(coords, order)).reshape(-1)
        p = -(-n_tokens // tile) * tile
        index = torch.full((p,), -1, dtype=torch.int32)
        index[:n_tokens] = flat.to(torch.int32)
        return TokenOrder(index[None].to(device), tile, n_tokens)
    tile = per_axis("tile", tile, k)
    dilation = per_axis("dilation", dilation, k)
    if any(t < 1 for t in tile) or any(d < 1 for d in dilation):
        raise ValueError(f"`tile` and `dilation` must be >= 1, got tile={tile}, dilation={dilation}.")
    tiles, _ = _grid_layout(grid, tile, dilation)
    # dims: g_a (dilation group), r_a (tile), o_a (offset in tile) for every axis a, each broadcast in its own slot
    flat = torch.zeros((), dtype=torch.int64)
    valid = torch.ones((), dtype=torch.bool)
    ndim = 3 * k
    for a in range(k):
        g = torch.arange(dilation[a])
        r = torch.arange(tiles[a])
        o = torch.arange(tile[a])
        shape_g, shape_r, shape_o = [1] * ndim, [1] * ndim, [1] * ndim
        shape_g[a], shape_r[k + a], shape_o[2 * k + a] = dilation[a], tiles[a], tile[a]
        x = (r.view(shape_r) * tile[a] + o.view(shape_o)) * dilation[a] + g.view(shape_g)
        flat = flat + x * strides[a]
        valid = valid & (x < grid[a])
    index = torch.where(valid, flat, -1)
    perm = [order[i] for i in range(k)] + [k + order[i] for i in range(k)] + [2 * k + order[i] for i in range(k)]
    index = index.permute(perm).reshape(-1).to(torch.int32)
    return TokenOrder(index[None].to(device), math.prod(tile), n_tokens)


def grid_tile_index(
    grid: Sequence[int],
    tile: Sequence[int],
    *,
    dilation: int | Sequence[int] = 1,
    axis_order: Sequence[int] | None = None,
) -> tuple[tuple[int, ...], torch.Tensor]:
    """Tile ids of an N-D :func:`grid_order`, by (dilation group, tile coordinate) per axis.

    Returns ``(tiles_per_axis, ids)`` where ``ids`` has shape ``[d_0, ..., d_{k-1}, R_0, ..., R_{k-1}]`` (original
    axis order) and ``ids[g..., r...]`` is the tile id of tile ``r`` in dilation group ``g``.
    """
    grid = tuple(grid)
    k = len(grid)
    tile = per_axis("tile", tile, k)
    dilation = per_axis("dilation", dilation, k)
    order = tuple(range(k)) if axis_order is None else tuple(axis_order)
    tiles, _ = _grid_layout(grid, tile, dilation)
    perm_shape = [dilation[a] for a in order] + [tiles[a] for a in order]
    ids = torch.arange(math.prod(perm_shape)).view(perm_shape)
    inv = [0] * (2 * k)
    for i, a in enumerate(order):
        inv[a] = i
        inv[k + a] = k + i
    return tiles, ids.permute(inv)


def tile_coordinate_bounds(order: TokenOrder, grid: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-tile bounding boxes of the real tokens of an order over a row-major ``grid``.

    Returns ``(lo, hi, has_tokens)``: ``lo``/``hi`` ``int64 [Hi, T, k]`` the smallest / largest coordinate of the
    tile's tokens along every axis (inclusive), ``has_tokens`` ``bool [Hi, T]``. Useful to classify tiles of
    geometric patterns analytically (e.g. a circle: visited iff the boxes' minimum distance is below the radius,
    full iff their maximum distance is).
    """
    grid = tuple(grid)
    if order.num_tokens != math.prod(grid):
        raise ValueError(f"order has {order.num_tokens} tokens, grid {grid} has {math.prod(grid)}.")
    hi_, p = order.index.shape
    idx = order.index.long().view(hi_, order.num_tiles, order.tile_size)
    real = idx >= 0
    coords = torch.stack(torch.unravel_index(idx.clamp(min=0), grid), dim=-1)  # [Hi, T, S, k]
    big = max(grid) + 1
    lo = torch.where(real[..., None], coords, big).amin(dim=2)
    hi = torch.where(real[..., None], coords, -1).amax(dim=2)
    return lo, hi, real.any(-1)


def concat_orders(*orders: TokenOrder) -> TokenOrder:
    """Join orders of consecutive parts of one sequence (e.g. text tokens, then an image grid, then pooled tokens).

    Part ``i`` holds original tokens ``[sum(N_<i), sum(N_<=i))`` and tiles ``[sum(T_<i), sum(T_<=i))``; all parts
    must share ``tile_size``. Per-head and shared orders may be mixed (shared ones are repeated).
    """
    if not orders:
        raise ValueError("concat_orders needs at least one order.")
    tile = orders[0].tile_size
    if any(o.tile_size != tile for o in orders):
        raise ValueError(f"all orders must share one tile_size, got {[o.tile_size for o in orders]}.")
    hi = max(o.num_heads for o in orders)
    if any(o.num_heads not in (1, hi) for o in orders):
        raise ValueError(f"per-head orders must have the same number of heads, got {[o.num_heads for o in orders]}.")
    parts, segments = [], []
    tok = til = 0
    for o in orders:
        idx = torch.where(o.index >= 0, o.index + tok, -1).expand(hi, -1)
        parts.append(idx)
        segments.append((tok, o.num_tokens, til, o.num_tiles))
        tok += o.num_tokens
        til += o.num_tiles
    return TokenOrder(torch.cat(parts, dim=1), tile, tok, tuple(segments))


def stack_orders(orders: Sequence[TokenOrder]) -> TokenOrder:
    """One order per head (e.g. PARO's per-head axis orders): ``index [H, P]``."""
    first = orders[0]
    if any(o.num_positions != first.num_positions or o.tile_size != first.tile_size for o in orders):
        raise ValueError("stacked orders must have the same number of positions and tile size.")
    if any(o.num_tokens != first.num_tokens or o.num_heads != 1 for o in orders):
        raise ValueError("stacked orders must be shared (Hi = 1) orders of the same number of tokens.")
    return TokenOrder(torch.cat([o.index for o in orders], dim=0), first.tile_size, first.num_tokens, first.segments)


# ------------------------------------------------------------------------------------------------- tile tables
@dataclasses.dataclass(frozen=True, eq=False)
class TileTable:
    """Which key tiles every query tile visits.

    Attributes:
        kv_tiles: ``int32 [Bt, Ht, Tq, K]`` with ``Bt`` in {1, B} and ``Ht`` in {1, H} (1 = shared). Row
            ``(b, h, i)`` lists key tiles of query tile ``i``: entries ``[0, num_full)`` are *full* (every pair of
            real query and key in the two tiles is visible, the key tile holds no padding: kernels skip masking),
            entries ``[num_full, num_kv)`` are *partial* (the in-tile mask and padding are evaluated); later entries
            are ignored (kept in ``[0, Tk)``).
        num_kv: ``int32 [Bt, Ht, Tq]`` number of listed tiles.
        num_full: ``int32 [Bt, Ht, Tq]`` number of full tiles (a prefix of the list).
        num_kv_tiles: ``Tk``, the number of key tiles.
    """

    kv_tiles: torch.Tensor
    num_kv: torch.Tensor
    num_full: torch.Tensor
    num_kv_tiles: int

    def __post_init__(self):
        if self.kv_tiles.dim() != 4 or self.num_kv.shape != self.kv_tiles.shape[:3]:
            raise ValueError(
                "TileTable.kv_tiles must be [Bt, Ht, Tq, K] and num_kv [Bt, Ht, Tq], got "
                f"{tuple(self.kv_tiles.shape)} and {tuple(self.num_kv.shape)}."
            )
        if self.num_full.shape != self.num_kv.shape:
            raise ValueError(f"TileTable.num_full must have shape {tuple(self.num_kv.shape)}.")
        for name in ("kv_tiles", "num_kv", "num_full"):
            t = getattr(self, name)
            if t.dtype != torch.int32:
                object.__setattr__(self, name, t.to(torch.int32).contiguous())

    def validate(self) -> None:
        """Raise ``ValueError`` unless ``0 <= num_full <= num_kv <= K`` and listed entries are tile ids in
        ``[0, Tk)`` (kernels index memory with them)."""
        k = self.kv_tiles.shape[3]
        if bool(((self.num_full < 0) | (self.num_full > self.num_kv) | (self.num_kv > k)).any()):
            raise ValueError(f"TileTable needs 0 <= num_full <= num_kv <= K={k} for every query tile.")
        listed = torch.arange(k, device=self.kv_tiles.device) < self.num_kv[..., None]
        bad = listed & ((self.kv_tiles < 0) | (self.kv_tiles >= self.num_kv_tiles))
        if bool(bad.any()):
            raise ValueError(f"TileTable.kv_tiles lists tile ids outside [0, {self.num_kv_tiles}).")
        if bool(((self.kv_tiles < 0) | (self.kv_tiles >= self.num_kv_tiles)).any()):
            raise ValueError("unused TileTable.kv_tiles entries must also lie in [0, Tk) (kernels may prefetch them).")

    @property
    def num_q_tiles(self) -> int:
        return self.kv_tiles.shape[2]

    @property
    def max_kv(self) -> int:
        return self.kv_tiles.shape[3]

    def to(self, device: torch.device | str) -> TileTable:
        if self.kv_tiles.device == torch.device(device):
            return self
        return TileTable(self.kv_tiles.to(device), self.num_kv.to(device), self.num_full.to(device), self.num_kv_tiles)

    def dense(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(visited, full)`` boolean ``[Bt, Ht, Tq, Tk]`` masks of the listed and of the full tiles."""
        bt, ht, tq, k = self.kv_tiles.shape
        slot = torch.arange(k, device=self.kv_tiles.device)
        listed = slot < self.num_kv[..., None]
        full = slot < self.num_full[..., None]
        idx = self.kv_tiles.long()
        visited = torch.zeros(bt, ht, tq, self.num_kv_tiles + 1, dtype=torch.bool, device=idx.device)
        visited.scatter_(3, torch.where(listed, idx, self.num_kv_tiles), True)
        fullm = torch.zeros_like(visited)
        fullm.scatter_(3, torch.where(full, idx, self.num_kv_tiles), True)
        return visited[..., :-1], fullm[..., :-1]

    def visited_tiles(self) -> int:
        """Total number of (query tile, key tile) pairs visited, summed over the table's batch and head rows."""
        return int(self.num_kv.sum())


def tile_table_from_dense(visited: torch.Tensor, full: torch.Tensor | None = None) -> TileTable:
    """Build a :class:`TileTable` from boolean tile masks.

    Args:
        visited: bool ``[Tq, Tk]``, ``[Ht, Tq, Tk]`` or ``[Bt, Ht, Tq, Tk]``: the key tiles each query tile visits
            (e.g. PARO's per-head block masks).
        full: same shape (or ``None``: every visited tile is full): tiles that need no mask evaluation. Must imply
            ``visited``.
    """
    while visited.dim() < 4:
        visited = visited[None]
    if full is None:
        full = visited
    while full.dim() < 4:
        full = full[None]
    full = full.expand_as(visited)
    if bool((full & ~visited).any()):
        raise ValueError("`full` tiles must also be `visited`.")
    tk = visited.shape[-1]
    # sort key: 0 = full, 1 = partial, 2 = not visited; stable so tiles keep ascending order within a class
    key = torch.where(full, 0, torch.where(visited, 1, 2)).to(torch.int8)
    order = torch.sort(key, dim=-1, stable=True).indices
    num_kv = visited.sum(-1)
    num_full = full.sum(-1)
    k = max(int(num_kv.max()) if num_kv.numel() else 0, 1)
    return TileTable(order[..., :k].to(torch.int32).contiguous(), num_kv.to(torch.int32), num_full.to(torch.int32), tk)


def _call_mask(mask_mod: MaskMod | None, b, h, q, kv) -> torch.Tensor:
    if mask_mod is None:
        return torch.ones((), dtype=torch.bool, device=q.device)
    return mask_mod(b, h, q, kv)


def dense_tile_masks(
    q_order: TokenOrder,
    kv_order: TokenOrder,
    mask_mod: MaskMod | None,
    *,
    batch: int = 1,
    heads: int = 1,
    chunk_elements: int = 1 << 24,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Evaluate ``mask_mod`` on every (query tile, key tile) pair: ``(visited, full)`` bool ``[Bt, Ht, Tq, Tk]``.

    A pair is *visited* when some real query sees some real key, *full* when every real query sees every key of a
    tile that holds no padding. Costs ``O(Nq * Nk)`` mask evaluations, in chunks of ``chunk_elements`` (memory stays
    bounded); use it for small problems, tests, or once per resolution.
    ``batch`` / ``heads``: how many batch rows and heads the mask depends on (1 = the same for all).
    """
    device = q_order.device
    heads = max(heads, q_order.num_heads, kv_order.num_heads)
    tq, tk = q_order.num_tiles, kv_order.num_tiles
    sq, sk = q_order.tile_size, kv_order.tile_size
    qi = q_order.index.expand(heads, -1).view(heads, tq, sq)
    ki = kv_order.index.expand(heads, -1).view(heads, tk, sk)
    b = torch.arange(batch, device=device).view(batch, 1, 1, 1, 1, 1)
    h = torch.arange(heads, device=device).view(1, heads, 1, 1, 1, 1)
    k_real = (ki >= 0).view(1, heads, 1, 1, tk, sk)
    k_full_tile = k_real.all(-1)  # [1, H, 1, 1, Tk]
    visited = torch.empty(batch, heads, tq, tk, dtype=torch.bool, device=device)
    full = torch.empty_like(visited)
    chunk = max(1, chunk_elements // max(1, batch * heads * sq * tk * sk))
    for c0 in range(0, tq, chunk):
        c1 = min(tq, c0 + chunk)
        q = qi[:, c0:c1].reshape(1, heads, c1 - c0, sq, 1, 1)
        kv = ki.view(1, heads, 1, 1, tk, sk)
        ok = _call_mask(mask_mod, b, h, q.clamp(min=0), kv.clamp(min=0))
        ok = ok.expand(batch, heads, c1 - c0, sq, tk, sk)
        q_real = q >= 0
        pair = ok & q_real & k_real
        visited[:, :, c0:c1] = pair.any(-1).any(-2)
        # full: all real queries see all keys of the tile, and the tile has no padding keys
        all_ok = (ok | ~q_real).all(-1).all(-2)
        has_q = q_real.any(-3).view(1, heads, c1 - c0, 1)
        full[:, :, c0:c1] = all_ok & k_full_tile.view(1, heads, 1, tk) & has_q
    return visited, full


def tile_table_from_mask(
    q_order: TokenOrder,
    kv_order: TokenOrder,
    mask_mod: MaskMod | None,
    *,
    batch: int = 1,
    heads: int = 1,
    chunk_elements: int = 1 << 24,
) -> TileTable:
    """The exact :class:`TileTable` of ``mask_mod`` (see :func:`dense_tile_masks` for cost and arguments)."""
    visited, full = dense_tile_masks(
        q_order, kv_order, mask_mod, batch=batch, heads=heads, chunk_elements=chunk_elements
    )
    return tile_table_from_dense(visited, full)


def segment_tile_masks(
    q_order: TokenOrder,
    kv_order: TokenOrder,
    rules: dict[tuple[int, int], Any],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tile masks ``(visited, full)`` ``[Bt, Ht, Tq, Tk]`` assembled per pair of segments of joined orders.

    ``q_order`` / ``kv_order`` come from :func:`concat_orders` (or are single orders: one segment). ``rules`` maps
    ``(query segment, key segment)`` to:

    - ``"all"``: every query of the segment sees every key of the segment (tiles are full, except key tiles holding
      padding, which are partial);
    - a pair ``(visited, full)`` of bool masks ``[..., Tq_seg, Tk_seg]`` for that block (e.g. from
      :func:`dense_tile_masks` on the segments' own orders, or built analytically);

    missing pairs are not visible. Example (FLUX with CLEAR-style pooled keys): segments text / image / pooled, rules
    ``{(0, 0): "all", (0, 1): "all", (1, 0): "all", (1, 1): local, (1, 2): "all"}``.
    """
    masks = [v for v in rules.values() if not isinstance(v, str)]
    lead = torch.broadcast_shapes(*(m[0].shape[:-2] for m in masks)) if masks else ()
    while len(lead) < 2:
        lead = (1, *lead)
    device = q_order.device
    tq, tk = q_order.num_tiles, kv_order.num_tiles
    visited = torch.zeros(*lead, tq, tk, dtype=torch.bool, device=device)
    full = torch.zeros_like(visited)
    k_pad = (kv_order.index < 0).view(kv_order.num_heads, tk, kv_order.tile_size).any(-1)  # [Hi, Tk]
    q_real = (q_order.index >= 0).view(q_order.num_heads, tq, q_order.tile_size).any(-1)  # [Hi, Tq]
    for (qs, ks), rule in rules.items():
        if not (0 <= qs < len(q_order.segments) and 0 <= ks < len(kv_order.segments)):
            raise ValueError(f"segment pair {(qs, ks)} is out of range for these orders.")
        _, _, q0, nq = q_order.segments[qs]
        _, _, k0, nk = kv_order.segments[ks]
        if isinstance(rule, str):
            if rule != "all":
                raise ValueError(f"segment rule must be 'all' or a (visited, full) pair, got {rule!r}.")
            rows = q_real[:, q0 : q0 + nq, None]  # [Hi, nq, 1]
            if rows.shape[0] != 1 and visited.shape[1] == 1:
                raise ValueError("per-head query orders need rules with a head dimension.")
            visited[..., q0 : q0 + nq, k0 : k0 + nk] = rows.any(0)
            full[..., q0 : q0 + nq, k0 : k0 + nk] = rows.any(0) & ~k_pad[:, None, k0 : k0 + nk].any(0)
        else:
            vis, ful = rule
            if vis.shape[-2:] != (nq, nk) or ful.shape[-2:] != (nq, nk):
                raise ValueError(
                    f"rule for segments {(qs, ks)} must be [..., {nq}, {nk}] tile masks, got {tuple(vis.shape)}."
                )
            visited[..., q0 : q0 + nq, k0 : k0 + nk] = vis.to(device)
            full[..., q0 : q0 + nq, k0 : k0 + nk] = ful.to(device)
    return visited, full


def _demote_padded_full_tiles(table: TileTable, kv_order: TokenOrder) -> TileTable:
    """``table`` with every *full* entry whose key tile holds padding moved to the partial entries.

    Kernels load full tiles without any mask, so a padded key tile listed as full would make them read the row before
    the key tensor (padding index ``-1``). Tables built by :func:`tile_table_from_dense` without ``full`` (e.g. PARO's
    block masks) list every visited tile as full; this keeps the contract in one place."""
    hi, tk = kv_order.num_heads, kv_order.num_tiles
    pad = (kv_order.index.view(hi, tk, kv_order.tile_size) < 0).any(-1)  # [Hi, Tk]
    if not bool(pad.any()):
        return table
    bt, ht, tq, k = table.kv_tiles.shape
    slot = torch.arange(k, device=table.kv_tiles.device)
    listed_full = slot < table.num_full[..., None]  # [Bt, Ht, Tq, K]
    if hi > 1 and ht == 1:
        listed_full = listed_full.expand(bt, hi, tq, k)
    pad_rows = pad.to(table.kv_tiles.device)[None, :, None, :].expand(bt, max(ht, hi), tq, tk)
    ids = table.kv_tiles.expand(bt, max(ht, hi), tq, k).long()
    if not bool((listed_full & torch.gather(pad_rows, 3, ids)).any()):
        return table
    visited, full = table.dense()
    if hi > 1 and ht == 1:
        visited, full = visited.expand(bt, hi, tq, tk), full.expand(bt, hi, tq, tk)
    return tile_table_from_dense(visited, full & ~pad_rows)


# ------------------------------------------------------------------------------------------------- in-tile masks
@dataclasses.dataclass(frozen=True, eq=False)
class TileMask:
    """Visibility inside partial tiles, on *original* token indices.

    Attributes:
        mask_mod: ``mask_mod(b, h, q_idx, kv_idx) -> bool tensor``, written with elementwise tensor operations as a
            FlexAttention ``mask_mod`` (it receives broadcastable index tensors in the reference backend and scalars
            under ``vmap`` in flex). Indices are positions in the caller's query / key sequences.
        triton_fn: optional ``@triton.jit`` function ``fn(b, h, q_idx, kv_idx, params_ptr) -> bool block`` with
            ``q_idx`` ``[BLOCK_M, 1]`` and ``kv_idx`` ``[1, BLOCK_N]`` int32 blocks, ``b``/``h`` scalars and
            ``params_ptr`` a pointer to :attr:`params`; needed by the ``"triton"`` backend.
        params: a 1-D ``int32`` or ``float32`` tensor read by ``triton_fn`` (e.g. grid sizes, a radius).
        name: shown in logs and reprs.
        triton_rows_fn: optional ``@triton.jit`` function ``fn(b, h, q_idx, params_ptr) -> block or tuple of blocks``
            that the Triton kernel calls once per block of query rows (``q_idx`` ``[BLOCK_M, 1]``); ``triton_fn``
            then receives its result in place of ``q_idx``. Use it to move per-query work (integer divisions,
            window bounds) out of the loop over key tiles.
        triton_tile_fn: optional *tile-local* ``@triton.jit`` function ``fn(b, h, rows, kv_tile, offs, params_ptr,
            ARGS) -> bool [BLOCK_M, BLOCK_N]`` used by the Triton kernel in place of ``triton_fn``: ``kv_tile`` is the
            key tile's id (scalar), ``offs`` the in-tile positions ``[BLOCK_N]`` (``tl.arange``-based, so that
            in-tile coordinates are compile-time constants), ``rows`` what ``triton_rows_fn`` made of the query
            indices and ``ARGS`` the constexpr :attr:`tile_args`. It never sees original key indices, so the kernel
            reads none, and it must mask padding keys itself. It is only valid for the key order it was built for.
        tile_args: a tuple of ints passed to ``triton_tile_fn`` as a compile-time constant (e.g. the key tile shape).
    """

    mask_mod: MaskMod
    triton_fn: Any = None
    params: torch.Tensor | None = None
    name: str = "mask"
    triton_rows_fn: Any = None
    triton_tile_fn: Any = None
    tile_args: tuple = ()


@dataclasses.dataclass(frozen=True, eq=False)
class BlockSparsePattern:
    """A complete block-sparse attention pattern (see the module docstring).

    Attributes:
        table: the :class:`TileTable`; ``Tq = q_order.num_tiles``, ``Tk = kv_order.num_tiles``.
        q_order / kv_order: :class:`TokenOrder` of the queries and of the keys/values.
        mask: optional :class:`TileMask` evaluated on partial tiles; ``None``: all pairs of listed tiles are visible
            (padding excepted).
        name: shown in logs and reprs.
    """

    table: TileTable
    q_order: TokenOrder
    kv_order: TokenOrder
    mask: TileMask | None = None
    name: str = "block-sparse"
    _cache: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        t = self.table
        if t.num_q_tiles != self.q_order.num_tiles or t.num_kv_tiles != self.kv_order.num_tiles:
            raise ValueError(
                f"tile table is {t.num_q_tiles} x {t.num_kv_tiles} tiles, but the orders have "
                f"{self.q_order.num_tiles} query and {self.kv_order.num_tiles} key tiles."
            )
        t.validate()
        object.__setattr__(self, "table", _demote_padded_full_tiles(t, self.kv_order))

    @property
    def num_queries(self) -> int:
        return self.q_order.num_tokens

    @property
    def num_keys(self) -> int:
        return self.kv_order.num_tokens

    @property
    def q_tile(self) -> int:
        return self.q_order.tile_size

    @property
    def kv_tile(self) -> int:
        return self.kv_order.tile_size

    def to(self, device: torch.device | str) -> BlockSparsePattern:
        """This pattern on ``device`` (cached)."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if self.table.kv_tiles.device == device:
            return self
        key = ("to", str(device))
        if key not in self._cache:
            mask = self.mask
            if mask is not None and mask.params is not None:
                mask = dataclasses.replace(mask, params=mask.params.to(device))
            self._cache[key] = dataclasses.replace(
                self,
                table=self.table.to(device),
                q_order=self.q_order.to(device),
                kv_order=self.kv_order.to(device),
                mask=mask,
                _cache={},
            )
        return self._cache[key]

    def for_queries(self, positions: torch.Tensor) -> BlockSparsePattern:
        """This pattern with only the query tiles holding some of ``positions`` (query indices) left visiting keys.

        The other query tiles list no key tile, so kernels skip them and their outputs are meaningless (zeros): the
        caller keeps only the rows ``positions``. Index spaces are unchanged, so every backend (and a Triton mask's
        tile-local coordinates) stays valid. Used by ring attention, where a rank owns a shard of the queries and
        holds every key (:mod:`attnpack.attn_processors.parallel`). Cached per device and positions.
        """
        positions = positions.to(self.q_order.device, torch.int64)
        key = ("queries", positions.numel(), hash(tuple(positions[:: max(1, positions.numel() // 64)].tolist())))
        cached = self._cache.get(key)
        if cached is not None and torch.equal(cached[0], positions):
            return cached[1]
        table, order = self.table, self.q_order
        tile = order.inverse()[:, positions] // order.tile_size  # [Hi, n]: the tile of every kept query, per head
        keep = torch.zeros(order.num_heads, order.num_tiles, dtype=torch.bool, device=order.device)
        keep.scatter_(1, tile, True)
        if table.num_kv.shape[1] != order.num_heads:  # a table shared by per-head orders: keep a tile for all heads
            keep = keep.any(0, keepdim=True)
        keep = keep.to(table.num_kv.device)  # [1 or H, Tq], broadcast over the table's [Bt, Ht, Tq]
        restricted = TileTable(
            table.kv_tiles,
            torch.where(keep, table.num_kv, 0).to(torch.int32),
            torch.where(keep, table.num_full, 0).to(torch.int32),
            table.num_kv_tiles,
        )
        pattern = dataclasses.replace(
            self, table=restricted, name=f"{self.name}[{positions.numel()} queries]", _cache={}
        )
        self._cache[key] = (positions, pattern)
        return pattern

    def visited_keys(self) -> torch.Tensor:
        """``bool [Nk]``: the keys some query tile visits (for any batch row and head)."""
        table, order = self.table, self.kv_order
        slot = torch.arange(table.kv_tiles.shape[-1], device=table.kv_tiles.device)
        listed = slot < table.num_kv[..., None]
        tiles = torch.zeros(order.num_tiles, dtype=torch.bool, device=table.kv_tiles.device)
        tiles[table.kv_tiles[listed].long()] = True
        index = order.index.view(order.num_heads, order.num_tiles, order.tile_size)
        keys = torch.zeros(order.num_tokens + 1, dtype=torch.bool, device=order.device)
        real = index[:, tiles.to(order.device)]
        keys[torch.where(real >= 0, real.long(), order.num_tokens).flatten()] = True
        return keys[: order.num_tokens]

    def tile_bound(self) -> float:
        """Speedup bound set by tiles visited: ``Tq * Tk / mean visited pairs`` (per batch and head row)."""
        rows = self.table.num_kv.shape[0] * self.table.num_kv.shape[1]
        visited = self.table.visited_tiles() / rows
        return self.table.num_q_tiles * self.table.num_kv_tiles / max(visited, 1)

    def stats(self) -> dict[str, Any]:
        """Tile statistics: query/key tiles, visited pairs per row, fraction of visited tiles needing masks."""
        rows = self.table.num_kv.shape[0] * self.table.num_kv.shape[1]
        visited = self.table.visited_tiles()
        full = int(self.table.num_full.sum())
        return {
            "q_tiles": self.table.num_q_tiles,
            "kv_tiles": self.table.num_kv_tiles,
            "visited_per_row": visited / rows,
            "masked_fraction": (visited - full) / max(visited, 1),
            "tile_bound": self.tile_bound(),
            "fully_block_sparse": visited == full,
        }

    def __repr__(self) -> str:
        return (
            f"BlockSparsePattern({self.name!r}, queries={self.num_queries}, keys={self.num_keys}, "
            f"tiles={self.q_tile}x{self.kv_tile}, table={tuple(self.table.kv_tiles.shape)})"
        )
