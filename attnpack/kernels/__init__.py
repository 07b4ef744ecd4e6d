"""Attention math with no diffusers knowledge: pure-PyTorch references, masks, FlexAttention and Triton kernels.

- :func:`block_sparse_attention` -- the shared block-sparse entry point (token orders, tile tables, in-tile masks);
  see :mod:`attnpack.kernels.block_sparse`.
- :func:`neighborhood_attention` -- generalized neighborhood attention (NATTEN semantics); see
  :mod:`attnpack.kernels.neighborhood` and :mod:`attnpack.kernels.neighborhood.windows`.
- ``naive.py`` in each op folder -- brute-force dense oracles for tests.
"""

from .block_sparse import (
    BlockSparsePattern,
    TileMask,
    TileTable,
    TokenOrder,
    block_sparse_attention,
    concat_orders,
    flat_order,
    grid_order,
    segment_tile_masks,
    stack_orders,
    tile_table_from_dense,
    tile_table_from_mask,
)
from .neighborhood import neighborhood_attention


__all__ = [
    "BlockSparsePattern",
    "TileMask",
    "TileTable",
    "TokenOrder",
    "block_sparse_attention",
    "concat_orders",
    "flat_order",
    "grid_order",
    "neighborhood_attention",
    "segment_tile_masks",
    "stack_orders",
    "tile_table_from_dense",
    "tile_table_from_mask",
]
