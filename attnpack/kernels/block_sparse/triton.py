"""Fused block-sparse attention forward kernel in Triton.

One program per (query tile, batch x head). It gathers its query rows through the query order (the token
permutation is fused: rows are loaded from, and stored to, their original positions, so no permuted copy of Q, K, V
or O is ever written), then walks the tile table: first the *full* key tiles with no mask at all, then the
*partial* ones, where padding and the pattern's in-tile mask (a ``@triton.jit`` function) are applied. Softmax is
the usual online (flash) softmax in fp32 with ``exp2``.

Runs on CUDA, and on CPU in the Triton interpreter (``TRITON_INTERPRET=1``, set before importing triton), where
operands are upcast to fp32 before ``tl.dot`` (bf16 dots are wrong in the interpreter). Forward only.
"""

from __future__ import annotations

import functools
import itertools
import math
import os

import torch
import triton
import triton.language as tl

from .pattern import BlockSparsePattern


__all__ = ["block_sparse_triton", "triton_unusable", "interpreting"]

MAX_HEAD_DIM = 256


def interpreting() -> bool:
    """Whether Triton runs in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _tile_update(q, k, v, m_i, l_i, acc, qk_scale, keep, MASKED: tl.constexpr, DOT_F32: tl.constexpr):
    """One key tile of the online softmax. q ``[M, D]``, k ``[D, N]``, v ``[N, Dv]``; ``keep`` ``[M, N]``."""
    if DOT_F32:
        qk = tl.dot(q.to(tl.float32), k.to(tl.float32), input_precision="ieee")
    else:
        qk = tl.dot(q, k)
    qk = qk * qk_scale
    if MASKED:
        qk = tl.where(keep, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(qk - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    if DOT_F32:
        acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc


@triton.jit
def _block_sparse_fwd(
    Q, K, V, Out, LSE, QI, KI, TBL, NKV, NFULL, MP,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_on,
    stride_qih, stride_kih,
    stride_tb, stride_th, stride_tq,
    stride_cb, stride_ch,
    H, NQ, NK, qk_scale,
    Q_TILE: tl.constexpr, KV_TILE: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    Q_GATHER: tl.constexpr, KV_GATHER: tl.constexpr,
    MASK_FN: tl.constexpr, HAS_LSE: tl.constexpr, DOT_F32: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * Q_TILE + tl.arange(0, Q_TILE)
    if Q_GATHER:
        q_idx = tl.load(QI + h * stride_qih + offs_m)
    else:
        q_idx = tl.where(offs_m < NQ, offs_m, -1)
    q_ok = q_idx >= 0
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    d_ok = offs_d < HEAD_DIM
    dv_ok = offs_dv < HEAD_DIM_V
    q_rows = q_idx.to(tl.int64)
    q = tl.load(
        Q + b * stride_qb + h * stride_qh + q_rows[:, None] * stride_qn + offs_d[None, :],
        mask=q_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    ki_base = KI + h * stride_kih
    tbl = TBL + b * stride_tb + h * stride_th + pid_m * stride_tq
    n_kv = tl.load(NKV + b * stride_cb + h * stride_ch + pid_m)
    n_full = tl.load(NFULL + b * stride_cb + h * stride_ch + pid_m)

    m_i = tl.full([Q_TILE], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([Q_TILE], dtype=tl.float32)
    acc = tl.zeros([Q_TILE, BLOCK_DV], dtype=tl.float32)
    offs_t = tl.arange(0, KV_TILE)

    # full tiles: every pair visible, no padding: no mask at all
    for i in range(0, n_full):
        kt = tl.load(tbl + i)
        offs_n = kt * KV_TILE + offs_t
        if KV_GATHER:
            kv_rows = tl.load(ki_base + offs_n).to(tl.int64)
        else:
            kv_rows = offs_n.to(tl.int64)
        k = tl.load(k_base + kv_rows[None, :] * stride_kn + offs_d[:, None], mask=d_ok[:, None], other=0.0)
        v = tl.load(v_base + kv_rows[:, None] * stride_vn + offs_dv[None, :], mask=dv_ok[None, :], other=0.0)
        m_i, l_i, acc = _tile_update(q, k, v, m_i, l_i, acc, qk_scale, q_ok[:, None], False, DOT_F32)

    # partial tiles: padding and the in-tile mask on original indices
    for i in range(n_full, n_kv):
        kt = tl.load(tbl + i)
        offs_n = kt * KV_TILE + offs_t
        if KV_GATHER:
            kv_idx = tl.load(ki_base + offs_n)
        else:
            kv_idx = tl.where(offs_n < NK, offs_n, -1)
        kv_ok = kv_idx >= 0
        kv_rows = tl.where(kv_ok, kv_idx, 0).to(tl.int64)
        k = tl.load(
            k_base + kv_rows[None, :] * stride_kn + offs_d[:, None], mask=kv_ok[None, :] & d_ok[:, None], other=0.0
        )
        v = tl.load(
            v_base + kv_rows[:, None] * stride_vn + offs_dv[None, :], mask=kv_ok[:, None] & dv_ok[None, :], other=0.0
        )
        keep = kv_ok[None, :] & (q_idx[:, None] >= -1)
        if MASK_FN is not None:
            keep = keep & MASK_FN(b, h, tl.where(q_ok, q_idx, 0)[:, None], tl.where(kv_ok, kv_idx, 0)[None, :], MP)
        m_i, l_i, acc = _tile_update(q, k, v, m_i, l_i, acc, qk_scale, keep, True, DOT_F32)

    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    out = acc / l_safe[:, None]
    tl.store(
        Out + b * stride_ob + h * stride_oh + q_rows[:, None] * stride_on + offs_dv[None, :],
        out.to(Out.dtype.element_ty),
        mask=q_ok[:, None] & dv_ok[None, :],
    )
    if HAS_LSE:
        lse = tl.where(l_i > 0.0, (m_i + tl.math.log2(l_safe)) * 0.6931471805599453, float("-inf"))
        tl.store(LSE + pid_bh * NQ + q_rows, lse, mask=q_ok)


def _configs():
    return [triton.Config({}, num_warps=w, num_stages=s) for w, s in itertools.product((4, 8), (1, 2, 3))]


@functools.cache
def _tuned_kernel():
    return triton.autotune(
        configs=_configs(), key=["Q_TILE", "KV_TILE", "BLOCK_D", "BLOCK_DV", "Q_GATHER", "KV_GATHER", "DOT_F32"]
    )(_block_sparse_fwd)


def _is_pow2(x: int) -> bool:
    return x >= 1 and x & (x - 1) == 0


def triton_unusable(query, key, value, pattern: BlockSparsePattern, needs_grad: bool) -> str | None:
    """Why the Triton kernel cannot run this call (``None``: it can)."""
    if query.device.type != "cuda" and not interpreting():
        return "the Triton kernel needs a CUDA device (or TRITON_INTERPRET=1 set before importing triton)"
    if needs_grad:
        return "the Triton kernel is forward-only; use backend='flex' (CUDA) or 'reference' for gradients"
    if pattern.mask is not None and pattern.mask.triton_fn is None:
        return f"the pattern's mask {pattern.mask.name!r} has no Triton version (TileMask.triton_fn)"
    for name, t in (("query", pattern.q_tile), ("key", pattern.kv_tile)):
        if not _is_pow2(t) or t < 16:
            return f"{name} tiles must hold a power of two >= 16 tokens for tl.dot, got {t}"
    if max(query.shape[-1], value.shape[-1]) > MAX_HEAD_DIM:
        return f"head dims above {MAX_HEAD_DIM} are not supported"
    if query.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {query.dtype} is not supported"
    return None


def _order_gathers(pattern: BlockSparsePattern) -> tuple[bool, bool]:
    key = "triton_gathers"
    if key not in pattern._cache:
        pattern._cache[key] = (not pattern.q_order.is_identity(), not pattern.kv_order.is_identity())
    return pattern._cache[key]


def block_sparse_triton(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    pattern: BlockSparsePattern,
    *,
    scale: float | None = None,
    return_lse: bool = False,
    autotune: bool | None = None,
):
    """Block-sparse attention with the fused Triton kernel (see :func:`attnpack.kernels.block_sparse_attention`).

    ``autotune``: tune ``num_warps`` / ``num_stages`` per tile shape (default: on CUDA, off in the interpreter).
    """
    bsz, heads, nq, dim = query.shape
    nk, dv = key.shape[2], value.shape[-1]
    scale = dim**-0.5 if scale is None else scale
    query, key, value = (t if t.stride(-1) == 1 else t.contiguous() for t in (query, key, value))
    table = pattern.table
    out = torch.empty(bsz, heads, nq, dv, device=query.device, dtype=query.dtype)
    lse = torch.empty(bsz, heads, nq, device=query.device, dtype=torch.float32) if return_lse else out
    qi = pattern.q_order.index.expand(heads, -1)
    ki = pattern.kv_order.index.expand(heads, -1)
    tiles = table.kv_tiles.expand(bsz, heads, -1, -1)
    nkv = table.num_kv.expand(bsz, heads, -1)
    nfull = table.num_full.expand(bsz, heads, -1)
    mask = pattern.mask
    params = mask.params if mask is not None and mask.params is not None else table.num_kv
    q_gather, kv_gather = _order_gathers(pattern)
    interp = interpreting()
    use_tuning = (query.device.type == "cuda" and not interp) if autotune is None else autotune
    kernel = _tuned_kernel() if use_tuning else _block_sparse_fwd
    extra = {} if use_tuning else {"num_warps": 4, "num_stages": 2}
    grid = (table.num_q_tiles, bsz * heads)
    kernel[grid](
        query, key, value, out, lse, qi, ki, tiles, nkv, nfull, params,
        query.stride(0), query.stride(1), query.stride(2),
        key.stride(0), key.stride(1), key.stride(2),
        value.stride(0), value.stride(1), value.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        qi.stride(0), ki.stride(0),
        tiles.stride(0), tiles.stride(1), tiles.stride(2),
        nkv.stride(0), nkv.stride(1),
        heads, nq, nk, scale * math.log2(math.e),
        Q_TILE=pattern.q_tile, KV_TILE=pattern.kv_tile,
        HEAD_DIM=dim, HEAD_DIM_V=dv,
        BLOCK_D=max(16, triton.next_power_of_2(dim)), BLOCK_DV=max(16, triton.next_power_of_2(dv)),
        Q_GATHER=q_gather, KV_GATHER=kv_gather,
        MASK_FN=mask.triton_fn if mask is not None else None,
        HAS_LSE=return_lse, DOT_F32=interp or query.dtype == torch.float32,
        **extra,
    )  # fmt: skip
    return (out, lse) if return_lse else out
