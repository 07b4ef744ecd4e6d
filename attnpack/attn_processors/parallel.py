"""attnpack processors under diffusers' context parallelism (``model.enable_parallelism(config=...)``).

Under Ulysses (``ContextParallelConfig(ulysses_degree=P)``) every rank holds ``1/P`` of the sequence with all heads.
Dense attention is left to diffusers (its templated Ulysses / ring / unified attention). Any other attnpack core
needs the whole sequence: the processor does the Ulysses all-to-all itself (:func:`ulysses_call`), so that the core
sees every token of ``H/P`` heads in the *global* token order with the global :class:`TokenLayout` (grid from the run
context, never inferred from a shard), runs exactly as on one process, and the inverse all-to-all hands each rank its
own tokens back. Cores that index heads (head perturbation, PARO's per-head plans) read :attr:`AttentionCall.heads`.

Ring attention (``ring_degree > 1``, alone or with Ulysses) keeps only a shard of the keys on each rank at a time:
dense attention stays correct (diffusers' ring merges partial softmaxes), attnpack's other cores are refused
(:func:`check_parallel_support`) with a message naming the fix.
"""

from __future__ import annotations

import torch

from .context import ParallelLayout, RunState
from .families import TokenLayout


__all__ = ["SUPPORTED_FAMILIES", "check_parallel_support", "global_layout", "needs_exchange", "ulysses_call"]

# families whose diffusers denoiser has a context-parallel plan (`_cp_plan`) that attnpack's adapters understand
SUPPORTED_FAMILIES = ("flux", "wan")


def _core_parts(core) -> tuple:
    return tuple(getattr(core, "parts", (core,)))


def needs_exchange(core) -> bool:
    """Whether ``core`` is more than dense attention (which diffusers parallelises itself)."""
    from .processor import DenseCore

    return not all(isinstance(part, DenseCore) for part in _core_parts(core))


def _technique(processor) -> str:
    return getattr(processor, "technique", None) or type(processor.core).__name__


def check_parallel_support(model: torch.nn.Module, parallel: ParallelLayout) -> None:
    """Raise a ``ValueError`` naming the technique, the setting and the fix if an attnpack processor installed on
    ``model`` cannot run under ``parallel``; called before each context-parallel denoiser call does any work, and by
    ``apply_*`` when the model is parallel already."""
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
        if parallel.ring_degree > 1:
            raise ValueError(
                f"{where} does not support ring attention (ring_degree={parallel.ring_degree}): its attention "
                "pattern needs every key of its heads on one rank, and ring attention only ever holds one shard of "
                "the keys. Use ContextParallelConfig(ulysses_degree=N) with ring_degree=1 (docs/multi-gpu.md)."
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
    n_local = local.num_queries
    n = n_local * p
    if local.is_cross:
        return TokenLayout.cross_attention(n, local.num_keys, run.grid_for(n)), None
    if local.num_text == 0:
        return TokenLayout.self_attention(n, run.grid_for(n)), None
    n_text, n_image = local.num_text * p, local.num_image * p
    grid = run.grid if run.grid is not None and run.image_len == n_image else None
    layout = TokenLayout.joint(n_image, n_text, grid, text_first=local.text_first)
    offsets = (torch.arange(p) * n_local)[:, None]
    text = (offsets + torch.arange(local.text.start, local.text.stop)[None]).flatten()
    image = (offsets + torch.arange(local.image.start, local.image.stop)[None]).flatten()
    perm = torch.cat([text, image] if local.text_first else [image, text])
    return layout, perm


def _seq_to_heads(x: torch.Tensor, group) -> torch.Tensor:
    """``[B, H, N/P, D]`` (all heads, a shard of the tokens) -> ``[B, H/P, N, D]`` (this rank's heads, all tokens)."""
    from diffusers.models.attention_dispatch import SeqAllToAllDim

    return SeqAllToAllDim.apply(group, x.transpose(1, 2).contiguous(), 2, 1).transpose(1, 2)


def _heads_to_seq(x: torch.Tensor, group) -> torch.Tensor:
    """Inverse of :func:`_seq_to_heads`."""
    from diffusers.models.attention_dispatch import SeqAllToAllDim

    return SeqAllToAllDim.apply(group, x.transpose(1, 2).contiguous(), 1, 2).transpose(1, 2)


def ulysses_call(core, query, key, value, call, parallel: ParallelLayout) -> torch.Tensor:
    """Run ``core`` on the whole sequence for this rank's heads (Ulysses), return this rank's tokens, all heads.

    ``query`` / ``key`` / ``value``: ``[B, H, N/P, D]`` as the adapter prepared them on this rank. Cross-attention
    keys (text, replicated on every rank) are not exchanged: this rank's heads are sliced out of them.
    """
    import dataclasses

    if call.mask is not None:
        raise ValueError(
            f"layer {call.layer.name!r} got an attention mask from the model; attnpack techniques under context "
            "parallelism support unmasked attention only. Run this model on one process."
        )
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
