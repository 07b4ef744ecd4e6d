"""PARO axis orders: per-head permutations of a row-major ``(F, H, W)`` (or ``(H, W)``) token grid.

Paper: Zhao et al., "PAROAttention: Pattern-Aware ReOrdering for Efficient Sparse and Quantized Attention in Visual
Generation Models", https://arxiv.org/abs/2506.16054. Each attention head picks one order in which the grid axes are
flattened (slowest axis first); a head whose attention is local along, say, the ``F`` axis becomes block-wise once
``F`` is the fastest axis. Order indices follow the official code: ``0 FHW, 1 FWH, 2 HWF, 3 HFW, 4 WHF, 5 WFH`` for
videos and ``0 HW, 1 WH`` for images. Index 0 is the identity (diffusers' token order).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..block_sparse import TokenOrder, concat_orders, flat_order, grid_order, stack_orders


__all__ = [
    "AXIS_ORDER_NAMES",
    "axis_order_names",
    "axis_order",
    "inverse_axis_order",
    "permute_grid",
    "unpermute_grid",
    "paro_token_order",
    "TILINGS",
]

# how blocks tile a [text, grid] sequence: "padded" (text padded to whole blocks, the grid starts a new block;
# attnpack's calibration) or "joint" (blocks run over the raw joint sequence, as the official PAROAtten code does)
TILINGS = ("padded", "joint")

# official indices (permute_plan['permute'] in jamescsq47/PAROAtten); letters name grid axes slowest first
AXIS_ORDER_NAMES: dict[int, tuple[str, ...]] = {
    3: ("FHW", "FWH", "HWF", "HFW", "WHF", "WFH"),
    2: ("HW", "WH"),
}
_AXES = {3: "FHW", 2: "HW"}


def axis_order_names(ndim: int) -> tuple[str, ...]:
    """The candidate order names for a grid of ``ndim`` axes (6 for videos, 2 for images)."""
    if ndim not in AXIS_ORDER_NAMES:
        raise ValueError(f"PARO reorders 2-D (H, W) or 3-D (F, H, W) token grids, got a grid with {ndim} axes.")
    return AXIS_ORDER_NAMES[ndim]


def axis_order(order: int | str, ndim: int) -> tuple[int, ...]:
    """The axis permutation (slowest axis first) of an order given by index or name, e.g. ``"HWF"`` -> ``(1, 2, 0)``."""
    names = axis_order_names(ndim)
    if isinstance(order, str):
        if order.upper() not in names:
            raise ValueError(f"`order` must be one of {', '.join(names)} for a {ndim}-D grid, got {order!r}.")
        name = order.upper()
    else:
        if isinstance(order, bool) or not 0 <= int(order) < len(names):
            raise ValueError(f"`order` must be an index in [0, {len(names)}) for a {ndim}-D grid, got {order!r}.")
        name = names[int(order)]
    return tuple(_AXES[ndim].index(c) for c in name)


def inverse_axis_order(axes: Sequence[int]) -> tuple[int, ...]:
    """The permutation undoing ``axes``: ``HWF = (1, 2, 0)`` -> ``(2, 0, 1)``."""
    inv = [0] * len(axes)
    for i, a in enumerate(axes):
        inv[a] = i
    return tuple(inv)


def _check_grid(x: torch.Tensor, grid: Sequence[int], dim: int) -> int:
    dim = dim % x.dim()
    n = 1
    for g in grid:
        n *= g
    if x.shape[dim] != n:
        raise ValueError(f"dimension {dim} of a tensor of shape {tuple(x.shape)} must hold prod({tuple(grid)}) = {n}.")
    return dim


def permute_grid(x: torch.Tensor, grid: Sequence[int], order: int | str, dim: int = -2) -> torch.Tensor:
    """Reorder the tokens along ``dim`` (row-major over ``grid``) so that they are flattened in ``order``.

    ``x``: ``[..., N, ...]`` with ``N = prod(grid)`` at ``dim`` (default ``-2``: ``[B, H, N, D]``). Exact (a pure
    index permutation); :func:`unpermute_grid` inverts it.
    """
    dim = _check_grid(x, grid, dim)
    axes = axis_order(order, len(grid))
    y = x.unflatten(dim, tuple(grid))
    perm = list(range(dim)) + [dim + a for a in axes] + list(range(dim + len(grid), y.dim()))
    return y.permute(perm).flatten(dim, dim + len(grid) - 1)


def unpermute_grid(y: torch.Tensor, grid: Sequence[int], order: int | str, dim: int = -2) -> torch.Tensor:
    """Inverse of :func:`permute_grid`: tokens flattened in ``order`` back to row-major ``grid`` order."""
    dim = _check_grid(y, grid, dim)
    axes = axis_order(order, len(grid))
    x = y.unflatten(dim, tuple(grid[a] for a in axes))
    inv = inverse_axis_order(axes)
    perm = list(range(dim)) + [dim + a for a in inv] + list(range(dim + len(grid), x.dim()))
    return x.permute(perm).flatten(dim, dim + len(grid) - 1)


def paro_token_order(
    grid: Sequence[int],
    orders: Sequence[int] | torch.Tensor,
    block_size: int,
    *,
    text_len: int = 0,
    text_first: bool = True,
    tiling: str = "padded",
    device: torch.device | str | None = None,
) -> TokenOrder:
    """The block-sparse :class:`~attnpack.kernels.block_sparse.TokenOrder` of one PARO layer.

    Args:
        grid: the image / video token grid, ``(H, W)`` or ``(F, H, W)``, row-major in the caller's sequence.
        orders: one order index per head (``[H]``); a single entry is shared by all heads.
        block_size: tokens per block (64 in the paper).
        text_len: text tokens joined with the grid tokens in the same attention (CogVideoX 226, FLUX 512, Wan 0).
        text_first: text precedes the grid (CogVideoX, FLUX); ``False``: it follows.
        tiling: ``"padded"``: text tokens keep their order and fill their own blocks (the last one padded), the
            grid starts a new block. ``"joint"`` (the official PAROAtten code's): blocks run over the raw sequence
            ``[text, reordered grid]``, so the last text block also holds the first grid tokens (CogVideoX: block 3
            holds 34 text and 30 grid tokens) and only the sequence's last block is padded; needs the text first.
    """
    if tiling not in TILINGS:
        raise ValueError(f"`tiling` must be one of {', '.join(TILINGS)}, got {tiling!r}.")
    orders = [int(o) for o in (orders.tolist() if isinstance(orders, torch.Tensor) else orders)]
    if not orders:
        raise ValueError("`orders` needs at least one entry.")
    if tiling == "joint":
        if text_len > 0 and not text_first:
            raise ValueError("`tiling='joint'` needs the text tokens before the grid (text_first=True).")
        text_len = max(text_len, 0)
        n = text_len + math.prod(grid)
        p = -(-n // block_size) * block_size
        rows = {}
        for o in set(orders):
            flat = grid_order(grid, 1, axis_order=axis_order(o, len(grid))).index[0]
            rows[o] = torch.cat([torch.arange(text_len, dtype=torch.int32), flat + text_len,
                                 torch.full((p - n,), -1, dtype=torch.int32)])  # fmt: skip
        index = torch.stack([rows[o] for o in orders]) if len(rows) > 1 else rows[orders[0]][None]
        return TokenOrder(index.to(device), block_size, n)
    unique = {o: grid_order(grid, block_size, axis_order=axis_order(o, len(grid)), device=device) for o in set(orders)}
    image = unique[orders[0]] if len(unique) == 1 else stack_orders([unique[o] for o in orders])
    if text_len <= 0:
        return image
    text = flat_order(text_len, block_size, device=device)
    return concat_orders(text, image) if text_first else concat_orders(image, text)
