"""The GNA in-tile mask as a ``@triton.jit`` function for the fused block-sparse kernel.

Evaluated only on *partial* tiles. Parameters (``int32``, see :func:`attnpack.kernels.masks.neighborhood_params`):
``[N, ndim, n_0..n_2, k_0..k_2, s_0..s_2, d_0..d_2, causal_0..causal_2]`` with grids of fewer than 3 axes padded in
front by trivial axes (length 1, window 1). Keys ``>= N`` are additional keys, visible to every query.
"""

from __future__ import annotations

import triton
import triton.language as tl


__all__ = ["neighborhood_mask_triton"]


@triton.jit
def _axis_visible(qa, ka, n, k, s, d, causal):
    """Key coordinate ``ka`` ``[1, BN]`` is in the window of query coordinate ``qa`` ``[BM, 1]`` along one axis."""
    g = qa % d
    ii = qa // d
    ng = (n - g + d - 1) // d
    leader_c = tl.minimum((ii // s) * s + s - 1, ng - 1)
    start_c = tl.maximum(leader_c - k + 1, 0)
    end_c = ii + 1
    wl = k // 2
    wr = k // 2 + k % 2 - 1
    leader = tl.minimum((ii // s) * s + s // 2, ng - 1)
    centre = tl.minimum(tl.maximum(leader, wl), ng - 1 - wr)
    start = tl.where(causal != 0, start_c, centre - wl)
    end = tl.where(causal != 0, end_c, centre + wr + 1)
    jj = ka // d
    return ((ka % d) == g) & (jj >= start) & (jj < end)


@triton.jit
def neighborhood_mask_triton(b, h, q_idx, kv_idx, P):
    """GNA visibility of ``[BM, 1]`` query and ``[1, BN]`` key indices (original, row-major flattened)."""
    n_tokens = tl.load(P)
    n0 = tl.load(P + 2)
    n1 = tl.load(P + 3)
    n2 = tl.load(P + 4)
    q2 = q_idx % n2
    q1 = (q_idx // n2) % n1
    q0 = q_idx // (n1 * n2)
    k2 = kv_idx % n2
    k1 = (kv_idx // n2) % n1
    k0 = (kv_idx // (n1 * n2)) % n0
    ok = _axis_visible(q0, k0, n0, tl.load(P + 5), tl.load(P + 8), tl.load(P + 11), tl.load(P + 14))
    ok = ok & _axis_visible(q1, k1, n1, tl.load(P + 6), tl.load(P + 9), tl.load(P + 12), tl.load(P + 15))
    ok = ok & _axis_visible(q2, k2, n2, tl.load(P + 7), tl.load(P + 10), tl.load(P + 13), tl.load(P + 16))
    return ok | (kv_idx >= n_tokens)
