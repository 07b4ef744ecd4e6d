"""Pure-PyTorch block-sparse attention: gathers each query tile's listed key tiles, never an ``N x N`` matrix.

Memory is ``O(chunk of query tiles x visited keys)``: the query tiles are processed in chunks whose score matrices
hold at most ``chunk_elements`` entries. Differentiable everywhere; under autograd each chunk is recomputed in the
backward pass (activation checkpointing), so saved memory stays ``O(inputs + outputs)``.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from .pattern import BlockSparsePattern


__all__ = ["block_sparse_reference"]

DEFAULT_CHUNK_ELEMENTS = 1 << 22


def _gather_tiles(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``x [B, H, T, S, D]``, ``idx [B|1, H|1, C, K]`` -> ``[B, H, C, K, S, D]``."""
    b, h, t, s, d = x.shape
    c, k = idx.shape[-2:]
    idx = idx.expand(b, h, c, k).reshape(b * h, c * k, 1).long()
    out = torch.gather(x.reshape(b * h, t, s * d), 1, idx.expand(-1, -1, s * d))
    return out.view(b, h, c, k, s, d)


def _chunk(q, k_tiles, v_tiles, q_idx, kv_idx_tiles, tiles, num_kv, num_full, mask_mod, scale, b_ids, h_ids):
    """Attention of one chunk of query tiles.

    q ``[B, H, C, Sq, D]``, k/v tiles ``[B, H, Tk, Sk, D]``, q_idx ``[Hi, C, Sq]``, kv_idx_tiles ``[Hi, Tk, Sk]``,
    tiles ``[Bt, Ht, C, K]``, counts ``[Bt, Ht, C]``. Returns (out ``[B, H, C, Sq, Dv]`` fp32, lse ``[B, H, C, Sq]``).
    """
    c, kk = tiles.shape[-2:]
    sk = k_tiles.shape[3]
    keys = _gather_tiles(k_tiles, tiles).flatten(3, 4)  # [B, H, C, K*Sk, D]
    vals = _gather_tiles(v_tiles, tiles).flatten(3, 4)
    scores = torch.matmul(q.float(), keys.float().transpose(-1, -2)) * scale  # [B, H, C, Sq, K*Sk]

    # every mask below broadcasts to [B, H, C, Sq, K*Sk]
    slot = torch.arange(kk, device=q.device)
    listed = (slot < num_kv[..., None]).repeat_interleave(sk, dim=-1)[:, :, :, None, :]
    full = (slot < num_full[..., None]).repeat_interleave(sk, dim=-1)[:, :, :, None, :]
    hc = max(kv_idx_tiles.shape[0], tiles.shape[1])
    heads = torch.arange(hc, device=q.device).view(1, hc, 1, 1)
    kv_idx = kv_idx_tiles.expand(hc, -1, -1)[heads, tiles.expand(-1, hc, -1, -1).long()]  # [Bt, Hc, C, K, Sk]
    kv_idx = kv_idx.flatten(3, 4)[:, :, :, None, :]
    visible = listed & (kv_idx >= 0)
    if mask_mod is not None:
        qi = q_idx[None, :, :, :, None].clamp(min=0)
        inside = mask_mod(b_ids, h_ids, qi, kv_idx.clamp(min=0))
        visible = visible & (inside | full)
    scores = scores.masked_fill(~visible, float("-inf"))
    m = scores.amax(dim=-1, keepdim=True).detach()
    m = torch.where(torch.isfinite(m), m, 0.0)
    e = torch.exp(scores - m)
    s = e.sum(dim=-1, keepdim=True)
    out = torch.matmul(e, vals.float()) / torch.where(s > 0, s, 1.0)
    lse = (m + torch.log(s)).squeeze(-1)  # -inf where a query sees no key
    return out, lse


def block_sparse_reference(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    pattern: BlockSparsePattern,
    *,
    scale: float | None = None,
    return_lse: bool = False,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
):
    """Block-sparse attention in pure PyTorch (see :func:`attnpack.kernels.block_sparse_attention`).

    Args:
        query: ``[B, H, Nq, D]``; key ``[B, H, Nk, D]``; value ``[B, H, Nk, Dv]`` (the caller's token order).
        pattern: the :class:`BlockSparsePattern` (on the inputs' device).
        scale: softmax scale, default ``D ** -0.5``.
        return_lse: also return the log-sum-exp ``[B, H, Nq]`` (fp32, natural log; ``-inf`` for queries that see
            no key, whose output is 0).
        chunk_elements: bound on the entries of one chunk's score matrix.

    Returns:
        ``[B, H, Nq, Dv]`` in the query dtype (and the LSE when asked).
    """
    bsz, heads, _, dim = query.shape
    dv = value.shape[-1]
    scale = dim**-0.5 if scale is None else scale
    qo, ko, table = pattern.q_order, pattern.kv_order, pattern.table
    tq, sq, tk, sk = qo.num_tiles, qo.tile_size, ko.num_tiles, ko.tile_size
    q_tiles = qo.permute(query).view(bsz, heads, tq, sq, dim)
    k_tiles = ko.permute(key).view(bsz, heads, tk, sk, dim)
    v_tiles = ko.permute(value).view(bsz, heads, tk, sk, dv)
    q_idx = qo.index.view(qo.num_heads, tq, sq)
    kv_idx_tiles = ko.index.view(ko.num_heads, tk, sk)
    mask_mod = pattern.mask.mask_mod if pattern.mask is not None else None
    b_ids = torch.arange(bsz, device=query.device).view(bsz, 1, 1, 1, 1)
    h_ids = torch.arange(heads, device=query.device).view(1, heads, 1, 1, 1)

    kk = table.max_kv
    per_tile = bsz * heads * sq * kk * sk + 2 * bsz * heads * kk * sk * max(dim, dv)
    chunk = max(1, chunk_elements // max(per_tile, 1))
    use_ckpt = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    outs, lses = [], []
    for c0 in range(0, tq, chunk):
        c1 = min(tq, c0 + chunk)
        args = (
            q_tiles[:, :, c0:c1],
            k_tiles,
            v_tiles,
            q_idx[:, c0:c1],
            kv_idx_tiles,
            table.kv_tiles[:, :, c0:c1],
            table.num_kv[:, :, c0:c1],
            table.num_full[:, :, c0:c1],
            mask_mod,
            scale,
            b_ids,
            h_ids,
        )
        if use_ckpt:
            out, lse = checkpoint(_chunk, *args, use_reentrant=False)
        else:
            out, lse = _chunk(*args)
        outs.append(out)
        lses.append(lse)
    out = torch.cat(outs, dim=2).reshape(bsz, heads, tq * sq, dv)
    out = qo.unpermute(out).to(query.dtype)
    if not return_lse:
        return out
    lse = qo.unpermute(torch.cat(lses, dim=2).reshape(bsz, heads, tq * sq))
    return out, lse
