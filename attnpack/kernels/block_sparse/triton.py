"""Fused block-sparse attention forward kernel in Triton.

One program per (query block, batch x head). Its rows arrive in one of two ways:

- **permuted** (where tensor descriptors apply: Hopper-class GPUs, head dims up to 128): the wrapper copies Q, K, V
  once into tile-major order (every tile a run of contiguous rows) and the kernel reads them, and writes O, through
  tensor descriptors (TMA), the output being permuted back afterwards (issue 22: the gathered loads below compile to
  plain ``LDG``, the descriptor loads to ``UTMALDG``);
- **gathered** (elsewhere, or ``permute=False``): the token permutation is fused into the loads and stores, rows are
  read from and written to their original positions through the orders, no copy is made.

It then walks the tile table: first the *full* key tiles with no mask code at all, then, in a second loop, the
*partial* ones, where padding and the pattern's in-tile mask are applied: a tile-local mask (``TileMask.
triton_tile_fn``: key coordinates from the tile id and compile-time in-tile positions, what GNA and CLEAR use) or an
index mask on original key indices (``TileMask.triton_fn``). Softmax is the usual online (flash) softmax in fp32
with ``exp2``.

Runs on CUDA, and on CPU in the Triton interpreter (``TRITON_INTERPRET=1``, set before importing triton), where
operands are upcast to fp32 before ``tl.dot`` (bf16 dots are wrong in the interpreter). Forward only.
"""

from __future__ import annotations

import functools
import logging
import math
import os

import torch
import triton
import triton.language as tl

from .pattern import BlockSparsePattern


__all__ = ["block_sparse_triton", "triton_unusable", "interpreting"]

logger = logging.getLogger(__name__)

MAX_HEAD_DIM = 256
# tensor descriptors up to head_dim 128: at 256 the staged Q / K / V / O tiles need more than the 227 KiB of shared
# memory a Hopper block can have (328 KiB at blocks (128, 64), 2 stages: benchmarks/kernel_resources.py)
MAX_TMA_HEAD_DIM = 128


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
def _load_kv(k_base, v_base, KD, VD, b, h, n0, rows, in_range, stride_kn, stride_vn, offs_d, offs_dv, d_ok, dv_ok,
             BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, USE_TMA: tl.constexpr,
             PARTIAL: tl.constexpr):  # fmt: skip
    """K^T ``[BLOCK_D, BLOCK_N]`` and V ``[BLOCK_N, BLOCK_DV]`` of key ``rows`` (``int64 [BLOCK_N]``; ``in_range``:
    rows that exist, checked on partial tiles only). ``USE_TMA``: the contiguous rows ``n0 .. n0 + BLOCK_N`` through
    tensor descriptors (TMA on Hopper; rows past the end read as zeros)."""
    if USE_TMA:
        k = tl.reshape(KD.load([b, h, n0, 0]), [BLOCK_N, BLOCK_D])
        v = tl.reshape(VD.load([b, h, n0, 0]), [BLOCK_N, BLOCK_DV])
        return tl.trans(k), v
    if PARTIAL:
        k = tl.load(
            k_base + rows[None, :] * stride_kn + offs_d[:, None], mask=in_range[None, :] & d_ok[:, None], other=0.0
        )
        v = tl.load(
            v_base + rows[:, None] * stride_vn + offs_dv[None, :], mask=in_range[:, None] & dv_ok[None, :], other=0.0
        )
    else:  # full tiles hold no padding
        k = tl.load(k_base + rows[None, :] * stride_kn + offs_d[:, None], mask=d_ok[:, None], other=0.0)
        v = tl.load(v_base + rows[:, None] * stride_vn + offs_dv[None, :], mask=dv_ok[None, :], other=0.0)
    return k, v


@triton.jit
def _attend_tiles(
    tbl, i0, i1, q, q_idx, q_mask, m_i, l_i, acc, qk_scale, b, h, MP, k_base, v_base, KD, VD, KI, ki_base, NK, NKI,
    stride_kn, stride_vn, offs_d, offs_dv, d_ok, dv_ok,
    KV_TILE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    KV_GATHER: tl.constexpr, USE_TMA: tl.constexpr, MASK_FN: tl.constexpr, MASK_LOCAL: tl.constexpr,
    MASK_ARGS: tl.constexpr, PARTIAL: tl.constexpr, DOT_F32: tl.constexpr,
):  # fmt: skip
    """Online softmax over table entries ``[i0, i1)`` (each key tile in ``KV_TILE // BLOCK_N`` blocks). Full tiles use
    no mask and read no key index. On partial tiles: a tile-local mask (``MASK_LOCAL``: ``MASK_FN(b, h, q_mask, tile,
    offs, MP, MASK_ARGS)`` from the tile id and the compile-time in-tile positions ``offs``; it masks padding too), or
    the index mask ``MASK_FN(b, h, q_mask, kv_idx, MP)`` on the original key indices (``-1``: padding, masked) read
    through the key order ``KI`` (``None``: identity order of ``NKI`` keys)."""
    offs_t = tl.arange(0, BLOCK_N)
    q_ok = q_idx >= 0
    for i in range(i0, i1):
        kt = tl.load(tbl + i)
        for j in tl.static_range(KV_TILE // BLOCK_N):
            offs_local = j * BLOCK_N + offs_t
            n0 = kt * KV_TILE + j * BLOCK_N
            offs_n = n0 + offs_t
            if KV_GATHER:
                kv_idx = tl.load(ki_base + offs_n)
                in_range = kv_idx >= 0
                if PARTIAL:
                    rows = tl.where(in_range, kv_idx, 0).to(tl.int64)
                else:
                    rows = kv_idx.to(tl.int64)
            else:
                in_range = offs_n < NK
                rows = offs_n.to(tl.int64)
                if PARTIAL:
                    if not MASK_LOCAL:
                        if KI is None:
                            kv_idx = tl.where(offs_n < NKI, offs_n, -1)
                        else:
                            kv_idx = tl.load(ki_base + offs_n)
            k, v = _load_kv(
                k_base, v_base, KD, VD, b.to(tl.int32), h.to(tl.int32), n0, rows, in_range, stride_kn, stride_vn,
                offs_d, offs_dv, d_ok, dv_ok, BLOCK_N, BLOCK_D, BLOCK_DV, USE_TMA, PARTIAL,
            )  # fmt: skip
            keep = q_ok[:, None]
            if PARTIAL:
                if MASK_LOCAL:
                    keep = MASK_FN(b, h, q_mask, kt, offs_local, MP, MASK_ARGS)
                else:
                    kv_ok = kv_idx >= 0
                    keep = kv_ok[None, :] & (q_idx[:, None] >= -1)
                    if MASK_FN is not None:
                        keep = keep & MASK_FN(b, h, q_mask, tl.where(kv_ok, kv_idx, 0)[None, :], MP)
            m_i, l_i, acc = _tile_update(q, k, v, m_i, l_i, acc, qk_scale, keep, PARTIAL, DOT_F32)
    return m_i, l_i, acc


@triton.jit
def _block_sparse_fwd(
    Q, K, V, Out, LSE, QD, KD, VD, OD, QI, KI, TBL, NKV, NFULL, MP,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_on,
    stride_qih, stride_kih,
    stride_tb, stride_th, stride_tq,
    stride_cb, stride_ch,
    H, NQ, NK, NQI, NKI, qk_scale,
    Q_TILE: tl.constexpr, KV_TILE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    Q_GATHER: tl.constexpr, KV_GATHER: tl.constexpr, USE_TMA: tl.constexpr,
    MASK_FN: tl.constexpr, MASK_ROWS_FN: tl.constexpr, MASK_LOCAL: tl.constexpr, MASK_ARGS: tl.constexpr,
    HAS_LSE: tl.constexpr, DOT_F32: tl.constexpr,
):  # fmt: skip
    # one program: BLOCK_M query rows (a part of query tile q_tile) x one (batch, head).
    # Data rows: gathered through QI / KI (``*_GATHER``), else contiguous (NQ / NK rows: identity orders, or inputs
    # already permuted into tile-major order). Original indices for masks: QI / KI when given (``NQI`` / ``NKI``: the
    # lengths of the orders when they are not), else the positions themselves.
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    q_tile = pid_m // (Q_TILE // BLOCK_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    if QI is None:
        q_idx = tl.where(offs_m < NQI, offs_m, -1)
    else:
        q_idx = tl.load(QI + h * stride_qih + offs_m)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    d_ok = offs_d < HEAD_DIM
    dv_ok = offs_dv < HEAD_DIM_V
    if Q_GATHER:
        q_ok = q_idx >= 0
        q_rows = tl.where(q_ok, q_idx, 0).to(tl.int64)
    else:
        q_ok = offs_m < NQ
        q_rows = offs_m.to(tl.int64)
    row0 = pid_m * BLOCK_M
    if USE_TMA:
        q = tl.reshape(QD.load([b.to(tl.int32), h.to(tl.int32), row0, 0]), [BLOCK_M, BLOCK_D])
    else:
        q = tl.load(
            Q + b * stride_qb + h * stride_qh + q_rows[:, None] * stride_qn + offs_d[None, :],
            mask=q_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    if KI is None:
        ki_base = KI
    else:
        ki_base = KI + h * stride_kih
    tbl = TBL + b * stride_tb + h * stride_th + q_tile * stride_tq
    n_kv = tl.load(NKV + b * stride_cb + h * stride_ch + q_tile)
    n_full = tl.load(NFULL + b * stride_cb + h * stride_ch + q_tile)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)

    # the mask's per-row work (e.g. GNA windows) once per query block, not once per key block
    q_mask = tl.where(q_idx >= 0, q_idx, 0)[:, None]
    if MASK_ROWS_FN is not None:
        q_mask = MASK_ROWS_FN(b, h, q_mask, MP)

    # full tiles first (every pair visible, no padding: no mask at all), then partial tiles (padding + in-tile mask)
    m_i, l_i, acc = _attend_tiles(
        tbl, 0, n_full, q, q_idx, q_mask, m_i, l_i, acc, qk_scale, b, h, MP, k_base, v_base, KD, VD, KI, ki_base,
        NK, NKI, stride_kn, stride_vn, offs_d, offs_dv, d_ok, dv_ok, KV_TILE, BLOCK_N, BLOCK_D, BLOCK_DV, KV_GATHER,
        USE_TMA, None, False, None, False, DOT_F32,
    )  # fmt: skip
    m_i, l_i, acc = _attend_tiles(
        tbl, n_full, n_kv, q, q_idx, q_mask, m_i, l_i, acc, qk_scale, b, h, MP, k_base, v_base, KD, VD, KI, ki_base,
        NK, NKI, stride_kn, stride_vn, offs_d, offs_dv, d_ok, dv_ok, KV_TILE, BLOCK_N, BLOCK_D, BLOCK_DV, KV_GATHER,
        USE_TMA, MASK_FN, MASK_LOCAL, MASK_ARGS, True, DOT_F32,
    )  # fmt: skip

    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    out = (acc / l_safe[:, None]).to(Out.dtype.element_ty)
    if USE_TMA:
        OD.store([b.to(tl.int32), h.to(tl.int32), row0, 0], tl.reshape(out, [1, 1, BLOCK_M, BLOCK_DV]))
    else:
        tl.store(
            Out + b * stride_ob + h * stride_oh + q_rows[:, None] * stride_on + offs_dv[None, :],
            out,
            mask=q_ok[:, None] & dv_ok[None, :],
        )
    if HAS_LSE:
        lse = tl.where(l_i > 0.0, (m_i + tl.math.log2(l_safe)) * 0.6931471805599453, float("-inf"))
        tl.store(LSE + pid_bh.to(tl.int64) * NQ + q_rows, lse, mask=q_ok)


# Opt-in tuning space (``backend_options={"autotune": True}``). Every config is compiled on the first use of a tile
# shape, so the space is kept small: with the earlier 24-config space the first full-size test on an H200 did not
# finish in about 6 minutes (compile time the suspected cause; not verified).
_TUNING_SPACE = (
    (128, 64, 8, 2),
    (128, 64, 8, 3),
    (128, 128, 8, 2),
    (128, 32, 4, 2),
    (64, 64, 4, 2),
    (64, 64, 4, 3),
    (64, 128, 4, 2),
    (64, 32, 4, 2),
)  # (BLOCK_M, BLOCK_N, num_warps, num_stages)


def _descriptor_blocks(nargs) -> None:
    """Autotuning pre-hook: the tensor descriptors' block shapes follow the config's ``BLOCK_M`` / ``BLOCK_N``."""
    _set_descriptor_blocks(nargs, nargs["BLOCK_M"], nargs["BLOCK_N"])


def _set_descriptor_blocks(args, bm: int, bn: int) -> None:
    for name, rows, width in (
        ("QD", bm, "BLOCK_D"),
        ("KD", bn, "BLOCK_D"),
        ("VD", bn, "BLOCK_DV"),
        ("OD", bm, "BLOCK_DV"),
    ):
        if args.get(name) is not None:
            args[name].block_shape = [1, 1, rows, args[width]]


def _configs():
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=st, pre_hook=_descriptor_blocks)
        for m, n, w, st in _TUNING_SPACE
    ]


def default_blocks(
    q_tile: int, kv_tile: int, head_dim: int, cuda: bool, itemsize: int = 2, masked: bool = False
) -> tuple[int, int, int, int]:
    """``(BLOCK_M, BLOCK_N, num_warps, num_stages)`` used without tuning. On CUDA: FlashAttention-style blocks of at
    most 128 query x 128 key rows (64 key rows below head_dim 128 and for fp32), 8 warps for 128-row blocks at
    head_dim >= 128, 3 pipeline stages for 16-bit inputs (the best of 8 configs on an H200 for GNA at head_dim 128:
    docs/benchmarks.md); in the interpreter: whole tiles. ``masked`` (the pattern has an in-tile mask): 8 warps for
    128-row blocks at every head dim (compiled for sm_90 at head_dim 64, 4 warps spill in the masked loop, 8 do not:
    ``benchmarks/kernel_resources.py``)."""
    if not cuda:
        return q_tile, kv_tile, 4, 2
    wide = head_dim >= 128 and itemsize <= 2
    bm, bn = min(q_tile, 128), min(kv_tile, 128 if wide else 64)
    return bm, bn, (8 if bm >= 128 and (head_dim >= 128 or masked) else 4), (3 if itemsize <= 2 else 2)


def _prune(configs, named_args, **kwargs):
    """Keep block sizes that divide the tiles (a query / key tile is split into whole blocks)."""
    q_tile, kv_tile = kwargs.get("Q_TILE", named_args.get("Q_TILE")), kwargs.get("KV_TILE", named_args.get("KV_TILE"))
    kept = [
        c
        for c in configs
        if c.kwargs["BLOCK_M"] <= q_tile
        and q_tile % c.kwargs["BLOCK_M"] == 0
        and c.kwargs["BLOCK_N"] <= kv_tile
        and kv_tile % c.kwargs["BLOCK_N"] == 0
    ]
    return kept or [
        triton.Config({"BLOCK_M": q_tile, "BLOCK_N": kv_tile}, num_warps=4, num_stages=2, pre_hook=_descriptor_blocks)
    ]


@functools.cache
def _tuned_kernel():
    return triton.autotune(
        configs=_configs(),
        key=["Q_TILE", "KV_TILE", "BLOCK_D", "BLOCK_DV", "Q_GATHER", "KV_GATHER", "USE_TMA", "DOT_F32", "HAS_LSE"],
        prune_configs_by={"early_config_prune": _prune},
    )(_block_sparse_fwd)


def _is_pow2(x: int) -> bool:
    return x >= 1 and x & (x - 1) == 0


def triton_unusable(query, key, value, pattern: BlockSparsePattern, needs_grad: bool) -> str | None:
    """Why the Triton kernel cannot run this call (``None``: it can)."""
    if query.device.type != "cuda" and not interpreting():
        return "the Triton kernel needs a CUDA device (or TRITON_INTERPRET=1 set before importing triton)"
    if needs_grad:
        return "the Triton kernel is forward-only; use backend='flex' (CUDA) or 'reference' for gradients"
    mask = pattern.mask
    if mask is not None and mask.triton_fn is None and mask.triton_tile_fn is None:
        return f"the pattern's mask {mask.name!r} has no Triton version (TileMask.triton_fn)"
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


def _tma_device(t: torch.Tensor, *dims: int) -> bool:
    """Whether tensor descriptors can serve ``t``'s device at these head dims: a Hopper-class GPU (or the
    interpreter), head dims up to :data:`MAX_TMA_HEAD_DIM` with 16-byte rows."""
    if t.device.type == "cuda":
        if torch.cuda.get_device_capability(t.device)[0] < 9:
            return False
    elif not interpreting():
        return False
    return all(d <= MAX_TMA_HEAD_DIM and (d * t.element_size()) % 16 == 0 for d in dims)


def _tma_ok(*tensors: torch.Tensor) -> bool:
    """Whether tensor descriptors (TMA) can address these ``[B, H, N, D]`` tensors: :func:`_tma_device`, 16-byte
    aligned base addresses and strides, unit stride along ``D``."""
    if not _tma_device(tensors[0], *(t.shape[-1] for t in tensors)):
        return False
    for t in tensors:
        size = t.element_size()
        if t.stride(-1) != 1 or t.data_ptr() % 16 or any((s * size) % 16 for s in t.stride()[:-1]):
            return False
    return True


def _to_tile_major(order, x: torch.Tensor) -> torch.Tensor:
    """``[B, H, N, D]`` -> ``[B, H, P, D]`` in tile-major order, one gather pass. Padding positions get a copy of
    token 0 (finite; the kernel masks them) instead of zeros: :meth:`TokenOrder.permute` would add a pass."""
    idx = order.index.clamp(min=0).long()
    if order.num_heads == 1:
        return x.index_select(2, idx[0])
    b, h, _, d = x.shape
    return torch.gather(x, 2, idx[None, :, :, None].expand(b, h, -1, d))


def _from_tile_major(inv: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``[B, H, P, D]`` (tile-major) -> ``[B, H, N, D]`` through the inverse order ``inv`` ``[Hi, N]``."""
    if inv.shape[0] == 1:
        return y.index_select(2, inv[0])
    b, h, _, d = y.shape
    return torch.gather(y, 2, inv[None, :, :, None].expand(b, h, -1, d))


def _descriptor(t: torch.Tensor):
    from triton.tools.tensor_descriptor import TensorDescriptor

    # block shape set per launch (_set_descriptor_blocks): [1, 1, rows, padded head dim]
    return TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, 16, 16])


def block_sparse_triton(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    pattern: BlockSparsePattern,
    *,
    scale: float | None = None,
    return_lse: bool = False,
    autotune: bool | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    permute: bool | None = None,
    tma: bool | None = None,
):
    """Block-sparse attention with the fused Triton kernel (see :func:`attnpack.kernels.block_sparse_attention`).

    Other options (``backend_options``): ``autotune`` tunes the block sizes (query / key tiles are split into
    ``BLOCK_M`` / ``BLOCK_N`` blocks), ``num_warps`` and ``num_stages`` per tile shape (default off: each of the
    8 configs is compiled on the first call of a tile shape); without
    tuning, ``block_m`` / ``block_n`` (default: :func:`default_blocks`).
    ``permute``: copy Q / K / V into tile-major order first (one gather pass each, and one for the output) so that
    every tile is a run of contiguous rows the kernel loads with tensor descriptors; ``False`` fuses the gathers into
    the kernel's loads instead (no copies, plain gathered loads). Default: permute when an order is not the identity
    and the permuted rows can be read through tensor descriptors. ``tma``: load contiguous rows through tensor
    descriptors (default: where possible: Hopper-class GPUs and the interpreter, head dims up to 128, 16-byte aligned
    rows and strides); ``False`` also keeps the gathers fused unless ``permute=True``.
    """
    bsz, heads, nq, dim = query.shape
    dv = value.shape[-1]
    scale = dim**-0.5 if scale is None else scale
    query, key, value = (t if t.stride(-1) == 1 else t.contiguous() for t in (query, key, value))
    table = pattern.table
    q_gather, kv_gather = _order_gathers(pattern)
    if permute is None:  # permuting pays where it makes the rows descriptor loads; else the gathers stay fused
        permute = (q_gather or kv_gather) and tma is not False and _tma_device(query, dim, dv)
    permute = bool(permute)
    qi = pattern.q_order.index.expand(heads, -1) if q_gather else None
    ki = pattern.kv_order.index.expand(heads, -1) if kv_gather else None
    q_permuted = permute and q_gather
    if permute:
        if q_gather:
            query = _to_tile_major(pattern.q_order, query)
        if kv_gather:
            key, value = _to_tile_major(pattern.kv_order, key), _to_tile_major(pattern.kv_order, value)
        q_gather = kv_gather = False  # data rows are now positions; qi / ki still give the original indices
    rows_q, rows_k = query.shape[2], key.shape[2]
    out = torch.empty(bsz, heads, rows_q, dv, device=query.device, dtype=query.dtype)
    lse = torch.empty(bsz, heads, rows_q, device=query.device, dtype=torch.float32) if return_lse else out
    use_tma = not (q_gather or kv_gather) and (tma is not False) and _tma_ok(query, key, value, out)
    if tma and not use_tma:
        raise ValueError(
            "`tma=True` needs contiguous rows (identity orders or `permute`), a Hopper-class GPU or the interpreter, "
            "and 16-byte aligned strides."
        )
    descs = [_descriptor(t) for t in (query, key, value, out)] if use_tma else [None] * 4
    tiles = table.kv_tiles.expand(bsz, heads, -1, -1)
    nkv = table.num_kv.expand(bsz, heads, -1)
    nfull = table.num_full.expand(bsz, heads, -1)
    mask = pattern.mask
    local = mask is not None and mask.triton_tile_fn is not None
    params = mask.params if mask is not None and mask.params is not None else table.num_kv
    interp = interpreting()
    use_tuning = bool(autotune)
    if use_tuning and interp:
        raise ValueError("`autotune` needs a CUDA device; the Triton interpreter cannot time kernels.")
    q_tile, kv_tile = pattern.q_tile, pattern.kv_tile
    block_d, block_dv = max(16, triton.next_power_of_2(dim)), max(16, triton.next_power_of_2(dv))
    if use_tuning:
        kernel, extra = _tuned_kernel(), {}
    else:
        dbm, dbn, warps, stages = default_blocks(
            q_tile, kv_tile, max(dim, dv), query.device.type == "cuda" and not interp, query.element_size(), local
        )
        bm, bn = block_m or dbm, block_n or dbn
        if q_tile % bm or kv_tile % bn or not (_is_pow2(bm) and _is_pow2(bn)) or min(bm, bn) < 16:
            raise ValueError(
                f"`block_m` / `block_n` must be powers of two >= 16 dividing the tiles ({q_tile}, {kv_tile}); "
                f"got {bm}, {bn}."
            )
        kernel, extra = _block_sparse_fwd, {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": warps, "num_stages": stages}
        names = dict(zip(("QD", "KD", "VD", "OD"), descs), BLOCK_D=block_d, BLOCK_DV=block_dv)
        _set_descriptor_blocks(names, bm, bn)

    def grid(meta):
        return (table.num_q_tiles * (q_tile // meta["BLOCK_M"]), bsz * heads)

    def launch(**extra):
        kernel[grid](*args, **kw, **extra)

    args = (
        query, key, value, out, lse, *descs, qi, ki, tiles, nkv, nfull, params,
        query.stride(0), query.stride(1), query.stride(2),
        key.stride(0), key.stride(1), key.stride(2),
        value.stride(0), value.stride(1), value.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        qi.stride(0) if qi is not None else 0, ki.stride(0) if ki is not None else 0,
        tiles.stride(0), tiles.stride(1), tiles.stride(2),
        nkv.stride(0), nkv.stride(1),
        heads, rows_q, rows_k, pattern.q_order.num_tokens, pattern.kv_order.num_tokens, scale * math.log2(math.e),
    )  # fmt: skip
    kw = dict(
        Q_TILE=q_tile, KV_TILE=kv_tile,
        HEAD_DIM=dim, HEAD_DIM_V=dv, BLOCK_D=block_d, BLOCK_DV=block_dv,
        Q_GATHER=q_gather, KV_GATHER=kv_gather, USE_TMA=use_tma,
        MASK_FN=(mask.triton_tile_fn if local else mask.triton_fn) if mask is not None else None,
        MASK_ROWS_FN=mask.triton_rows_fn if mask is not None else None,
        MASK_LOCAL=local, MASK_ARGS=mask.tile_args if local else None,
        HAS_LSE=return_lse, DOT_F32=interp or query.dtype == torch.float32,
    )  # fmt: skip
    try:
        launch(**extra)
    except triton.runtime.errors.OutOfResources:
        if use_tuning or extra["num_stages"] <= 1:
            raise
        # a deeper software pipeline than the shared memory holds (e.g. large head dims with descriptors): one
        # stage less, said at DEBUG level
        logger.debug("block_sparse_triton: out of shared memory with %d stages; retrying with %d", extra["num_stages"],
                     extra["num_stages"] - 1)  # fmt: skip
        launch(**{**extra, "num_stages": extra["num_stages"] - 1})
    if q_permuted:  # back to the caller's order (the inverse permutation cached with the pattern)
        if "q_inverse" not in pattern._cache:
            pattern._cache["q_inverse"] = pattern.q_order.inverse()
        inv = pattern._cache["q_inverse"]
        out = _from_tile_major(inv, out)
        lse = _from_tile_major(inv, lse[..., None])[..., 0] if return_lse else lse
    return (out, lse) if return_lse else out
