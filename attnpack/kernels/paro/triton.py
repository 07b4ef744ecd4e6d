"""Quantized block-sparse attention in Triton: INT8 QK^T with per-tile scales, INT8 (or FP8) PV, FP32 accumulation.

Semantics: :mod:`attnpack.kernels.paro.quant` (the pure-PyTorch reference simulates this kernel block by block).
One program computes one query tile of one (batch, head): it loads the tile's int8 ``Q`` and its scale, then walks
only the key tiles the tile table lists (no per-block branch over all tiles), with an online base-2 softmax. ``P`` is
quantized per row in registers, its scale taken from the online-softmax row max (no reduction over the block); ``V`` arrives quantized per channel; the per-channel ``V`` scale and mean are folded
into the epilogue. The tokens are put in PARO's per-head order by a pre-pass kernel that gathers each tile's rows
through the order while smoothing and quantizing them (one read of Q, K, V, int8 writes; V's tiles are written
transposed, token index fastest, the K-major operand 8-bit wgmma needs), and the output rows are
stored straight to their original positions (the inverse permutation is fused into the store).

Integer and FP8 dots run only on a GPU (FP8 needs compute capability >= 8.9). Under the Triton interpreter
(``TRITON_INTERPRET=1``, for CPU tests) operands are upcast to fp32 before ``tl.dot``; integer products stay exact.
"""

from __future__ import annotations

import math
import os

import torch

from ..block_sparse import BlockSparsePattern
from .quant import LOG2E, Prepared, quant_spec, real_masks, smoothing_stats


try:
    import triton
    import triton.language as tl
except ImportError:  # optional: pip install attnpack[triton]
    triton = None

__all__ = ["quantized_triton", "prepare_quantized_triton", "triton_unusable"]


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_unusable(query, key, value, pattern, needs_grad, quant="int8") -> str | None:
    """Why the Triton kernel cannot run this call (``None``: it can)."""
    if triton is None:
        return "Triton is not installed (pip install attnpack[triton])"
    if needs_grad:
        return "the quantized kernel is forward-only"
    if pattern.mask is not None:
        return "the quantized kernel supports block-wise patterns only (no in-tile mask)"
    if query.device.type == "cuda":
        if quant_spec(quant).pv_fp8 and torch.cuda.get_device_capability(query.device) < (8, 9):
            return "FP8 PV needs a GPU of compute capability >= 8.9 (Ada, Hopper); use quant='int8'"
        return None
    if query.device.type == "cpu" and _interpreting():
        return None
    return f"needs a CUDA device or TRITON_INTERPRET=1 on CPU, got a {query.device.type} tensor"


if triton is not None:

    @triton.jit
    def _fp8_e4m3_round(x):
        # fp32 -> e4m3 -> fp32 for |x| <= 448, round to nearest even. Used in the interpreter only, whose own
        # float8 cast drops the exponent carry (126.5 -> 64 instead of 128); GPUs use the hardware conversion.
        a = tl.abs(x)
        e = tl.maximum(tl.floor(tl.log2(tl.maximum(a, 1e-30))), -6.0)
        e = tl.where(tl.exp2(e) > a, e - 1.0, e)
        e = tl.maximum(e, -6.0)
        ulp = tl.exp2(e - 3.0)
        y = a / ulp
        r = tl.floor(y + 0.5)
        r = tl.where((r - y == 0.5) & (r - 2.0 * tl.floor(r * 0.5) == 1.0), r - 1.0, r)
        r = tl.minimum(r * ulp, 448.0)
        return tl.where(x < 0, -r, r)

    @triton.jit
    def _paro_quantize_fwd(
        X,
        IDX,
        MEAN,
        CSCALE,
        OUT,
        TSCALE,
        H,
        N,
        T,
        D,
        S,
        IDX_STRIDE,
        QMAX: tl.constexpr,
        MODE: tl.constexpr,
        HAS_MEAN: tl.constexpr,
        UPCAST: tl.constexpr,
        BLOCK: tl.constexpr,
        BLOCK_D: tl.constexpr,
        TRANSPOSED: tl.constexpr = False,
    ):
        # one tile of one (batch, head): gather its rows through the order, smooth, quantize, store tile-major.
        # TRANSPOSED: each tile stored as [D, S] (token index fastest), the K-major layout 8-bit wgmma needs for V
        # MODE 0: per-tile scale (Q, K); 1: per-channel scale, integers (V); 2: per-channel scale, FP8 (V)
        t = tl.program_id(0)
        bh = tl.program_id(1)
        h = bh % H
        rows = tl.arange(0, BLOCK)
        cols = tl.arange(0, BLOCK_D)
        row_ok = rows < S
        col_ok = cols < D
        pos = t * S + rows
        tok = tl.load(IDX + h * IDX_STRIDE + pos, mask=row_ok, other=-1)
        real = row_ok & (tok >= 0)
        src = (bh * N + tl.maximum(tok, 0)).to(tl.int64)
        x = tl.load(X + src[:, None] * D + cols[None, :], mask=real[:, None] & col_ok[None, :], other=0.0)
        x = x.to(tl.float32)
        if HAS_MEAN:
            x = x - tl.load(MEAN + bh * D + cols, mask=col_ok, other=0.0)[None, :]
        x = tl.where(real[:, None] & col_ok[None, :], x, 0.0)
        dst = (bh * T * S + pos).to(tl.int64)
        out_mask = row_ok[:, None] & col_ok[None, :]
        if TRANSPOSED:
            out_ptrs = OUT + (bh * T + t).to(tl.int64) * S * D + cols[None, :] * S + rows[:, None]
        else:
            out_ptrs = OUT + dst[:, None] * D + cols[None, :]
        if MODE == 0:
            amax = tl.max(tl.max(tl.abs(x), 1), 0)
            scale = tl.where(amax > 0, tl.math.div_rn(amax, tl.full([], QMAX, tl.float32)), 1.0)
            q = tl.minimum(tl.maximum(tl.floor(tl.math.div_rn(x, scale) + 0.5), -QMAX), QMAX)
            tl.store(OUT + dst[:, None] * D + cols[None, :], q.to(tl.int8), mask=out_mask)
            tl.store(TSCALE + bh * T + t, scale)
        else:
            # IEEE division (Triton's `/` is approximate on GPUs): the result is bit-identical to the PyTorch pre-pass
            x = tl.math.div_rn(x, tl.load(CSCALE + bh * D + cols, mask=col_ok, other=1.0)[None, :])
            if MODE == 1:
                q = tl.minimum(tl.maximum(tl.floor(x + 0.5), -QMAX), QMAX)
                tl.store(out_ptrs, q.to(tl.int8), mask=out_mask)
            else:
                if UPCAST:
                    x = _fp8_e4m3_round(x)
                tl.store(out_ptrs, x.to(tl.float8e4nv), mask=out_mask)

    @triton.jit
    def _paro_quant_attn_fwd(
        Q,
        QS,
        K,
        KS,
        V,
        VS,
        VM,
        QIDX,
        KIDX,
        TILES,
        NUMKV,
        OUT,
        LSE,
        H,
        NQ,
        TQ,
        TK,
        KK,
        D,
        DV,
        S,
        QI_STRIDE,
        KI_STRIDE,
        T_BS,
        T_HS,
        N_BS,
        N_HS,
        sm,
        BLOCK: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_DV: tl.constexpr,
        PV_MAX: tl.constexpr,
        PV_FP8: tl.constexpr,
        UPCAST: tl.constexpr,
        RETURN_LSE: tl.constexpr,
    ):
        i = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        rows = tl.arange(0, BLOCK)
        dq = tl.arange(0, BLOCK_D)
        dvv = tl.arange(0, BLOCK_DV)
        row_ok = rows < S
        pq = i * S + rows
        q_tok = tl.load(QIDX + h * QI_STRIDE + pq, mask=row_ok, other=-1)
        q_real = row_ok & (q_tok >= 0)
        q_rows = (bh * TQ * S + pq).to(tl.int64)
        q = tl.load(Q + q_rows[:, None] * D + dq[None, :], mask=row_ok[:, None] & (dq[None, :] < D), other=0)
        qs = tl.load(QS + bh * TQ + i)
        n = tl.load(NUMKV + b * N_BS + h * N_HS + i)
        m_i = tl.full([BLOCK], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK], tl.float32)
        acc = tl.zeros([BLOCK, BLOCK_DV], tl.float32)
        for slot in range(0, n):
            t = tl.load(TILES + b * T_BS + h * T_HS + i * KK + slot)
            pk = t * S + rows
            k_ok = row_ok & (tl.load(KIDX + h * KI_STRIDE + pk, mask=row_ok, other=-1) >= 0)
            k_rows = (bh * TK * S + pk).to(tl.int64)
            k = tl.load(K + k_rows[:, None] * D + dq[None, :], mask=row_ok[:, None] & (dq[None, :] < D), other=0)
            ks = tl.load(KS + bh * TK + t)
            if UPCAST:
                qk = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)))
            else:
                qk = tl.dot(q, tl.trans(k), out_dtype=tl.int32).to(tl.float32)
            s = qk * (qs * ks * sm)
            s = tl.where(k_ok[None, :], s, float("-inf"))
            m_tile = tl.max(s, 1)
            m_new = tl.maximum(m_i, m_tile)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(s - m_safe[:, None])
            p = tl.where(q_real[:, None] & k_ok[None, :], p, 0.0)
            l_i = l_i * alpha + tl.sum(p, 1)
            # P's scale per row from the online-softmax row max (exp2 is monotone: the row's max of p), no reduction
            # over the block; a row scale factors out of P V, so it is applied to the product below
            pmax = tl.where(q_real, tl.exp2(m_tile - m_safe), 0.0)
            inv = tl.where(pmax > 0, PV_MAX / pmax, 0.0)
            scaled = p * inv[:, None]
            # V tiles are stored transposed ([DV, S], token index fastest): tl.trans gives the K-major operand that
            # 8-bit wgmma reads from shared memory, so V is loaded asynchronously like K (no register transpose)
            v_ptrs = V + (bh * TK + t).to(tl.int64) * S * DV + dvv[:, None] * S + rows[None, :]
            v_mask = (dvv[:, None] < DV) & row_ok[None, :]
            if PV_FP8:
                v = tl.trans(tl.load(v_ptrs, mask=v_mask, other=0.0))
                if UPCAST:
                    pv = tl.dot(_fp8_e4m3_round(scaled), v.to(tl.float32))
                else:
                    pv = tl.dot(scaled.to(tl.float8e4nv), v)
            else:
                v = tl.trans(tl.load(v_ptrs, mask=v_mask, other=0))
                p_int = tl.floor(scaled + 0.5)
                if UPCAST:
                    pv = tl.dot(p_int, v.to(tl.float32))
                else:
                    pv = tl.dot(p_int.to(tl.int8), v, out_dtype=tl.int32).to(tl.float32)
            acc = acc * alpha[:, None] + pv * (pmax / PV_MAX)[:, None]
            m_i = m_new
        vs = tl.load(VS + bh * DV + dvv, mask=dvv < DV, other=0.0)
        vm = tl.load(VM + bh * DV + dvv, mask=dvv < DV, other=0.0)
        seen = l_i > 0
        l_safe = tl.where(seen, l_i, 1.0)
        out = acc * vs[None, :] / l_safe[:, None]
        out = tl.where(seen[:, None], out + vm[None, :], 0.0)
        # scatter the rows back to their original token positions (the inverse permutation, fused into the store)
        o_rows = (bh * NQ + tl.maximum(q_tok, 0)).to(tl.int64)
        o_ptrs = OUT + o_rows[:, None] * DV + dvv[None, :]
        tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=q_real[:, None] & (dvv[None, :] < DV))
        if RETURN_LSE:
            lse = tl.where(seen, (m_i + tl.log2(l_safe)) / 1.4426950408889634, float("-inf"))
            tl.store(LSE + o_rows, lse, mask=q_real)


def default_launch(block: int) -> tuple[int, int]:
    """``(num_warps, num_stages)`` of the quantized kernel for ``BLOCK``-row tiles when the caller gives none."""
    return (4 if block <= 64 else 8), 2


def _pow2(n: int, minimum: int) -> int:
    return max(minimum, 1 << max(0, math.ceil(math.log2(max(n, 1)))))


def _quantize(x, order, mean, channel_scale, qmax, mode, out_dtype, transposed=False):
    """Launch the quantization pre-pass for one tensor ``x [B, H, N, D]`` -> (tile-major ``[B, H, T, S, D]``,
    per-tile scales ``[B, H, T]`` or ``None``). ``transposed``: every tile stored as ``[D, S]`` in memory (the result
    is a ``[B, H, T, S, D]`` view of it)."""
    b, h, n, d = x.shape
    t, sz = order.num_tiles, order.tile_size
    if transposed:
        out = torch.empty(b, h, t, d, sz, device=x.device, dtype=out_dtype)
    else:
        out = torch.empty(b, h, t, sz, d, device=x.device, dtype=out_dtype)
    tile_scale = torch.empty(b, h, t, device=x.device, dtype=torch.float32)  # written in mode 0 only
    _paro_quantize_fwd[(t, b * h)](
        x.contiguous(),
        order.index.contiguous(),
        tile_scale if mean is None else mean.contiguous(),  # placeholders are never read
        tile_scale if channel_scale is None else channel_scale.contiguous(),
        out,
        tile_scale,
        h,
        n,
        t,
        d,
        sz,
        order.num_positions if order.num_heads > 1 else 0,
        QMAX=qmax,
        MODE=mode,
        HAS_MEAN=mean is not None,
        UPCAST=x.device.type != "cuda",
        BLOCK=_pow2(sz, 16),
        BLOCK_D=_pow2(d, 16),
        TRANSPOSED=transposed,
    )
    return out.transpose(-1, -2) if transposed else out, (tile_scale if mode == 0 else None)


def _tiles_transposed(v: torch.Tensor) -> torch.Tensor:
    """``v [B, H, T, S, Dv]`` with every tile ``[Dv, S]`` contiguous in memory (the pre-pass's V; copied otherwise)."""
    vt = v.transpose(-1, -2)
    return vt if vt.is_contiguous() else vt.contiguous()


def prepare_quantized_triton(query, key, value, pattern: BlockSparsePattern, spec) -> Prepared:
    """:func:`~attnpack.kernels.paro.quant.prepare_quantized` with one fused Triton pass per tensor (gather through
    the order + smoothing + quantization), bit-identical to the PyTorch version."""
    qo, ko = pattern.q_order, pattern.kv_order
    k_mean, v_mean, v_scale = smoothing_stats(key, value, spec)
    q_q, q_scale = _quantize(query, qo, None, None, spec.qk_max, 0, torch.int8)
    k_q, k_scale = _quantize(key, ko, k_mean, None, spec.qk_max, 0, torch.int8)
    v_dtype = torch.float8_e4m3fn if spec.pv_fp8 else torch.int8
    v_q, _ = _quantize(value, ko, v_mean, v_scale, int(spec.pv_max), 2 if spec.pv_fp8 else 1, v_dtype, True)
    return Prepared(q_q, q_scale, k_q, k_scale, v_q, v_scale, v_mean, *real_masks(pattern), k_mean)


@torch.no_grad()
def quantized_triton(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    pattern: BlockSparsePattern,
    *,
    scale: float | None = None,
    return_lse: bool = False,
    quant: str = "int8",
    num_warps: int | None = None,
    num_stages: int | None = None,
):
    """Quantized block-sparse attention with the Triton kernel (same arguments and result as
    :func:`attnpack.kernels.paro.quant.quantized_reference`; ``num_warps`` / ``num_stages`` tune the launch)."""
    spec = quant_spec(quant)
    reason = triton_unusable(query, key, value, pattern, False, quant)
    if reason is not None:
        raise ValueError(f"the Triton PARO kernel cannot run: {reason}.")
    b, h, _, d = query.shape
    dv = value.shape[-1]
    scale = d**-0.5 if scale is None else scale
    prep = prepare_quantized_triton(query, key, value, pattern, spec)
    qo, ko, table = pattern.q_order, pattern.kv_order, pattern.table
    tq, tk, sz = qo.num_tiles, ko.num_tiles, qo.tile_size
    upcast = query.device.type != "cuda"
    nq = query.shape[2]
    out = torch.empty(b, h, nq, dv, device=query.device, dtype=query.dtype)
    lse = torch.empty(b, h, nq, device=query.device, dtype=torch.float32) if return_lse else out
    bt, ht, _, kk = table.kv_tiles.shape
    min_d = 16 if upcast else 32  # 8-bit mma (int8, fp8) needs k >= 32: head dims and key blocks are padded to it
    block = _pow2(sz, min_d)
    _paro_quant_attn_fwd[(tq, b * h)](
        prep.q.contiguous(),
        prep.q_scale.contiguous(),
        prep.k.contiguous(),
        prep.k_scale.contiguous(),
        _tiles_transposed(prep.v),
        prep.v_scale.contiguous(),
        prep.v_mean.contiguous(),
        qo.index.contiguous(),
        ko.index.contiguous(),
        table.kv_tiles.contiguous(),
        table.num_kv.contiguous(),
        out,
        lse,
        h,
        nq,
        tq,
        tk,
        kk,
        d,
        dv,
        sz,
        qo.num_positions if qo.num_heads > 1 else 0,
        ko.num_positions if ko.num_heads > 1 else 0,
        ht * tq * kk if bt > 1 else 0,
        tq * kk if ht > 1 else 0,
        ht * tq if bt > 1 else 0,
        tq if ht > 1 else 0,
        scale * LOG2E,
        BLOCK=block,
        BLOCK_D=_pow2(d, min_d),
        BLOCK_DV=_pow2(dv, min_d),
        PV_MAX=spec.pv_max,
        PV_FP8=spec.pv_fp8,
        UPCAST=upcast,
        RETURN_LSE=return_lse,
        num_warps=num_warps or default_launch(block)[0],
        num_stages=num_stages or default_launch(block)[1],
    )
    if not return_lse:
        return out
    return out, lse + prep.lse_shift(query, scale)
