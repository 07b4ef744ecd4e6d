"""Synthetic attention inputs with planted PARO structure, for validation, figures and fidelity tables.

Every head gets queries and keys from one smooth Gaussian random field on the token grid (random Fourier features),
with a per-axis correlation length: short along the slowest axis of the head's planted order, medium along the middle
one, long along the fastest. Attention then stays within a few slices of the slow axis and spreads along the fast
one, i.e. it is local along the planted axis order and becomes block-diagonal once tokens are flattened in that order.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .orders import axis_order


__all__ = ["planted_qkv"]


def planted_qkv(
    grid: Sequence[int],
    orders: Sequence[int],
    *,
    head_dim: int = 64,
    batch: int = 1,
    lengths: Sequence[float] = (0.35, 1.2, 6.0),
    sharpness: float = 14.0,
    noise: float = 0.05,
    text_len: int = 0,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Queries, keys and values ``[batch, H, text_len + prod(grid), head_dim]`` with locality planted per head.

    Args:
        grid: ``(F, H, W)`` or ``(H, W)`` token grid, row-major in the sequence.
        orders: planted order index of every head (``H = len(orders)``), e.g. ``[0, 2, 5]``.
        head_dim: feature width (random Fourier features of the field).
        batch: batch size (fields differ per batch row).
        lengths: correlation lengths (in tokens) along the slowest, middle and fastest axis of the planted order
            (images use the last two).
        sharpness: softmax logit of a perfectly correlated pair: larger = more peaked attention.
        noise: i.i.d. Gaussian noise added to queries and keys (relative to the field's scale).
        text_len: random text tokens placed before the grid (they see and are seen by everything).
        seed: random seed.
    """
    grid = tuple(int(g) for g in grid)
    ndim = len(grid)
    g = torch.Generator().manual_seed(seed)
    coords = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in grid], indexing="ij"), -1)
    coords = coords.reshape(-1, ndim)  # [N, k] row-major
    n = coords.shape[0]
    per_axis = list(lengths)[-ndim:]
    qs, ks = [], []
    for o in orders:
        axes = axis_order(int(o), ndim)  # slowest first
        length = torch.empty(ndim, dtype=torch.float64)
        for rank, a in enumerate(axes):
            length[a] = per_axis[rank]
        omega = torch.randn(batch, ndim, head_dim, generator=g, dtype=torch.float64) / length[None, :, None]
        phase = torch.rand(batch, 1, head_dim, generator=g, dtype=torch.float64) * 2 * math.pi
        field = torch.cos(coords[None] @ omega + phase) * math.sqrt(2.0 / head_dim)  # [B, N, D], phi.phi ~ kernel
        amp = math.sqrt(sharpness * math.sqrt(head_dim))  # (q . k) / sqrt(D) = sharpness * kernel
        q = amp * field + noise * amp / math.sqrt(head_dim) * torch.randn(batch, n, head_dim, generator=g)
        k = amp * field + noise * amp / math.sqrt(head_dim) * torch.randn(batch, n, head_dim, generator=g)
        qs.append(q)
        ks.append(k)
    q = torch.stack(qs, 1)
    k = torch.stack(ks, 1)
    h = len(orders)
    v = torch.randn(batch, h, n, head_dim, generator=g, dtype=torch.float64)
    if text_len:
        text = [torch.randn(batch, h, text_len, head_dim, generator=g, dtype=torch.float64) for _ in range(3)]
        q, k, v = (torch.cat([t, x], dim=2) for t, x in zip(text, (q, k, v)))
    return q.to(dtype), k.to(dtype), v.to(dtype)
