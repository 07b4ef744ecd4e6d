"""Pure-PyTorch GNA: every query gathers exactly its neighborhood keys (plus the additional keys).

Memory is ``O(chunk x prod(window) x D)``: queries are processed in chunks whose gathered keys hold at most
``chunk_elements`` values, so no ``N x N`` tensor is ever built. Differentiable; under autograd each chunk is
recomputed in the backward pass (activation checkpointing), keeping saved memory at ``O(inputs + outputs)``.
"""

from __future__ import annotations

import math

import torch
from torch.utils.checkpoint import checkpoint

from .windows import NeighborhoodSpec, neighborhood_key_indices


__all__ = ["neighborhood_reference"]

DEFAULT_CHUNK_ELEMENTS = 1 << 22


def _chunk(q, key, value, extra_k, extra_v, keys, valid, scale):
    """q ``[B, H, C, D]``, keys/valid ``[C, W]`` -> out ``[B, H, C, Dv]`` (fp32)."""
    bsz, heads, c, _ = q.shape
    w = keys.shape[1]
    flat = keys.reshape(-1)
    k_n = key.index_select(2, flat).view(bsz, heads, c, w, -1)
    v_n = value.index_select(2, flat).view(bsz, heads, c, w, -1)
    scores = torch.einsum("bhcd,bhcwd->bhcw", q.float(), k_n.float()) * scale
    scores = scores.masked_fill(~valid, float("-inf"))
    if extra_k is not None:
        scores = torch.cat([scores, torch.einsum("bhcd,bhmd->bhcm", q.float(), extra_k.float()) * scale], dim=-1)
    probs = torch.softmax(scores, dim=-1)  # every query sees at least itself: no empty rows
    out = torch.einsum("bhcw,bhcwd->bhcd", probs[..., :w], v_n.float())
    if extra_v is not None:
        out = out + torch.einsum("bhcm,bhmd->bhcd", probs[..., w:], extra_v.float())
    return out


def neighborhood_reference(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    spec: NeighborhoodSpec,
    *,
    additional_keys: torch.Tensor | None = None,
    additional_values: torch.Tensor | None = None,
    scale: float | None = None,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    query_positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """GNA by explicit gathering (inputs ``[B, H, N, D]``, already checked; see
    :func:`attnpack.kernels.neighborhood_attention`). With ``query_positions`` (flattened grid indices), only those
    queries are computed and the output is ``[B, H, len(query_positions), Dv]``."""
    bsz, heads, n, dim = query.shape
    if query_positions is not None:
        n = query_positions.numel()
    dv = value.shape[-1]
    scale = dim**-0.5 if scale is None else scale
    w = math.prod(spec.window)
    m = 0 if additional_keys is None else additional_keys.shape[2]
    per_query = bsz * heads * (2 * w * max(dim, dv) + w + m)
    chunk = max(1, min(n, chunk_elements // max(per_query, 1)))
    use_ckpt = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (query, key, value, additional_keys, additional_values)
    )
    outs = []
    for c0 in range(0, n, chunk):
        c1 = min(n, c0 + chunk)
        if query_positions is None:
            rows = torch.arange(c0, c1, device=query.device)
            q = query[:, :, c0:c1]
        else:
            rows = query_positions[c0:c1].to(query.device)
            q = query.index_select(2, rows)
        keys, valid = neighborhood_key_indices(spec, rows)
        args = (q, key, value, additional_keys, additional_values, keys, valid, scale)
        outs.append(checkpoint(_chunk, *args, use_reentrant=False) if use_ckpt else _chunk(*args))
    return torch.cat(outs, dim=2).to(query.dtype)
