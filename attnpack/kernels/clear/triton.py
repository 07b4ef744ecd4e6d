"""The CLEAR in-tile mask for the block-sparse Triton kernel (see :class:`attnpack.kernels.block_sparse.TileMask`).

Same rule as :func:`attnpack.kernels.clear.clear_mask_mod`, in two forms: :func:`clear_mask_triton` on ``int32``
blocks ``q_idx [BLOCK_M, 1]`` and ``kv_idx [1, BLOCK_N]`` (indices are non-negative: the kernels clamp padding), and
the **tile-local** :func:`clear_tile_triton` the kernel uses with 2-D key boxes: query coordinates are computed once
per query block (:func:`clear_rows_triton`), the key tile's segment and origin are scalars decoded from its tile id,
and the in-tile key coordinates are compile-time functions of the position, so the per-pair work is a few integer
operations with no division. ``params`` (:func:`attnpack.kernels.clear.clear_mask_params`) = ``[T, W, T + H*W,
r**2, H, text key tiles, key tiles per image row, image key tiles, pooled keys]``.
"""

from __future__ import annotations

import triton
import triton.language as tl


__all__ = ["clear_mask_triton", "clear_rows_triton", "clear_tile_triton"]


@triton.jit
def clear_mask_triton(b, h, q_idx, kv_idx, params_ptr):
    t = tl.load(params_ptr + 0)
    w = tl.load(params_ptr + 1)
    end = tl.load(params_ptr + 2)
    r2 = tl.load(params_ptr + 3)
    # image coordinates (text indices give meaningless values, short-circuited below); indices >= 0, so floor
    # division equals truncation once the text offset is removed for image tokens
    qr = q_idx - t
    kr = kv_idx - t
    qy = qr // w
    qx = qr - qy * w
    ky = kr // w
    kx = kr - ky * w
    dy = qy - ky
    dx = qx - kx
    local = dy * dy + dx * dx < r2
    text_q = (q_idx < t) & (kv_idx < end)
    image_q = (q_idx >= t) & ((kv_idx < t) | (kv_idx >= end) | local)
    return text_q | image_q


@triton.jit
def clear_rows_triton(b, h, q_idx, P):
    """Per query block: ``(is_text, y, x)`` of every query row ``q_idx`` ``[BM, 1]`` (coordinates meaningless for
    text rows)."""
    t = tl.load(P + 0)
    w = tl.load(P + 1)
    qr = q_idx - t
    qy = qr // w
    return q_idx < t, qy, qr - qy * w


@triton.jit
def clear_tile_triton(b, h, rows, kt, offs, P, ARGS: tl.constexpr):
    """CLEAR visibility of key tile ``kt`` at in-tile positions ``offs`` ``[BN]``: text key tiles (1-D), then the
    image in ``ARGS = (rows, cols)`` boxes (row-major over boxes), then pooled key tiles (1-D); padding masked."""
    TY: tl.constexpr = ARGS[0]
    TX: tl.constexpr = ARGS[1]
    is_text_q, qy, qx = rows
    t = tl.load(P + 0)
    w = tl.load(P + 1)
    r2 = tl.load(P + 3)
    hh = tl.load(P + 4)
    text_tiles = tl.load(P + 5)
    per_row = tl.load(P + 6)
    image_tiles = tl.load(P + 7)
    it = kt - text_tiles
    # image key tile: origin (scalars) + compile-time in-tile coordinates
    oy = (it // per_row) * TY
    ox = (it % per_row) * TX
    cy = (offs // TX)[None, :]
    cx = (offs % TX)[None, :]
    dy = (qy - oy) - cy
    dx = (qx - ox) - cx
    inside = ((oy + cy) < hh) & ((ox + cx) < w)
    image = inside & ((dy * dy + dx * dx < r2) | is_text_q)
    # text and pooled key tiles (1-D): every query sees text keys, image queries see pooled keys
    text_ok = (kt * (TY * TX) + offs < t)[None, :]
    pooled_ok = ((it - image_tiles) * (TY * TX) + offs < tl.load(P + 8))[None, :] & (is_text_q == 0)
    other = tl.where(kt < text_tiles, text_ok, pooled_ok)
    return tl.where((kt >= text_tiles) & (it < image_tiles), image, other)
