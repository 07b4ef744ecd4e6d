"""Block-sparse attention through PyTorch FlexAttention.

The tile table becomes a FlexAttention ``BlockMask`` (full tiles -> ``full_kv_*``, partial tiles -> ``kv_*``) over
the tile-major sequences; its ``mask_mod`` maps tile-major positions back to original token indices, masks padding
and calls the pattern's in-tile mask. Inputs are permuted to tile-major order before the call and the output is
permuted back.

FlexAttention is compiled with ``torch.compile`` on CUDA (set ``ATTNPACK_FLEX_COMPILE=0`` to run it eagerly) and runs
eagerly elsewhere; on CPU it is forward-only and its eager path evaluates the mask densely (small problems only).
Backward works on CUDA.
"""

from __future__ import annotations

import functools
import logging
import os

import torch

from .pattern import BlockSparsePattern


logger = logging.getLogger(__name__)

__all__ = ["block_sparse_flex", "flex_block_mask", "flex_available"]


def flex_available() -> bool:
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def _should_compile(device: torch.device) -> bool:
    env = os.environ.get("ATTNPACK_FLEX_COMPILE")
    if env is not None:
        return env.strip().lower() in ("1", "true", "yes", "on")
    return device.type == "cuda"


@functools.cache
def _flex_fn(compiled: bool):
    from torch.nn.attention.flex_attention import flex_attention

    if compiled:
        return torch.compile(flex_attention, dynamic=False)
    return flex_attention


def _largest_pow2_divisor(n: int, cap: int) -> int:
    p = 1
    while p * 2 <= cap and n % (p * 2) == 0:
        p *= 2
    return p


def flex_block_mask(pattern: BlockSparsePattern, batch: int, heads: int, *, compiled: bool = True):
    """The FlexAttention ``BlockMask`` of ``pattern`` (cached on the pattern per batch size and head count).

    Compiled FlexAttention visits only the listed tiles and skips ``mask_mod`` on full ones. Eager FlexAttention
    evaluates ``mask_mod`` on every pair and ignores the block structure, so for ``compiled=False`` the ``mask_mod``
    also looks the pair's tiles up in the table.
    """
    key = ("flex_block_mask", batch, heads, compiled)
    if key in pattern._cache:
        return pattern._cache[key]
    from torch.nn.attention.flex_attention import BlockMask

    table = pattern.table
    tk = table.num_kv_tiles
    kk = table.max_kv
    device = table.kv_tiles.device
    full_idx = table.kv_tiles
    # partial tiles: shift each row left by num_full so the partial entries come first
    shift = torch.arange(kk, device=device) + table.num_full[..., None].long()
    partial_idx = torch.gather(table.kv_tiles, 3, shift.clamp(max=kk - 1))
    pad = max(tk - kk, 0)

    def padded(x):
        return torch.nn.functional.pad(x, (0, pad)).contiguous() if pad else x.contiguous()

    q_index = pattern.q_order.index
    kv_index = pattern.kv_order.index
    inner = pattern.mask.mask_mod if pattern.mask is not None else None
    per_head_q = q_index.shape[0] > 1
    per_head_kv = kv_index.shape[0] > 1

    def in_tile(b, h, q_idx, kv_idx):
        oq = q_index[h, q_idx] if per_head_q else q_index[0, q_idx]
        ok = kv_index[h, kv_idx] if per_head_kv else kv_index[0, kv_idx]
        valid = ok >= 0
        if inner is None:
            return valid
        return valid & inner(b, h, oq.clamp(min=0), ok.clamp(min=0))

    mask_mod = in_tile
    if not compiled:
        visited, full = table.dense()
        per_b, per_h = visited.shape[0] > 1, visited.shape[1] > 1
        q_tile, kv_tile = pattern.q_tile, pattern.kv_tile

        def mask_mod(b, h, q_idx, kv_idx):
            bb = b if per_b else 0
            hh = h if per_h else 0
            qt, kt = q_idx // q_tile, kv_idx // kv_tile
            return visited[bb, hh, qt, kt] & (full[bb, hh, qt, kt] | in_tile(b, h, q_idx, kv_idx))

    block_mask = BlockMask.from_kv_blocks(
        (table.num_kv - table.num_full).contiguous(),
        padded(partial_idx),
        table.num_full.contiguous(),
        padded(full_idx),
        BLOCK_SIZE=(pattern.q_tile, pattern.kv_tile),
        mask_mod=mask_mod,
        seq_lengths=(pattern.q_order.num_positions, pattern.kv_order.num_positions),
    )
    pattern._cache[key] = block_mask
    return block_mask


def block_sparse_flex(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    pattern: BlockSparsePattern,
    *,
    scale: float | None = None,
    return_lse: bool = False,
):
    """Block-sparse attention with FlexAttention (see :func:`attnpack.kernels.block_sparse_attention`)."""
    bsz, heads = query.shape[:2]
    compiled = _should_compile(query.device)
    block_mask = flex_block_mask(pattern, bsz, heads, compiled=compiled)
    qp = pattern.q_order.permute(query)
    kp = pattern.kv_order.permute(key)
    vp = pattern.kv_order.permute(value)
    kernel_options = None
    if query.device.type == "cuda":
        # FlexAttention's kernel blocks must divide the sparse tiles
        kernel_options = {
            "BLOCK_M": _largest_pow2_divisor(pattern.q_tile, 128),
            "BLOCK_N": _largest_pow2_divisor(pattern.kv_tile, 64),
        }
    fn = _flex_fn(compiled)
    result = fn(qp, kp, vp, block_mask=block_mask, scale=scale, return_lse=return_lse, kernel_options=kernel_options)
    if return_lse:
        out, lse = result
        return pattern.q_order.unpermute(out), pattern.q_order.unpermute(lse.float())
    return pattern.q_order.unpermute(result)
