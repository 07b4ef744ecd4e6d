"""The CLEAR in-tile mask for the block-sparse Triton kernel (see :class:`attnpack.kernels.block_sparse.TileMask`).

Same rule as :func:`attnpack.kernels.clear.clear_mask_mod`, on ``int32`` blocks ``q_idx [BLOCK_M, 1]`` and
``kv_idx [1, BLOCK_N]``; ``params`` = ``[T, W, T + H*W, r**2]`` (:func:`attnpack.kernels.clear.clear_mask_params`).
Indices are non-negative (the kernels clamp padding before calling it).
"""

from __future__ import annotations

import triton
import triton.language as tl


__all__ = ["clear_mask_triton"]


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
