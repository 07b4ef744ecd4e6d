"""CLEAR circular local attention: the exact mask, 2-D tiled block-sparse patterns, pooled global tokens.

Paper: Liu, Tan and Wang, "CLEAR: Conv-Like Linearization Revs Pre-Trained Diffusion Transformers Up",
https://arxiv.org/abs/2412.16112 (official code: https://github.com/Huage001/CLEAR, ``attention_processor.py``).

Token order is FLUX's: ``T`` text tokens, then the ``H x W`` image tokens row-major; with ``down_factor = d > 1``
the keys get ``(H / d) * (W / d)`` pooled tokens appended. The mask (official ``local_mask`` /
``local_dwonsample_mask``), on query index ``q`` and key index ``k``:

- text queries (``q < T``) see every text and image key, and **no** pooled key;
- image queries see every text key, every pooled key, and the image keys of a **circle**: query ``(y, x)`` sees key
  ``(y', x')`` iff ``(y - y')**2 + (x - x')**2 < r**2`` (strict, Euclidean, token units; clipped at the borders).

The block-sparse kernels (:mod:`attnpack.kernels.block_sparse`) run it with 2-D query and key tiles (boxes of the
token grid, NATTEN style) instead of FlexAttention's 128 consecutive row-major tokens: a tile's union of circles is a
rounded box, so far fewer tiles are visited and far fewer of them need the in-tile mask (see
:func:`clear_tile_stats` and ``docs/clear.md``). Text and pooled tokens sit in 1-D tiles of the same size.
Tile tables are computed analytically from tile bounding boxes: ``O(tiles^2)``, never ``O(N^2)``.
"""

from __future__ import annotations

import dataclasses
import math
import threading
from collections import OrderedDict
from collections.abc import Sequence

import torch

from ..block_sparse import BlockSparsePattern, block_sparse_attention
from ..block_sparse.pattern import (
    TileMask,
    TokenOrder,
    concat_orders,
    flat_order,
    grid_order,
    segment_tile_masks,
    tile_coordinate_bounds,
    tile_table_from_dense,
)


__all__ = [
    "ClearSpec",
    "ClearPatternCache",
    "clear_mask_mod",
    "circle_tile_masks",
    "clear_pattern",
    "clear_tile_stats",
    "default_clear_tiles",
    "resolve_clear_tiles",
    "pool_image_tokens",
    "proportional_scale",
    "clear_attention",
    "TRAIN_SEQ_LEN",
]

# FLUX.1-dev training length used by the official proportional attention: 64 x 64 image tokens + 512 text tokens
TRAIN_SEQ_LEN = 64**2 + 512
# default 2-D tiles: 128-token query boxes (8 rows x 16 columns) and 64-token key boxes (the block sizes of
# FlashAttention-style kernels on Hopper); see clear_tile_stats and the density table in docs/clear.md
DEFAULT_Q_TILE = (8, 16)
DEFAULT_KV_TILE = (8, 8)


@dataclasses.dataclass(frozen=True)
class ClearSpec:
    """One CLEAR configuration at one resolution.

    Attributes:
        grid: ``(H, W)`` image tokens (FLUX: pixels / 16).
        text_len: ``T`` text tokens before the image tokens (FLUX.1: 512 with the default ``max_sequence_length``).
        radius: ``r``, the window radius in tokens (``window_size`` in the official code).
        down_factor: ``d``; ``d > 1`` appends ``(H / d) * (W / d)`` pooled image tokens to the keys.
    """

    grid: tuple[int, int]
    text_len: int
    radius: int
    down_factor: int = 1

    def __post_init__(self):
        grid = tuple(self.grid)
        if len(grid) != 2 or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in grid):
            raise ValueError(f"`grid` must be (H, W), two positive ints, got grid={self.grid!r}.")
        object.__setattr__(self, "grid", grid)
        if not isinstance(self.radius, int) or isinstance(self.radius, bool) or self.radius < 1:
            raise ValueError(f"`radius` must be a positive int (tokens), got radius={self.radius!r}.")
        if not isinstance(self.down_factor, int) or isinstance(self.down_factor, bool) or self.down_factor < 1:
            raise ValueError(f"`down_factor` must be an int >= 1, got down_factor={self.down_factor!r}.")
        if not isinstance(self.text_len, int) or self.text_len < 0:
            raise ValueError(f"`text_len` must be an int >= 0, got text_len={self.text_len!r}.")
        h, w = grid
        d = self.down_factor
        if h % d or w % d:
            raise ValueError(
                f"`down_factor`={d} must divide the image token grid {grid} (H x W tokens = pixels / 16 in FLUX): use "
                f"image sizes that are multiples of {16 * d} pixels, or down_factor=1."
            )

    @property
    def num_image(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def num_pooled(self) -> int:
        d = self.down_factor
        return 0 if d == 1 else (self.grid[0] // d) * (self.grid[1] // d)

    @property
    def num_queries(self) -> int:
        return self.text_len + self.num_image

    @property
    def num_keys(self) -> int:
        return self.text_len + self.num_image + self.num_pooled

    def is_dense(self) -> bool:
        """Every query sees every key: ``d == 1`` and the circle covers the grid (``r**2 > (H-1)**2 + (W-1)**2``)."""
        h, w = self.grid
        return self.down_factor == 1 and self.radius**2 > (h - 1) ** 2 + (w - 1) ** 2


def clear_mask_mod(spec: ClearSpec):
    """FlexAttention-style ``mask_mod(b, h, q_idx, kv_idx)`` of CLEAR on original token indices.

    The official formula, with the text length taken from ``spec`` (the official code hard-codes 512 when pooling):
    ``(q < T and k < T + HW) or (q >= T and (k < T or k >= T + HW or dy**2 + dx**2 < r**2))``.
    """
    t, w = spec.text_len, spec.grid[1]
    end = t + spec.num_image
    r2 = spec.radius**2

    def mask_mod(b, h, q_idx, kv_idx):
        qy, qx = (q_idx - t) // w, (q_idx - t) % w
        ky, kx = (kv_idx - t) // w, (kv_idx - t) % w
        local = (qy - ky) * (qy - ky) + (qx - kx) * (qx - kx) < r2
        text_q = (q_idx < t) & (kv_idx < end)
        image_q = (q_idx >= t) & ((kv_idx < t) | (kv_idx >= end) | local)
        return text_q | image_q

    return mask_mod


def _box_tiles(order: TokenOrder, grid: tuple[int, int]):
    lo, hi, has = tile_coordinate_bounds(order, grid)
    count = (order.index >= 0).view(order.num_heads, order.num_tiles, order.tile_size).sum(-1)
    volume = torch.where(has, (hi - lo + 1).prod(-1), 0)
    if not torch.equal(count, volume):
        raise ValueError(
            "circle_tile_masks needs tiles that are boxes of the grid (2-D tiles, or 1-D tiles that cover whole rows "
            f"or whole fractions of a row); got tiles of {order.tile_size} tokens on grid {grid}."
        )
    return lo[0], hi[0], has[0]


def circle_tile_masks(
    q_order: TokenOrder, kv_order: TokenOrder, grid: Sequence[int], radius: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact ``(visited, full)`` tile masks ``[Tq, Tk]`` of the circle rule between two tilings of one image grid.

    Tiles are boxes, so the smallest squared distance between a query tile and a key tile is the sum over axes of the
    squared gaps between their coordinate ranges, and the largest is the sum of the squared extreme differences: the
    pair is visited iff the smallest is ``< r**2``, full iff the largest is ``< r**2`` and the key tile has no padding.
    """
    grid = tuple(grid)
    qlo, qhi, qhas = _box_tiles(q_order, grid)  # [Tq, 2]
    klo, khi, khas = _box_tiles(kv_order, grid)
    qlo, qhi = qlo[:, None], qhi[:, None]
    klo, khi = klo[None], khi[None]
    gap = (klo - qhi).clamp(min=0) + (qlo - khi).clamp(min=0)  # [Tq, Tk, 2]
    far = torch.maximum(khi - qlo, qhi - klo)
    r2 = radius**2
    visited = (gap * gap).sum(-1) < r2
    visited &= qhas[:, None] & khas[None, :]
    k_pad = (kv_order.index[0] < 0).view(kv_order.num_tiles, kv_order.tile_size).any(-1)
    full = ((far * far).sum(-1) < r2) & visited & ~k_pad[None, :]
    return visited, full


def _shrink(tile: Sequence[int], grid: Sequence[int]) -> tuple[int, int]:
    t = list(tile)
    for a in range(2):
        while t[a] > 1 and t[a] >= 2 * grid[a] and t[0] * t[1] > 16:
            t[a] //= 2
    return t[0], t[1]


def default_clear_tiles(grid: Sequence[int]) -> tuple[tuple[int, int], tuple[int, int]]:
    """``(q_tile, kv_tile)`` for a grid: ``(8, 16)`` query boxes and ``(8, 8)`` key boxes, halved on axes much
    longer than the grid (small images) while keeping at least 16 tokens per tile."""
    return _shrink(DEFAULT_Q_TILE, grid), _shrink(DEFAULT_KV_TILE, grid)


def resolve_clear_tiles(grid: Sequence[int], q_tile=None, kv_tile=None):
    """Tiles actually used: the defaults when both are ``None``; ``kv_tile`` defaults to ``q_tile``."""
    if q_tile is None and kv_tile is None:
        return default_clear_tiles(grid)
    q_tile = default_clear_tiles(grid)[0] if q_tile is None else q_tile
    kv_tile = q_tile if kv_tile is None else kv_tile
    for name, t in (("q_tile", q_tile), ("kv_tile", kv_tile)):
        ok = isinstance(t, int) or (len(tuple(t)) == 2 and all(isinstance(x, int) for x in t))
        if not ok or min((t,) if isinstance(t, int) else tuple(t)) < 1:
            raise ValueError(
                f"`{name}` must be (rows, cols) of positive ints or an int (1-D tiles), got {name}={t!r}."
            )
    norm = lambda t: t if isinstance(t, int) else tuple(t)  # noqa: E731
    return norm(q_tile), norm(kv_tile)


def _image_order(grid, tile) -> TokenOrder:
    if isinstance(tile, int):
        return grid_order(grid, tile)  # 1-D row-major tiles (FlexAttention's layout), for comparison
    return grid_order(grid, tuple(tile))


def _tile_size(tile) -> int:
    return tile if isinstance(tile, int) else math.prod(tile)


def _triton_mask():
    """The Triton versions of the mask ``(index fn, rows fn, tile-local fn)``, or ``None``s without triton (the
    Triton backend then declines the pattern)."""
    import importlib.util

    if importlib.util.find_spec("triton") is None:
        return None, None, None
    mod = importlib.import_module(f"{__package__}.triton")
    return mod.clear_mask_triton, mod.clear_rows_triton, mod.clear_tile_triton


def clear_mask_params(spec: ClearSpec, kv_tile=None) -> torch.Tensor:
    """``int32`` parameters of the Triton in-tile masks: ``[T, W, T + H*W, r**2, H, text key tiles, key tiles per
    image row, image key tiles, pooled keys]`` (the tile counts of 2-D ``kv_tile`` boxes; zeros without)."""
    h, w = spec.grid
    tiles = [0, 0, 0]
    if kv_tile is not None and not isinstance(kv_tile, int):
        size = _tile_size(kv_tile)
        per_row = -(-w // kv_tile[1])
        tiles = [-(-spec.text_len // size), per_row, -(-h // kv_tile[0]) * per_row]
    vals = [spec.text_len, w, spec.num_queries, spec.radius**2, h, *tiles, spec.num_pooled]
    return torch.tensor(vals, dtype=torch.int32)


def clear_pattern(
    spec: ClearSpec,
    *,
    q_tile: int | Sequence[int] | None = None,
    kv_tile: int | Sequence[int] | None = None,
    device: torch.device | str | None = None,
) -> BlockSparsePattern:
    """The block-sparse pattern of CLEAR.

    Queries: text in 1-D tiles, then the image in ``q_tile`` boxes; keys: text, the image in ``kv_tile`` boxes, then
    the pooled tokens (``d > 1``) in 1-D tiles. Both tiles hold the same number of tokens per segment of an order; an
    int tile means 1-D row-major tiles of the flattened image (FlexAttention's layout, for comparisons).
    Tiles default to :func:`default_clear_tiles` (``kv_tile`` defaults to ``q_tile`` when only that is given).
    """
    q_tile, kv_tile = resolve_clear_tiles(spec.grid, q_tile, kv_tile)
    sq, sk = _tile_size(q_tile), _tile_size(kv_tile)
    t = spec.text_len
    q_img, kv_img = _image_order(spec.grid, q_tile), _image_order(spec.grid, kv_tile)
    q_parts = ([flat_order(t, sq)] if t else []) + [q_img]
    kv_parts = ([flat_order(t, sk)] if t else []) + [kv_img]
    if spec.num_pooled:
        kv_parts.append(flat_order(spec.num_pooled, sk))
    q_order, kv_order = concat_orders(*q_parts), concat_orders(*kv_parts)
    qi = 1 if t else 0  # segment of the image queries / keys
    rules = {(qi, qi): circle_tile_masks(q_img, kv_img, spec.grid, spec.radius)}
    if t:
        rules.update({(0, 0): "all", (0, 1): "all", (1, 0): "all"})
    if spec.num_pooled:
        rules[(qi, qi + 1)] = "all"
    table = tile_table_from_dense(*segment_tile_masks(q_order, kv_order, rules))
    label = f"clear(r={spec.radius}, d={spec.down_factor}, text={t}, grid={spec.grid})"
    index_fn, rows_fn, tile_fn = _triton_mask()
    boxes = not isinstance(kv_tile, int)  # the tile-local mask needs 2-D key boxes
    mask = TileMask(
        clear_mask_mod(spec),
        index_fn,
        clear_mask_params(spec, kv_tile),
        label,
        triton_rows_fn=rows_fn if boxes else None,
        triton_tile_fn=tile_fn if boxes else None,
        tile_args=tuple(kv_tile) if boxes else (),
    )
    pattern = BlockSparsePattern(table, q_order, kv_order, mask, name="clear")
    return pattern if device is None else pattern.to(device)


def clear_tile_stats(
    spec: ClearSpec, *, q_tile: int | Sequence[int] | None = None, kv_tile: int | Sequence[int] | None = None
) -> dict:
    """Tile statistics of :func:`clear_pattern` (what a benchmark table shows).

    Returns ``density`` (fraction of (query tile, key tile) pairs visited, as FlexAttention's block-mask
    "sparsity" counts them), ``work`` (visited tile area / padded ``Nq x Nk``: comparable across tile sizes),
    ``masked`` (fraction of visited tiles that need the in-tile mask), ``pairs`` (fraction of (query, key) pairs
    the mask allows: the bound for any kernel), ``tile_bound`` (speedup bound from tiles visited) and tile counts.
    """
    q_tile, kv_tile = resolve_clear_tiles(spec.grid, q_tile, kv_tile)
    p = clear_pattern(spec, q_tile=q_tile, kv_tile=kv_tile)
    table = p.table
    tq, tk = table.num_q_tiles, table.num_kv_tiles
    visited = int(table.num_kv.sum())
    full = int(table.num_full.sum())
    return {
        "q_tiles": tq,
        "kv_tiles": tk,
        "q_tile": q_tile,
        "kv_tile": kv_tile,
        "density": visited / (tq * tk),
        "work": visited * p.q_tile * p.kv_tile / (p.q_order.num_positions * p.kv_order.num_positions),
        "masked": (visited - full) / max(visited, 1),
        "pairs": clear_pair_count(spec) / (spec.num_queries * spec.num_keys),
        "tile_bound": tq * tk / max(visited, 1),
    }


def clear_pair_count(spec: ClearSpec) -> int:
    """Number of visible (query, key) pairs, counted exactly per row offset of the circle (``O(H * r)``)."""
    h, w = spec.grid
    r = spec.radius
    t = spec.text_len
    local = 0
    # pairs at row offset dy: keys within |dx| <= m(dy) = floor(sqrt(r^2 - dy^2 - eps)) of the same or shifted row
    for dy in range(-min(r, h - 1), min(r, h - 1) + 1):
        rem = r * r - dy * dy
        if rem <= 0:
            continue
        m = math.isqrt(rem - 1)  # largest dx with dx^2 < rem
        rows = h - abs(dy)
        # sum over x of #x' in [x - m, x + m] within [0, W)
        cols = sum(min(w - 1, x + m) - max(0, x - m) + 1 for x in range(w)) if m < w else w * w
        local += rows * cols
    n_img = h * w
    text_rows = t * (t + n_img)
    return text_rows + n_img * (t + spec.num_pooled) + local


def pool_image_tokens(x: torch.Tensor, grid: Sequence[int], down_factor: int, weight: torch.Tensor) -> torch.Tensor:
    """Pooled global tokens: each ``d x d`` cell of the image tokens reduced by a weighted sum (official order of ops).

    Args:
        x: ``[B, H, h*w, D]`` image keys or values (after qk-norm and RoPE), row-major over ``grid = (h, w)``.
        weight: the learnable ``spatial_weight``, ``[1, 1, 1, d, 1, d, 1]`` (or ``[d, d]``), shared by K and V.

    Returns:
        ``[B, H, (h/d)*(w/d), D]`` pooled tokens, row-major over the ``(h/d, w/d)`` cells.
    """
    h, w = grid
    d = down_factor
    weight = weight.reshape(1, 1, 1, d, 1, d, 1).to(dtype=x.dtype, device=x.device)
    return (x.unflatten(2, (h // d, d, w // d, d)) * weight).sum(dim=(3, 5)).flatten(2, 3)


def proportional_scale(num_keys: int, head_dim: int, down_factor: int = 1) -> float:
    """The official "proportional attention" softmax scale ``sqrt(log_{4608}(n) / head_dim)``.

    ``num_keys`` is ``T + H*W`` (without pooled tokens); the official pooled-token processor uses ``n = 10 * num_keys``
    (an undocumented constant, copied for parity), the plain one ``n = num_keys``.
    """
    n = num_keys if down_factor == 1 else 10 * num_keys
    return math.sqrt(math.log(n, TRAIN_SEQ_LEN) / head_dim)


class ClearPatternCache:
    """Patterns per (grid, text length, radius, down factor, tiles); least recently used evicted beyond ``maxsize``.

    One cache belongs to one :func:`attnpack.apply_clear` call (no module globals): switching resolutions back and
    forth always finds the pattern of the current grid. Patterns cache their device copies themselves.
    """

    def __init__(self, maxsize: int = 16):
        self.maxsize = maxsize
        self._entries: OrderedDict[tuple, BlockSparsePattern] = OrderedDict()
        self._lock = threading.Lock()
        self.builds = 0

    def get(self, spec: ClearSpec, q_tile=None, kv_tile=None) -> BlockSparsePattern:
        key = (spec, *resolve_clear_tiles(spec.grid, q_tile, kv_tile))
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return self._entries[key]
        pattern = clear_pattern(spec, q_tile=q_tile, kv_tile=kv_tile)
        with self._lock:
            self.builds += 1
            self._entries[key] = pattern
            while len(self._entries) > self.maxsize:
                self._entries.popitem(last=False)
        return pattern

    def __len__(self) -> int:
        return len(self._entries)


def clear_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    grid: Sequence[int],
    text_len: int,
    radius: int,
    down_factor: int = 1,
    spatial_weight: torch.Tensor | None = None,
    scale: float | None = None,
    proportional_attention: bool = False,
    backend: str | None = None,
    cache: ClearPatternCache | None = None,
    q_tile: Sequence[int] | None = None,
    kv_tile: Sequence[int] | None = None,
    query_positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """CLEAR attention on FLUX's joint sequence.

    Parameters:
        query, key, value: ``[B, H, T + h*w, D]``: ``text_len`` text tokens, then the image tokens row-major over
            ``grid = (h, w)`` (after qk-norm and RoPE, as FLUX computes them).
        grid: ``(h, w)`` image tokens.
        text_len: ``T``.
        radius: window radius ``r`` (strict ``dy**2 + dx**2 < r**2``).
        down_factor: ``d``; ``d > 1`` appends pooled keys/values (:func:`pool_image_tokens`) seen by image queries.
        spatial_weight: the layer's pooling weight (``d x d`` values), required when ``d > 1``.
        scale: softmax scale (default ``D ** -0.5``, or the proportional scale).
        proportional_attention: use :func:`proportional_scale` (the official high-resolution setting).

    Other Parameters:
        backend: block-sparse backend (``"reference"``, ``"flex"``, ``"triton"``; ``None``: automatic, see
            :func:`attnpack.kernels.block_sparse_attention`).
        cache: a :class:`ClearPatternCache` (patterns are rebuilt on every call without one).
        q_tile, kv_tile: 2-D tile shapes (default :func:`default_clear_tiles`).
        query_positions: ``int64 [n]`` sorted query indices: only these queries are computed (ring attention, where a
            rank owns a shard of the queries and holds every key); the result is then ``[B, H, n, D]``.

    Returns:
        ``[B, H, T + h*w, D]`` in the input dtype.
    """
    spec = ClearSpec(tuple(grid), text_len, radius, down_factor)
    if query.dim() != 4 or query.shape[2] != spec.num_queries or key.shape[2] != spec.num_queries:
        raise ValueError(
            f"query/key/value must be [B, H, T + h*w = {spec.num_queries}, D] for text_len={text_len}, "
            f"grid={spec.grid}; got query {tuple(query.shape)}, key {tuple(key.shape)}."
        )
    if scale is None and proportional_attention:
        scale = proportional_scale(spec.num_queries, query.shape[-1], down_factor)
    if down_factor > 1:
        if spatial_weight is None or spatial_weight.numel() != down_factor**2:
            got = None if spatial_weight is None else tuple(spatial_weight.shape)
            raise ValueError(
                f"`spatial_weight` must hold d x d = {down_factor**2} values for d={down_factor}, got {got}."
            )
        t = text_len
        key = torch.cat([key, pool_image_tokens(key[:, :, t:], spec.grid, down_factor, spatial_weight)], dim=2)
        value = torch.cat([value, pool_image_tokens(value[:, :, t:], spec.grid, down_factor, spatial_weight)], dim=2)
    pattern = (
        cache.get(spec, q_tile, kv_tile) if cache is not None else clear_pattern(spec, q_tile=q_tile, kv_tile=kv_tile)
    )
    if query_positions is None:
        return block_sparse_attention(query, key, value, pattern, scale=scale, backend=backend)
    query_positions = query_positions.to(query.device)
    pattern = pattern.to(query.device).for_queries(query_positions)
    out = block_sparse_attention(query, key, value, pattern, scale=scale, backend=backend)
    return out.index_select(2, query_positions)
