"""PARO kernels: per-head axis reordering, calibration statistics and quantized block-sparse attention.

Paper: Zhao et al., "PAROAttention: Pattern-Aware ReOrdering for Efficient Sparse and Quantized Attention in Visual
Generation Models", NeurIPS 2025, https://arxiv.org/abs/2506.16054.

- :mod:`.orders` -- the 6 axis orders of an ``(F, H, W)`` grid (2 for ``(H, W)``), exact permutations and inverses,
  and :func:`paro_token_order`, the block-sparse token order of a layer (text blocks + per-head reordered grid).
- :mod:`.stats` -- block statistics of the attention map without materialising it, the order-selection metric
  (with the paper's sign slip fixed) and nested static block masks.
- :mod:`.quant` -- the quantized attention's exact semantics as a pure-PyTorch reference (INT8 QK^T with per-tile
  scales and K smoothing, INT8 / FP8 / INT4 PV with FP32 accumulation).
- :mod:`.triton` -- the Triton kernel of the same computation.

The quantized attention is reached through the shared entry point
:func:`attnpack.kernels.block_sparse.block_sparse_attention` with ``backend="paro_quant_triton"`` (or
``"paro_quant_reference"``) and ``backend_options={"quant": "int8" | "fp8" | "int4"}``; unquantized PARO attention
uses the shared block-sparse backends.
"""

from __future__ import annotations

from ..block_sparse import BlockSparseBackend, block_sparse_backends, register_block_sparse_backend
from .metrics import fidelity
from .orders import (
    AXIS_ORDER_NAMES,
    TILINGS,
    axis_order,
    axis_order_names,
    inverse_axis_order,
    paro_token_order,
    permute_grid,
    unpermute_grid,
)
from .planted import planted_qkv
from .quant import QUANT_MODES, QuantSpec, quant_spec, quantized_reference
from .stats import (
    DEFAULT_SIGMA,
    MASK_RULES,
    BlockStatistics,
    OrderSearch,
    block_statistics,
    combined_scores,
    forced_blocks,
    mask_from_codes,
    order_metrics,
    select_block_masks,
    select_orders,
)
from .triton import quantized_triton, triton_unusable


__all__ = [
    "AXIS_ORDER_NAMES",
    "BlockStatistics",
    "DEFAULT_SIGMA",
    "MASK_RULES",
    "OrderSearch",
    "QUANT_MODES",
    "QUANT_BACKENDS",
    "QuantSpec",
    "TILINGS",
    "axis_order",
    "axis_order_names",
    "block_statistics",
    "combined_scores",
    "fidelity",
    "forced_blocks",
    "inverse_axis_order",
    "mask_from_codes",
    "order_metrics",
    "paro_token_order",
    "permute_grid",
    "planted_qkv",
    "quant_spec",
    "quantized_reference",
    "quantized_triton",
    "select_block_masks",
    "select_orders",
    "unpermute_grid",
]

QUANT_BACKENDS = ("paro_quant_triton", "paro_quant_reference")


def _reference_unusable(query, key, value, pattern, needs_grad) -> str | None:
    if pattern.mask is not None:
        return "the quantized PARO attention supports block-wise patterns only (no in-tile mask)"
    return None


def _triton_unusable(query, key, value, pattern, needs_grad) -> str | None:
    return triton_unusable(query, key, value, pattern, needs_grad)


if "paro_quant_reference" not in block_sparse_backends():
    # only used when named: the automatic choice never quantizes
    register_block_sparse_backend(
        BlockSparseBackend("paro_quant_reference", quantized_reference, _reference_unusable, None, None)
    )
    register_block_sparse_backend(BlockSparseBackend("paro_quant_triton", quantized_triton, _triton_unusable, None))
