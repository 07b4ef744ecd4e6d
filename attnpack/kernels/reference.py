"""Brute-force oracles for tests: dense boolean masks and masked softmax attention.

Everything here builds an ``N x N`` mask: use it only on small problems. The kernels in this package are tested
against these functions, which transcribe the published definitions as literally as possible.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch


__all__ = ["masked_attention", "nbrs_1d", "neighborhood_mask", "pattern_mask"]


def masked_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    return_lse: bool = False,
):
    """Dense softmax attention in fp64 with a boolean mask (``True`` = attend).

    Args:
        query: ``[B, H, Nq, D]``; key ``[B, H, Nk, D]``; value ``[B, H, Nk, Dv]``.
        mask: bool, broadcastable to ``[B, H, Nq, Nk]``; rows without any visible key give zeros (LSE ``-inf``).

    Returns:
        ``[B, H, Nq, Dv]`` in fp64 (and the natural-log LSE ``[B, H, Nq]``).
    """
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.matmul(query.double(), key.double().transpose(-1, -2)) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - torch.where(torch.isfinite(lse), lse, 0.0)[..., None])
    out = torch.matmul(probs, value.double())
    return (out, lse) if return_lse else out


def nbrs_1d(i: int, n: int, k: int, s: int, d: int, causal: bool) -> list[int]:
    """The keys (axis positions) that query position ``i`` attends along one axis under GNA (NATTEN 0.21 semantics).

    A transcription of the rule in the GNA reference note (``fna_fusion.hpp`` ``get_win_start``/``get_win_end``):
    dilation groups ``i mod d``; stride groups sharing the window of their leader (the centre, or the last query when
    causal); non-causal windows shifted inward at the borders; even windows take ``k/2`` keys left, ``k/2 - 1`` right.
    """
    g = i % d
    ii = i // d
    ng = -(-(n - g) // d)
    if causal:
        leader = min((ii // s) * s + s - 1, ng - 1)
        start = max(leader - k + 1, 0)
        end = ii + 1
    else:
        wl = k // 2
        wr = k // 2 + (k % 2) - 1
        leader = min((ii // s) * s + s // 2, ng - 1)
        c = min(max(leader, wl), ng - 1 - wr)
        start, end = c - wl, c + wr + 1
    return [g + d * j for j in range(start, end)]


def neighborhood_mask(
    grid: Sequence[int],
    window: Sequence[int],
    stride: Sequence[int],
    dilation: Sequence[int],
    causal: Sequence[bool],
) -> torch.Tensor:
    """Dense GNA mask ``[N, N]`` (bool) over the row-major flattened ``grid``: the Cartesian product of
    :func:`nbrs_1d` along every axis."""
    grid = tuple(grid)
    n = math.prod(grid)
    per_axis = [
        [set(nbrs_1d(i, grid[a], window[a], stride[a], dilation[a], causal[a])) for i in range(grid[a])]
        for a in range(len(grid))
    ]
    coords = list(itertools.product(*[range(g) for g in grid]))
    mask = torch.zeros(n, n, dtype=torch.bool)
    for qi, qc in enumerate(coords):
        keys = itertools.product(*[sorted(per_axis[a][qc[a]]) for a in range(len(grid))])
        for kc in keys:
            mask[qi, int(sum(c * math.prod(grid[a + 1 :]) for a, c in enumerate(kc)))] = True
    return mask


def pattern_mask(pattern, batch: int = 1, heads: int = 1) -> torch.Tensor:
    """The dense ``[batch, heads, Nq, Nk]`` mask of a :class:`~attnpack.kernels.block_sparse.BlockSparsePattern`,
    evaluated pair by pair from its definition: query ``i`` sees key ``j`` iff the key's tile is listed for the
    query's tile and is full or ``mask_mod`` allows the pair (padding never appears: only real tokens are indexed).
    """
    qo, ko = pattern.q_order, pattern.kv_order
    visited, full = pattern.table.dense()  # [Bt, Ht, Tq, Tk]
    nq, nk = qo.num_tokens, ko.num_tokens
    mask = torch.zeros(batch, heads, nq, nk, dtype=torch.bool)
    q_inv, k_inv = qo.inverse().cpu(), ko.inverse().cpu()
    for b, h in itertools.product(range(batch), range(heads)):
        q_tile = q_inv[min(h, qo.num_heads - 1)] // qo.tile_size
        k_tile = k_inv[min(h, ko.num_heads - 1)] // ko.tile_size
        bt, ht = min(b, visited.shape[0] - 1), min(h, visited.shape[1] - 1)
        vis = visited[bt, ht].cpu()[q_tile][:, k_tile]
        ful = full[bt, ht].cpu()[q_tile][:, k_tile]
        if pattern.mask is not None:
            inside = pattern.mask.mask_mod(
                torch.tensor(b), torch.tensor(h), torch.arange(nq)[:, None], torch.arange(nk)[None, :]
            )
            vis = vis & (ful | inside)
        mask[b, h] = vis
    return mask
