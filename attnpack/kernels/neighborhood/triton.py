"""The GNA in-tile mask as ``@triton.jit`` functions for the fused block-sparse kernel.

Evaluated only on *partial* tiles, in two halves: :func:`neighborhood_rows_triton` computes each query row's window
once per query block (integer divisions by run-time sizes, the expensive part), and per key block either

- :func:`neighborhood_tile_triton` (what the kernel uses): **tile-local and separable**. The key tile's dilation group
  and origin along each axis are scalars decoded from its tile id; the in-tile coordinates of the ``BLOCK_N`` keys
  are compile-time functions of their position (tile shapes are constexpr powers of two: shifts and masks of a
  ``tl.arange``), so the per-pair work is two comparisons per axis against per-row bounds, with no division and no
  per-key index in registers (the earlier per-key divisions made the kernel spill: docs/benchmarks.md);
- or :func:`neighborhood_keys_triton`, the same rule on original key indices (kept for masks on other key orders).

Parameters (``int32``, see :func:`attnpack.kernels.neighborhood.windows.neighborhood_params`): ``[N, ndim, n_0..n_2, k_0..k_2,
s_0..s_2, d_0..d_2, causal_0..causal_2, R_0..R_2, num_extra]`` with grids of fewer than 3 axes padded in front by
trivial axes (length 1, window 1); ``R_a`` key tiles per axis and dilation group. Keys ``>= N`` (key tiles after the
grid's) are additional keys, visible to every query.
"""

from __future__ import annotations

import triton
import triton.language as tl


__all__ = [
    "neighborhood_keys_triton",
    "neighborhood_mask_triton",
    "neighborhood_rows_triton",
    "neighborhood_tile_triton",
]


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


@triton.jit
def _axis_keep(c, start, end, g, tile_g, origin):
    """In-tile coordinate ``c`` ``[1, BN]`` against the row windows ``[start, end)`` / group ``g`` ``[BM, 1]`` of a
    key tile in dilation group ``tile_g`` starting at group-local coordinate ``origin`` (scalars)."""
    lo = start - origin
    hi = tl.where(g == tile_g, end - origin, lo)  # another dilation group: empty
    return (c >= lo) & (c < hi)


@triton.jit
def neighborhood_tile_triton(b, h, rows, kt, offs, P, ARGS: tl.constexpr):
    """GNA visibility of key tile ``kt`` (a box of :func:`~attnpack.kernels.block_sparse.grid_order`, tile shape
    ``ARGS = (t_0, t_1, t_2)``, powers of two) at in-tile positions ``offs`` ``[BN]`` for the query windows ``rows``
    of :func:`neighborhood_rows_triton`; padding keys (outside the grid, or past the additional keys) are masked."""
    T0: tl.constexpr = ARGS[0]
    T1: tl.constexpr = ARGS[1]
    T2: tl.constexpr = ARGS[2]
    # in-tile coordinates: compile-time functions of the position (shifts and masks)
    c2 = (offs % T2)[None, :]
    c1 = ((offs // T2) % T1)[None, :]
    c0 = (offs // (T1 * T2))[None, :]
    # the tile: dilation group g_a and tile coordinate r_a per axis (tile id = g * prod(R) + r, both row-major)
    r_0 = tl.load(P + 17)
    r_1 = tl.load(P + 18)
    r_2 = tl.load(P + 19)
    d1 = tl.load(P + 12)
    d2 = tl.load(P + 13)
    n_r = r_0 * r_1 * r_2
    r = kt % n_r
    g = kt // n_r
    s0, e0, g0, s1, e1, g1, s2, e2, g2 = rows
    ok = _axis_keep(c0, s0, e0, g0, g // (d1 * d2), (r // (r_1 * r_2)) * T0)
    ok = ok & _axis_keep(c1, s1, e1, g1, (g // d2) % d1, ((r // r_2) % r_1) * T1)
    ok = ok & _axis_keep(c2, s2, e2, g2, g % d2, (r % r_2) * T2)
    # additional keys: the 1-D tiles after the grid's, visible to every query; their padding masked
    grid_tiles = n_r * tl.load(P + 11) * d1 * d2
    extra = ((kt - grid_tiles) * (T0 * T1 * T2) + offs < tl.load(P + 20))[None, :]
    return tl.where(kt >= grid_tiles, extra, ok)
