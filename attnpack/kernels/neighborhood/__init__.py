"""Generalized neighborhood attention (GNA), with NATTEN 0.21 semantics, on ``[B, H, N, D]`` tensors.

Paper: Hassani et al., "Generalized Neighborhood Attention: Multi-dimensional Sparse Attention at the Speed of
Light", https://arxiv.org/abs/2504.16922. The pattern (windows shifted inward at borders, stride groups sharing their
leader's window, causal windows ending at the query, dilation as interleaved sub-grids) is described in
:mod:`attnpack.kernels.neighborhood.windows`; the fast backends run it through :func:`attnpack.kernels.block_sparse_attention`.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .._checks import check_qkv, per_axis
from ..block_sparse import BlockSparsePattern, block_sparse_attention, choose_backend
from .reference import neighborhood_reference
from .windows import NeighborhoodSpec, default_tile_shape, neighborhood_pattern


logger = logging.getLogger(__name__)

__all__ = [
    "neighborhood_attention",
    "normalize_neighborhood_args",
    "cached_neighborhood_pattern",
    "cpu_backend_choice",
    "BACKENDS",
]

BACKENDS = ("reference", "tiled", "flex", "triton")

IntOrTuple = int | Sequence[int]
BoolOrTuple = bool | Sequence[bool]


def normalize_neighborhood_args(
    grid_shape: Sequence[int],
    window_size: IntOrTuple,
    stride: IntOrTuple = 1,
    dilation: IntOrTuple = 1,
    is_causal: BoolOrTuple = False,
) -> NeighborhoodSpec:
    """Check GNA arguments as NATTEN's ``utils/checks.py`` does and return the normalised :class:`NeighborhoodSpec`.

    ``window_size`` may use ``-1`` for the full extent of an axis. Errors name the argument, its value and the grid.
    """
    if isinstance(grid_shape, int) and not isinstance(grid_shape, bool):
        grid_shape = (grid_shape,)
    if (
        not isinstance(grid_shape, Sequence)
        or not 1 <= len(grid_shape) <= 3
        or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in grid_shape)
    ):
        raise ValueError(f"`grid_shape` must be a tuple of 1, 2 or 3 positive ints, got grid_shape={grid_shape!r}.")
    grid = tuple(grid_shape)
    ndim = len(grid)
    where = f" of grid_shape={grid}"
    window = per_axis("window_size", window_size, ndim, where=where)
    window = tuple(n if k == -1 else k for k, n in zip(window, grid))
    stride = per_axis("stride", stride, ndim, where=where)
    dilation = per_axis("dilation", dilation, ndim, where=where)
    causal = per_axis("is_causal", is_causal, ndim, kind=bool, where=where)
    if any(k < 2 for k in window):
        raise ValueError(
            f"`window_size` must be >= 2 (or -1 for the full axis) along every axis, got window_size={window} for "
            f"grid_shape={grid}."
        )
    if any(d < 1 for d in dilation):
        raise ValueError(f"`dilation` must be >= 1 along every axis, got dilation={dilation} for grid_shape={grid}.")
    if any(s < 1 for s in stride):
        raise ValueError(f"`stride` must be >= 1 along every axis, got stride={stride} for grid_shape={grid}.")
    if any(k * d > n for n, k, d in zip(grid, window, dilation)):
        raise ValueError(
            "The product of `window_size` and `dilation` cannot be larger than the grid along any axis, got "
            f"window_size={window}, dilation={dilation} for grid_shape={grid}. Use a smaller window (or -1 for a full "
            "axis), or rescale it to the grid (apply_gna's `base_size`)."
        )
    if any(s > k for k, s in zip(window, stride)):
        raise ValueError(
            f"`stride` cannot be larger than `window_size` along any axis, got stride={stride}, window_size={window} "
            f"for grid_shape={grid}."
        )
    return NeighborhoodSpec(grid, window, stride, dilation, causal)


@functools.lru_cache(maxsize=64)
def _pattern_cached(spec, q_tile, kv_tile, num_extra, device) -> BlockSparsePattern:
    return neighborhood_pattern(spec, q_tile=q_tile, kv_tile=kv_tile, num_extra=num_extra, device=device)


def cached_neighborhood_pattern(
    spec: NeighborhoodSpec,
    *,
    q_tile: Sequence[int] | None = None,
    kv_tile: Sequence[int] | None = None,
    num_extra: int = 0,
    device: torch.device | str = "cpu",
) -> BlockSparsePattern:
    """:func:`~attnpack.kernels.neighborhood.windows.neighborhood_pattern`, cached per (spec, tiles, extra keys, device)."""
    device = torch.device(device)
    q_tile = tuple(q_tile) if q_tile is not None else default_tile_shape(spec.grid, device.type)
    kv_tile = tuple(kv_tile) if kv_tile is not None else q_tile
    for name, t in (("q_tile_shape", q_tile), ("kv_tile_shape", kv_tile)):
        if len(t) != spec.ndim or not all(isinstance(x, int) and x >= 1 for x in t):
            raise ValueError(f"`{name}` must be {spec.ndim} positive ints (one per axis), got {name}={t!r}.")
    return _pattern_cached(spec, q_tile, kv_tile, num_extra, str(device))


# CPU choice between the two PyTorch paths: the tiled one computes every key of the (padded) key-tile list of a query
# tile, the reference one gathers exactly the keys each query needs, at a higher cost per key. Measured on 2 shared
# CPU cores, fp32 (benchmarks/cpu_dispatch.py, docs/benchmarks.md): the reference path was faster where the tiles hold
# 4.4x (32x32 w9 + 64 text), 11.8x (64x64 w7; 8x32x32 w(3,7,7)) the needed keys, the tiled one at 3.4x (128x128 w13)
CPU_REFERENCE_ABOVE = 4.0


def cpu_backend_choice(
    spec: NeighborhoodSpec,
    num_extra: int = 0,
    q_tile: Sequence[int] | None = None,
    kv_tile: Sequence[int] | None = None,
) -> tuple[str, float]:
    """``("reference" | "tiled", ratio)``: the automatic CPU backend and the ratio it is decided on, keys computed per
    query by the tiled path (the longest key-tile list, as the tiled path pads every list to it) over the keys a
    query needs (window plus additional keys); above :data:`CPU_REFERENCE_ABOVE` the reference path is chosen."""
    pattern = cached_neighborhood_pattern(spec, q_tile=q_tile, kv_tile=kv_tile, num_extra=num_extra, device="cpu")
    tiled = pattern.table.kv_tiles.shape[-1] * pattern.kv_tile
    ratio = tiled / (math.prod(spec.window) + num_extra)
    return ("reference" if ratio > CPU_REFERENCE_ABOVE else "tiled"), ratio


def _check_tensors(query, key, value, additional_keys, additional_values, grid) -> None:
    check_qkv(query, key, value, n_hint="N = prod(grid_shape)")
    n = math.prod(grid)
    if query.shape[2] != n or key.shape[2] != n:
        raise ValueError(
            f"query, key and value must hold N = prod(grid_shape) = {n} tokens for grid_shape={tuple(grid)}, got "
            f"{query.shape[2]}, {key.shape[2]}, {value.shape[2]}."
        )
    if (additional_keys is None) != (additional_values is None):
        raise ValueError("`additional_keys` and `additional_values` must be either both tensors or both None.")
    if additional_keys is None:
        return
    for name, t, ref in (("additional_keys", additional_keys, key), ("additional_values", additional_values, value)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"`{name}` must be a [B, H, M, D] tensor, got {type(t).__name__}.")
        if t.device != ref.device or t.dtype != ref.dtype:
            raise ValueError(f"`{name}` must be on {ref.device} with dtype {ref.dtype}, got {t.device}, {t.dtype}.")
        if t.shape[:2] != ref.shape[:2] or t.shape[3] != ref.shape[3]:
            raise ValueError(
                f"`{name}` must match {'key' if ref is key else 'value'} in batch, heads and head dim: expected "
                f"[{ref.shape[0]}, {ref.shape[1]}, M, {ref.shape[3]}], got {list(t.shape)}."
            )
    if additional_keys.shape[2] != additional_values.shape[2]:
        raise ValueError(
            "`additional_keys` and `additional_values` must hold the same number of tokens, got "
            f"{additional_keys.shape[2]} and {additional_values.shape[2]}."
        )


def _dense(query, key, value, additional_keys, additional_values, scale, causal):
    if additional_keys is not None:
        key = torch.cat([key, additional_keys], dim=2)
        value = torch.cat([value, additional_values], dim=2)
    return F.scaled_dot_product_attention(query, key, value, is_causal=causal, scale=scale)


def neighborhood_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    grid_shape: Sequence[int],
    window_size: IntOrTuple,
    stride: IntOrTuple = 1,
    dilation: IntOrTuple = 1,
    is_causal: BoolOrTuple = False,
    additional_keys: torch.Tensor | None = None,
    additional_values: torch.Tensor | None = None,
    scale: float | None = None,
    backend: str | None = None,
    q_tile_shape: Sequence[int] | None = None,
    kv_tile_shape: Sequence[int] | None = None,
) -> torch.Tensor:
    """Generalized neighborhood attention (GNA) with NATTEN's ``na1d`` / ``na2d`` / ``na3d`` semantics.

    Paper: https://arxiv.org/abs/2504.16922. Every query attends the Cartesian product of its per-axis windows, plus
    every additional key. Along an axis of length ``n`` with window ``k``, stride ``s``, dilation ``d``:
    non-causal windows hold ``k // 2`` keys before and ``k // 2 + k % 2 - 1`` after the window centre and are shifted
    inward at the borders (never padded); queries in groups of ``s`` share the window of their leader (the centre of
    the group; the last query when causal); causal windows end at the query; dilation splits the axis into ``d``
    interleaved sub-grids. Full windows on every axis (non-causal) equal plain self-attention.

    Parameters:
        query, key, value: ``[B, H, N, D]`` (value ``[B, H, N, Dv]``) with ``N = prod(grid_shape)`` tokens in
            row-major order of the grid.
        grid_shape: the token grid, 1, 2 or 3 axes (e.g. ``(H, W)`` or ``(F, H, W)``).
        window_size: window per axis (an int for all axes, or one per axis); ``-1`` = the full axis.
        stride: stride per axis, ``1 <= stride <= window``.
        dilation: dilation per axis, ``window * dilation <= n``.
        is_causal: causal flag per axis.
        additional_keys, additional_values: ``[B, H, M, D]`` / ``[B, H, M, Dv]`` tokens every query attends on top
            of its neighborhood (e.g. text tokens).
        scale: softmax scale, default ``D ** -0.5``.

    Other Parameters:
        backend: ``"reference"`` (pure PyTorch: every query gathers its own window; memory ``O(N x window)``;
            differentiable), ``"tiled"`` (pure PyTorch on the block-sparse tiles: faster on CPU, memory
            ``O(N x keys visited per tile)``, differentiable), ``"flex"`` (FlexAttention; backward on CUDA),
            ``"triton"`` (fused forward kernel; CUDA, or ``TRITON_INTERPRET=1``), or ``None``: full windows run
            dense SDPA, otherwise Triton on CUDA when no gradient is needed, flex on CUDA; elsewhere ``"tiled"``,
            or ``"reference"`` where the tiles would compute over 4x the keys a query needs
            (:func:`cpu_backend_choice`). The choice is logged at DEBUG level.
        q_tile_shape, kv_tile_shape: N-D tile shapes of the tiled / flex / Triton backends (default on CUDA:
            NATTEN's 128-token tiles, 1-D ``(128,)``, 2-D ``(16, 8)``, 3-D ``(2, 8, 8)``; elsewhere 64-token tiles;
            shrunk on small axes).

    Returns:
        ``[B, H, N, Dv]`` in the input dtype.
    """
    spec = normalize_neighborhood_args(grid_shape, window_size, stride, dilation, is_causal)
    _check_tensors(query, key, value, additional_keys, additional_values, spec.grid)
    return neighborhood_attention_spec(
        query, key, value, spec, additional_keys=additional_keys, additional_values=additional_values, scale=scale,
        backend=check_backend(backend), q_tile_shape=q_tile_shape, kv_tile_shape=kv_tile_shape,
    )  # fmt: skip


def check_backend(backend: str | None) -> str | None:
    """``backend`` if it names a GNA backend (:data:`BACKENDS`) or is ``None``; else an error listing them."""
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"`backend` must be one of {', '.join(map(repr, BACKENDS))} or None, got {backend!r}.")
    return backend


def neighborhood_attention_spec(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    spec: NeighborhoodSpec,
    *,
    additional_keys: torch.Tensor | None = None,
    additional_values: torch.Tensor | None = None,
    scale: float | None = None,
    backend: str | None = None,
    q_tile_shape: Sequence[int] | None = None,
    kv_tile_shape: Sequence[int] | None = None,
    query_positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`neighborhood_attention` for callers that already hold checked inputs: a :class:`NeighborhoodSpec`
    from :func:`normalize_neighborhood_args`, tensors of the right shapes, a backend from :func:`check_backend`
    (the GNA processor normalises once per grid and calls this on every layer and step).

    ``query_positions``: ``int64 [n]``, sorted flattened grid indices: only these queries are computed (the other
    rows of ``query`` are never read for output) and the result is ``[B, H, n, Dv]``. Ring attention uses it: a rank
    owns a shard of the queries and holds every key; query tiles without any of them are skipped."""
    num_extra = 0 if additional_keys is None else additional_keys.shape[2]
    if backend is None and (spec.is_full() or (spec.is_plain_causal() and num_extra == 0)):
        if query_positions is None:
            logger.debug("neighborhood_attention: full window on every axis of %s; using dense SDPA", spec.grid)
            return _dense(query, key, value, additional_keys, additional_values, scale, spec.is_plain_causal())
        if spec.is_full():
            q = query.index_select(2, query_positions.to(query.device))
            return _dense(q, key, value, additional_keys, additional_values, scale, False)
    if query_positions is not None:
        query_positions = query_positions.to(query.device)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (query, key, value, additional_keys, additional_values)
    )
    if backend == "reference":
        return neighborhood_reference(
            query, key, value, spec, additional_keys=additional_keys, additional_values=additional_values, scale=scale,
            query_positions=query_positions,
        )  # fmt: skip
    if backend is None and query.device.type != "cuda":
        backend, ratio = cpu_backend_choice(spec, num_extra, q_tile_shape, kv_tile_shape)
        logger.debug(
            "neighborhood_attention: backend not set; picked %r on %s (tiles hold %.1fx the keys a query needs)",
            backend,
            query.device.type,
            ratio,
        )
        if backend == "reference":
            return neighborhood_reference(
                query, key, value, spec, additional_keys=additional_keys, additional_values=additional_values,
                scale=scale, query_positions=query_positions,
            )  # fmt: skip
    pattern = cached_neighborhood_pattern(
        spec, q_tile=q_tile_shape, kv_tile=kv_tile_shape, num_extra=num_extra, device=query.device
    )
    if query_positions is not None:
        pattern = pattern.for_queries(query_positions)
    if additional_keys is not None:
        key = torch.cat([key, additional_keys], dim=2)
        value = torch.cat([value, additional_values], dim=2)
    if backend is None:
        name, skipped = choose_backend(query, key, value, pattern, needs_grad)
        logger.debug(
            "neighborhood_attention: backend not set; picked %r for grid %s%s",
            name,
            spec.grid,
            f" (skipped {'; '.join(skipped)})" if skipped else "",
        )
        backend = name
    out = block_sparse_attention(
        query, key, value, pattern, scale=scale, backend="reference" if backend == "tiled" else backend
    )
    return out if query_positions is None else out.index_select(2, query_positions)
