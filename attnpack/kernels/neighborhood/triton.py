"""The GNA in-tile mask as a ``@triton.jit`` function for the fused block-sparse kernel.

Evaluated only on *partial* tiles, in two halves: :func:`neighborhood_rows_triton` computes each query row's window
once per query block (integer divisions by run-time sizes, the expensive part) and :func:`neighborhood_keys_triton`
compares key coordinates against it per key block. Parameters (``int32``, see
:func:`attnpack.kernels.masks.neighborhood_params`): ``[N, ndim, n_0..n_2, k_0..k_2, s_0..s_2, d_0..d_2,
causal_0..causal_2]`` with grids of fewer than 3 axes padded in front by trivial axes (length 1, window 1). Keys
``>= N`` are additional keys, visible to every query.
"""

from __future__ import annotations

import triton
import triton.language as tl


__all__ = ["neighborhood_keys_triton", "neighborhood_mask_triton", "neighborhood_rows_triton"]


@triton.jit
def _axis_window(qa, n, k, s, d, causal):
    """Window of query coordinate ``qa`` ``[BM, 1]`` along one axis: ``(start, end, group)`` in dilation-group
    coordinates (a key ``ka`` is visible iff ``ka % d == group`` and ``start <= ka // d < end``)."""
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
    return start, end, g


@triton.jit
def _in_window(ka, start, end, g, d):
    jj = ka // d
    return ((ka % d) == g) & (jj >= start) & (jj < end)


@triton.jit
def neighborhood_rows_triton(b, h, q_idx, P):
    """Per query block (called once, outside the key loop): the window of every query row ``q_idx`` ``[BM, 1]``
    along the three (padded) axes, as a tuple of ``[BM, 1]`` blocks for :func:`neighborhood_keys_triton`."""
    n1 = tl.load(P + 3)
    n2 = tl.load(P + 4)
    q2 = q_idx % n2
    q1 = (q_idx // n2) % n1
    q0 = q_idx // (n1 * n2)
    s0, e0, g0 = _axis_window(q0, tl.load(P + 2), tl.load(P + 5), tl.load(P + 8), tl.load(P + 11), tl.load(P + 14))
    s1, e1, g1 = _axis_window(q1, n1, tl.load(P + 6), tl.load(P + 9), tl.load(P + 12), tl.load(P + 15))
    s2, e2, g2 = _axis_window(q2, n2, tl.load(P + 7), tl.load(P + 10), tl.load(P + 13), tl.load(P + 16))
    return s0, e0, g0, s1, e1, g1, s2, e2, g2


@triton.jit
def neighborhood_keys_triton(b, h, rows, kv_idx, P):
    """GNA visibility of key indices ``kv_idx`` ``[1, BN]`` (original, row-major flattened) for the query windows
    ``rows`` computed by :func:`neighborhood_rows_triton`."""
    n_tokens = tl.load(P)
    n0 = tl.load(P + 2)
    n1 = tl.load(P + 3)
    n2 = tl.load(P + 4)
    k2 = kv_idx % n2
    k1 = (kv_idx // n2) % n1
    k0 = (kv_idx // (n1 * n2)) % n0
    s0, e0, g0, s1, e1, g1, s2, e2, g2 = rows
    ok = _in_window(k0, s0, e0, g0, tl.load(P + 11))
    ok = ok & _in_window(k1, s1, e1, g1, tl.load(P + 12))
    ok = ok & _in_window(k2, s2, e2, g2, tl.load(P + 13))
    return ok | (kv_idx >= n_tokens)


@triton.jit
def neighborhood_mask_triton(b, h, q_idx, kv_idx, P):
    """GNA visibility of ``[BM, 1]`` query and ``[1, BN]`` key indices in one call (both halves above)."""
    return neighborhood_keys_triton(b, h, neighborhood_rows_triton(b, h, q_idx, P), kv_idx, P)
