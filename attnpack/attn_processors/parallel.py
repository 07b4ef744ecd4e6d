"""attnpack processors under diffusers' context parallelism (``model.enable_parallelism(config=...)``).

Every rank holds ``1/W`` of the sequence between attention layers (``W = ulysses_degree * ring_degree``). Dense
attention is left to diffusers (its templated Ulysses / ring / unified attention). Any other attnpack core runs in the
global frame (:func:`parallel_call`): it sees tokens in the *global* order with the global :class:`TokenLayout` (grid
from the run context, never inferred from a shard), so it runs exactly as on one process.

- **Ulysses** (:func:`ulysses_call`): the all-to-all gives every rank the whole sequence for ``H/P`` heads; the core
  runs on it and the inverse all-to-all hands each rank its own tokens back. Cores that index heads (head
  perturbation, PARO's per-head plans) read :attr:`AttentionCall.heads`. Every technique works.
- **Ring** and **unified** (``ring_degree > 1``, after the Ulysses all-to-all inside each ring rank's group)
  (:func:`ring_call`): a rank owns a shard of the queries and the core computes the rows of its own queries only
  (:attr:`AttentionCall.queries`). A core that can say which keys a set of queries reads (``keys_needed``: GNA) gets
  exactly those from the other ranks (one all-to-all); otherwise keys and values are all-gathered over the ring group
  (as diffusers' own ring attention does). A block-sparse core skips every query tile outside the shard, and with it
  every key tile that no owned query visits: with a local pattern (GNA, CLEAR) a rank computes against the
  neighbouring shards only (:func:`ring_key_reads` says which). Cores that declare ``query_subset = True`` run under
  ring attention (GNA, CLEAR); the others are refused (:func:`check_parallel_support`) with a message naming the
  fix: PARO (its per-head token reordering spreads every block over all shards, so a rank would compute every block
  anyway) and the modifiers and observers (head guidance, A-STAR's store).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch

from .context import ParallelLayout, RunState
from .families import TokenLayout


__all__ = [
    "RING_TECHNIQUES",
    "RING_TRAFFIC",
    "SUPPORTED_FAMILIES",
    "check_parallel_support",
    "global_layout",
    "needs_exchange",
    "parallel_call",
    "ring_call",
    "RingRead",
    "ring_key_reads",
    "shard_positions",
    "ulysses_call",
]

# families whose diffusers denoiser has a context-parallel plan (`_cp_plan`) that attnpack's adapters understand
SUPPORTED_FAMILIES = ("flux", "wan")
# techniques whose cores compute a subset of the queries (`query_subset = True`): they run under ring attention
RING_TECHNIQUES = ("clear", "gna")


def _core_parts(core) -> tuple:
    return tuple(getattr(core, "parts", (core,)))


def needs_exchange(core) -> bool:
    """Whether ``core`` is more than dense attention (which diffusers parallelises itself)."""
    from .processor import DenseCore

    return not all(isinstance(part, DenseCore) for part in _core_parts(core))


def _technique(processor) -> str:
    return getattr(processor, "technique", None) or type(processor.core).__name__


def check_parallel_support(model: torch.nn.Module, parallel: ParallelLayout, *, at_run: bool = False) -> None:
    """Raise a ``ValueError`` naming the technique, the setting and the fix if an attnpack processor installed on
    ``model`` cannot run under ``parallel``; called before each context-parallel denoiser call does any work
    (``at_run=True``), and by ``apply_*`` and ``enable_context_parallel`` when the other is in place already.

    ``at_run`` adds the checks of the layers left dense (their attention backend under ring attention), which only
    make sense once every technique is installed."""
    from .processor import AttnPackProcessor, core_role

    for processor in model.attn_processors.values():
        if not isinstance(processor, AttnPackProcessor) or not needs_exchange(processor.core):
            continue
        layer, name = processor.layer, _technique(processor)
        where = f"`{name}` on layer {layer.name!r}"
        if layer.family not in SUPPORTED_FAMILIES:
            raise ValueError(
                f"{where} cannot run under context parallelism on a {layer.family!r} denoiser: attnpack supports it "
                f"on {', '.join(SUPPORTED_FAMILIES)} (the diffusers models with a context-parallel plan). Run this "
                "model on one process, or shard many outputs over processes with `attnpack batch`."
            )
        if parallel.ring_degree > 1 and not all(
            getattr(p, "query_subset", False) for p in _core_parts(processor.core)
        ):
            raise ValueError(
                f"{where} does not support ring attention (ring_degree={parallel.ring_degree}): "
                f"{_ring_reason(processor.core)} Ring attention runs {' and '.join(RING_TECHNIQUES)} (and dense "
                "attention); for this technique use ContextParallelConfig(ulysses_degree=N) with ring_degree=1 "
                "(docs/multi-gpu.md)."
            )
        if parallel.anything:
            raise ValueError(
                f"{where} does not support `ulysses_anything` (uneven shards): use ulysses_anything=False with a "
                "sequence length and head count divisible by ulysses_degree."
            )
        if layer.heads % parallel.ulysses_degree:
            raise ValueError(
                f"{where}: the layer has {layer.heads} heads, not divisible by ulysses_degree="
                f"{parallel.ulysses_degree}; use a ulysses_degree that divides {layer.heads}."
            )
        if any(core_role(part) == "observer" for part in _core_parts(processor.core)):
            raise ValueError(
                f"{where} records attention maps, which under context parallelism would hold only this rank's "
                "heads; run it on one process (context parallelism is not supported for attention observers)."
            )
    if at_run and parallel.ring_degree > 1:
        _check_ring_dense_backends(model, parallel)


# diffusers backends that run under context parallelism but cannot return the log-sum-exp its ring attention merges
# partial results with (they raise at the first dense attention call under a ring degree)
NO_LSE_BACKENDS = ("native", "_native_npu")


def _check_ring_dense_backends(model: torch.nn.Module, parallel: ParallelLayout) -> None:
    """Refuse ring attention before any work when a layer that diffusers runs itself (dense attention: no technique,
    or `DenseCore`) uses a backend without log-sum-exp."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    from .processor import AttnPackProcessor

    dense = []
    for name, processor in model.attn_processors.items():
        if isinstance(processor, AttnPackProcessor) and needs_exchange(processor.core):
            continue
        if not hasattr(processor, "_attention_backend"):
            continue  # diffusers does not parallelise it either
        backend = processor._attention_backend or _AttentionBackendRegistry.get_active_backend()[0]
        backend = getattr(backend, "value", backend)
        if backend in NO_LSE_BACKENDS:
            dense.append((name.removesuffix(".processor"), backend))
    if dense:
        layer, backend = dense[0]
        raise ValueError(
            f"ring attention (ring_degree={parallel.ring_degree}) runs {len(dense)} dense attention layer(s) (no "
            f"ring-capable attnpack technique on them, e.g. {layer!r}) through diffusers' ring attention, which needs "
            f"an attention backend that returns the log-sum-exp; they use {backend!r}, which does not. Select one "
            "before the run: `attnpack.set_attention_backend(pipe, '_native_cudnn')` ('flash', 'sage', ...; command "
            "line: --attention-backend _native_cudnn), or use Ulysses (ring_degree=1)."
        )


def _ring_reason(core) -> str:
    from .paro import ParoCore

    parts = _core_parts(core)
    if any(isinstance(p, ParoCore) for p in parts):
        return (
            "its per-head token reordering spreads every attention block over all shards of the sequence, so each "
            "rank would compute every block (no saving over one process)."
        )
    return "it works on whole sequences and cannot compute only the queries a ring rank owns."


def shard_positions(local: TokenLayout, world: int, shards) -> torch.Tensor:
    """Global positions (indices into the global sequence, text and image streams regrouped) of the tokens of the
    sequence shards ``shards`` (flattened-mesh ranks), concatenated in that order, each in its local order.

    Each stream (text, image) is cut into ``world`` equal contiguous shards and rank ``c`` holds shard ``c`` of each
    (FLUX: ``[text shard, image shard]``); a single stream (Wan's video tokens) is simply cut in ``world`` pieces.
    """
    n_local = local.num_queries
    parts = []
    for c in shards:
        if local.is_cross or local.num_text == 0:
            parts.append(torch.arange(c * n_local, (c + 1) * n_local))
            continue
        text_base, image_base = (0, local.num_text * world) if local.text_first else (local.num_image * world, 0)
        pos = torch.empty(n_local, dtype=torch.int64)
        pos[local.text] = text_base + c * local.num_text + torch.arange(local.num_text)
        pos[local.image] = image_base + c * local.num_image + torch.arange(local.num_image)
        parts.append(pos)
    return torch.cat(parts)


def _global_token_layout(local: TokenLayout, world: int, run: RunState) -> TokenLayout:
    n = local.num_queries * world
    if local.is_cross:
        return TokenLayout.cross_attention(n, local.num_keys, run.grid_for(n))
    if local.num_text == 0:
        return TokenLayout.self_attention(n, run.grid_for(n))
    n_image = local.num_image * world
    grid = run.grid if run.grid is not None and run.image_len == n_image else None
    return TokenLayout.joint(n_image, local.num_text * world, grid, text_first=local.text_first)


def global_layout(
    local: TokenLayout, parallel: ParallelLayout, run: RunState
) -> tuple[TokenLayout, torch.Tensor | None]:
    """The layout of the whole sequence and the permutation ``perm`` with ``global = gathered[..., perm, :]`` (``None``
    when the gathered order is the global order already).

    After the all-to-all, the sequence is the ranks' local sequences one after the other (rank-major). Each stream
    (text, image) is sharded in order, so a stream's global order is its shards in rank order; for FLUX, whose ranks
    each hold ``[text shard, image shard]``, the streams are regrouped (``perm`` is not the identity).
    """
    p = parallel.ulysses_degree
    layout = _global_token_layout(local, p, run)
    if local.is_cross or local.num_text == 0:
        return layout, None
    return layout, torch.argsort(shard_positions(local, p, range(p)))


def _seq_to_heads(x: torch.Tensor, group) -> torch.Tensor:
    """``[B, H, N/P, D]`` (all heads, a shard of the tokens) -> ``[B, H/P, N, D]`` (this rank's heads, all tokens)."""
    from diffusers.models.attention_dispatch import SeqAllToAllDim

    return SeqAllToAllDim.apply(group, x.transpose(1, 2).contiguous(), 2, 1).transpose(1, 2)


def _heads_to_seq(x: torch.Tensor, group) -> torch.Tensor:
    """Inverse of :func:`_seq_to_heads`."""
    from diffusers.models.attention_dispatch import SeqAllToAllDim

    return SeqAllToAllDim.apply(group, x.transpose(1, 2).contiguous(), 1, 2).transpose(1, 2)


def parallel_call(core, query, key, value, call, parallel: ParallelLayout) -> torch.Tensor:
    """Run ``core`` under ``parallel``: :func:`ulysses_call` without ring degree, else :func:`ring_call`."""
    if call.mask is not None:
        raise ValueError(
            f"layer {call.layer.name!r} got an attention mask from the model; attnpack techniques under context "
            "parallelism support unmasked attention only. Run this model on one process."
        )
    if parallel.ring_degree > 1:
        return ring_call(core, query, key, value, call, parallel)
    return ulysses_call(core, query, key, value, call, parallel)


def ulysses_call(core, query, key, value, call, parallel: ParallelLayout) -> torch.Tensor:
    """Run ``core`` on the whole sequence for this rank's heads (Ulysses), return this rank's tokens, all heads.

    ``query`` / ``key`` / ``value``: ``[B, H, N/P, D]`` as the adapter prepared them on this rank. Cross-attention
    keys (text, replicated on every rank) are not exchanged: this rank's heads are sliced out of them.
    """

    group = parallel.ulysses_group
    heads = parallel.heads(query.shape[1])
    layout, perm = global_layout(call.layout, parallel, call.run)
    if perm is not None:
        perm = perm.to(query.device)

    def to_global(x):
        x = _seq_to_heads(x, group)
        return x if perm is None else x.index_select(2, perm)

    q = to_global(query)
    if call.layout.is_cross:
        k, v = key[:, heads], value[:, heads]
    else:
        k, v = to_global(key), to_global(value)
    local = dataclasses.replace(call, layout=layout, parallel=False, heads=heads)
    out = core(q, k, v, local)
    if perm is not None:
        out = out.index_select(2, torch.argsort(perm))
    return _heads_to_seq(out.contiguous(), group)


def _ring_all_gather(x: torch.Tensor, parallel: ParallelLayout) -> torch.Tensor:
    """``[B, H, n, D]`` on every ring rank -> ``[B, H, R * n, D]``, ring ranks in order."""
    import torch.distributed._functional_collectives as funcol

    gathered = funcol.all_gather_tensor(x.contiguous(), gather_dim=0, group=parallel.ring_group)
    return torch.cat(gathered.chunk(parallel.ring_degree), dim=2)


@dataclasses.dataclass
class RingTraffic:
    """Keys and values a rank received from the other ring ranks, counted in tokens (diagnostics, tests)."""

    received: int = 0  # remote tokens received
    remote: int = 0  # remote tokens that exist (what an all-gather receives)

    def reset(self) -> None:
        self.received = self.remote = 0


RING_TRAFFIC = RingTraffic()


def _ring_keys(core, k, v, held, call, parallel: ParallelLayout):
    """Every key and value this rank's queries may read, in global order (``[B, h, N, D]``; unread rows are zeros).

    A core with ``keys_needed(positions, call)`` (a ``bool [N]`` over the global keys, ``None`` for all) gets exactly
    the tokens its queries' tiles visit: every rank works out what every other rank needs (the same computation on
    all ranks: no extra messages) and sends each only those rows, in one ``all_to_all`` with per-peer sizes. Without
    it, or with gradients, the keys are all-gathered (as diffusers' ring attention does).
    """
    import torch.distributed as dist

    me, ring = parallel.ring_rank, parallel.ring_degree
    n = call.layout.num_keys
    wanted = None
    needs = getattr(core, "keys_needed", None)
    grad = torch.is_grad_enabled() and (k.requires_grad or v.requires_grad)
    if needs is not None and not grad:
        wanted = [needs(torch.sort(positions).values, call) for positions in held]
        wanted = None if any(w is None for w in wanted) else wanted
    remote = sum(h.numel() for j, h in enumerate(held) if j != me)
    RING_TRAFFIC.remote += remote
    if wanted is None:
        RING_TRAFFIC.received += remote
        order = torch.argsort(torch.cat(held))
        return _ring_all_gather(k, parallel).index_select(2, order), _ring_all_gather(v, parallel).index_select(
            2, order
        )
    dk = k.shape[-1]
    kv = torch.cat([k, v], dim=-1)
    sends, takes = [], []
    for j in range(ring):
        mine = j == me  # nothing to oneself
        sends.append(held[me][:0] if mine else torch.nonzero(wanted[j].to(held[me].device)[held[me]]).flatten())
        takes.append(held[j][:0] if mine else held[j][wanted[me].to(held[j].device)[held[j]]])
    rows = kv.movedim(2, 0)  # [tokens, B, h, D]: all_to_all_single splits dim 0
    outgoing = rows.index_select(0, torch.cat(sends)).contiguous()
    incoming = rows.new_empty((sum(t.numel() for t in takes), *rows.shape[1:]))
    # one collective in which every ring rank takes part (zero-size parts included), so no rank can wait alone
    dist.all_to_all_single(
        incoming, outgoing, [t.numel() for t in takes], [t.numel() for t in sends], group=parallel.ring_group
    )
    full = kv.new_zeros(kv.shape[0], kv.shape[1], n, kv.shape[3]).index_copy_(2, held[me], kv)
    full.index_copy_(2, torch.cat(takes), incoming.movedim(0, 2))
    RING_TRAFFIC.received += incoming.shape[0]
    return full[..., :dk].contiguous(), full[..., dk:].contiguous()


def ring_call(core, query, key, value, call, parallel: ParallelLayout) -> torch.Tensor:
    """Run ``core`` for this rank's queries against every key (ring and unified attention).

    ``query`` / ``key`` / ``value``: ``[B, H, N/W, D]`` as the adapter prepared them on this rank. With a Ulysses
    degree ``U > 1`` the Ulysses all-to-all runs first (this rank then holds ``H/U`` heads of the ``U`` shards of its
    ring rank, diffusers' unified layout). Keys and values come from the other ring ranks in global order
    (:func:`_ring_keys`: only the rows the core's ``keys_needed`` names, else all of them); queries are placed at their
    global positions in an otherwise zero tensor, and the core (``query_subset``) computes only the rows
    :attr:`AttentionCall.queries`. Cross-attention keys (text, replicated) are not exchanged.
    """
    u, ring_rank, world = parallel.ulysses_degree, parallel.ring_rank, parallel.world
    heads = parallel.heads(query.shape[1])
    q, k, v = query, key, value
    if u > 1:
        q = _seq_to_heads(q, parallel.ulysses_group)
        if not call.layout.is_cross:
            k, v = _seq_to_heads(k, parallel.ulysses_group), _seq_to_heads(v, parallel.ulysses_group)
    layout = _global_token_layout(call.layout, world, call.run)
    # the global positions of every ring rank's tokens (after the Ulysses exchange: its U shards, in order)
    held = [
        shard_positions(call.layout, world, range(j * u, (j + 1) * u)).to(q.device)
        for j in range(parallel.ring_degree)
    ]
    owned, rank_of = torch.sort(held[ring_rank])
    local = dataclasses.replace(call, layout=layout, parallel=False, heads=heads, queries=owned)
    if call.layout.is_cross:
        k, v = key[:, heads], value[:, heads]
    else:
        k, v = _ring_keys(core, k, v, held, local, parallel)
    q_full = q.new_zeros(q.shape[0], q.shape[1], layout.num_queries, q.shape[3]).index_copy_(2, held[ring_rank], q)
    out = core(q_full, k, v, local)
    if out.shape[2] != owned.numel():
        raise RuntimeError(
            f"{core!r} returned {out.shape[2]} rows for {owned.numel()} owned queries under ring attention."
        )
    out = out.index_select(2, torch.argsort(rank_of))
    return _heads_to_seq(out.contiguous(), parallel.ulysses_group) if u > 1 else out


class RingRead(NamedTuple):
    """What one ring rank reads of the keys (:func:`ring_key_reads`)."""

    shards: list[int]  # the ring ranks whose keys its queries visit (its own included); the others cost no compute
    remote_fraction: float  # the share of the other ranks' key tokens it receives (1.0: an all-gather's)


def ring_key_reads(pattern, ring_degree: int) -> list[RingRead]:
    """For a block-sparse ``pattern`` over one stream (Wan's video tokens) under ring attention of ``ring_degree``
    (each ring rank owns a contiguous ``1 / ring_degree`` of the queries, also under unified attention): per ring
    rank, the key shards its queries visit and the share of remote key tokens it receives (:func:`ring_call` sends
    exactly the tokens of the visited key tiles)."""
    n = pattern.num_queries
    if n % ring_degree:
        raise ValueError(f"{n} queries do not split into ring_degree={ring_degree} equal shards.")
    per = n // ring_degree
    reads = []
    for r in range(ring_degree):
        keys = pattern.for_queries(torch.arange(r * per, (r + 1) * per)).visited_keys()[:n]
        shards = [j for j in range(ring_degree) if bool(keys[j * per : (j + 1) * per].any())]
        remote = int(keys.sum()) - int(keys[r * per : (r + 1) * per].sum())
        reads.append(RingRead(shards, remote / max(n - per, 1)))
    return reads
