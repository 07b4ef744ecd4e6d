"""Quantized block-sparse attention (PARO / SageAttention style): the pure-PyTorch reference.

Paper: https://arxiv.org/abs/2506.16054 (Sec. 3.4). Semantics shared by this reference and the Triton kernel
(:mod:`attnpack.kernels.paro.triton`), which it simulates exactly, block by block and in the same order:

1. **Smoothing.** ``K`` minus its mean over the keys (per batch, head and channel; softmax is invariant to it), ``V``
   minus its mean (added back to the output: the normalised weights sum to one).
2. **Tiles.** ``Q``, ``K``, ``V`` are gathered into the pattern's tile-major order (PARO's per-head reordering) once
   per call; every tile is one quantization block.
3. **QK^T.** ``Q`` and ``K`` are quantized per tile, symmetric, ``scale = max|x| / qmax`` (``qmax`` 127 for INT8, 7
   for INT4), rounding half up (``floor(x / scale + 0.5)``); ``S = (Q_q K_q^T) * q_scale * k_scale``, exact in integer
   (or fp32) accumulation.
4. **Online softmax over the listed key tiles** in table order, base 2 (``S * softmax_scale * log2(e)``), with the
   running row max ``m``; ``P = exp2(S - m)`` of the current tile lies in ``[0, 1]``.
5. **PV.** ``P`` is quantized per row of each (query tile, key tile) block with ``scale = max(P_row) / pmax``
   (INT8: 127 and half-up rounding; FP8: e4m3 with 448 and round-to-nearest-even; INT4: 7); ``max(P_row) =
   exp2(rowmax(S_tile) - m_new)`` comes from the online softmax's row max, so the kernel needs no reduction over the
   block, and a row scale factors out of the product. ``V`` per channel over all tokens (``scale = max|V - mean| /
   pmax``); ``acc = acc * exp2(m_old - m_new) + (P_q V_q) * p_scale[:, None]``, all in FP32.
   The row sum ``l`` uses the unquantized ``P`` (as SageAttention).
6. ``out = acc * v_scale / l + mean(V)`` (0 for a query that sees no key).

INT4 is simulated with int8 storage (values in ``[-7, 7]``): accuracy only, no speed-up.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from ..block_sparse import BlockSparsePattern


__all__ = [
    "QuantSpec",
    "QUANT_MODES",
    "quant_spec",
    "quantize_tiles",
    "smoothing_stats",
    "prepare_quantized",
    "quantized_reference",
]

LOG2E = 1.4426950408889634
DEFAULT_CHUNK_ELEMENTS = 1 << 24


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """A quantization mode: ``qk_max`` for Q and K (symmetric integers), ``pv_max`` and ``pv_fp8`` for P and V."""

    name: str
    qk_max: int
    pv_max: float
    pv_fp8: bool = False


QUANT_MODES: dict[str, QuantSpec] = {
    "int8": QuantSpec("int8", 127, 127.0),
    "fp8": QuantSpec("fp8", 127, 448.0, pv_fp8=True),
    "int4": QuantSpec("int4", 7, 7.0),
}


def quant_spec(quant: str | QuantSpec) -> QuantSpec:
    if isinstance(quant, QuantSpec):
        return quant
    if not isinstance(quant, str) or quant.lower() not in QUANT_MODES:
        raise ValueError(f"`quant` must be one of {', '.join(map(repr, QUANT_MODES))} or None, got {quant!r}.")
    return QUANT_MODES[quant.lower()]


def _round_half_up(x: torch.Tensor) -> torch.Tensor:
    return torch.floor(x + 0.5)


def quantize_tiles(x: torch.Tensor, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-tile quantization of ``x [B, H, T, S, D]`` -> (``int8 [B, H, T, S, D]``, fp32 scale ``[B, H, T]``).

    An all-zero tile gets scale 1.
    """
    amax = x.abs().amax(dim=(-1, -2)).float()
    # divide by a tensor on amax's device: PyTorch's CUDA division by a Python scalar multiplies by its reciprocal,
    # which can differ from the IEEE quotient (and from the Triton pre-pass) by one ulp
    scale = torch.where(amax > 0, amax / amax.new_tensor(float(qmax)), 1.0)
    q = _round_half_up(x.float() / scale[..., None, None]).clamp(-qmax, qmax)
    return q.to(torch.int8), scale


def _quantize_p(p: torch.Tensor, pmax: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``p`` (>= 0) with one scale per row (``pmax`` is the row max, broadcastable); returns (fp32 values of
    the quantized numbers, fp32 scale)."""
    inv = torch.where(pmax > 0, spec.pv_max / pmax, 0.0)
    scaled = p * inv
    if spec.pv_fp8:
        q = scaled.to(torch.float8_e4m3fn).float()
    else:
        q = _round_half_up(scaled)
    return q, pmax / spec.pv_max


@dataclasses.dataclass
class Prepared:
    """Tile-major quantized inputs of one call (shared by the reference and the Triton kernel).

    ``q``: int8 ``[B, H, Tq, S, D]``, ``q_scale`` fp32 ``[B, H, Tq]``; ``k`` / ``k_scale`` likewise for the keys;
    ``v``: int8 (INT8 / INT4) or float8_e4m3fn (FP8) ``[B, H, Tk, S, Dv]``; ``v_scale`` / ``v_mean`` fp32
    ``[B, H, Dv]``; ``q_real`` / ``k_real`` bool ``[Hi, T, S]`` (``False`` at padding); ``k_mean`` fp32
    ``[B, H, D]`` (the smoothing shift, needed to return the log-sum-exp of the unsmoothed scores).
    """

    q: torch.Tensor
    q_scale: torch.Tensor
    k: torch.Tensor
    k_scale: torch.Tensor
    v: torch.Tensor
    v_scale: torch.Tensor
    v_mean: torch.Tensor
    q_real: torch.Tensor
    k_real: torch.Tensor
    k_mean: torch.Tensor

    def lse_shift(self, query: torch.Tensor, scale: float) -> torch.Tensor:
        """``[B, H, Nq]`` natural-log amount that smoothing removed from every query's scores: ``scale * q.k_mean``."""
        return torch.einsum("bhnd,bhd->bhn", query.float(), self.k_mean) * scale


def smoothing_stats(key, value, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(k_mean [B, H, D], v_mean [B, H, Dv], v_scale [B, H, Dv])`` in fp32, shared by both implementations.

    ``v_scale = max_n |V - mean| / pmax`` is computed from the per-channel min and max (exactly the max of the
    rounded differences, without an fp32 copy of V).
    """
    k_mean = key.mean(dim=2, dtype=torch.float32)
    v_mean = value.mean(dim=2, dtype=torch.float32)
    v_min, v_max = torch.aminmax(value, dim=2)
    v_amax = torch.maximum(v_max.float() - v_mean, v_mean - v_min.float())
    return k_mean, v_mean, torch.where(v_amax > 0, v_amax / spec.pv_max, 1.0)


def real_masks(pattern: BlockSparsePattern) -> tuple[torch.Tensor, torch.Tensor]:
    """bool ``[Hi, T, S]`` masks of the real (non-padding) query and key positions."""
    qo, ko = pattern.q_order, pattern.kv_order
    q_real = (qo.index >= 0).view(qo.num_heads, qo.num_tiles, qo.tile_size)
    k_real = (ko.index >= 0).view(ko.num_heads, ko.num_tiles, ko.tile_size)
    return q_real, k_real


def prepare_quantized(query, key, value, pattern: BlockSparsePattern, spec: QuantSpec) -> Prepared:
    """Smooth, reorder (one gather per tensor) and quantize ``query`` / ``key`` / ``value`` ``[B, H, N, D]``."""
    qo, ko = pattern.q_order, pattern.kv_order
    b, h, _, d = query.shape
    dv = value.shape[-1]
    k_mean, v_mean, v_scale = smoothing_stats(key, value, spec)
    q_t = qo.permute(query.float()).view(b, h, qo.num_tiles, qo.tile_size, d)
    k_t = ko.permute(key.float() - k_mean[:, :, None]).view(b, h, ko.num_tiles, ko.tile_size, d)
    q_q, q_scale = quantize_tiles(q_t, spec.qk_max)
    k_q, k_scale = quantize_tiles(k_t, spec.qk_max)
    v_scaled = (value.float() - v_mean[:, :, None]) / v_scale[:, :, None]
    v_scaled = ko.permute(v_scaled).view(b, h, ko.num_tiles, ko.tile_size, dv)
    if spec.pv_fp8:
        v_q = v_scaled.to(torch.float8_e4m3fn)
    else:
        v_q = _round_half_up(v_scaled).clamp(-spec.pv_max, spec.pv_max).to(torch.int8)
    return Prepared(q_q, q_scale, k_q, k_scale, v_q, v_scale, v_mean, *real_masks(pattern), k_mean)


def _gather(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``x [B, H, T, ...]`` gathered at ``idx [B, H, C]`` along T -> ``[B, H, C, ...]``."""
    b, h, c = idx.shape
    raw = x.view(torch.uint8) if x.dtype == torch.float8_e4m3fn else x  # CPU gather has no float8 kernel
    flat = raw.reshape(b, h, x.shape[2], -1)
    out = torch.gather(flat, 2, idx.long()[..., None].expand(b, h, c, flat.shape[-1]))
    return out.view(b, h, c, *x.shape[3:]).view(x.dtype)


@torch.no_grad()
def quantized_reference(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    pattern: BlockSparsePattern,
    *,
    scale: float | None = None,
    return_lse: bool = False,
    quant: str | QuantSpec = "int8",
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
):
    """Quantized block-sparse attention in pure PyTorch (see the module docstring for the exact semantics).

    Args:
        query / key / value: ``[B, H, Nq, D]`` / ``[B, H, Nk, D]`` / ``[B, H, Nk, Dv]`` in the caller's token order.
        pattern: a :class:`BlockSparsePattern` without in-tile mask (PARO patterns are block-wise).
        scale: softmax scale, default ``D ** -0.5``.
        return_lse: also return the log-sum-exp ``[B, H, Nq]`` (natural log) of the scores computed from the quantized
            ``Q`` and smoothed ``K``, with the smoothing shift added back (comparable to the unquantized LSE).
        quant: ``"int8"``, ``"fp8"`` or ``"int4"`` (or a :class:`QuantSpec`).
        chunk_elements: bound on the entries of one step's ``P`` blocks (query tiles are processed in chunks).

    Returns:
        ``[B, H, Nq, Dv]`` in the query dtype (and the LSE).
    """
    if pattern.mask is not None:
        raise ValueError("the quantized PARO attention supports block-wise patterns only (no in-tile mask).")
    spec = quant_spec(quant)
    b, h, _, d = query.shape
    dv = value.shape[-1]
    scale = d**-0.5 if scale is None else scale
    sm = scale * LOG2E
    prep = prepare_quantized(query, key, value, pattern, spec)
    table, qo = pattern.table, pattern.q_order
    tq, sz = qo.num_tiles, qo.tile_size
    kk = table.max_kv
    tiles = table.kv_tiles.expand(b, h, tq, kk)
    num_kv = table.num_kv.expand(b, h, tq)
    q_real = prep.q_real.expand(h, tq, sz)
    k_real = prep.k_real.expand(h, -1, -1)
    heads = torch.arange(h, device=query.device)[None, :, None]

    chunk = max(1, chunk_elements // max(1, b * h * sz * sz))
    outs, lses = [], []
    for c0 in range(0, tq, chunk):
        c1 = min(tq, c0 + chunk)
        q = prep.q[:, :, c0:c1].float()  # [B, H, C, S, D]
        qs = prep.q_scale[:, :, c0:c1]
        qr = q_real[None, :, c0:c1, :, None]  # [1, H, C, S, 1]
        shape = (b, h, c1 - c0, sz)
        m = torch.full(shape, -math.inf, device=query.device)
        l_sum = torch.zeros(shape, device=query.device)
        acc = torch.zeros(*shape, dv, device=query.device)
        for slot in range(kk):
            tile = tiles[:, :, c0:c1, slot]  # [B, H, C]
            active = (slot < num_kv[:, :, c0:c1])[..., None, None]
            k = _gather(prep.k, tile).float()
            ks = torch.gather(prep.k_scale, 2, tile.long())
            s = torch.matmul(q, k.transpose(-1, -2)) * ((qs * ks) * sm)[..., None, None]  # [B, H, C, S, S]
            kr = k_real[heads, tile.long()][..., None, :]  # [B, H, C, 1, S]
            s = torch.where(kr & active, s, -math.inf)
            m_new = torch.maximum(m, s.amax(-1))
            m_safe = torch.where(torch.isinf(m_new), 0.0, m_new)
            alpha = torch.exp2(m - m_safe)
            p = torch.where(kr & active & qr, torch.exp2(s - m_safe[..., None]), 0.0)
            l_sum = l_sum * alpha + p.sum(-1)
            p_q, p_scale = _quantize_p(p, p.amax(dim=-1, keepdim=True), spec)  # one scale per row
            v = _gather(prep.v, tile).float()
            acc = acc * alpha[..., None] + torch.matmul(p_q, v) * p_scale
            m = m_new
        seen = l_sum > 0
        out = acc * prep.v_scale[:, :, None, None, :] / torch.where(seen, l_sum, 1.0)[..., None]
        out = torch.where(seen[..., None], out + prep.v_mean[:, :, None, None, :], 0.0)
        outs.append(out)
        if return_lse:
            lses.append(torch.where(seen, (m + torch.log2(torch.where(seen, l_sum, 1.0))) / LOG2E, -math.inf))
    out = qo.unpermute(torch.cat(outs, dim=2).reshape(b, h, tq * sz, dv)).to(query.dtype)
    if not return_lse:
        return out
    lse = qo.unpermute(torch.cat(lses, dim=2).reshape(b, h, tq * sz))
    return out, lse + prep.lse_shift(query, scale)
