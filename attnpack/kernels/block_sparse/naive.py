"""Brute-force oracles for tests of the block-sparse op: masked softmax attention over a dense boolean mask, and
the dense mask of a :class:`BlockSparsePattern`. They build ``N x N`` masks: small problems only."""

from __future__ import annotations

import itertools

import torch


__all__ = ["masked_attention", "pattern_mask"]


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
