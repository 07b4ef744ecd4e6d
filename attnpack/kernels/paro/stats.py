"""PARO calibration statistics: per-block attention statistics, the order-selection metric and block masks.

Paper: https://arxiv.org/abs/2506.16054 (Sec. 3.2-3.3, Eq. 1-3). Everything here works on post-softmax attention
``P`` cut into ``block_size x block_size`` blocks of a token order, and never materialises ``P``: query rows are
processed in chunks and reduced to block statistics right away.

- :func:`block_statistics`: per-block sum, max and count of near-zero entries of ``P`` for several token orders at
  once (``P`` is computed once per chunk).
- :func:`order_metrics`: block sparsity (fraction of blocks with at least ``sigma`` of their entries below ``eps``;
  ``sigma`` defaults to 0.99 instead of the paper's ~0.9, see :data:`DEFAULT_SIGMA`) and block incoherence (mean over blocks of ``max|P| / mean|P|``).
- :func:`combined_scores` / :class:`OrderSearch`: the selection rule. The paper minimises
  ``alpha * sparsity + (1 - alpha) * incoherence``, which would favour orders with *fewer* sparse blocks (a sign
  slip); attnpack minimises ``alpha * (1 - sparsity) / max(1 - sparsity) + (1 - alpha) * incoherence /
  max(incoherence)``, both normalised over the candidate orders of the head.
- :func:`forced_blocks` / :func:`select_block_masks`: static masks that keep the heaviest blocks until a density is
  reached, always keeping the diagonal, the text rows and columns and the last block row and column.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from ..block_sparse import TokenOrder, grid_order
from .orders import axis_order, axis_order_names


__all__ = [
    "BlockStatistics",
    "block_statistics",
    "order_metrics",
    "combined_scores",
    "select_orders",
    "OrderSearch",
    "forced_blocks",
    "select_block_masks",
    "mask_from_codes",
    "MASK_RULES",
]

DEFAULT_CHUNK_ELEMENTS = 1 << 25
# The paper's reading gives sigma ~ 0.9; with it a block whose every 10th entry is large (strided attention, the
# pattern of a wrongly ordered head) counts as sparse, and wrong orders won on planted inputs (docs/paro.md).
DEFAULT_SIGMA = 0.99
MASK_RULES = ("threshold", "row")


@dataclasses.dataclass
class BlockStatistics:
    """Statistics of ``P`` per (head, query block, key block), summed over the batch.

    Attributes:
        sum: ``[H, Tq, Tk]`` sum of the entries (the block's attention mass).
        max: ``[H, Tq, Tk]`` largest entry.
        small: ``[H, Tq, Tk]`` number of entries below ``eps``.
        entries: ``[H, Tq, Tk]`` number of (real query, real key) entries (padding excluded), times the batch size.
    """

    sum: torch.Tensor
    max: torch.Tensor
    small: torch.Tensor
    entries: torch.Tensor


def _tile_counts(order: TokenOrder) -> torch.Tensor:
    """``[Hi, T]`` number of real tokens per tile."""
    return (order.index >= 0).view(order.num_heads, order.num_tiles, order.tile_size).sum(-1)


@torch.no_grad()
def block_statistics(
    query: torch.Tensor,
    key: torch.Tensor,
    orders: Sequence[TokenOrder],
    *,
    span: slice | None = None,
    scale: float | None = None,
    eps: float = 1e-3,
    sum_only: bool = False,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> list[BlockStatistics]:
    """Per-block statistics of ``P = softmax(query @ key^T * scale)`` under several token orders.

    Args:
        query / key: ``[B, H, N, D]`` (self-attention: the same token sequence).
        orders: token orders of the tokens in ``span`` (indices relative to ``span.start``), each shared (``Hi = 1``)
            or per head (``Hi = H``); query and key blocks use the same order.
        span: the tokens the orders describe (default: all). The softmax still runs over all ``N`` keys; only rows and
            columns inside ``span`` are reduced (e.g. the video tokens of a text + video attention).
        scale: softmax scale, default ``D ** -0.5``.
        eps: threshold of a "near-zero" entry (counted in :attr:`BlockStatistics.small`).
        sum_only: compute only :attr:`BlockStatistics.sum` (the others are returned empty).
        chunk_elements: bound on the entries of one chunk of ``P`` (``B * H * rows * N``).

    Returns:
        one :class:`BlockStatistics` per order, fp32 on the inputs' device.
    """
    b, h, n, d = query.shape
    scale = d**-0.5 if scale is None else scale
    span = slice(0, n) if span is None else span
    s0, s1 = span.start or 0, n if span.stop is None else span.stop
    ns = s1 - s0
    device = query.device
    outs, prepared = [], []
    for order in orders:
        if order.num_tokens != ns:
            raise ValueError(f"an order has {order.num_tokens} tokens, but the span holds {ns}.")
        if order.num_heads not in (1, h):
            raise ValueError(f"an order has {order.num_heads} per-head rows; the inputs have {h} heads.")
        order = order.to(device)
        tq = order.num_tiles
        real = order.index >= 0
        gather_idx = torch.where(real, order.index, ns).long()  # padding -> an appended zero column
        tile_of_token = order.inverse() // order.tile_size  # [Hi, ns]
        counts = _tile_counts(order).float()
        entries = b * counts[:, :, None] * counts[:, None, :]
        shape = (h, tq, tq)
        empty = torch.empty(0, device=device)
        out = BlockStatistics(
            sum=torch.zeros(shape, device=device),
            max=empty if sum_only else torch.zeros(shape, device=device),
            small=empty if sum_only else torch.zeros(shape, device=device),
            entries=entries.expand(shape).contiguous(),
        )
        outs.append(out)
        prepared.append((order, real, gather_idx, tile_of_token))

    rows = max(1, chunk_elements // max(1, b * h * n))
    heads = torch.arange(h, device=device)[:, None]
    for r0 in range(s0, s1, rows):
        r1 = min(s1, r0 + rows)
        c = r1 - r0
        scores = torch.matmul(query[:, :, r0:r1].float(), key.float().transpose(-1, -2)) * scale
        p = torch.softmax(scores, dim=-1)[..., s0:s1]
        p = torch.cat([p, p.new_zeros(b, h, c, 1)], dim=-1)  # [B, H, c, ns + 1]
        for (order, real, gather_idx, tile_of_token), out in zip(prepared, outs):
            tq, sz = order.num_tiles, order.tile_size
            if order.num_heads == 1:
                g = p.index_select(-1, gather_idx[0])
            else:
                g = torch.gather(p, -1, gather_idx[None, :, None, :].expand(b, h, c, -1))
            g = g.view(b, h, c, tq, sz)
            rows_tile = tile_of_token[:, r0 - s0 : r1 - s0].expand(h, c)  # query block of each row
            flat = (heads * tq + rows_tile).reshape(-1)
            out.sum.view(h * tq, tq).index_add_(0, flat, g.sum(-1).sum(0).reshape(h * c, tq))
            if sum_only:
                continue
            src = flat[:, None].expand(-1, tq)
            out.max.view(h * tq, tq).scatter_reduce_(0, src, g.amax(-1).amax(0).reshape(h * c, tq), "amax")
            small = ((g < eps) & real.view(-1, 1, tq, sz)).sum(-1).sum(0).float()
            out.small.view(h * tq, tq).index_add_(0, flat, small.reshape(h * c, tq))
    return outs


def order_metrics(stats: BlockStatistics, *, sigma: float = DEFAULT_SIGMA) -> tuple[torch.Tensor, torch.Tensor]:
    """PARO's block sparsity and block incoherence of each head (paper Eq. 1-2).

    Returns ``(sparsity, incoherence)``, each ``[H]``: the fraction of blocks in which at least ``sigma`` of the
    entries are near zero (higher: more skippable blocks), and the mean over blocks holding attention of
    ``max / mean`` (lower: easier to quantize with one scale per block).
    """
    valid = stats.entries > 0
    sparse = valid & (stats.small >= sigma * stats.entries)
    sparsity = sparse.flatten(1).sum(-1) / valid.flatten(1).sum(-1).clamp(min=1)
    held = valid & (stats.sum > 0)
    mean = stats.sum / stats.entries.clamp(min=1)
    ratio = torch.where(held, stats.max / torch.where(held, mean, 1.0), 0.0)
    incoherence = ratio.flatten(1).sum(-1) / held.flatten(1).sum(-1).clamp(min=1)
    return sparsity, incoherence


def combined_scores(sparsity: torch.Tensor, incoherence: torch.Tensor, alpha: float) -> torch.Tensor:
    """The selection score of every candidate order (lower is better), ``[..., n_orders]``.

    ``alpha * (1 - sparsity) / max_o(1 - sparsity) + (1 - alpha) * incoherence / max_o(incoherence)``: the paper's
    Eq. 3 with the sparsity term turned into a cost (its published form rewards fewer sparse blocks).
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"`alpha` must be in [0, 1] (weight of sparsity vs. incoherence), got {alpha=}.")
    dense = 1.0 - sparsity
    tiny = torch.finfo(torch.float32).tiny
    a = dense / dense.amax(-1, keepdim=True).clamp(min=tiny)
    q = incoherence / incoherence.amax(-1, keepdim=True).clamp(min=tiny)
    return alpha * a + (1.0 - alpha) * q


def select_orders(scores: torch.Tensor, *, tolerance: float = 1e-9) -> torch.Tensor:
    """Index of the best (lowest) score per row; ties go to the lowest index (order 0 is the identity)."""
    best = scores.amin(-1, keepdim=True)
    candidates = scores <= best + tolerance
    return candidates.float().argmax(-1)  # first True


class OrderSearch:
    """Accumulates the order-selection metrics of one layer over calibration calls.

    Args:
        grid: the ``(F, H, W)`` or ``(H, W)`` token grid of the layer's image / video tokens.
        heads: number of heads.
        block_size: block size of the statistics (the kernel tile, 64 in the paper).
        eps / sigma: a block is sparse when at least ``sigma`` of its entries are below ``eps``.
    """

    def __init__(
        self, grid: Sequence[int], heads: int, block_size: int, *, eps: float = 1e-3, sigma: float = DEFAULT_SIGMA
    ):
        self.grid = tuple(int(g) for g in grid)
        self.names = axis_order_names(len(self.grid))
        self.heads = heads
        self.block_size = block_size
        self.eps = eps
        self.sigma = sigma
        n = len(self.names)
        self.sparsity_sum = torch.zeros(heads, n, dtype=torch.float64)
        self.incoherence_sum = torch.zeros(heads, n, dtype=torch.float64)
        self.count = 0
        self._orders: dict[str, list[TokenOrder]] = {}

    def candidate_orders(self, device) -> list[TokenOrder]:
        key = str(device)
        if key not in self._orders:
            self._orders[key] = [
                grid_order(self.grid, self.block_size, axis_order=axis_order(i, len(self.grid)), device=device)
                for i in range(len(self.names))
            ]
        return self._orders[key]

    @torch.no_grad()
    def update(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        *,
        span: slice | None = None,
        scale: float | None = None,
        chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    ) -> None:
        """Add one attention call: ``query`` / ``key`` ``[B, H, N, D]``, the grid tokens at ``span``."""
        stats = block_statistics(
            query,
            key,
            self.candidate_orders(query.device),
            span=span,
            scale=scale,
            eps=self.eps,
            chunk_elements=chunk_elements,
        )
        for i, st in enumerate(stats):
            sp, inc = order_metrics(st, sigma=self.sigma)
            self.sparsity_sum[:, i] += sp.double().cpu()
            self.incoherence_sum[:, i] += inc.double().cpu()
        self.count += 1

    def metrics(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean ``(sparsity, incoherence)`` over the calls seen, each ``[H, n_orders]``."""
        n = max(self.count, 1)
        return (self.sparsity_sum / n).float(), (self.incoherence_sum / n).float()

    def select(self, alpha: float = 0.5) -> torch.Tensor:
        """The chosen order index per head, ``int64 [H]``."""
        if self.count == 0:
            raise RuntimeError("OrderSearch.select() before any update(): no attention call was recorded.")
        return select_orders(combined_scores(*self.metrics(), alpha))


def forced_blocks(num_tiles: int, text_tiles: range | None = None, *, device=None) -> torch.Tensor:
    """Blocks every PARO mask keeps, bool ``[T, T]``: the diagonal, the last block row and column, and the rows and
    columns of the text blocks."""
    forced = torch.eye(num_tiles, dtype=torch.bool, device=device)
    forced[-1, :] = True
    forced[:, -1] = True
    if text_tiles is not None and len(text_tiles):
        forced[text_tiles.start : text_tiles.stop, :] = True
        forced[:, text_tiles.start : text_tiles.stop] = True
    return forced


def select_block_masks(
    mass: torch.Tensor,
    densities: Sequence[float],
    forced: torch.Tensor,
    *,
    rule: str = "threshold",
) -> torch.Tensor:
    """Nested static block masks for several densities, encoded as one code per block.

    Args:
        mass: ``[H, Tq, Tk]`` accumulated attention mass per block (in the layer's chosen order).
        densities: target fractions of kept blocks, strictly increasing, each in ``(0, 1]``.
        forced: bool ``[Tq, Tk]`` or ``[H, Tq, Tk]``: blocks always kept (see :func:`forced_blocks`).
        rule: ``"threshold"``: per head, keep the heaviest blocks until ``density * Tq * Tk`` blocks are kept (one
            mass threshold per head, as in the paper); ``"row"``: the same within every query-block row
            (``density * Tk`` blocks per row: balanced kernel work).

    Returns:
        ``uint8 [H, Tq, Tk]``: the index of the smallest density whose mask contains the block, or
        ``len(densities)`` when only the density-1 mask does. Masks are nested: a block kept at one density is kept at
        every larger one. When the forced blocks alone exceed a density, that mask is just the forced blocks.
    """
    if rule not in MASK_RULES:
        raise ValueError(f"`mask_rule` must be one of {', '.join(MASK_RULES)}, got {rule!r}.")
    dens = [float(d) for d in densities]
    if not dens or any(not 0.0 < d <= 1.0 for d in dens) or any(a >= b for a, b in zip(dens, dens[1:])):
        raise ValueError(f"`densities` must be strictly increasing values in (0, 1], got {list(densities)}.")
    h, tq, tk = mass.shape
    forced = forced.to(mass.device).expand(h, tq, tk)
    score = torch.where(forced, torch.inf, mass.float())
    if rule == "threshold":
        flat = score.reshape(h, tq * tk)
        total = tq * tk
    else:
        flat = score.reshape(h * tq, tk)
        total = tk
    order = torch.sort(flat, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(flat.shape[-1], device=flat.device).expand_as(order))
    n_forced = forced.reshape(flat.shape).sum(-1, keepdim=True)
    codes = torch.full(flat.shape, len(dens), dtype=torch.uint8, device=mass.device)
    for level in reversed(range(len(dens))):
        keep = rank < torch.clamp(n_forced, min=int(dens[level] * total + 0.5))
        codes[keep] = level
    return codes.view(h, tq, tk)


def mask_from_codes(codes: torch.Tensor, level: int | None) -> torch.Tensor:
    """The bool mask of density level ``level`` from :func:`select_block_masks` codes (``None``: density 1)."""
    if level is None:
        return torch.ones_like(codes, dtype=torch.bool)
    return codes <= level
