"""Brute-force oracles for tests of neighborhood attention: the published GNA windows transcribed literally, as
per-axis neighbour lists and a dense ``N x N`` mask (small problems only)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch


__all__ = ["nbrs_1d", "neighborhood_mask"]


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
