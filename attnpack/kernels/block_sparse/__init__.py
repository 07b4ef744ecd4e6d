"""Block-sparse attention: one entry point shared by GNA, CLEAR and PARO.

``block_sparse_attention(query, key, value, pattern)`` computes softmax attention restricted to a
:class:`BlockSparsePattern`: tokens are put in tile-major order (each tile a contiguous run of tokens: an N-D box of a
token grid, a text span, ...), every query tile visits only the key tiles its :class:`TileTable` lists, *full* tiles
are computed without any mask, and *partial* tiles evaluate an in-tile :class:`TileMask` on original token indices.

Building a pattern::

    from attnpack.kernels.block_sparse import (
        BlockSparsePattern, TileMask, concat_orders, dense_tile_masks, flat_order, grid_order,
        segment_tile_masks, tile_table_from_dense,
    )

    # queries: 512 text tokens then a 64x64 image; keys: the same
    q_order = kv_order = concat_orders(flat_order(512, 128), grid_order((64, 64), (16, 8)))
    # in-tile rule on original indices (text sees all, all see text, image: |dy|, |dx| <= 8)
    def mask_mod(b, h, q, kv):
        qy, qx, ky, kx = (q - 512) // 64, (q - 512) % 64, (kv - 512) // 64, (kv - 512) % 64
        local = ((qy - ky).abs() <= 8) & ((qx - kx).abs() <= 8)
        return (q < 512) | (kv < 512) | local
    image = grid_order((64, 64), (16, 8))
    local = dense_tile_masks(image, image, lambda b, h, q, kv: mask_mod(b, h, q + 512, kv + 512))
    visited, full = segment_tile_masks(q_order, kv_order, {(0, 0): "all", (0, 1): "all", (1, 0): "all", (1, 1): local})
    pattern = BlockSparsePattern(tile_table_from_dense(visited, full), q_order, kv_order, TileMask(mask_mod))
    out = block_sparse_attention(q, k, v, pattern)  # q, k, v: [B, H, 512 + 4096, D], caller's order

Backends (``backend=``): ``"reference"`` (pure PyTorch, any device, differentiable, memory bounded by the visited
tiles), ``"flex"`` (FlexAttention with a ``BlockMask`` built from the table; compiled on CUDA; backward on CUDA) and
``"triton"`` (fused forward kernel; CUDA, or the Triton interpreter with ``TRITON_INTERPRET=1``). ``None`` picks the
fastest that works: Triton on CUDA for forward-only calls whose mask has a Triton version, else flex on CUDA, else
the reference; the choice is logged at DEBUG. More backends (e.g. quantized kernels) plug in with
:func:`register_block_sparse_backend`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

import torch

from .._checks import check_qkv
from .flex import _should_compile, block_sparse_flex, flex_available, flex_block_mask
from .pattern import (
    BlockSparsePattern,
    TileMask,
    TileTable,
    TokenOrder,
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
from .reference import block_sparse_reference


logger = logging.getLogger(__name__)

__all__ = [
    "block_sparse_attention",
    "BlockSparsePattern",
    "TileMask",
    "TileTable",
    "TokenOrder",
    "BlockSparseBackend",
    "register_block_sparse_backend",
    "block_sparse_backends",
    "concat_orders",
    "dense_tile_masks",
    "flat_order",
    "grid_order",
    "grid_tile_index",
    "segment_tile_masks",
    "stack_orders",
    "tile_coordinate_bounds",
    "tile_table_from_dense",
    "tile_table_from_mask",
    "flex_block_mask",
]


@dataclasses.dataclass(frozen=True)
class BlockSparseBackend:
    """A block-sparse attention implementation.

    Attributes:
        name: the ``backend=`` value selecting it.
        run: ``run(query, key, value, pattern, *, scale, return_lse, **options)`` -> output (and LSE), with the
            semantics of :func:`block_sparse_attention` (inputs already checked, pattern on the inputs' device).
        unusable: ``unusable(query, key, value, pattern, needs_grad) -> str | None``: why it cannot run this call
            (``None``: it can).
        priority: order of the automatic choice (lower first); ``None``: only used when named explicitly.
        auto_devices: device types on which the automatic choice considers it (``None``: all).
    """

    name: str
    run: Callable[..., torch.Tensor | tuple[torch.Tensor, torch.Tensor]]
    unusable: Callable[..., str | None]
    priority: int | None = None
    auto_devices: tuple[str, ...] | None = ("cuda",)


_BACKENDS: dict[str, BlockSparseBackend] = {}


def register_block_sparse_backend(backend: BlockSparseBackend, *, replace: bool = False) -> BlockSparseBackend:
    """Add a backend (e.g. a quantized kernel) selectable with ``backend=<name>``."""
    if backend.name in _BACKENDS and not replace:
        raise ValueError(f"a block-sparse backend named {backend.name!r} is already registered.")
    _BACKENDS[backend.name] = backend
    return backend


def block_sparse_backends() -> dict[str, BlockSparseBackend]:
    """The registered backends by name."""
    return dict(_BACKENDS)


def _reference_unusable(query, key, value, pattern, needs_grad) -> str | None:
    return None


def _flex_unusable(query, key, value, pattern, needs_grad) -> str | None:
    if not flex_available():
        return "torch.nn.attention.flex_attention is not available in this PyTorch"
    if needs_grad and query.device.type != "cuda":
        return "FlexAttention has no backward pass on CPU; use backend='reference' for gradients"
    if query.device.type == "cuda" and _should_compile(query.device):
        # the compiled kernel's blocks divide the tiles, and its tl.dot needs reduction dims >= 16 (seen on an H200:
        # 4-token PARO tiles failed to compile); the reference backend serves such calls
        k_block = pattern.kv_tile & -pattern.kv_tile  # largest power of two dividing the key tiles
        if query.shape[-1] < 16 or k_block < 16:
            return (
                f"compiled FlexAttention needs head_dim >= 16 and key tiles divisible by 16, got head_dim "
                f"{query.shape[-1]} and {pattern.kv_tile}-token tiles"
            )
    return None


register_block_sparse_backend(BlockSparseBackend("reference", block_sparse_reference, _reference_unusable, 30, None))
# eager FlexAttention (CPU) evaluates the mask on all N x N pairs: only chosen automatically on CUDA
register_block_sparse_backend(BlockSparseBackend("flex", block_sparse_flex, _flex_unusable, 20, ("cuda",)))

try:
    from .triton import block_sparse_triton, triton_unusable
except ImportError:  # triton is an optional dependency (attnpack[triton])

    def _no_triton(*args, **kwargs) -> str:
        return "triton is not installed; `pip install attnpack[triton]`"

    register_block_sparse_backend(BlockSparseBackend("triton", _no_triton, _no_triton, None))
else:
    register_block_sparse_backend(BlockSparseBackend("triton", block_sparse_triton, triton_unusable, 10, ("cuda",)))


def _check_inputs(query, key, value, pattern: BlockSparsePattern) -> None:
    check_qkv(query, key, value)
    b, h, nq, _ = query.shape
    if nq != pattern.num_queries or key.shape[2] != pattern.num_keys:
        raise ValueError(
            f"`pattern` is for {pattern.num_queries} queries and {pattern.num_keys} keys, got query with {nq} and "
            f"key with {key.shape[2]} tokens."
        )
    tb, th = pattern.table.kv_tiles.shape[:2]
    if tb not in (1, b) or th not in (1, h):
        raise ValueError(f"the tile table is for batch {tb} and {th} heads; inputs have batch {b} and {h} heads.")
    for name, order in (("q_order", pattern.q_order), ("kv_order", pattern.kv_order)):
        if order.num_heads not in (1, h):
            raise ValueError(f"`pattern.{name}` has {order.num_heads} per-head orders; inputs have {h} heads.")


def choose_backend(query, key, value, pattern, needs_grad: bool) -> tuple[str, list[str]]:
    """The automatic choice and the reasons the faster backends were skipped."""
    skipped = []
    for backend in sorted((b for b in _BACKENDS.values() if b.priority is not None), key=lambda b: b.priority):
        if backend.auto_devices is not None and query.device.type not in backend.auto_devices:
            skipped.append(f"{backend.name}: not chosen automatically on {query.device.type}")
            continue
        reason = backend.unusable(query, key, value, pattern, needs_grad)
        if reason is None:
            if backend.name == "reference" and query.device.type == "cuda":
                skipped.append("reference: slow on GPU, used as a last resort")
            return backend.name, skipped
        skipped.append(f"{backend.name}: {reason}")
    raise RuntimeError("no block-sparse backend can run this call: " + "; ".join(skipped))


def block_sparse_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    pattern: BlockSparsePattern,
    *,
    scale: float | None = None,
    backend: str | None = None,
    return_lse: bool = False,
    backend_options: dict | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention restricted to a block-sparse pattern.

    Args:
        query: ``[B, H, Nq, D]`` in the caller's token order, ``Nq = pattern.num_queries``.
        key: ``[B, H, Nk, D]``, ``Nk = pattern.num_keys``.
        value: ``[B, H, Nk, Dv]``.
        pattern: a :class:`BlockSparsePattern`. Query ``i`` attends key ``j`` iff, with ``p``/``r`` their tile-major
            positions in ``pattern.q_order``/``pattern.kv_order`` (head ``h``), key tile ``r // kv_tile`` is listed
            for (batch ``b``, head ``h``, query tile ``p // q_tile``) in ``pattern.table`` and either it is one of the
            first ``num_full`` entries (full) or ``pattern.mask.mask_mod(b, h, i, j)`` is true (no mask: true).
            Moved to the inputs' device automatically (cached).
        scale: softmax scale; default ``D ** -0.5``.
        backend: ``"reference"``, ``"flex"``, ``"triton"`` or a registered name; ``None`` chooses (see module doc).
        return_lse: also return the log-sum-exp ``[B, H, Nq]`` (fp32, natural log) for merging partial attentions.
        backend_options: extra keyword arguments for the chosen backend's ``run``.

    Returns:
        ``[B, H, Nq, Dv]`` in the input dtype; a query that sees no key gets zeros (and LSE ``-inf``).
    """
    _check_inputs(query, key, value, pattern)
    pattern = pattern.to(query.device)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    if backend is None:
        name, skipped = choose_backend(query, key, value, pattern, needs_grad)
        logger.debug(
            "block_sparse_attention: backend not set; picked %r for %r%s",
            name,
            pattern,
            f" (skipped {'; '.join(skipped)})" if skipped else "",
        )
    else:
        if backend not in _BACKENDS:
            raise ValueError(f"`backend` must be one of {', '.join(map(repr, _BACKENDS))} or None, got {backend!r}.")
        reason = _BACKENDS[backend].unusable(query, key, value, pattern, needs_grad)
        if reason is not None:
            raise ValueError(f"backend={backend!r} cannot run this call: {reason}.")
        name = backend
    return _BACKENDS[name].run(
        query, key, value, pattern, scale=scale, return_lse=return_lse, **(backend_options or {})
    )
